// Shared helpers of the shardcast interop tests (not a test file itself: the
// node test runner only picks up *.test.mjs here).
//
// Target, from the environment (every test skips when what it needs is unset):
//   SHARDCAST_WS        ws://127.0.0.1:PORT/connection/websocket
//   SHARDCAST_HTTP      http://127.0.0.1:PORT            (server API)
//   SHARDCAST_API_KEY   sent as header X-API-Key
//   SHARDCAST_SECRET    HS256 secret of connection tokens
//   SHARDCAST_PING_SECS server ping interval (ping tests only)
//   SHARDCAST_PONG_SECS server pong timeout  (ping tests only)
//
// The npm dependencies (centrifuge, ws) are imported lazily, only by a test
// that runs: without `npm ci` in tests/interop, the files still load and skip.

import assert from 'node:assert/strict';
import { createHmac, randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';

export { sleep };

// ---------------------------------------------------------------------------
// Environment

const ENV_HELP = {
  SHARDCAST_WS: 'WebSocket endpoint, e.g. ws://127.0.0.1:PORT/connection/websocket',
  SHARDCAST_HTTP: 'HTTP API base, e.g. http://127.0.0.1:PORT',
  SHARDCAST_API_KEY: 'server API key (X-API-Key)',
  SHARDCAST_SECRET: 'HS256 connection token secret',
  SHARDCAST_PING_SECS: 'server ping interval in seconds',
  SHARDCAST_PONG_SECS: 'server pong timeout in seconds',
};

/**
 * Returns the target config, or null after marking the test skipped when one
 * of the `needed` environment variables is unset.
 */
export function target(t, needed = ['SHARDCAST_WS', 'SHARDCAST_SECRET']) {
  const missing = needed.filter((k) => !process.env[k]);
  if (missing.length > 0) {
    t.skip(
      `no shardcast target: set ${missing.map((k) => `${k} (${ENV_HELP[k]})`).join(', ')}`,
    );
    return null;
  }
  const num = (k) => (process.env[k] ? Number(process.env[k]) : undefined);
  return {
    ws: process.env.SHARDCAST_WS,
    http: process.env.SHARDCAST_HTTP ? process.env.SHARDCAST_HTTP.replace(/\/+$/, '') : undefined,
    apiKey: process.env.SHARDCAST_API_KEY,
    secret: process.env.SHARDCAST_SECRET,
    pingSecs: num('SHARDCAST_PING_SECS'),
    pongSecs: num('SHARDCAST_PONG_SECS'),
  };
}

export const ALL_BUT_PING = ['SHARDCAST_WS', 'SHARDCAST_HTTP', 'SHARDCAST_API_KEY', 'SHARDCAST_SECRET'];

export function nonce() {
  return randomBytes(6).toString('hex');
}

// ---------------------------------------------------------------------------
// Lazily loaded dependencies

let depsPromise = null;

export function deps() {
  if (depsPromise === null) {
    depsPromise = Promise.all([import('centrifuge'), import('ws')]).then(
      ([centrifuge, ws]) => ({ Centrifuge: centrifuge.Centrifuge, centrifuge, WebSocket: ws.WebSocket }),
      (err) => {
        throw new Error(
          `cannot load the interop test dependencies (${err.message}): run \`npm ci\` in tests/interop`,
        );
      },
    );
  }
  return depsPromise;
}

// ---------------------------------------------------------------------------
// Tokens (HS256 JWT, minted with node:crypto)

const b64url = (buf) => Buffer.from(buf).toString('base64url');

export function signJwt(secret, payload) {
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify(payload));
  const sig = createHmac('sha256', secret).update(`${header}.${body}`).digest('base64url');
  return `${header}.${body}.${sig}`;
}

/** A connection token: `sub` user, `exp` (default: in one hour), optional `info`, `channels`. */
export function connToken(secret, { sub, exp, info, channels } = {}) {
  const payload = { sub: sub ?? '', exp: exp ?? Math.floor(Date.now() / 1000) + 3600 };
  if (info !== undefined) payload.info = info;
  if (channels !== undefined) payload.channels = channels;
  return signJwt(secret, payload);
}

// ---------------------------------------------------------------------------
// Waiting

/** Polls `cond` until it returns a truthy value, or fails with `what` after `ms`. */
export async function waitUntil(cond, ms, what) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() >= deadline) {
      throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    }
    await sleep(10);
  }
}

/**
 * Waits for one of several events of `emitter`. `handlers` maps an event name
 * to a function of its ctx: returning a value other than undefined resolves
 * with it, throwing rejects, returning undefined keeps waiting. All listeners
 * and the timer are removed once settled.
 */
export function waitOutcome(emitter, handlers, ms, what) {
  return new Promise((resolve, reject) => {
    const listeners = [];
    const finish = (settle, value) => {
      clearTimeout(timer);
      for (const [event, listener] of listeners) emitter.off(event, listener);
      settle(value);
    };
    for (const [event, handler] of Object.entries(handlers)) {
      const listener = (ctx) => {
        let result;
        try {
          result = handler(ctx);
        } catch (err) {
          finish(reject, err);
          return;
        }
        if (result !== undefined) finish(resolve, result);
      };
      emitter.on(event, listener);
      listeners.push([event, listener]);
    }
    const timer = setTimeout(
      () => finish(reject, new Error(`timed out after ${ms} ms waiting for ${what}`)),
      ms,
    );
  });
}

/** Resolves with the ctx of the first `event` of `emitter` accepted by `pred`. */
export function waitEvent(emitter, event, ms, pred = () => true) {
  return waitOutcome(emitter, { [event]: (ctx) => (pred(ctx) ? ctx : undefined) }, ms, `'${event}' event`);
}

/** Index and values of the first place two arrays differ, for failure messages. */
export function firstDifference(actual, expected) {
  const n = Math.max(actual.length, expected.length);
  for (let i = 0; i < n; i++) {
    if (actual[i] !== expected[i]) {
      return `first difference at index ${i}: got ${JSON.stringify(actual[i])}, expected ${JSON.stringify(expected[i])}`
        + ` (got ${actual.length} items: ...${JSON.stringify(actual.slice(Math.max(0, i - 3), i + 4))}...)`;
    }
  }
  return 'no difference';
}

export const range = (n) => Array.from({ length: n }, (_, i) => i);

// ---------------------------------------------------------------------------
// Server HTTP API

/** POST /api/publish; returns { status, text, body }. */
export async function apiPublish(cfg, channel, data) {
  const res = await fetch(`${cfg.http}/api/publish`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'X-API-Key': cfg.apiKey },
    body: JSON.stringify({ channel, data }),
  });
  const text = await res.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = undefined;
  }
  return { status: res.status, text, body };
}

/** Publishes through the API and asserts the documented success answer. */
export async function publishOk(cfg, channel, data) {
  const r = await apiPublish(cfg, channel, data);
  assert.equal(r.status, 200, `POST /api/publish ${channel}: HTTP ${r.status} ${r.text}`);
  assert.deepEqual(r.body, { result: {} }, `POST /api/publish ${channel}: body ${r.text}`);
  return r;
}

// ---------------------------------------------------------------------------
// SDK clients

/**
 * A `ws` WebSocket subclass for the SDK: `allowSynchronousEvents: false`, so
 * that `ws` emits the frames of one TCP read on separate ticks (see the
 * README), and recording what goes over it into `rec`:
 *   rec.opened   sockets constructed (= connection attempts that got a transport)
 *   rec.frames   text of every frame received, in order
 *   rec.sent     text of every frame sent, in order
 */
export function sdkWebSocketClass(WebSocket, rec) {
  return class SdkWebSocket extends WebSocket {
    constructor(address, protocols, options) {
      super(address, protocols, { ...(options || {}), allowSynchronousEvents: false });
      rec.opened += 1;
      rec.sockets.push(this);
      this.on('message', (data, isBinary) => {
        rec.frames.push(isBinary ? data : data.toString());
      });
      this.on('close', (code, reason) => {
        rec.closes.push({ code, reason: reason.toString() });
      });
    }

    send(data, ...rest) {
      rec.sent.push(typeof data === 'string' ? data : Buffer.from(data).toString());
      return super.send(data, ...rest);
    }
  };
}

/**
 * The JSON messages in `frames` (text of WebSocket frames), in order: each frame
 * holds one or more JSON objects separated by newlines; empty lines are skipped
 * as the SDK skips them.
 */
export function wireMessages(frames) {
  return frames
    .flatMap((f) => f.split('\n'))
    .filter((line) => line.trim() !== '')
    .map((line) => JSON.parse(line));
}

/** Closes what is left of sockets: gracefully first, then terminates them. */
async function closeSockets(sockets, ms = 1000) {
  for (const s of sockets) {
    if (s.readyState === s.CONNECTING || s.readyState === s.OPEN) {
      try {
        s.close();
      } catch {
        // not open yet: terminated below
      }
    }
  }
  const deadline = Date.now() + ms;
  while (sockets.some((s) => s.readyState !== s.CLOSED) && Date.now() < deadline) {
    await sleep(10);
  }
  for (const s of sockets) {
    if (s.readyState !== s.CLOSED) s.terminate();
  }
}

/**
 * Creates a Centrifuge client (not connected yet) registered for cleanup with
 * the test `t`. Returns { client, rec, log } where `log` lists the client's
 * events in order ({ event, ctx, at }).
 */
export async function sdkClient(t, cfg, opts = {}) {
  const { Centrifuge, WebSocket } = await deps();
  const rec = { opened: 0, frames: [], sent: [], closes: [], sockets: [] };
  const { user, token, ...rest } = opts;
  const options = {
    websocket: sdkWebSocketClass(WebSocket, rec),
    name: 'js',
    timeout: 5000,
    ...rest,
  };
  if (token !== undefined) {
    options.token = token;
  } else if (!('getToken' in rest)) {
    options.token = connToken(cfg.secret, { sub: user ?? `interop-${nonce()}` });
  }
  const client = new Centrifuge(cfg.ws, options);
  const log = [];
  for (const event of ['state', 'connecting', 'connected', 'disconnected', 'error']) {
    client.on(event, (ctx) => log.push({ event, ctx, at: Date.now() }));
  }
  t.after(async () => {
    client.disconnect();
    await closeSockets(rec.sockets);
  });
  return { client, rec, log };
}

/** sdkClient() + connect(); resolves once connected, with the client id. */
export async function connectedClient(t, cfg, opts = {}) {
  const c = await sdkClient(t, cfg, opts);
  const outcome = waitOutcome(c.client, {
    connected: (ctx) => ctx,
    disconnected: (ctx) => {
      throw new Error(`client disconnected instead of connecting: ${JSON.stringify(ctx)}`);
    },
  }, 5000, 'the client to connect');
  c.client.connect();
  const ctx = await outcome;
  c.clientId = ctx.client;
  return c;
}

/**
 * Subscribes `client` to `channel` and waits for `subscribed`. `filter` picks
 * the publications kept in the returned `pubs` array (ctx.data of each).
 */
export async function subscribed(client, channel, filter = () => true, subOpts = {}) {
  const sub = client.newSubscription(channel, subOpts);
  const pubs = [];
  const ctxs = [];
  sub.on('publication', (ctx) => {
    if (filter(ctx.data)) {
      pubs.push(ctx.data);
      ctxs.push(ctx);
    }
  });
  const outcome = waitOutcome(sub, {
    subscribed: (ctx) => ctx,
    unsubscribed: (ctx) => {
      throw new Error(`subscription to ${channel} failed: ${JSON.stringify(ctx)}`);
    },
  }, 5000, `the subscription to ${channel}`);
  sub.subscribe();
  const subCtx = await outcome;
  return { sub, pubs, ctxs, subCtx };
}

// ---------------------------------------------------------------------------
// Raw protocol client (plain `ws`, protocol v2 JSON)

/**
 * A raw Centrifugo protocol v2 JSON client over `ws`, recording everything:
 *   frames   [{ at, text }] every frame received, in order
 *   messages [{ at, frame, msg }] every JSON line of them, in order (frame = index)
 *   bad      lines that did not parse as JSON
 *   pings    count of server pings ({})
 *   closed   promise of { code, reason, at } once the socket closed
 * Answers server pings with {} unless answerPings is false.
 */
export class RawClient {
  static async open(t, cfg, { answerPings = true } = {}) {
    const { WebSocket } = await deps();
    const c = new RawClient();
    c.answerPings = answerPings;
    c.ws = new WebSocket(cfg.ws);
    c.frames = [];
    c.messages = [];
    c.bad = [];
    c.pings = 0;
    c.sent = [];
    c.nextId = 1;
    c.waiters = new Set();
    c.closeInfo = null;
    c.closed = new Promise((resolve) => {
      c.ws.on('close', (code, reason) => {
        c.closeInfo = { code, reason: reason.toString(), at: Date.now() };
        resolve(c.closeInfo);
        c.notify();
      });
    });
    c.ws.on('error', (err) => {
      c.error = err;
    });
    c.ws.on('message', (data) => c.onFrame(data.toString()));
    t.after(() => closeSockets([c.ws]));
    await new Promise((resolve, reject) => {
      c.ws.once('open', resolve);
      c.ws.once('error', reject);
    });
    c.openedAt = Date.now();
    return c;
  }

  onFrame(text) {
    const at = Date.now();
    const frame = this.frames.length;
    this.frames.push({ at, text });
    for (const line of text.split('\n')) {
      if (line.trim() === '') continue;
      let msg;
      try {
        msg = JSON.parse(line);
      } catch {
        this.bad.push(line);
        continue;
      }
      this.messages.push({ at, frame, msg });
      if (msg && typeof msg === 'object' && Object.keys(msg).length === 0) {
        this.pings += 1;
        if (this.answerPings && this.ws.readyState === this.ws.OPEN) this.sendRaw('{}');
      }
    }
    this.notify();
  }

  notify() {
    for (const w of this.waiters) w();
  }

  sendRaw(text) {
    this.sent.push(text);
    this.ws.send(text);
  }

  /** Resolves with the first message (from index `from` on) accepted by pred. */
  waitMessage(pred, ms, what = 'a message', from = 0) {
    return new Promise((resolve, reject) => {
      const check = () => {
        for (let i = from; i < this.messages.length; i++) {
          if (pred(this.messages[i].msg)) {
            done();
            resolve(this.messages[i].msg);
            return;
          }
        }
        if (this.closeInfo) {
          done();
          reject(new Error(`connection closed (${JSON.stringify(this.closeInfo)}) while waiting for ${what}`));
        }
      };
      const done = () => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Error(`timed out after ${ms} ms waiting for ${what}`));
      }, ms);
      this.waiters.add(check);
      check();
    });
  }

  /** Sends a command (an id is added) and resolves with its reply (error replies too). */
  call(cmd, ms = 5000) {
    const id = this.nextId++;
    const from = this.messages.length;
    this.sendRaw(JSON.stringify({ id, ...cmd }));
    return this.waitMessage((m) => m.id === id, ms, `reply to command ${id} ${JSON.stringify(cmd)}`, from);
  }

  async connect(token, ms = 5000) {
    const reply = await this.call({ connect: { token, name: 'interop-raw' } }, ms);
    assert.equal(reply.error, undefined, `raw connect failed: ${JSON.stringify(reply)}`);
    assert.ok(reply.connect, `raw connect reply has no connect result: ${JSON.stringify(reply)}`);
    this.connectReply = reply.connect;
    return reply.connect;
  }

  async subscribe(channel, ms = 5000) {
    const reply = await this.call({ subscribe: { channel } }, ms);
    assert.equal(reply.error, undefined, `raw subscribe ${channel} failed: ${JSON.stringify(reply)}`);
    return reply.subscribe;
  }

  /** Publication pushes of `channel`, in wire order: [{ frame, data, pub }]. */
  pubs(channel) {
    return this.messages
      .filter((m) => m.msg.push && m.msg.push.pub && m.msg.push.channel === channel)
      .map((m) => ({ frame: m.frame, data: m.msg.push.pub.data, pub: m.msg.push.pub }));
  }

  /** Disconnect code of the server: a disconnect push, else the close frame. */
  disconnectInfo() {
    const push = this.messages.find((m) => m.msg.push && m.msg.push.disconnect);
    return {
      push: push ? push.msg.push.disconnect : null,
      close: this.closeInfo,
    };
  }
}

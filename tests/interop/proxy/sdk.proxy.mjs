// The official JS SDK against a server whose connect, subscribe, publish and rpc go through the
// proxies to the test backend (../backend/backend.mjs). Not a *.test.mjs file: `node --test
// tests/interop` does not pick it up (its server has no [proxy] section); tests/e2e/proxy.rs
// starts the backend and a server pointed at it and runs this file by path:
//
//   node --test --test-concurrency=1 tests/interop/proxy/sdk.proxy.mjs
//
// Environment (every test skips when one is unset):
//   SHARDCAST_WS, SHARDCAST_HTTP, SHARDCAST_API_KEY, SHARDCAST_SECRET   as in ../helpers.mjs
//   BACKEND_URL   http://127.0.0.1:PORT of the backend (its /requests record is read)
//
// The server needs: [proxy] with connect_endpoint, subscribe_endpoint, publish_endpoint and
// rpc_endpoint at BACKEND_URL/centrifugo/<name>, http_headers = ["Cookie"], and the namespace
// `chat` with subscribe_proxy = true and publish_proxy = true.
//
// The SDK runs with no token: its identity comes from the Cookie header of the WebSocket
// upgrade, which the server copies onto the connect proxy request (the `ws` class below adds
// the header, as a browser would send the site's cookie).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  target, ALL_BUT_PING, deps, sdkWebSocketClass, waitOutcome, waitEvent, waitUntil, nonce, sleep,
  publishOk, wireMessages, connectedClient,
} from '../helpers.mjs';

// ---------------------------------------------------------------------------
// Target and backend

function proxyTarget(t) {
  if (!process.env.BACKEND_URL) {
    t.skip('no backend: set BACKEND_URL (http://127.0.0.1:PORT of tests/interop/backend/backend.mjs)');
    return null;
  }
  const cfg = target(t, ALL_BUT_PING);
  if (!cfg) return null;
  return { ...cfg, backend: process.env.BACKEND_URL.replace(/\/+$/, '') };
}

/** The backend's record of proxy requests to `/centrifugo/<proxy>`. */
async function requests(cfg, proxy) {
  const res = await fetch(`${cfg.backend}/requests`);
  assert.equal(res.status, 200, `GET ${cfg.backend}/requests: HTTP ${res.status}`);
  const all = await res.json();
  return all.filter((r) => r.path === `/centrifugo/${proxy}`);
}

/** Waits until the backend has recorded a `proxy` request accepted by `pred`; returns it. */
async function recorded(cfg, proxy, pred, what) {
  let seen = [];
  try {
    return await waitUntil(async () => {
      seen = await requests(cfg, proxy);
      return seen.find(pred);
    }, 5000, `the backend to record a ${proxy} request ${what}`);
  } catch (e) {
    throw new Error(`${e.message}; it has: ${JSON.stringify(seen.map((r) => r.body))}`);
  }
}

/** The fields every proxy request carries (Centrifugo's proxy request JSON). */
function assertCommonFields(rec, clientId) {
  assert.equal(rec.body.client, clientId, `client field: ${JSON.stringify(rec.body)}`);
  assert.equal(rec.body.transport, 'websocket', JSON.stringify(rec.body));
  assert.equal(rec.body.protocol, 'json', JSON.stringify(rec.body));
  assert.equal(rec.body.encoding, 'json', JSON.stringify(rec.body));
  assert.match(String(rec.headers['content-type']), /^application\/json/, JSON.stringify(rec.headers));
}

// ---------------------------------------------------------------------------
// SDK clients without a token, with a Cookie (and other headers) on the upgrade request

/**
 * A Centrifuge client with no token whose WebSocket upgrade carries `cookie` (if given) and
 * `headers`. Cleaned up after the test. Returns { client, rec, log }.
 */
async function cookieClient(t, cfg, { cookie, headers = {}, ...options } = {}) {
  const { Centrifuge, WebSocket } = await deps();
  const rec = { opened: 0, frames: [], sent: [], closes: [], sockets: [] };
  const extra = { ...headers };
  if (cookie !== undefined) extra.Cookie = cookie;
  const Recording = sdkWebSocketClass(WebSocket, rec);
  class CookieWebSocket extends Recording {
    constructor(address, protocols, opts) {
      super(address, protocols, { ...(opts || {}), headers: { ...extra } });
    }
  }
  const client = new Centrifuge(cfg.ws, {
    websocket: CookieWebSocket,
    name: 'proxy-js',
    timeout: 5000,
    ...options,
  });
  const log = [];
  for (const event of ['state', 'connecting', 'connected', 'disconnected', 'error']) {
    client.on(event, (ctx) => log.push({ event, ctx, at: Date.now() }));
  }
  t.after(async () => {
    client.disconnect();
    const deadline = Date.now() + 1000;
    while (rec.sockets.some((s) => s.readyState !== s.CLOSED) && Date.now() < deadline) await sleep(10);
    for (const s of rec.sockets) if (s.readyState !== s.CLOSED) s.terminate();
  });
  return { client, rec, log };
}

/** cookieClient() + connect(); resolves with { client, rec, log, ctx } once connected. */
async function connectedByCookie(t, cfg, opts) {
  const c = await cookieClient(t, cfg, opts);
  const outcome = waitOutcome(c.client, {
    connected: (ctx) => ctx,
    disconnected: (ctx) => {
      throw new Error(`disconnected instead of connecting: ${JSON.stringify(ctx)}`);
    },
  }, 8000, 'the client to connect through the connect proxy');
  c.client.connect();
  c.ctx = await outcome;
  return c;
}

/** Connects, then waits for the client to end disconnected; returns the disconnected ctx. */
async function refusedConnect(t, cfg, opts) {
  const c = await cookieClient(t, cfg, opts);
  const outcome = waitOutcome(c.client, {
    connected: (ctx) => {
      throw new Error(`connected although the backend refuses: ${JSON.stringify(ctx)}`);
    },
    disconnected: (ctx) => ctx,
  }, 8000, 'the client to end disconnected');
  c.client.connect();
  return { ...c, ctx: await outcome };
}

/** Subscribes and waits for `subscribed` or `unsubscribed`; returns { sub, ev, ctx, pubs }. */
async function trySubscribe(client, channel, subOpts = {}) {
  const sub = client.newSubscription(channel, subOpts);
  const pubs = [];
  sub.on('publication', (ctx) => pubs.push(ctx.data));
  const outcome = waitOutcome(sub, {
    subscribed: (ctx) => ({ ev: 'subscribed', ctx }),
    unsubscribed: (ctx) => ({ ev: 'unsubscribed', ctx }),
  }, 8000, `the subscription to ${channel} to settle`);
  sub.subscribe();
  return { sub, pubs, ...(await outcome) };
}

// ---------------------------------------------------------------------------
// connect

test('connects with no token: the identity comes from the cookie through the connect proxy', { timeout: 20000 }, async (t) => {
  const cfg = proxyTarget(t);
  if (!cfg) return;
  const user = `cookie-${nonce()}`;
  const cookie = `session=${user}`;
  const c = await connectedByCookie(t, cfg, {
    cookie,
    headers: { 'X-Not-Listed': 'must-not-reach-the-backend' },
    version: '1.2.3',
    data: { hello: 'world' },
  });
  t.diagnostic(`connected ctx: ${JSON.stringify(c.ctx)}`);
  assert.deepEqual(c.ctx.data, { welcome: user }, 'the connect reply carries the backend\'s result data');
  const sentConnect = wireMessages(c.rec.sent).find((m) => m.connect);
  assert.ok(sentConnect, `no connect command sent: ${JSON.stringify(c.rec.sent)}`);
  assert.equal(sentConnect.connect.token, undefined, 'the SDK sent no token');

  const rec = await recorded(cfg, 'connect', (r) => r.body.client === c.ctx.client, `for client ${c.ctx.client}`);
  t.diagnostic(`connect proxy request: ${JSON.stringify(rec)}`);
  assertCommonFields(rec, c.ctx.client);
  assert.equal(rec.headers.cookie, cookie, 'the Cookie header of the upgrade is copied');
  assert.equal(rec.headers['x-not-listed'], undefined, 'a header not in http_headers is not copied');
  assert.equal(rec.body.name, 'proxy-js');
  assert.equal(rec.body.version, '1.2.3');
  assert.deepEqual(rec.body.data, { hello: 'world' }, 'the client\'s connect data reaches the backend');
  assert.equal(rec.body.user, undefined, 'a connect request has no user yet');

  // The server took the user and the info from the backend: presence shows both.
  const channel = `chat:who-${nonce()}`;
  const s = await trySubscribe(c.client, channel);
  assert.equal(s.ev, 'subscribed', JSON.stringify(s.ctx));
  const res = await fetch(`${cfg.http}/api/presence`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'X-API-Key': cfg.apiKey },
    body: JSON.stringify({ channel }),
  });
  const body = await res.json();
  const entry = body.result && body.result.presence && body.result.presence[c.ctx.client];
  assert.ok(entry, `presence of ${channel} lacks ${c.ctx.client}: ${JSON.stringify(body)}`);
  assert.equal(entry.user, user, JSON.stringify(entry));
  assert.deepEqual(entry.conn_info, { name: user }, `conn_info from the backend's info: ${JSON.stringify(entry)}`);
});

test('a connect the backend refuses with a disconnect ends with 4501 and does not reconnect', { timeout: 20000 }, async (t) => {
  const cfg = proxyTarget(t);
  if (!cfg) return;
  const marker = `anon-${nonce()}`;
  const c = await refusedConnect(t, cfg, { cookie: `other=${marker}` });
  t.diagnostic(`disconnected ctx: ${JSON.stringify(c.ctx)}`);
  assert.equal(c.ctx.code, 4501, JSON.stringify(c.ctx));
  assert.equal(c.ctx.reason, 'unauthorized', JSON.stringify(c.ctx));
  await sleep(1500);
  assert.equal(c.client.state, 'disconnected');
  assert.equal(c.rec.opened, 1, 'no reconnect after a terminal disconnect code');
  const mine = (await requests(cfg, 'connect')).filter((r) => r.headers.cookie === `other=${marker}`);
  assert.equal(mine.length, 1, `one connect proxy request: ${JSON.stringify(mine)}`);
});

test('a connect error from the backend reaches the client with its code and ends it', { timeout: 20000 }, async (t) => {
  const cfg = proxyTarget(t);
  if (!cfg) return;
  const c = await refusedConnect(t, cfg, { cookie: `session=error; run=${nonce()}` });
  t.diagnostic(`disconnected ctx: ${JSON.stringify(c.ctx)}`);
  const errors = c.log.filter((e) => e.event === 'error').map((e) => e.ctx);
  // A non-temporary error reply to connect: the SDK stops with that code (no reconnect).
  assert.equal(c.ctx.code, 1000, `disconnected: ${JSON.stringify(c.ctx)}; errors: ${JSON.stringify(errors)}`);
  assert.equal(c.ctx.reason, 'custom');
  const reply = wireMessages(c.rec.frames).find((m) => m.error);
  assert.deepEqual(reply && { code: reply.error.code, message: reply.error.message }, { code: 1000, message: 'custom' });
  await sleep(1000);
  assert.equal(c.rec.opened, 1, 'no reconnect after a non-temporary connect error');
});

test('connect result channels become server-side subscriptions', { timeout: 20000 }, async (t) => {
  const cfg = proxyTarget(t);
  if (!cfg) return;
  const run = nonce();
  const channel = `probe-srv-${run}`;
  const c = await cookieClient(t, cfg, { cookie: `session=srv-${run}; channels=${channel}` });
  const got = [];
  c.client.on('publication', (ctx) => got.push(ctx));
  const subscribed = waitEvent(c.client, 'subscribed', 8000, (ctx) => ctx.channel === channel);
  c.client.connect();
  await subscribed;
  await publishOk(cfg, channel, { run, n: 1 });
  await waitUntil(() => got.some((p) => p.channel === channel && p.data.run === run), 5000,
    `the publication on the server-side subscription ${channel}`);
});

// ---------------------------------------------------------------------------
// subscribe

test('subscribes where the backend allows it: the reply carries the backend\'s data', { timeout: 20000 }, async (t) => {
  const cfg = proxyTarget(t);
  if (!cfg) return;
  const run = nonce();
  const user = `sub-${run}`;
  const c = await connectedByCookie(t, cfg, { cookie: `session=${user}` });
  const channel = `chat:room-${run}`;
  const s = await trySubscribe(c.client, channel, { data: { want: 'in' } });
  t.diagnostic(`subscribe outcome: ${JSON.stringify({ ev: s.ev, ctx: s.ctx })}`);
  assert.equal(s.ev, 'subscribed', JSON.stringify(s.ctx));
  assert.deepEqual(s.ctx.data, { granted: channel });
  const rec = await recorded(cfg, 'subscribe', (r) => r.body.channel === channel, `for ${channel}`);
  assertCommonFields(rec, c.ctx.client);
  assert.equal(rec.body.user, user);
  assert.deepEqual(rec.body.data, { want: 'in' }, 'the subscribe data reaches the backend');
  // The subscription works: a publication arrives.
  await publishOk(cfg, channel, { run });
  await waitUntil(() => s.pubs.some((d) => d.run === run), 5000, 'the publication');
});

test('a subscription the backend refuses ends unsubscribed with 403, without retrying', { timeout: 20000 }, async (t) => {
  const cfg = proxyTarget(t);
  if (!cfg) return;
  const run = nonce();
  const c = await connectedByCookie(t, cfg, { cookie: `session=sub-${run}` });
  const channel = `chat:forbidden-${run}`;
  const s = await trySubscribe(c.client, channel);
  t.diagnostic(`subscribe outcome: ${JSON.stringify({ ev: s.ev, ctx: s.ctx })}`);
  assert.equal(s.ev, 'unsubscribed', JSON.stringify(s.ctx));
  assert.equal(s.ctx.code, 403, JSON.stringify(s.ctx));
  await sleep(1000);
  assert.equal(s.sub.state, 'unsubscribed');
  const mine = (await requests(cfg, 'subscribe')).filter((r) => r.body.channel === channel);
  assert.equal(mine.length, 1, `one subscribe proxy request, no retry: ${JSON.stringify(mine)}`);
  // The connection itself is fine.
  assert.equal(c.client.state, 'connected');
  const other = await trySubscribe(c.client, `chat:room-${run}`);
  assert.equal(other.ev, 'subscribed', JSON.stringify(other.ctx));
});

// ---------------------------------------------------------------------------
// publish

test('a client publish goes through the publish proxy and subscribers get the substituted data', { timeout: 20000 }, async (t) => {
  const cfg = proxyTarget(t);
  if (!cfg) return;
  const run = nonce();
  const channel = `chat:pub-${run}`;
  // The receiver connects with a token (HS256): the proxies and tokens work side by side.
  const receiver = await connectedClient(t, cfg, { user: `recv-${run}` });
  const r = await trySubscribe(receiver.client, channel);
  assert.equal(r.ev, 'subscribed', JSON.stringify(r.ctx));
  const writer = `writer-${run}`;
  const w = await connectedByCookie(t, cfg, { cookie: `session=${writer}` });
  await w.client.publish(channel, { text: 'hello', secret: 'dropped by the backend' });
  await waitUntil(() => r.pubs.length > 0, 5000, 'the publication at the receiver');
  assert.deepEqual(r.pubs[0], { text: 'hello', by: writer, moderated: true },
    'subscribers get the data the backend returned, not what the client sent');
  const rec = await recorded(cfg, 'publish', (x) => x.body.channel === channel, `for ${channel}`);
  assertCommonFields(rec, w.ctx.client);
  assert.equal(rec.body.user, writer);
  assert.deepEqual(rec.body.data, { text: 'hello', secret: 'dropped by the backend' });
  await sleep(300);
  assert.equal(r.pubs.length, 1, `exactly one publication: ${JSON.stringify(r.pubs)}`);
});

test('a publish the backend refuses is rejected with 403 and reaches nobody', { timeout: 20000 }, async (t) => {
  const cfg = proxyTarget(t);
  if (!cfg) return;
  const run = nonce();
  const channel = `chat:readonly-${run}`;
  const receiver = await connectedClient(t, cfg, { user: `recv-${run}` });
  const r = await trySubscribe(receiver.client, channel);
  assert.equal(r.ev, 'subscribed', JSON.stringify(r.ctx));
  const w = await connectedByCookie(t, cfg, { cookie: `session=writer-${run}` });
  const err = await w.client.publish(channel, { text: 'nope' }).then(
    (ok) => assert.fail(`publish to ${channel} succeeded: ${JSON.stringify(ok)}`),
    (e) => e,
  );
  t.diagnostic(`publish rejected with ${JSON.stringify(err)}`);
  assert.equal(err.code, 403, JSON.stringify(err));
  assert.equal(err.message, 'permission denied');
  await sleep(500);
  assert.deepEqual(r.pubs, [], 'a refused publication is not delivered');
  assert.equal(w.client.state, 'connected');
});

// ---------------------------------------------------------------------------
// rpc

test('rpc goes to the backend: results come back, errors keep their codes', { timeout: 20000 }, async (t) => {
  const cfg = proxyTarget(t);
  if (!cfg) return;
  const run = nonce();
  const user = `rpc-${run}`;
  const c = await connectedByCookie(t, cfg, { cookie: `session=${user}` });
  const payload = { run, n: 42, nested: { list: [1, 'two', null] } };
  const res = await c.client.rpc('echo', payload);
  assert.deepEqual(res.data, payload);
  const rec = await recorded(cfg, 'rpc', (r) => r.body.data && r.body.data.run === run, `echo of run ${run}`);
  assertCommonFields(rec, c.ctx.client);
  assert.equal(rec.body.user, user);
  assert.equal(rec.body.method, 'echo');

  const fail = await c.client.rpc('fail', { run }).then(
    (ok) => assert.fail(`rpc fail resolved: ${JSON.stringify(ok)}`),
    (e) => e,
  );
  assert.equal(fail.code, 1001, JSON.stringify(fail));
  assert.equal(fail.message, 'rpc failed');
  const unknown = await c.client.rpc('no-such-method', {}).then(
    (ok) => assert.fail(`rpc no-such-method resolved: ${JSON.stringify(ok)}`),
    (e) => e,
  );
  assert.equal(unknown.code, 404, JSON.stringify(unknown));
  assert.equal(c.client.state, 'connected', 'rpc errors do not end the connection');
});

test('an rpc answered with a disconnect closes the client with that code', { timeout: 20000 }, async (t) => {
  const cfg = proxyTarget(t);
  if (!cfg) return;
  const c = await connectedByCookie(t, cfg, { cookie: `session=bye-${nonce()}` });
  const disconnected = waitEvent(c.client, 'disconnected', 8000);
  c.client.rpc('bye', {}).catch(() => {});
  const ctx = await disconnected;
  t.diagnostic(`disconnected ctx: ${JSON.stringify(ctx)}`);
  assert.equal(ctx.code, 4500, JSON.stringify(ctx));
  assert.equal(ctx.reason, 'bye');
  await sleep(1000);
  assert.equal(c.rec.opened, 1, 'no reconnect after a terminal disconnect code');
});

// History and recovery across two shardcast nodes sharing one Redis, with the
// official JS SDK. Not a *.test.mjs file: `node --test tests/interop` does not
// pick it up (it needs two nodes and a Redis it may restart); tests/e2e/recovery.rs
// starts all that and runs it by path:
//
//   node --test --test-concurrency=1 tests/interop/cluster/recovery.cluster.mjs
//
// Target, from the environment (every test skips when one is unset):
//   SHARDCAST_A_WS, SHARDCAST_B_WS       ws://127.0.0.1:PORT/connection/websocket of node A, B
//   SHARDCAST_A_HTTP, SHARDCAST_B_HTTP   http://127.0.0.1:PORT (server API) of node A, B
//   SHARDCAST_API_KEY                    X-API-Key of both
//   SHARDCAST_SECRET                     HS256 secret of connection tokens
//   SHARDCAST_REDIS_PORT                 the port of the Redis both nodes use (127.0.0.1)
//   SHARDCAST_REDIS_CLI                  redis-cli to run (default: redis-cli on PATH)
//   SHARDCAST_REDIS_SERVER               redis-server to run (default: on PATH)
//
// The nodes need these namespaces (besides the base config of tests/e2e):
//   [namespaces.feed]  history_size = 100, history_ttl_secs = 300, recover = true
//   [namespaces.tiny]  history_size = 5,   history_ttl_secs = 300, recover = true
//   [namespaces.open]  history_size = 10,  history_ttl_secs = 300, allow_history_for_client = true
//
// The last test restarts Redis: it shuts the running one down (SHUTDOWN NOSAVE)
// and starts a new redis-server on the same port, without persistence, which it
// kills when the file is done. So run this file against a Redis of its own.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { execFile, spawn } from 'node:child_process';
import {
  connToken, connectedClient, sdkClient, nonce, range, sleep, waitUntil, waitEvent, firstDifference,
} from '../helpers.mjs';

// ---------------------------------------------------------------------------
// Environment

const NEEDED = [
  'SHARDCAST_A_WS', 'SHARDCAST_A_HTTP', 'SHARDCAST_B_WS', 'SHARDCAST_B_HTTP',
  'SHARDCAST_API_KEY', 'SHARDCAST_SECRET', 'SHARDCAST_REDIS_PORT',
];

function cluster(t) {
  const missing = NEEDED.filter((k) => !process.env[k]);
  if (missing.length > 0) {
    t.skip(`no shardcast cluster: set ${missing.join(', ')} (see the head of this file)`);
    return null;
  }
  const node = (name) => {
    const ws = process.env[`SHARDCAST_${name}_WS`];
    const url = new URL(ws);
    return {
      name,
      ws,
      http: process.env[`SHARDCAST_${name}_HTTP`].replace(/\/+$/, ''),
      host: url.hostname,
      port: Number(url.port),
    };
  };
  const a = node('A');
  const b = node('B');
  return {
    a,
    b,
    apiKey: process.env.SHARDCAST_API_KEY,
    secret: process.env.SHARDCAST_SECRET,
    redisPort: Number(process.env.SHARDCAST_REDIS_PORT),
    redisCli: process.env.SHARDCAST_REDIS_CLI || 'redis-cli',
    redisServer: process.env.SHARDCAST_REDIS_SERVER || 'redis-server',
  };
}

// SDK options of every client here: reconnect soon after a transport loss, so
// the tests need not wait out the default 500 ms .. 20 s backoff.
const FAST_RECONNECT = { minReconnectDelay: 100, maxReconnectDelay: 500 };

/** A helpers.mjs config for an SDK client of `node` (or of `ws`, e.g. a proxy). */
const sdkTarget = (cfg, ws) => ({ ws, secret: cfg.secret });

// ---------------------------------------------------------------------------
// Server API

/** POST /api/METHOD on `http`; returns { status, text, body }. Throws on a network error. */
async function api(cfg, http, method, body) {
  const res = await fetch(`${http}/api/${method}`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'X-API-Key': cfg.apiKey },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(5000),
  });
  const text = await res.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: res.status, text, body: json };
}

/**
 * Publishes through the API with an idempotency key, retrying (same key, so a
 * retry cannot publish twice) on an error reply or a failed request, for at
 * most `ms`. Resolves with the result { offset, epoch } and counts retries in
 * `stats.retries` when given.
 */
async function publish(cfg, http, channel, data, key, { ms = 10000, stats } = {}) {
  const deadline = Date.now() + ms;
  let last;
  for (let attempt = 0; ; attempt++) {
    try {
      const r = await api(cfg, http, 'publish', { channel, data, idempotency_key: key });
      if (r.status === 200 && r.body && r.body.result) {
        if (stats) stats.retries += attempt;
        return r.body.result;
      }
      last = `HTTP ${r.status} ${r.text}`;
    } catch (err) {
      last = err.message;
    }
    if (Date.now() >= deadline) {
      throw new Error(`publish to ${channel} via ${http} (key ${key}) failed for ${ms} ms; last: ${last}`);
    }
    await sleep(20);
  }
}

/** POST /api/history; resolves with the body ({ result } or { error }). */
async function apiHistory(cfg, http, req) {
  const r = await api(cfg, http, 'history', req);
  assert.equal(r.status, 200, `history ${JSON.stringify(req)}: HTTP ${r.status} ${r.text}`);
  return r.body;
}

/** The `info` entry of the node answering at `http` (the one with its Redis link state). */
async function nodeInfo(cfg, http) {
  const r = await api(cfg, http, 'info', {});
  const nodes = r.body && r.body.result && r.body.result.nodes;
  const own = Array.isArray(nodes) ? nodes.find((n) => n.redis) : undefined;
  assert.ok(own, `info of ${http}: ${r.text}`);
  return own;
}

// ---------------------------------------------------------------------------
// Redis

function run(cmd, args, ms = 5000) {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: ms }, (err, stdout, stderr) => {
      resolve({ code: err ? (err.code ?? 1) : 0, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

const redisCli = (cfg, ...args) => run(cfg.redisCli, ['-p', String(cfg.redisPort), ...args]);

/**
 * Names of the pub/sub connections Redis holds (CLIENT LIST TYPE pubsub): a node's
 * subscriber connection (`shardcast-<uid>-sub`) counts once it has subscribed to something.
 */
async function pubsubClients(cfg) {
  const r = await redisCli(cfg, 'CLIENT', 'LIST', 'TYPE', 'pubsub');
  return r.stdout.split('\n').filter((l) => l.trim() !== '').map((l) => (/ name=(\S*)/.exec(l) || [])[1] ?? '');
}

/** Whether each node of `uids` has its pub/sub connection (subscribed) to Redis. */
async function pubsubUp(cfg, uids) {
  const names = await pubsubClients(cfg);
  return uids.every((uid) => names.includes(`shardcast-${uid}-sub`));
}

/** Kills every pub/sub connection Redis holds; resolves with how many it killed. */
async function killPubsub(cfg) {
  const r = await redisCli(cfg, 'CLIENT', 'KILL', 'TYPE', 'pubsub');
  const n = Number(r.stdout.trim());
  assert.ok(Number.isInteger(n), `CLIENT KILL TYPE pubsub answered ${JSON.stringify(r)}`);
  return n;
}

// Redis servers this file started (test c), killed by PID when the file is done.
const startedRedis = [];
function killStartedRedis() {
  for (const child of startedRedis) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
}
after(killStartedRedis);
process.on('exit', killStartedRedis);

/**
 * Replaces the Redis on cfg.redisPort by an empty one: SHUTDOWN NOSAVE, then a
 * new redis-server on the same port without persistence (no RDB, no AOF).
 */
async function restartRedisEmpty(cfg) {
  const runId = async () => (/run_id:(\w+)/.exec((await redisCli(cfg, 'INFO', 'server')).stdout) || [])[1];
  const oldRunId = await runId();
  assert.ok(oldRunId, 'the running Redis tells its run_id');
  await redisCli(cfg, 'SHUTDOWN', 'NOSAVE'); // the reply is the connection closing
  await waitUntil(async () => (await redisCli(cfg, 'PING')).stdout.trim() !== 'PONG', 5000, 'Redis to stop');
  const child = spawn(cfg.redisServer, [
    '--port', String(cfg.redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
  ], { stdio: 'ignore' });
  startedRedis.push(child);
  await waitUntil(async () => {
    if (child.exitCode !== null) throw new Error(`new redis-server exited with ${child.exitCode}`);
    return (await redisCli(cfg, 'PING')).stdout.trim() === 'PONG';
  }, 5000, 'the new Redis to answer PING');
  // (The nodes reconnect at once and write their leases: the database is not empty for long.)
  const newRunId = await runId();
  assert.ok(newRunId && newRunId !== oldRunId, `a new Redis process (run_id ${oldRunId} -> ${newRunId})`);
  return child;
}

// ---------------------------------------------------------------------------
// A TCP proxy the SDK connects to, which a test moves from one node to another
// (as a load balancer would): existing connections are cut, new ones are held
// until release() and then go to the new target.

class SwitchProxy {
  static async start(target) {
    const p = new SwitchProxy(target);
    await new Promise((resolve, reject) => {
      p.server.once('error', reject);
      p.server.listen(0, '127.0.0.1', resolve);
    });
    p.url = `ws://127.0.0.1:${p.server.address().port}/connection/websocket`;
    return p;
  }

  constructor(target) {
    this.target = target;
    this.holding = false;
    this.held = [];
    this.pairs = new Set();
    this.linked = []; // node name of every connection forwarded, in order
    this.server = net.createServer((sock) => {
      sock.on('error', () => {});
      if (this.holding) {
        sock.pause();
        this.held.push(sock);
      } else {
        this.link(sock);
      }
    });
  }

  link(sock) {
    if (sock.destroyed) return;
    const up = net.connect({ host: this.target.host, port: this.target.port });
    up.on('error', () => {});
    const pair = { sock, up, node: this.target.name };
    this.pairs.add(pair);
    this.linked.push(this.target.name);
    const end = () => {
      this.pairs.delete(pair);
      sock.destroy();
      up.destroy();
    };
    sock.on('close', end);
    up.on('close', end);
    sock.pipe(up);
    up.pipe(sock);
  }

  /** Cuts every connection; new ones wait for release() and then go to `target`. */
  moveTo(target) {
    this.target = target;
    this.holding = true;
    for (const { sock, up } of [...this.pairs]) {
      sock.destroy();
      up.destroy();
    }
  }

  release() {
    this.holding = false;
    for (const sock of this.held.splice(0)) this.link(sock);
  }

  /** Node names of the connections open now. */
  open() {
    return [...this.pairs].map((p) => p.node);
  }

  async close() {
    this.release();
    for (const { sock, up } of [...this.pairs]) {
      sock.destroy();
      up.destroy();
    }
    await new Promise((resolve) => this.server.close(resolve));
  }
}

// ---------------------------------------------------------------------------
// Subscriptions

/**
 * A subscription recording what the app sees: publications ({ data, offset }),
 * every `subscribed` ctx, and every subscription event in order.
 */
function track(client, channel, opts = {}) {
  const sub = client.newSubscription(channel, opts);
  const s = { sub, channel, pubs: [], subscribed: [], events: [] };
  sub.on('publication', (ctx) => s.pubs.push({ data: ctx.data, offset: ctx.offset }));
  sub.on('subscribed', (ctx) => {
    s.subscribed.push(ctx);
    if (s.eventsFrom === undefined) s.eventsFrom = s.events.length + 1; // after this one
  });
  for (const ev of ['subscribing', 'subscribed', 'unsubscribed', 'error']) {
    sub.on(ev, (ctx) => s.events.push({ ev, code: ctx && ctx.code, reason: ctx && ctx.reason }));
  }
  return s;
}

/** Subscription events after the first `subscribed`. */
const laterEvents = (s) => s.events.slice(s.eventsFrom ?? 0).map((e) => e.ev);

/** Subscribes (or waits for the next subscribe) until `n` `subscribed` events were seen. */
async function subscribedTimes(s, n, ms = 5000) {
  await waitUntil(() => s.subscribed.length >= n, ms,
    `subscribed event #${n} on ${s.channel} (events: ${JSON.stringify(s.events)})`);
  return s.subscribed[n - 1];
}

async function received(s, n, ms = 10000) {
  try {
    await waitUntil(() => s.pubs.length >= n, ms, `${n} publications on ${s.channel}`);
  } catch (err) {
    throw new Error(`${err.message}; got ${s.pubs.length}: ${JSON.stringify(s.pubs.slice(-5))}`);
  }
}

const ns = (pubs) => pubs.map((p) => p.data.n);
const offsets = (pubs) => pubs.map((p) => p.offset);
const fromTo = (first, count) => range(count).map((i) => first + i);

function assertSeq(actual, expected, what) {
  assert.deepEqual(actual, expected, `${what}: ${firstDifference(actual, expected)}`);
}

// ---------------------------------------------------------------------------
// e. History paging through the SDK and the HTTP API

test('history pages through the SDK (sub.history) and the HTTP API: limit, since, reverse, position only, wrong epoch', { timeout: 30000 }, async (t) => {
  const cfg = cluster(t);
  if (!cfg) return;
  const id = nonce();
  const channel = `feed:hist-${id}`;
  const results = [];
  for (let n = 0; n < 10; n++) {
    results.push(await publish(cfg, n % 2 ? cfg.b.http : cfg.a.http, channel, { n }, `${id}-${n}`));
  }
  const epoch = results[0].epoch;
  assert.ok(typeof epoch === 'string' && epoch !== '', `publish result has an epoch: ${JSON.stringify(results[0])}`);
  assert.deepEqual(results, fromTo(1, 10).map((offset) => ({ offset, epoch })), 'publish results: offsets 1..10, one epoch');

  // Through the SDK, as a subscriber of the channel (on node B).
  const c = await connectedClient(t, sdkTarget(cfg, cfg.b.ws), FAST_RECONNECT);
  const s = track(c.client, channel);
  s.sub.subscribe();
  const sctx = await subscribedTimes(s, 1);
  assert.deepEqual(sctx.streamPosition, { offset: 10, epoch }, 'subscribe reply position = the top');
  assert.equal(sctx.recoverable, true);

  const page = async (opts) => {
    const r = await s.sub.history(opts);
    assert.equal(r.epoch, epoch, `history ${JSON.stringify(opts)} epoch`);
    assert.equal(r.offset, 10, `history ${JSON.stringify(opts)} top offset`);
    assert.ok(r.publications.every((p) => p.channel === channel));
    return r.publications;
  };
  let p = await page({ limit: 3 });
  assert.deepEqual([ns(p), offsets(p)], [[0, 1, 2], [1, 2, 3]], 'SDK limit 3: the oldest three');
  p = await page({ limit: 3, since: { offset: 3, epoch } });
  assert.deepEqual([ns(p), offsets(p)], [[3, 4, 5], [4, 5, 6]], 'SDK since offset 3, limit 3');
  p = await page({ limit: 3, reverse: true });
  assert.deepEqual([ns(p), offsets(p)], [[9, 8, 7], [10, 9, 8]], 'SDK reverse limit 3: the newest three, newest first');
  p = await page({ limit: 3, since: { offset: 8, epoch }, reverse: true });
  assert.deepEqual(offsets(p), [7, 6, 5], 'SDK reverse since offset 8, limit 3: before it, newest first');
  p = await page({ limit: -1 });
  assert.deepEqual(offsets(p), fromTo(1, 10), 'SDK limit -1: all');
  p = await page({ limit: 0 });
  assert.deepEqual(p, [], 'SDK limit 0: position only');
  p = await page({});
  assert.deepEqual(p, [], 'SDK history() without a limit: position only');

  // Paging forward with `since` until the top: every publication once, in order.
  const all = [];
  let since = { offset: 0, epoch };
  for (let i = 0; i < 10; i++) {
    const chunk = await page({ limit: 4, since });
    if (chunk.length === 0) break;
    all.push(...chunk);
    since = { offset: chunk[chunk.length - 1].offset, epoch };
  }
  assertSeq(ns(all), range(10), 'SDK forward paging by 4');
  assertSeq(offsets(all), fromTo(1, 10), 'SDK forward paging offsets');

  await assert.rejects(s.sub.history({ limit: 3, since: { offset: 3, epoch: `${epoch}x` } }),
    (err) => err.code === 112, 'SDK since with a wrong epoch: error 112');

  // A client not subscribed to a feed channel may not read its history; in `open`
  // (allow_history_for_client) any client may.
  const other = await connectedClient(t, sdkTarget(cfg, cfg.a.ws), FAST_RECONNECT);
  await assert.rejects(other.client.history(channel, { limit: 1 }), (err) => err.code === 103,
    'history of a feed channel without subscribing: error 103');
  const openCh = `open:hist-${id}`;
  await publish(cfg, cfg.a.http, openCh, { n: 0 }, `${id}-open`);
  const h = await other.client.history(openCh, { limit: -1 });
  assert.deepEqual(h.publications.map((x) => x.data), [{ n: 0 }], 'history of an open channel without subscribing');

  // The same through the HTTP API (node A).
  const httpPage = async (req) => {
    const body = await apiHistory(cfg, cfg.a.http, { channel, ...req });
    assert.ok(body.result, `history ${JSON.stringify(req)}: ${JSON.stringify(body)}`);
    assert.equal(body.result.epoch, epoch);
    assert.equal(body.result.offset, 10);
    return body.result.publications || [];
  };
  p = await httpPage({ limit: 3 });
  assert.deepEqual(p, [0, 1, 2].map((n) => ({ data: { n }, offset: n + 1 })), 'API limit 3');
  p = await httpPage({ limit: 3, since: { offset: 3, epoch } });
  assert.deepEqual(offsets(p), [4, 5, 6], 'API since offset 3');
  p = await httpPage({ limit: 3, reverse: true });
  assert.deepEqual(offsets(p), [10, 9, 8], 'API reverse');
  p = await httpPage({ limit: 2, since: { offset: 8, epoch }, reverse: true });
  assert.deepEqual(offsets(p), [7, 6], 'API reverse since offset 8');
  p = await httpPage({ limit: -1 });
  assert.deepEqual(ns(p), range(10), 'API limit -1: all');
  p = await httpPage({ limit: 0 });
  assert.deepEqual(p, [], 'API limit 0: position only');
  let body = await apiHistory(cfg, cfg.a.http, { channel, limit: 3, since: { offset: 3, epoch: 'nope' } });
  assert.equal(body.error && body.error.code, 112, `API since with a wrong epoch: ${JSON.stringify(body)}`);
  body = await apiHistory(cfg, cfg.a.http, { channel: `news-${id}`, limit: 1 });
  assert.equal(body.error && body.error.code, 108, `API history of a channel without history: ${JSON.stringify(body)}`);

  // history_remove drops the publications but keeps the position: publishing goes on from it,
  // and the subscriber keeps receiving.
  const rm = await api(cfg, cfg.b.http, 'history_remove', { channel });
  assert.deepEqual(rm.body, { result: {} }, `history_remove: ${rm.text}`);
  p = await httpPage({ limit: -1 });
  assert.deepEqual(p, [], 'no publications after history_remove');
  const next = await publish(cfg, cfg.a.http, channel, { n: 10 }, `${id}-10`);
  assert.deepEqual(next, { offset: 11, epoch }, 'the position survives history_remove');
  await received(s, 1);
  assert.deepEqual(s.pubs, [{ data: { n: 10 }, offset: 11 }], 'the subscriber got the live publication once');
});

// ---------------------------------------------------------------------------
// f. Idempotent publish

test('a publish repeated with the same idempotency_key (on either node) gets the first result and is delivered once', { timeout: 30000 }, async (t) => {
  const cfg = cluster(t);
  if (!cfg) return;
  const id = nonce();
  const channel = `feed:idem-${id}`;
  const subs = [];
  for (const node of [cfg.a, cfg.b]) {
    const c = await connectedClient(t, sdkTarget(cfg, node.ws), FAST_RECONNECT);
    const s = track(c.client, channel);
    s.sub.subscribe();
    await subscribedTimes(s, 1);
    subs.push(s);
  }
  const once = async (http, data, key) => {
    const r = await api(cfg, http, 'publish', { channel, data, idempotency_key: key });
    assert.equal(r.status, 200, r.text);
    assert.ok(r.body.result, `publish: ${r.text}`);
    return r.body.result;
  };
  const first = await once(cfg.a.http, { n: 0 }, `k1-${id}`);
  assert.equal(first.offset, 1);
  const again = await once(cfg.a.http, { n: 0 }, `k1-${id}`);
  const onB = await once(cfg.b.http, { n: 0 }, `k1-${id}`);
  assert.deepEqual(again, first, 'repeat on the same node: the first result');
  assert.deepEqual(onB, first, 'repeat on the other node: the first result');
  const second = await once(cfg.b.http, { n: 1 }, `k2-${id}`);
  assert.deepEqual(second, { offset: 2, epoch: first.epoch }, 'another key publishes (the next offset)');
  const third = await once(cfg.a.http, { n: 2 }, undefined);
  assert.deepEqual(third, { offset: 3, epoch: first.epoch }, 'no key publishes');

  for (const s of subs) await received(s, 3);
  await sleep(200); // a duplicate would arrive by now
  for (const [i, s] of subs.entries()) {
    assert.deepEqual(s.pubs, [0, 1, 2].map((n) => ({ data: { n }, offset: n + 1 })),
      `subscriber ${i} (node ${i ? 'B' : 'A'}) received each publication once`);
  }
  const h = await apiHistory(cfg, cfg.b.http, { channel, limit: -1 });
  assert.deepEqual(offsets(h.result.publications), [1, 2, 3], 'history holds each once');
});

// ---------------------------------------------------------------------------
// a. Recovery on the other node

test('a subscriber that comes back on node B recovers the 50 publications it missed on A, in order, once', { timeout: 30000 }, async (t) => {
  const cfg = cluster(t);
  if (!cfg) return;
  const id = nonce();
  const channel = `feed:move-${id}`;
  const proxy = await SwitchProxy.start(cfg.a);
  t.after(() => proxy.close());

  const c = await connectedClient(t, sdkTarget(cfg, proxy.url), FAST_RECONNECT);
  const s = track(c.client, channel);
  s.sub.subscribe();
  const first = await subscribedTimes(s, 1);
  assert.equal(first.recoverable, true, 'feed subscriptions are recoverable');
  assert.equal(first.wasRecovering, false);
  assert.deepEqual(proxy.open(), ['A']);

  const results = [];
  for (let n = 0; n < 5; n++) {
    results.push(await publish(cfg, cfg.a.http, channel, { n }, `${id}-${n}`));
  }
  const epoch = results[0].epoch;
  assert.equal(first.streamPosition.epoch, epoch, 'the subscribe reply and the publications agree on the epoch');
  await received(s, 5);

  // The load balancer moves the client to node B; while it is away, 50 publications.
  const away = waitEvent(c.client, 'connecting', 5000);
  proxy.moveTo(cfg.b);
  await away;
  for (let n = 5; n < 55; n++) {
    results.push(await publish(cfg, n % 2 ? cfg.a.http : cfg.b.http, channel, { n }, `${id}-${n}`));
  }
  assert.deepEqual(results, fromTo(1, 55).map((offset) => ({ offset, epoch })), 'publish results');
  assert.equal(s.pubs.length, 5, 'nothing arrives while away');
  proxy.release();

  const back = await subscribedTimes(s, 2, 10000);
  await received(s, 55);
  await sleep(200); // a duplicate would arrive by now
  t.diagnostic(`resubscribe ctx: ${JSON.stringify(back)}; proxy forwarded to: ${proxy.linked.join(',')}`);
  assert.deepEqual(proxy.open(), ['B'], 'the client is now connected to node B');
  assert.equal(back.wasRecovering, true, 'wasRecovering');
  assert.equal(back.recovered, true, 'recovered');
  assert.equal(back.streamPosition.epoch, epoch, 'same epoch on node B');
  assertSeq(ns(s.pubs), range(55), 'publication data');
  assertSeq(offsets(s.pubs), fromTo(1, 55), 'publication offsets');

  // And it goes on live on node B.
  await publish(cfg, cfg.a.http, channel, { n: 55 }, `${id}-55`);
  await received(s, 56);
  assert.deepEqual(s.pubs[55], { data: { n: 55 }, offset: 56 });
  assert.deepEqual(laterEvents(s), ['subscribing', 'subscribed'], 'subscription events after the first subscribe');
});

test('a server-side subscription (token channels) recovers on node B what it missed on A', { timeout: 30000 }, async (t) => {
  const cfg = cluster(t);
  if (!cfg) return;
  const id = nonce();
  const channel = `feed:server-${id}`;
  const proxy = await SwitchProxy.start(cfg.a);
  t.after(() => proxy.close());
  const token = connToken(cfg.secret, { sub: `srv-${id}`, channels: [channel] });
  const c = await sdkClient(t, sdkTarget(cfg, proxy.url), { ...FAST_RECONNECT, token });
  const subscribed = [];
  const pubs = [];
  c.client.on('subscribed', (ctx) => subscribed.push(ctx));
  c.client.on('publication', (ctx) => {
    if (ctx.channel === channel) pubs.push({ data: ctx.data, offset: ctx.offset });
  });
  c.client.connect();
  await waitUntil(() => subscribed.length >= 1, 5000, 'the server-side subscribed event');
  assert.equal(subscribed[0].channel, channel);
  assert.equal(subscribed[0].recoverable, true, 'server-side subscription in a feed channel is recoverable');
  for (let n = 0; n < 3; n++) await publish(cfg, cfg.a.http, channel, { n }, `${id}-${n}`);
  await waitUntil(() => pubs.length >= 3, 5000, '3 live publications');

  const away = waitEvent(c.client, 'connecting', 5000);
  proxy.moveTo(cfg.b);
  await away;
  for (let n = 3; n < 23; n++) await publish(cfg, cfg.b.http, channel, { n }, `${id}-${n}`);
  proxy.release();
  await waitUntil(() => subscribed.length >= 2 && pubs.length >= 23, 10000,
    `the resubscribe and 23 publications (got ${pubs.length})`);
  await sleep(200); // a duplicate would arrive by now
  const back = subscribed[1];
  assert.deepEqual(proxy.open(), ['B'], 'now on node B');
  assert.equal(back.wasRecovering, true, 'wasRecovering');
  assert.equal(back.recovered, true, 'recovered');
  assertSeq(ns(pubs), range(23), 'publication data');
  assertSeq(offsets(pubs), fromTo(1, 23), 'publication offsets');
});

// ---------------------------------------------------------------------------
// d. A gap larger than the history window

test('a gap larger than history_size is not recovered (recovered: false) and the subscription goes on live', { timeout: 30000 }, async (t) => {
  const cfg = cluster(t);
  if (!cfg) return;
  const id = nonce();
  const channel = `tiny:gap-${id}`;
  const c = await connectedClient(t, sdkTarget(cfg, cfg.a.ws), FAST_RECONNECT);
  const s = track(c.client, channel);
  s.sub.subscribe();
  await subscribedTimes(s, 1);
  let epoch;
  for (let n = 0; n < 3; n++) {
    ({ epoch } = await publish(cfg, cfg.b.http, channel, { n }, `${id}-${n}`));
  }
  await received(s, 3);

  c.client.disconnect();
  await waitUntil(() => c.client.state === 'disconnected', 5000, 'the client to disconnect');
  for (let n = 3; n < 23; n++) {
    const r = await publish(cfg, cfg.b.http, channel, { n }, `${id}-${n}`);
    assert.deepEqual(r, { offset: n + 1, epoch });
  }
  const h = await apiHistory(cfg, cfg.a.http, { channel, limit: -1 });
  t.diagnostic(`history holds offsets ${JSON.stringify(offsets(h.result.publications))}`);

  c.client.connect();
  const back = await subscribedTimes(s, 2);
  await sleep(200); // recovered publications, if any, would have been delivered by now
  t.diagnostic(`resubscribe ctx: ${JSON.stringify(back)}; publications after it: ${JSON.stringify(offsets(s.pubs.slice(3)))}`);
  assert.equal(back.wasRecovering, true, 'wasRecovering');
  assert.equal(back.recovered, false, 'recovered: the 20 missed publications do not fit in a window of 5');
  assert.equal(back.streamPosition.epoch, epoch, 'same epoch');
  // Whatever came with the unrecovered subscribe is new to the app, in order, none twice.
  const later = offsets(s.pubs.slice(3));
  assert.ok(later.every((o, i) => o > 3 && o <= 23 && (i === 0 || o === later[i - 1] + 1)),
    `publications delivered with the unrecovered subscribe: ${JSON.stringify(later)}`);

  const live = await publish(cfg, cfg.b.http, channel, { n: 23 }, `${id}-23`);
  assert.equal(live.offset, 24);
  await waitUntil(() => s.pubs.some((p) => p.offset === 24), 5000, 'the live publication after the gap');
  await sleep(100);
  assert.deepEqual(s.pubs[s.pubs.length - 1], { data: { n: 23 }, offset: 24 }, 'live publication, once, last');
  assert.equal(s.pubs.filter((p) => p.offset === 24).length, 1);
});

// ---------------------------------------------------------------------------
// b. Redis pub/sub connections killed while publications flow

test('Redis pub/sub connections killed twice mid-stream: 4 subscribers on A get all 300 publications (published on B meanwhile) once, in order, without reconnecting', { timeout: 45000 }, async (t) => {
  const cfg = cluster(t);
  if (!cfg) return;
  const id = nonce();
  const channel = `feed:kill-${id}`;
  const COUNT = 300;
  const SUBSCRIBERS = 4;

  const subs = [];
  for (let i = 0; i < SUBSCRIBERS; i++) {
    const c = await connectedClient(t, sdkTarget(cfg, cfg.a.ws), FAST_RECONNECT);
    const s = track(c.client, channel);
    s.sub.subscribe();
    await subscribedTimes(s, 1);
    s.client = c;
    s.logFrom = c.log.length; // client events after the initial connect
    subs.push(s);
  }
  // Node B has no subscriber, so its Redis connections are no pub/sub connections: the
  // kills cut only node A's, and node B goes on publishing while A reconnects. A must repair
  // the gap from the channel's stream.
  const before = await nodeInfo(cfg, cfg.a.http);
  const uidB = (await nodeInfo(cfg, cfg.b.http)).uid;
  assert.equal(before.redis.state, 'connected');
  await waitUntil(() => pubsubUp(cfg, [before.uid]), 5000, 'node A\'s pub/sub connection');
  // Clients of earlier tests on node B are gone; so is its last subscription, once it
  // unsubscribed their channels.
  await waitUntil(async () => !(await pubsubClients(cfg)).includes(`shardcast-${uidB}-sub`), 5000,
    'node B to hold no subscription');

  // Publisher: through node B's API at a steady pace; an error reply would be retried with
  // the same idempotency key, so a retry cannot publish twice.
  const stats = { retries: 0 };
  let published = 0;
  const publisher = (async () => {
    const results = [];
    for (let n = 0; n < COUNT; n++) {
      results.push(await publish(cfg, cfg.b.http, channel, { n }, `${id}-${n}`, { stats }));
      published = n + 1;
      await sleep(5);
    }
    return results;
  })();
  const kills = [];
  const killer = (async () => {
    for (const at of [100, 200]) {
      await waitUntil(() => published >= at, 20000, `publication ${at}`);
      // Node A's pub/sub connection is back before each kill.
      await waitUntil(() => pubsubUp(cfg, [before.uid]), 5000, 'node A\'s pub/sub connection back');
      kills.push({ at: published, killed: await killPubsub(cfg) });
    }
  })();
  const [results] = await Promise.all([publisher, killer]);
  const epoch = results[0].epoch;
  assert.deepEqual(results, fromTo(1, COUNT).map((offset) => ({ offset, epoch })),
    'every publish result once, offsets 1..300 (retries got the first result)');

  try {
    await waitUntil(() => subs.every((s) => s.pubs.length >= COUNT), 15000, `${COUNT} publications at every subscriber`);
  } catch (err) {
    throw new Error(`${err.message}; received: ${subs.map((s) => s.pubs.length).join(', ')}`);
  }
  await sleep(300); // duplicates would arrive by now
  const afterA = await waitUntil(async () => {
    const info = await nodeInfo(cfg, cfg.a.http);
    return info.redis.reconnects >= before.redis.reconnects + 2 && info.redis.state === 'connected' ? info : null;
  }, 5000, 'node A to count two Redis reconnects');
  const pick = (i) => Object.fromEntries(Object.entries(i.counters)
    .filter(([k]) => /repair|stream_reads|insufficient|recover/.test(k)));
  t.diagnostic(`kills: ${JSON.stringify(kills)}; publish retries: ${stats.retries}; node A redis ${JSON.stringify(afterA.redis)}`);
  t.diagnostic(`node A counters before ${JSON.stringify(pick(before))} after ${JSON.stringify(pick(afterA))}`);
  assert.deepEqual(kills.map((k) => k.killed), [1, 1], 'each kill cut node A\'s pub/sub connection (only)');
  assert.equal(afterA.redis.reconnects, before.redis.reconnects + 2, 'node A reconnected twice');
  assert.ok(afterA.counters.repaired_publications > before.counters.repaired_publications,
    'node A repaired publications it missed from the stream (the kills did open gaps)');

  for (const [i, s] of subs.entries()) {
    const who = `subscriber ${i}`;
    assertSeq(ns(s.pubs), range(COUNT), `${who} data`);
    assertSeq(offsets(s.pubs), fromTo(1, COUNT), `${who} offsets`);
    const clientEvents = s.client.log.slice(s.logFrom).map((e) => e.event)
      .filter((e) => e === 'connecting' || e === 'disconnected');
    assert.deepEqual(clientEvents, [], `${who}: the SDK did not reconnect`);
    assert.equal(s.client.rec.opened, 1, `${who}: one WebSocket`);
    assert.deepEqual(laterEvents(s), [], `${who}: no unsubscribe/resubscribe (${JSON.stringify(s.events)})`);
  }
});

// ---------------------------------------------------------------------------
// c. Redis restarted without persistence (keep last: it replaces the Redis)

test('after Redis restarts empty, a returning subscriber learns its position is lost: recovered false, a new epoch', { timeout: 45000 }, async (t) => {
  const cfg = cluster(t);
  if (!cfg) return;
  const id = nonce();
  const channel = `feed:restart-${id}`;
  const c = await connectedClient(t, sdkTarget(cfg, cfg.a.ws), FAST_RECONNECT);
  const s = track(c.client, channel);
  s.sub.subscribe();
  await subscribedTimes(s, 1);
  const before = [];
  for (let n = 0; n < 3; n++) before.push(await publish(cfg, cfg.b.http, channel, { n }, `${id}-${n}`));
  const oldEpoch = before[0].epoch;
  await received(s, 3);
  assertSeq(offsets(s.pubs), [1, 2, 3], 'offsets before the restart');

  c.client.disconnect();
  await waitUntil(() => c.client.state === 'disconnected', 5000, 'the client to disconnect');
  await restartRedisEmpty(cfg);

  // Both nodes reconnect by themselves; publishes fail until then (retried, same key).
  const stats = { retries: 0 };
  const r1 = await publish(cfg, cfg.a.http, channel, { n: 100 }, `${id}-100`, { ms: 15000, stats });
  const r2 = await publish(cfg, cfg.b.http, channel, { n: 101 }, `${id}-101`, { ms: 15000, stats });
  t.diagnostic(`publish retries while the nodes reconnected: ${stats.retries}`);
  assert.notEqual(r1.epoch, oldEpoch, 'a new epoch after Redis lost the stream');
  assert.deepEqual([r1, r2], [{ offset: 1, epoch: r1.epoch }, { offset: 2, epoch: r1.epoch }], 'offsets start again');

  c.client.connect();
  const back = await subscribedTimes(s, 2, 15000);
  await sleep(200);
  t.diagnostic(`resubscribe ctx: ${JSON.stringify(back)}; events ${JSON.stringify(s.events)}`);
  assert.equal(back.wasRecovering, true, 'wasRecovering');
  assert.equal(back.recovered, false, 'recovered');
  assert.notEqual(back.streamPosition.epoch, oldEpoch, 'the epoch changed');
  assert.deepEqual(back.streamPosition, { offset: 2, epoch: r1.epoch }, 'the new stream position');
  assert.deepEqual(s.pubs.slice(3), [], 'nothing delivered as recovered from another epoch');

  const live = await publish(cfg, cfg.a.http, channel, { n: 102 }, `${id}-102`);
  assert.deepEqual(live, { offset: 3, epoch: r1.epoch });
  await received(s, 4);
  await sleep(100);
  assert.deepEqual(s.pubs.slice(3), [{ data: { n: 102 }, offset: 3 }], 'live again in the new epoch, once');
});

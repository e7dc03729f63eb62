// Bidirectional emulation with the official JS SDK, WebSocket unavailable: the
// client's only transports are `http_stream` and `sse` (its `transports`
// option), its stream is opened on node A and every command it sends goes as a
// POST to node B's /emulation, which routes it to A through Redis (no sticky
// sessions). Then everything works as over WebSocket: connect, subscribe,
// publish, presence, history, recovery, pings. Each test runs once per
// transport. Not a *.test.mjs file: `node --test tests/interop` does not pick it
// up (it needs two nodes and a Redis); tests/e2e/sdk.rs starts all that and runs
// it by path:
//
//   node --test --test-concurrency=1 tests/interop/cluster/emulation.cluster.mjs
//
// Target, from the environment (every test skips when one is unset):
//   SHARDCAST_A_HTTP, SHARDCAST_B_HTTP   http://127.0.0.1:PORT of node A, B
//   SHARDCAST_API_KEY                    X-API-Key of both
//   SHARDCAST_SECRET                     HS256 secret of connection tokens
//   SHARDCAST_PING_SECS, SHARDCAST_PONG_SECS   the nodes' ping interval and pong timeout
//
// The nodes need `[transports] http_stream = true, sse = true`, the `chat`
// namespace of tests/e2e (client publish, presence) and
//   [namespaces.feed]  history_size = 100, history_ttl_secs = 300, recover = true

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  apiPublish, connToken, nonce, sleep, waitUntil, waitEvent, waitOutcome, subscribed, range,
} from '../helpers.mjs';

const NEEDED = [
  'SHARDCAST_A_HTTP', 'SHARDCAST_B_HTTP', 'SHARDCAST_API_KEY', 'SHARDCAST_SECRET',
  'SHARDCAST_PING_SECS', 'SHARDCAST_PONG_SECS',
];

function cluster(t) {
  const missing = NEEDED.filter((k) => !process.env[k]);
  if (missing.length > 0) {
    t.skip(`no shardcast cluster: set ${missing.join(', ')} (see the head of this file)`);
    return null;
  }
  const base = (k) => process.env[k].replace(/\/+$/, '');
  return {
    a: base('SHARDCAST_A_HTTP'),
    b: base('SHARDCAST_B_HTTP'),
    apiKey: process.env.SHARDCAST_API_KEY,
    secret: process.env.SHARDCAST_SECRET,
    pingSecs: Number(process.env.SHARDCAST_PING_SECS),
    pongSecs: Number(process.env.SHARDCAST_PONG_SECS),
  };
}

let deps = null;
async function load() {
  if (deps === null) {
    const [centrifuge, eventsource] = await Promise.all([import('centrifuge'), import('eventsource')]);
    deps = { Centrifuge: centrifuge.Centrifuge, EventSource: eventsource.EventSource };
  }
  return deps;
}

/**
 * An SDK client whose only transport is `transport`, streaming from node A and
 * POSTing its commands to node B's /emulation. `rec` records every request it
 * makes: { url, method, body } (bodies of emulation POSTs parsed).
 */
async function emulatedClient(t, cfg, transport, opts = {}) {
  const { Centrifuge, EventSource } = await load();
  const rec = { requests: [], statuses: [] };
  const fetchRecorded = async (url, init = {}) => {
    const entry = { url: String(url), method: init.method || 'GET' };
    if (entry.url.endsWith('/emulation')) {
      entry.body = JSON.parse(init.body);
    }
    rec.requests.push(entry);
    const response = await fetch(url, init);
    if (entry.url.endsWith('/emulation')) {
      rec.statuses.push(response.status);
    }
    return response;
  };
  const { user, ...rest } = opts;
  const client = new Centrifuge(
    [{ transport, endpoint: `${cfg.a}/connection/${transport}` }],
    {
      // No WebSocket at all: as behind a proxy that blocks it.
      websocket: undefined,
      eventsource: EventSource,
      fetch: fetchRecorded,
      emulationEndpoint: `${cfg.b}/emulation`,
      token: connToken(cfg.secret, { sub: user ?? `emu-${nonce()}` }),
      name: 'js',
      timeout: 5000,
      minReconnectDelay: 100,
      maxReconnectDelay: 500,
      ...rest,
    },
  );
  const log = [];
  for (const event of ['connecting', 'connected', 'disconnected', 'error']) {
    client.on(event, (ctx) => log.push({ event, ctx, at: Date.now() }));
  }
  t.after(() => client.disconnect());
  return { client, rec, log };
}

async function connected(t, cfg, transport, opts) {
  const c = await emulatedClient(t, cfg, transport, opts);
  const outcome = waitOutcome(c.client, {
    connected: (ctx) => ctx,
    disconnected: (ctx) => {
      throw new Error(`disconnected instead of connecting: ${JSON.stringify(ctx)}`);
    },
  }, 10000, `the ${transport} client to connect`);
  c.client.connect();
  c.ctx = await outcome;
  return c;
}

/** The emulation POSTs a client made: all to node B, all answered 204. */
function emulationPosts(rec, cfg) {
  const posts = rec.requests.filter((r) => r.url.endsWith('/emulation'));
  for (const p of posts) {
    assert.equal(p.url, `${cfg.b}/emulation`, 'commands go to the other node');
    assert.equal(p.method, 'POST');
    assert.equal(typeof p.body.session, 'string');
    assert.equal(typeof p.body.node, 'string');
    assert.equal(typeof p.body.data, 'string');
  }
  return posts;
}

/** Publishes through node `node`'s server API (a history channel answers with its position). */
async function publishOk(cfg, node, channel, data) {
  const r = await apiPublish({ http: node, apiKey: cfg.apiKey }, channel, data);
  assert.equal(r.status, 200, `POST /api/publish ${channel}: HTTP ${r.status} ${r.text}`);
  assert.ok(r.body && r.body.result && !r.body.error, `POST /api/publish ${channel}: ${r.text}`);
}

for (const transport of ['http_stream', 'sse']) {
  test(`${transport}: connects over the stream of node A, commands through node B`, async (t) => {
    const cfg = cluster(t);
    if (!cfg) return;
    const { client, rec, ctx } = await connected(t, cfg, transport);
    assert.equal(ctx.transport, transport);
    assert.match(ctx.client, /^[0-9a-f-]{36}$/);
    // A subscription is the first command after connect: it goes to B.
    const channel = `chat:emu-${nonce()}`;
    const { sub } = await subscribed(client, channel);
    const posts = emulationPosts(rec, cfg);
    assert.ok(posts.length >= 1, 'the subscribe went as an emulation POST');
    assert.ok(posts.some((p) => p.body.data.includes('"subscribe"')));
    const streams = rec.requests.filter((r) => r.url.startsWith(`${cfg.a}/connection/`));
    // SSE opens its stream with EventSource (not through this fetch); HTTP-streaming with it.
    if (transport === 'http_stream') {
      assert.equal(streams.length, 1, 'one stream, on node A');
    }
    await waitUntil(() => rec.statuses.length === posts.length, 5000, 'POST answers');
    assert.ok(rec.statuses.every((s) => s === 204), `statuses ${rec.statuses}`);
    sub.unsubscribe();
  });

  test(`${transport}: subscribe, client publish and publications from both nodes`, async (t) => {
    const cfg = cluster(t);
    if (!cfg) return;
    const { client } = await connected(t, cfg, transport);
    const channel = `chat:emu-${nonce()}`;
    const { sub, pubs } = await subscribed(client, channel);
    await publishOk(cfg, cfg.a, channel, { from: 'api-a' });
    await publishOk(cfg, cfg.b, channel, { from: 'api-b' });
    const result = await sub.publish({ from: 'client' });
    assert.deepEqual(result, {});
    await waitUntil(() => pubs.length === 3, 5000, 'three publications');
    assert.deepEqual(pubs, [{ from: 'api-a' }, { from: 'api-b' }, { from: 'client' }]);
  });

  test(`${transport}: presence and presence stats`, async (t) => {
    const cfg = cluster(t);
    if (!cfg) return;
    const user = `emu-${nonce()}`;
    const { client, ctx } = await connected(t, cfg, transport, { user });
    const channel = `chat:emu-${nonce()}`;
    const { sub } = await subscribed(client, channel);
    const presence = await sub.presence();
    const entries = Object.values(presence.clients);
    assert.equal(entries.length, 1);
    assert.equal(entries[0].user, user);
    assert.equal(entries[0].client, ctx.client);
    const stats = await sub.presenceStats();
    assert.deepEqual(stats, { numClients: 1, numUsers: 1 });
  });

  test(`${transport}: history`, async (t) => {
    const cfg = cluster(t);
    if (!cfg) return;
    const { client } = await connected(t, cfg, transport);
    const channel = `feed:emu-${nonce()}`;
    for (const i of range(3)) {
      await publishOk(cfg, i % 2 ? cfg.a : cfg.b, channel, { n: i });
    }
    const { sub } = await subscribed(client, channel);
    const history = await sub.history({ limit: 10 });
    assert.deepEqual(history.publications.map((p) => p.data), [{ n: 0 }, { n: 1 }, { n: 2 }]);
    assert.equal(history.offset, 3);
    assert.ok(history.epoch.length > 0);
  });

  test(`${transport}: recovery after a reconnect`, async (t) => {
    const cfg = cluster(t);
    if (!cfg) return;
    const { client, log } = await connected(t, cfg, transport);
    const channel = `feed:emu-${nonce()}`;
    const { sub, pubs } = await subscribed(client, channel);
    await publishOk(cfg, cfg.a, channel, { n: 0 });
    await waitUntil(() => pubs.length === 1, 5000, 'the first publication');
    client.disconnect();
    for (const i of range(3)) {
      await publishOk(cfg, cfg.b, channel, { n: i + 1 });
    }
    const resubscribed = waitEvent(sub, 'subscribed', 10000);
    client.connect();
    const subCtx = await resubscribed;
    assert.equal(subCtx.wasRecovering, true);
    assert.equal(subCtx.recovered, true);
    await waitUntil(() => pubs.length === 4, 5000, 'the missed publications');
    assert.deepEqual(pubs, [{ n: 0 }, { n: 1 }, { n: 2 }, { n: 3 }]);
    assert.equal(log.filter((e) => e.event === 'connected').length, 2);
  });

  test(`${transport}: server pings are answered through the other node`, async (t) => {
    const cfg = cluster(t);
    if (!cfg) return;
    const { client, rec, log } = await connected(t, cfg, transport);
    // Stay idle for more than two ping intervals: every ping must be answered with a pong
    // ({}) by POST to B within the pong timeout, or A closes the connection.
    await sleep((cfg.pingSecs * 2 + cfg.pongSecs + 1) * 1000);
    const pongs = emulationPosts(rec, cfg).filter((p) => p.body.data.trim() === '{}');
    assert.ok(pongs.length >= 2, `pongs sent: ${pongs.length}`);
    assert.equal(log.filter((e) => e.event === 'disconnected').length, 0, 'stayed connected');
    assert.equal(log.filter((e) => e.event === 'connected').length, 1, 'never reconnected');
    assert.equal(client.state, 'connected');
  });
}

// The official SDK's protobuf build (`centrifuge/build/protobuf`, subprotocol
// `centrifuge-protobuf`, binary frames) against shardcast, beside JSON SDK
// clients on the same channels.
//
// Run by tests/e2e/sdk.rs (`official_js_sdk_protobuf_interop`) against a server
// with the history namespaces and a 2 s ping; the environment is the one of
// ../helpers.mjs. Data: the protobuf build sends and receives `data` as bytes
// (Uint8Array). shardcast carries JSON, so what a protobuf client publishes must
// be JSON text, and a JSON publication reaches it as the bytes of its JSON text.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  target, ALL_BUT_PING, connectedClient, subscribed, nonce, waitUntil, waitOutcome, sleep,
  publishOk, apiPublish, sdkWebSocketClass, connToken, deps,
} from '../helpers.mjs';

/** Publishes into a history channel through the API; asserts the offset it got. */
async function publishAt(cfg, channel, data, offset) {
  const r = await apiPublish(cfg, channel, data);
  assert.equal(r.status, 200, r.text);
  assert.equal(r.body.result.offset, offset, r.text);
}

const enc = new TextEncoder();
const dec = new TextDecoder();
const bytes = (value) => enc.encode(JSON.stringify(value));
// The SDK sets `binaryType = 'arraybuffer'`: binary frames are ArrayBuffers.
const isBinary = (f) => f instanceof ArrayBuffer || Buffer.isBuffer(f);
const frameBytes = (f) => new Uint8Array(f);
const parse = (data) => {
  assert.ok(data instanceof Uint8Array, `protobuf data is bytes, got ${typeof data}`);
  return JSON.parse(dec.decode(data));
};

let pbPromise = null;
function protobufSdk() {
  if (pbPromise === null) {
    pbPromise = import('centrifuge/build/protobuf').then((m) => m.Centrifuge);
  }
  return pbPromise;
}

/** A connected client of the protobuf build; `{ client, rec, clientId }`. */
async function pbClient(t, cfg, { user } = {}) {
  const Centrifuge = await protobufSdk();
  const { WebSocket } = await deps();
  const rec = { opened: 0, frames: [], sent: [], closes: [], sockets: [] };
  const client = new Centrifuge(cfg.ws, {
    websocket: sdkWebSocketClass(WebSocket, rec),
    name: 'js-protobuf',
    timeout: 5000,
    token: connToken(cfg.secret, { sub: user ?? `pb-${nonce()}` }),
  });
  const disconnects = [];
  client.on('disconnected', (ctx) => disconnects.push(ctx));
  t.after(() => client.disconnect());
  const outcome = waitOutcome(client, {
    connected: (ctx) => ctx,
    disconnected: (ctx) => {
      throw new Error(`protobuf client disconnected instead of connecting: ${JSON.stringify(ctx)}`);
    },
  }, 5000, 'the protobuf client to connect');
  client.connect();
  const ctx = await outcome;
  assert.equal(rec.sockets[0].protocol, 'centrifuge-protobuf', 'the subprotocol was answered');
  return { client, rec, clientId: ctx.client, disconnects };
}

test('protobuf and JSON SDK clients publish to each other on one channel', { timeout: 30000 }, async (t) => {
  const cfg = target(t, ALL_BUT_PING);
  if (!cfg) return;
  const run = nonce();
  const ch = `chat:pb-${run}`;
  const pb = await pbClient(t, cfg, { user: `pb-${run}` });
  const js = await connectedClient(t, cfg, { user: `js-${run}` });
  const p = await subscribed(pb.client, ch);
  const j = await subscribed(js.client, ch);

  // Protobuf → both: bytes of JSON text for the protobuf client, the value for JSON.
  await p.sub.publish(bytes({ from: 'pb', n: 1 }));
  await waitUntil(() => p.pubs.length === 1 && j.pubs.length === 1, 5000, 'the protobuf publication');
  assert.deepEqual(parse(p.pubs[0]), { from: 'pb', n: 1 });
  assert.deepEqual(j.pubs[0], { from: 'pb', n: 1 });
  assert.equal(j.ctxs[0].info.user, `pb-${run}`, 'the publisher info');
  assert.equal(p.ctxs[0].info.user, `pb-${run}`);

  // JSON → both.
  await j.sub.publish({ from: 'json', text: 'héllo' });
  await waitUntil(() => p.pubs.length === 2 && j.pubs.length === 2, 5000, 'the JSON publication');
  assert.deepEqual(parse(p.pubs[1]), { from: 'json', text: 'héllo' });
  assert.equal(p.ctxs[1].info.user, `js-${run}`);

  // Server API → both, in order.
  for (let n = 0; n < 20; n++) await publishOk(cfg, ch, { api: n });
  await waitUntil(() => p.pubs.length === 22 && j.pubs.length === 22, 5000, 'the API publications');
  assert.deepEqual(p.pubs.slice(2).map(parse), j.pubs.slice(2));
  assert.deepEqual(j.pubs.slice(2).map((d) => d.api), [...Array(20).keys()]);

  // On the wire: binary frames only for the protobuf client.
  assert.ok(pb.rec.frames.length > 0);
  for (const f of pb.rec.frames) assert.ok(isBinary(f), `binary frame, got ${typeof f}`);

  // A payload that is not JSON text is refused (bad request), the client stays.
  await assert.rejects(p.sub.publish(new Uint8Array([0xff, 0x00, 0x01])), (e) => e.code === 107);
  assert.equal(pb.client.state, 'connected');
});

test('protobuf SDK: presence, presence stats, rpc refused', { timeout: 20000 }, async (t) => {
  const cfg = target(t, ALL_BUT_PING);
  if (!cfg) return;
  const run = nonce();
  const ch = `chat:pbp-${run}`;
  const pb = await pbClient(t, cfg, { user: `pb-${run}` });
  const js = await connectedClient(t, cfg, { user: `js-${run}` });
  const p = await subscribed(pb.client, ch);
  await subscribed(js.client, ch);
  const presence = await p.sub.presence();
  assert.deepEqual(Object.keys(presence.clients).sort(), [pb.clientId, js.clientId].sort());
  assert.equal(presence.clients[pb.clientId].user, `pb-${run}`);
  assert.equal(presence.clients[js.clientId].user, `js-${run}`);
  assert.deepEqual(await p.sub.presenceStats(), { numClients: 2, numUsers: 2 });
  await assert.rejects(pb.client.rpc('method', bytes({})), (e) => e.code === 108);
});

test('protobuf SDK: history and recovery after a reconnect', { timeout: 30000 }, async (t) => {
  const cfg = target(t, ALL_BUT_PING);
  if (!cfg) return;
  const run = nonce();
  const ch = `feed:pbr-${run}`;
  const pb = await pbClient(t, cfg);
  const p = await subscribed(pb.client, ch);
  for (let n = 1; n <= 3; n++) await publishAt(cfg, ch, { n }, n);
  await waitUntil(() => p.pubs.length === 3, 5000, 'three live publications');
  const last = p.ctxs[2];
  assert.equal(last.offset, 3);

  // The connection drops; publications go on meanwhile; the SDK recovers them.
  const socket = pb.rec.sockets[pb.rec.sockets.length - 1];
  const reconnected = waitOutcome(pb.client, { connected: (ctx) => ctx }, 15000, 'the reconnect');
  socket.terminate();
  await waitUntil(() => pb.client.state !== 'connected', 5000, 'the client to notice');
  for (let n = 4; n <= 6; n++) await publishAt(cfg, ch, { n }, n);
  const resubscribed = waitOutcome(p.sub, { subscribed: (ctx) => ctx }, 15000, 'the resubscribe');
  await reconnected;
  const ctx = await resubscribed;
  assert.ok(ctx.wasRecovering && ctx.recovered, `recovered: ${JSON.stringify(ctx)}`);
  await waitUntil(() => p.pubs.length === 6, 5000, 'the recovered publications');
  assert.deepEqual(p.pubs.map((d) => parse(d).n), [1, 2, 3, 4, 5, 6]);

  // History of a channel whose history clients may read.
  const hch = `open:pbh-${run}`;
  for (let n = 1; n <= 4; n++) await publishAt(cfg, hch, { h: n }, n);
  const h = await pb.client.history(hch, { limit: 10 });
  assert.deepEqual(h.publications.map((x) => parse(x.data).h), [1, 2, 3, 4]);
  assert.equal(h.offset, 4);
  const newest = await pb.client.history(hch, { limit: 2, reverse: true });
  assert.deepEqual(newest.publications.map((x) => x.offset), [4, 3]);
});

test('protobuf SDK: pings answered, the connection stays', { timeout: 20000 }, async (t) => {
  const cfg = target(t);
  if (!cfg) return;
  if (!cfg.pingSecs) {
    t.skip('SHARDCAST_PING_SECS unset');
    return;
  }
  const pb = await pbClient(t, cfg);
  await sleep((cfg.pingSecs * 2 + 1) * 1000);
  assert.equal(pb.client.state, 'connected');
  assert.deepEqual(pb.disconnects, []);
  const pings = pb.rec.frames
    .filter(isBinary)
    .map(frameBytes)
    .filter((b) => b.length === 1 && b[0] === 0);
  assert.ok(pings.length >= 2, `server pings seen: ${pings.length}`);
  assert.equal(pb.rec.opened, 1, 'never reconnected');
});

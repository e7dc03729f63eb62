// Ordering across shards: 200 API publications to `news` reach 6 SDK clients
// (and raw wire clients) complete and in order.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  target, ALL_BUT_PING, connectedClient, subscribed, RawClient, connToken, nonce, publishOk,
  waitUntil, firstDifference, range, wireMessages,
} from './helpers.mjs';

const CHANNEL = 'news';
const COUNT = 200;
const SDK_CLIENTS = 6;
const RAW_CLIENTS = 2;

// The publications of this test are exactly {"n": i}; other tests publish other
// shapes to `news`, so running test files concurrently does not disturb this one.
const isOrderingPayload = (d) => d !== null && typeof d === 'object'
  && typeof d.n === 'number' && Object.keys(d).length === 1;

test(`${COUNT} API publications reach ${SDK_CLIENTS} SDK clients in order (and in wire order)`, { timeout: 90000 }, async (t) => {
  const cfg = target(t, ALL_BUT_PING);
  if (!cfg) return;
  const run = nonce();

  const sdk = [];
  for (let i = 0; i < SDK_CLIENTS; i++) {
    const c = await connectedClient(t, cfg, { user: `order-${run}-${i}` });
    const s = await subscribed(c.client, CHANNEL, isOrderingPayload);
    sdk.push({ ...c, ...s });
  }
  const raw = [];
  for (let i = 0; i < RAW_CLIENTS; i++) {
    const r = await RawClient.open(t, cfg);
    await r.connect(connToken(cfg.secret, { sub: `order-raw-${run}-${i}` }));
    await r.subscribe(CHANNEL);
    raw.push(r);
  }
  t.diagnostic(`SDK client ids: ${sdk.map((c) => c.clientId).join(', ')}`);
  t.diagnostic(`raw client ids: ${raw.map((r) => r.connectReply.client).join(', ')}`);

  for (let n = 0; n < COUNT; n++) {
    await publishOk(cfg, CHANNEL, { n });
  }

  const expected = range(COUNT);
  const rawNs = (r) => r.pubs(CHANNEL).map((p) => p.data).filter(isOrderingPayload).map((d) => d.n);
  try {
    await waitUntil(
      () => sdk.every((c) => c.pubs.length >= COUNT) && raw.every((r) => rawNs(r).length >= COUNT),
      20000,
      `${COUNT} publications at every client`,
    );
  } catch (err) {
    const counts = sdk.map((c) => c.pubs.length).concat(raw.map((r) => rawNs(r).length));
    throw new Error(`${err.message}; received (SDK..., raw...): ${counts.join(', ')}`);
  }

  // Wire order first: if it is wrong the server is at fault, not the SDK.
  for (const [i, r] of raw.entries()) {
    const ns = rawNs(r);
    const frames = new Set(r.pubs(CHANNEL).map((p) => p.frame));
    t.diagnostic(`raw client ${i}: ${ns.length} pushes in ${frames.size} frames`);
    assert.deepEqual(ns, expected, `raw client ${i} wire order: ${firstDifference(ns, expected)}`);
    assert.deepEqual(r.bad, [], `raw client ${i} got unparsable lines`);
  }
  for (const [i, c] of sdk.entries()) {
    const ns = c.pubs.map((d) => d.n);
    assert.deepEqual(ns, expected, `SDK client ${i} (${c.clientId}) order: ${firstDifference(ns, expected)}`);
    assert.ok(c.ctxs.every((ctx) => ctx.channel === CHANNEL));
  }
  // And the order on the SDK clients' own sockets (what ws handed to the SDK).
  for (const [i, c] of sdk.entries()) {
    const wire = wireMessages(c.rec.frames)
      .filter((m) => m.push && m.push.pub && isOrderingPayload(m.push.pub.data))
      .map((m) => m.push.pub.data.n);
    assert.deepEqual(wire, expected, `SDK client ${i} socket order: ${firstDifference(wire, expected)}`);
  }
});

// Namespace `chat` (client publish allowed, presence on) against the default
// namespace (client publish not allowed): presence and client publish.
// The tests of this file run one after the other (presence first), and no
// other file uses `chat:room1`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  target, ALL_BUT_PING, connectedClient, subscribed, nonce, waitUntil, sleep, publishOk,
} from './helpers.mjs';

const ROOM = 'chat:room1';

test(`presence in ${ROOM}: entries keyed by client id, with user and client; presenceStats`, { timeout: 30000 }, async (t) => {
  const cfg = target(t);
  if (!cfg) return;
  const run = nonce();
  const alice = await connectedClient(t, cfg, { user: `alice-${run}` });
  const bob = await connectedClient(t, cfg, { user: `bob-${run}` });
  const a = await subscribed(alice.client, ROOM);
  await subscribed(bob.client, ROOM);

  const presence = await a.sub.presence();
  t.diagnostic(`presence: ${JSON.stringify(presence)}`);
  const ids = Object.keys(presence.clients).sort();
  assert.deepEqual(ids, [alice.clientId, bob.clientId].sort(), 'presence must have exactly our 2 clients');
  for (const [id, who] of [[alice.clientId, `alice-${run}`], [bob.clientId, `bob-${run}`]]) {
    assert.equal(presence.clients[id].client, id, `presence entry ${id}: ${JSON.stringify(presence.clients[id])}`);
    assert.equal(presence.clients[id].user, who, `presence entry ${id}: ${JSON.stringify(presence.clients[id])}`);
  }
  const stats = await a.sub.presenceStats();
  assert.deepEqual(stats, { numClients: 2, numUsers: 2 });

  // A second connection of the same user counts as a client, not as a user.
  const alice2 = await connectedClient(t, cfg, { user: `alice-${run}` });
  const a2 = await subscribed(alice2.client, ROOM);
  assert.deepEqual(await a.sub.presenceStats(), { numClients: 3, numUsers: 2 });
  const presence3 = await a.sub.presence();
  assert.equal(Object.keys(presence3.clients).length, 3);
  assert.equal(presence3.clients[alice2.clientId].user, `alice-${run}`);

  // Unsubscribing removes the entry.
  a2.sub.unsubscribe();
  const after = await waitUntil(async () => {
    const s = await a.sub.presenceStats();
    return s.numClients === 2 ? s : null;
  }, 3000, 'presence to drop the unsubscribed client');
  assert.deepEqual(after, { numClients: 2, numUsers: 2 });
  // So does disconnecting.
  bob.client.disconnect();
  await waitUntil(async () => {
    const p = await a.sub.presence();
    return Object.keys(p.clients).length === 1 && p.clients[alice.clientId] ? p : null;
  }, 3000, 'presence to drop the disconnected client');
  assert.deepEqual(await a.sub.presenceStats(), { numClients: 1, numUsers: 1 });
});

test(`client publish in ${ROOM} reaches another subscriber`, { timeout: 20000 }, async (t) => {
  const cfg = target(t);
  if (!cfg) return;
  const run = nonce();
  const mine = (d) => d && d.run === run;
  const alice = await connectedClient(t, cfg, { user: `alice-${run}` });
  const bob = await connectedClient(t, cfg, { user: `bob-${run}` });
  const a = await subscribed(alice.client, ROOM, mine);
  const b = await subscribed(bob.client, ROOM, mine);

  const data = { kind: 'chat', run, text: 'hello from the SDK', nested: { list: [1, 'two', null, true] } };
  const result = await a.sub.publish(data);
  assert.deepEqual(result, {});
  await waitUntil(() => b.pubs.length >= 1, 5000, 'the publication at the other subscriber');
  assert.deepEqual(b.pubs, [data]);
  t.diagnostic(`publication ctx at the other subscriber: ${JSON.stringify(b.ctxs[0])}`);
  // The publisher is subscribed too: Centrifugo delivers to it as well.
  await waitUntil(() => a.pubs.length >= 1, 5000, 'the publication at the publisher');
  assert.deepEqual(a.pubs, [data]);
  // Client::publish (without a subscription object) works the same way.
  const data2 = { kind: 'chat', run, text: 'second' };
  assert.deepEqual(await bob.client.publish(ROOM, data2), {});
  await waitUntil(() => a.pubs.length >= 2, 5000, 'the second publication');
  assert.deepEqual(a.pubs, [data, data2]);
});

test('client publish in news (default namespace) is refused with 103 permission denied', { timeout: 20000 }, async (t) => {
  const cfg = target(t, ALL_BUT_PING);
  if (!cfg) return;
  const run = nonce();
  const mine = (d) => d && d.run === run;
  const alice = await connectedClient(t, cfg, { user: `alice-${run}` });
  const bob = await connectedClient(t, cfg, { user: `bob-${run}` });
  const a = await subscribed(alice.client, 'news', mine);
  const b = await subscribed(bob.client, 'news', mine);

  await assert.rejects(a.sub.publish({ kind: 'refused', run }), (err) => {
    t.diagnostic(`publish error: ${JSON.stringify(err)}`);
    assert.equal(err.code, 103, `expected error 103, got ${JSON.stringify(err)}`);
    assert.match(err.message, /permission denied/i);
    return true;
  });
  // Nothing was published, and the client and its subscription are unharmed.
  await sleep(300);
  assert.deepEqual(b.pubs, []);
  assert.deepEqual(a.pubs, []);
  assert.equal(alice.client.state, 'connected');
  assert.equal(a.sub.state, 'subscribed');
  const ok = { kind: 'api', run };
  await publishOk(cfg, 'news', ok);
  await waitUntil(() => a.pubs.length >= 1 && b.pubs.length >= 1, 5000, 'the API publication');
  assert.deepEqual(a.pubs, [ok]);
  assert.deepEqual(b.pubs, [ok]);
});

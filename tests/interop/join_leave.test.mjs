// Join and leave events on a Subscription (`joinLeave: true`), against a
// namespace with `join_leave` (the server's test config names it `jl`): the
// subscriber that asked sees its own join and the others' joins and leaves,
// with their subscription token's `info` as `chanInfo`; one that did not ask
// gets none over the wire.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  target, connectedClient, subscribed, nonce, signJwt, waitUntil, sleep, wireMessages,
} from './helpers.mjs';

test('join/leave: Subscription join and leave events with joinLeave: true', { timeout: 20000 }, async (t) => {
  const cfg = target(t);
  if (!cfg) return;
  const run = nonce();
  const channel = `jl:${run}`;
  const alice = await connectedClient(t, cfg, { user: `alice-${run}` });
  const bob = await connectedClient(t, cfg, { user: `bob-${run}` });
  const carol = await connectedClient(t, cfg, { user: `carol-${run}` });

  const events = [];
  const record = (sub) => {
    for (const kind of ['join', 'leave']) {
      sub.on(kind, (ctx) => events.push({ kind, channel: ctx.channel, ...ctx.info }));
    }
  };
  const a = await subscribed(alice.client, channel, () => true, { joinLeave: true });
  record(a.sub);
  // The SDK asked for them on the wire.
  const subCmd = wireMessages(alice.rec.sent).find((c) => c.subscribe?.channel === channel);
  assert.equal(subCmd?.subscribe?.join_leave, true, `subscribe command: ${JSON.stringify(subCmd)}`);
  // Its own join, after its subscribe reply.
  await waitUntil(() => events.length === 1, 5000, "alice's own join");
  assert.deepEqual(events[0], { kind: 'join', channel, client: alice.clientId, user: `alice-${run}` });

  // Bob subscribes with a subscription token carrying info, without joinLeave.
  const bobToken = signJwt(cfg.secret, { sub: `bob-${run}`, channel, info: { seat: 7 } });
  const b = await subscribed(bob.client, channel, () => true, { token: bobToken });
  const bobEvents = [];
  b.sub.on('join', (ctx) => bobEvents.push(ctx));
  b.sub.on('leave', (ctx) => bobEvents.push(ctx));
  await waitUntil(() => events.length === 2, 5000, "bob's join at alice");
  assert.deepEqual(events[1], {
    kind: 'join', channel, client: bob.clientId, user: `bob-${run}`, chanInfo: { seat: 7 },
  });
  // Presence shows the same chanInfo.
  const presence = await a.sub.presence();
  assert.deepEqual(presence.clients[bob.clientId]?.chanInfo, { seat: 7 }, JSON.stringify(presence));

  // Carol joins and disconnects: a join and a leave.
  await subscribed(carol.client, channel);
  await waitUntil(() => events.length === 3, 5000, "carol's join at alice");
  carol.client.disconnect();
  await waitUntil(() => events.length === 4, 5000, "carol's leave at alice");
  assert.deepEqual(events.slice(2), [
    { kind: 'join', channel, client: carol.clientId, user: `carol-${run}` },
    { kind: 'leave', channel, client: carol.clientId, user: `carol-${run}` },
  ]);

  // Bob unsubscribes: his leave, still with his chanInfo.
  b.sub.unsubscribe();
  await waitUntil(() => events.length === 5, 5000, "bob's leave at alice");
  assert.deepEqual(events[4], {
    kind: 'leave', channel, client: bob.clientId, user: `bob-${run}`, chanInfo: { seat: 7 },
  });

  // Bob never asked: no join or leave reached his socket, so none reached the SDK.
  await sleep(200);
  const pushes = wireMessages(bob.rec.frames).filter((m) => m.push?.join || m.push?.leave);
  assert.deepEqual(pushes, [], 'join/leave pushes reached a subscriber that did not ask');
  assert.deepEqual(bobEvents, []);
  assert.equal(events.length, 5, JSON.stringify(events));
});

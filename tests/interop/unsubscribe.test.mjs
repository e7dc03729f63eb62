// After sub.unsubscribe() the server stops sending the channel's publications
// to that connection, while other subscribers still get them.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  target, ALL_BUT_PING, connectedClient, subscribed, nonce, publishOk, waitUntil, waitEvent, sleep, wireMessages,
} from './helpers.mjs';

const CHANNEL = 'news';

test('unsubscribe: no more publications on the wire, others still receive', { timeout: 20000 }, async (t) => {
  const cfg = target(t, ALL_BUT_PING);
  if (!cfg) return;
  const run = nonce();
  const mine = (d) => d && d.run === run;
  const leaver = await connectedClient(t, cfg, { user: `leaver-${run}` });
  const stayer = await connectedClient(t, cfg, { user: `stayer-${run}` });
  const l = await subscribed(leaver.client, CHANNEL, mine);
  const s = await subscribed(stayer.client, CHANNEL, mine);

  // Both receive while subscribed.
  const before = { kind: 'unsub', run, step: 'before' };
  await publishOk(cfg, CHANNEL, before);
  await waitUntil(() => l.pubs.length === 1 && s.pubs.length === 1, 5000, 'the first publication at both clients');

  const unsubscribed = waitEvent(l.sub, 'unsubscribed', 2000);
  l.sub.unsubscribe();
  const ctx = await unsubscribed;
  assert.equal(ctx.code, 0, `unsubscribed ctx: ${JSON.stringify(ctx)}`);
  // The unsubscribe command went out; wait for the server's reply to it.
  const unsubCmd = wireMessages(leaver.rec.sent)
    .find((c) => c.unsubscribe?.channel === CHANNEL);
  assert.ok(unsubCmd, `the SDK sent no unsubscribe command: ${JSON.stringify(leaver.rec.sent)}`);
  const unsubReply = await waitUntil(
    () => wireMessages(leaver.rec.frames).find((m) => m.id === unsubCmd.id),
    3000,
    'the reply to the unsubscribe command',
  );
  assert.equal(unsubReply.error, undefined, `unsubscribe reply: ${JSON.stringify(unsubReply)}`);

  const after = { kind: 'unsub', run, step: 'after' };
  const framesBefore = leaver.rec.frames.length;
  await publishOk(cfg, CHANNEL, after);
  await waitUntil(() => s.pubs.length === 2, 5000, 'the second publication at the still-subscribed client');
  assert.deepEqual(s.pubs, [before, after]);
  await sleep(300);
  // Not only the SDK (which drops publications of an unsubscribed subscription
  // by itself): nothing of the channel came over the leaver's socket.
  const leaked = leaver.rec.frames.slice(framesBefore).filter((f) => f.includes(run));
  assert.deepEqual(leaked, [], 'publications arrived on the socket after unsubscribe');
  assert.deepEqual(l.pubs, [before]);
  assert.equal(leaver.client.state, 'connected');

  // Subscribing again works and delivers new publications only.
  const resubscribed = waitEvent(l.sub, 'subscribed', 5000);
  l.sub.subscribe();
  await resubscribed;
  const again = { kind: 'unsub', run, step: 'again' };
  await publishOk(cfg, CHANNEL, again);
  await waitUntil(() => l.pubs.length === 2 && s.pubs.length === 3, 5000, 'the third publication at both clients');
  assert.deepEqual(l.pubs, [before, again]);
  assert.deepEqual(s.pubs, [before, after, again]);
});

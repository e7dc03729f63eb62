// Subscription-token expiry with the official SDK (run by tests/e2e/security_tokens.rs with
// `client_expired_sub_close_delay_secs = 2`; not a *.test.mjs file, so the general interop
// run, whose server has the default delay, does not pick it up).
//
// Environment: SHARDCAST_WS, SHARDCAST_HTTP, SHARDCAST_API_KEY, SHARDCAST_SECRET (as in
// ../helpers.mjs), SHARDCAST_SUB_DELAY_SECS (the server's client_expired_sub_close_delay_secs).
//
// `$` channels need a subscription token. The SDK's Subscription `getToken` gives it one at
// subscribe; the server announces `expires`/`ttl`, and the SDK sends `sub_refresh` with a new
// token when the ttl runs out.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  target, ALL_BUT_PING, connectedClient, subscribed, nonce, publishOk, signJwt, waitUntil, waitEvent,
  sleep, wireMessages,
} from '../helpers.mjs';

const TOKEN_SECS = 2;

function subToken(cfg, user, channel, lifetimeSecs) {
  return signJwt(cfg.secret, {
    sub: user,
    channel,
    exp: Math.floor(Date.now() / 1000) + lifetimeSecs,
  });
}

function delaySecs() {
  const d = Number(process.env.SHARDCAST_SUB_DELAY_SECS);
  assert.ok(d > 0, 'SHARDCAST_SUB_DELAY_SECS must be set (the server\'s client_expired_sub_close_delay_secs)');
  return d;
}

test('getToken refreshes: the subscription outlives several token expiries', { timeout: 30000 }, async (t) => {
  const cfg = target(t, ALL_BUT_PING);
  if (!cfg) return;
  const delay = delaySecs();
  const run = nonce();
  const user = `live-${run}`;
  const channel = `$live-${run}`;
  const c = await connectedClient(t, cfg, { user });
  const tokens = [];
  const getToken = async (ctx) => {
    assert.equal(ctx.channel, channel);
    const tok = subToken(cfg, user, channel, TOKEN_SECS);
    tokens.push(Date.now());
    return tok;
  };
  const events = [];
  const s = await subscribed(c.client, channel, (d) => d && d.run === run, { getToken });
  for (const ev of ['subscribing', 'unsubscribed', 'error']) {
    s.sub.on(ev, (ctx) => events.push({ ev, ctx }));
  }
  // The subscribe reply announced the expiry.
  const subReply = wireMessages(c.rec.frames).find((m) => m.subscribe && m.subscribe.expires);
  assert.ok(subReply, `no subscribe reply with expires: ${JSON.stringify(c.rec.frames)}`);
  assert.ok(subReply.subscribe.ttl >= 1 && subReply.subscribe.ttl <= TOKEN_SECS, JSON.stringify(subReply));

  // Stay well past several token lifetimes plus the server's grace.
  const stay = (3 * TOKEN_SECS + delay + 1) * 1000;
  await sleep(stay);
  assert.deepEqual(events, [], `the subscription did not stay: ${JSON.stringify(events)}`);
  assert.ok(tokens.length >= 4, `getToken called ${tokens.length} times in ${stay} ms`);
  // Every refresh was a sub_refresh answered with a new expiry, never an error.
  const sent = wireMessages(c.rec.sent).filter((m) => m.sub_refresh);
  assert.ok(sent.length >= 3, `sub_refresh sent ${sent.length} times`);
  const replies = wireMessages(c.rec.frames).filter((m) => sent.some((r) => r.id === m.id));
  assert.equal(replies.length, sent.length, `replies: ${JSON.stringify(replies)}`);
  for (const r of replies) {
    assert.equal(r.sub_refresh?.expires, true, `sub_refresh reply: ${JSON.stringify(r)}`);
    assert.ok(r.sub_refresh.ttl >= 1 && r.sub_refresh.ttl <= TOKEN_SECS, JSON.stringify(r));
  }
  const pushes = wireMessages(c.rec.frames).filter((m) => m.push?.unsubscribe);
  assert.deepEqual(pushes, [], 'the server unsubscribed a refreshed subscription');
  // Still delivering.
  await publishOk(cfg, channel, { run, n: 1 });
  await waitUntil(() => s.pubs.length === 1, 5000, 'a publication after the refreshes');
  assert.equal(c.client.state, 'connected');
});

test('no refresh: the server unsubscribes that channel only, with 2501', { timeout: 30000 }, async (t) => {
  const cfg = target(t, ALL_BUT_PING);
  if (!cfg) return;
  const delay = delaySecs();
  const run = nonce();
  const user = `lapse-${run}`;
  const channel = `$lapse-${run}`;
  const c = await connectedClient(t, cfg, { user });
  let calls = 0;
  // The first token is given; then the application's token service refuses.
  const getToken = async () => {
    calls += 1;
    if (calls === 1) return subToken(cfg, user, channel, TOKEN_SECS);
    throw new Error('token service unavailable');
  };
  const mine = (d) => d && d.run === run;
  const lapsing = await subscribed(c.client, channel, mine, { getToken });
  const other = await subscribed(c.client, 'news', mine);
  const subscribedAt = Date.now();
  const ctx = await waitEvent(lapsing.sub, 'subscribing', (TOKEN_SECS + delay + 4) * 1000);
  const after = Date.now() - subscribedAt;
  assert.equal(ctx.code, 2501, `subscribing ctx: ${JSON.stringify(ctx)}`);
  assert.equal(ctx.reason, 'subscription expired');
  // Not before the token's exp plus the grace (one wheel tick of slack).
  assert.ok(after >= (TOKEN_SECS + delay - 2) * 1000, `unsubscribed after ${after} ms`);
  const push = wireMessages(c.rec.frames).find((m) => m.push?.unsubscribe);
  assert.deepEqual(push, {
    push: { channel, unsubscribe: { code: 2501, reason: 'subscription expired' } },
  });
  assert.ok(calls >= 2, 'the SDK asked for a new token');
  // The other subscription on the same connection keeps receiving; the connection stays.
  await publishOk(cfg, 'news', { run, n: 1 });
  await publishOk(cfg, channel, { run, n: 2 });
  await waitUntil(() => other.pubs.length === 1, 5000, 'the publication on the other channel');
  await sleep(300);
  assert.deepEqual(other.pubs, [{ run, n: 1 }]);
  assert.deepEqual(lapsing.pubs, [], 'the expired subscription still received');
  const leaked = c.rec.frames.filter((f) => f.includes('"n":2'));
  assert.deepEqual(leaked, [], 'a publication of the expired channel reached the socket');
  assert.equal(c.client.state, 'connected');
  assert.equal(c.rec.opened, 1, 'the connection was not replaced');
});

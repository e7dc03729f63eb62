// Connecting with the official SDK: valid, forged and expired tokens.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  target, connToken, signJwt, wireMessages, nonce, sdkClient, connectedClient, waitOutcome, sleep,
} from './helpers.mjs';

// What the SDK (centrifuge 5.x) does, from its source:
//  - an error reply to connect with code 109, or < 100, or temporary, makes it
//    reconnect (state connecting), and for 109 fetch a new token first; any
//    other code leaves it disconnected with that code;
//  - a close frame / disconnect push with code 3500..3999 or 4500..4999 leaves
//    it disconnected without reconnecting;
//  - without getToken, a token refresh fails the client as
//    disconnected { code: 1 (disconnectedCodes.unauthorized), reason: 'unauthorized' }.

const SDK_UNAUTHORIZED = 1;

test('connect with a valid token: connected event with a non-empty client id', { timeout: 15000 }, async (t) => {
  const cfg = target(t);
  if (!cfg) return;
  const user = `user-${nonce()}`;
  const { client, rec } = await sdkClient(t, cfg, {
    token: connToken(cfg.secret, { sub: user, info: { name: 'interop' } }),
  });
  const outcome = waitOutcome(client, {
    connected: (ctx) => ctx,
    disconnected: (ctx) => {
      throw new Error(`disconnected instead of connected: ${JSON.stringify(ctx)}`);
    },
  }, 5000, 'connected');
  client.connect();
  const ctx = await outcome;
  assert.equal(typeof ctx.client, 'string', `connected ctx: ${JSON.stringify(ctx)}`);
  assert.notEqual(ctx.client, '', 'client id must be non-empty');
  assert.equal(ctx.transport, 'websocket');
  assert.equal(client.state, 'connected');
  // The connect reply as it came over the wire, for the record.
  const reply = wireMessages(rec.frames).find((m) => m.connect);
  assert.ok(reply, 'no connect reply seen on the wire');
  assert.equal(reply.connect.client, ctx.client);
  t.diagnostic(`connect reply: ${JSON.stringify(reply)}`);
});

test('forged token (wrong secret): disconnected with code 3500, no reconnect loop', { timeout: 15000 }, async (t) => {
  const cfg = target(t);
  if (!cfg) return;
  const forged = signJwt(`${cfg.secret}-not-the-secret`, {
    sub: `forger-${nonce()}`,
    exp: Math.floor(Date.now() / 1000) + 3600,
  });
  const { client, rec, log } = await sdkClient(t, cfg, { token: forged, minReconnectDelay: 100, maxReconnectDelay: 200 });
  const outcome = waitOutcome(client, {
    connected: (ctx) => {
      throw new Error(`connected with a forged token: ${JSON.stringify(ctx)}`);
    },
    disconnected: (ctx) => ctx,
  }, 8000, 'disconnected');
  client.connect();
  const ctx = await outcome;
  t.diagnostic(`disconnected ctx: ${JSON.stringify(ctx)}; frames: ${JSON.stringify(rec.frames)}; closes: ${JSON.stringify(rec.closes)}`);
  assert.equal(ctx.code, 3500, `expected disconnect code 3500 (invalid token), got ${JSON.stringify(ctx)}`);
  assert.match(ctx.reason, /invalid token/i);
  // No reconnect loop: with a 100-200 ms reconnect delay, a looping client would
  // have opened several more sockets within a second.
  await sleep(1000);
  assert.equal(client.state, 'disconnected');
  assert.equal(rec.opened, 1, `sockets opened: ${rec.opened}`);
  const connecting = log.filter((e) => e.event === 'connecting');
  assert.equal(connecting.length, 1, `connecting events: ${JSON.stringify(connecting.map((e) => e.ctx))}`);
});

test('expired token without getToken: error 109, then disconnected (unauthorized)', { timeout: 15000 }, async (t) => {
  const cfg = target(t);
  if (!cfg) return;
  const expired = connToken(cfg.secret, { sub: `late-${nonce()}`, exp: Math.floor(Date.now() / 1000) - 60 });
  const { client, rec, log } = await sdkClient(t, cfg, { token: expired });
  const connectErrors = [];
  client.on('error', (ctx) => {
    if (ctx.type === 'connect') connectErrors.push(ctx.error);
  });
  const outcome = waitOutcome(client, {
    connected: (ctx) => {
      throw new Error(`connected with an expired token: ${JSON.stringify(ctx)}`);
    },
    disconnected: (ctx) => ctx,
  }, 8000, 'disconnected');
  client.connect();
  const ctx = await outcome;
  t.diagnostic(`events: ${JSON.stringify(log.map((e) => [e.event, e.ctx]))}; frames: ${JSON.stringify(rec.frames)}`);
  // The server's answer: an error reply 109 "token expired" to the connect command.
  assert.equal(connectErrors.length, 1, `connect errors: ${JSON.stringify(connectErrors)}`);
  assert.equal(connectErrors[0].code, 109, `connect error: ${JSON.stringify(connectErrors[0])}`);
  assert.match(connectErrors[0].message, /token expired/i);
  // The SDK then wants a new token, has no getToken, and gives up.
  assert.equal(ctx.code, SDK_UNAUTHORIZED, `disconnected ctx: ${JSON.stringify(ctx)}`);
  assert.equal(client.state, 'disconnected');
  await sleep(300);
  assert.equal(rec.opened, 1, `sockets opened: ${rec.opened}`);
  assert.equal(client.state, 'disconnected');
});

test('expired token with getToken returning a fresh one: ends connected', { timeout: 15000 }, async (t) => {
  const cfg = target(t);
  if (!cfg) return;
  const user = `renew-${nonce()}`;
  const expired = connToken(cfg.secret, { sub: user, exp: Math.floor(Date.now() / 1000) - 60 });
  let getTokenCalls = 0;
  const c = await connectedClient(t, cfg, {
    token: expired,
    getToken: async () => {
      getTokenCalls += 1;
      return connToken(cfg.secret, { sub: user });
    },
  });
  const connectErrors = c.log.filter((e) => e.event === 'error' && e.ctx.type === 'connect');
  t.diagnostic(`events: ${JSON.stringify(c.log.map((e) => [e.event, e.ctx]))}`);
  assert.equal(connectErrors.length, 1, 'the first attempt must fail with 109');
  assert.equal(connectErrors[0].ctx.error.code, 109);
  assert.equal(getTokenCalls, 1);
  assert.equal(c.rec.opened, 2, 'one failed attempt, one successful');
  assert.ok(c.clientId, 'client id must be non-empty');
  assert.equal(c.client.state, 'connected');
  // Still connected a moment later (no disconnect after connecting).
  await sleep(300);
  assert.equal(c.client.state, 'connected');
});

// Beyond the list of the brief: the SDK refreshes a connection token `ttl`
// seconds after the connect reply (see _connectResponse / _refresh), and
// Centrifugo closes an expired connection only after a grace period
// (client_expired_close_delay, 25 s by default), so the refresh command wins.
test('a connection token about to expire is refreshed without a disconnect', {
  timeout: 20000,
}, async (t) => {
  const cfg = target(t);
  if (!cfg) return;
  const user = `refresh-${nonce()}`;
  let getTokenCalls = 0;
  const c = await connectedClient(t, cfg, {
    token: connToken(cfg.secret, { sub: user, exp: Math.floor(Date.now() / 1000) + 3 }),
    getToken: async () => {
      getTokenCalls += 1;
      return connToken(cfg.secret, { sub: user });
    },
  });
  const connectedAt = Date.now();
  await sleep(6000);
  t.diagnostic(`events: ${JSON.stringify(c.log.map((e) => [e.event, e.ctx]))}; closes: ${JSON.stringify(c.rec.closes)}`);
  const troubles = c.log.filter((e) => e.at >= connectedAt && ['connecting', 'disconnected'].includes(e.event));
  assert.deepEqual(troubles.map((e) => [e.event, e.ctx]), [], 'the connection was lost around the token expiry');
  assert.equal(getTokenCalls, 1);
  const refresh = wireMessages(c.rec.sent).find((m) => m.refresh);
  assert.ok(refresh, 'the SDK sent no refresh command');
  const reply = wireMessages(c.rec.frames).find((m) => m.id === refresh.id);
  assert.ok(reply && !reply.error && reply.refresh, `refresh reply: ${JSON.stringify(reply)}`);
  assert.equal(c.client.state, 'connected');
});

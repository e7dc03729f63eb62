// Server ping / client pong. Needs a server started with a short ping interval:
// SHARDCAST_PING_SECS (ping interval) and SHARDCAST_PONG_SECS (pong timeout).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  target, connectedClient, RawClient, connToken, nonce, sleep, wireMessages,
} from './helpers.mjs';

const NEEDED = ['SHARDCAST_WS', 'SHARDCAST_SECRET', 'SHARDCAST_PING_SECS'];

const lines = (frames) => frames.flatMap((f) => f.split('\n')).filter((l) => l.trim() !== '');
const isEmptyObject = (text) => {
  try {
    const v = JSON.parse(text);
    return v !== null && typeof v === 'object' && !Array.isArray(v) && Object.keys(v).length === 0;
  } catch {
    return false;
  }
};

test('clients answering pings stay connected over 3 ping intervals (SDK and raw)', { timeout: 60000 }, async (t) => {
  const cfg = target(t, NEEDED);
  if (!cfg) return;
  const pingMs = cfg.pingSecs * 1000;
  const run = nonce();
  const c = await connectedClient(t, cfg, { user: `pinged-${run}` });
  const raw = await RawClient.open(t, cfg, { answerPings: true });
  const rawReply = await raw.connect(connToken(cfg.secret, { sub: `pinged-raw-${run}` }));
  const connectedAt = Date.now();

  // What the connect reply told the SDK: it sends pongs only if `pong` is true,
  // and watches for pings only if `ping` (seconds) is set.
  const reply = wireMessages(c.rec.frames).find((m) => m.connect);
  t.diagnostic(`connect reply: ${JSON.stringify(reply)}`);
  assert.equal(reply.connect.ping, cfg.pingSecs, 'connect reply `ping` must be the ping interval in seconds');
  assert.equal(reply.connect.pong, true, 'connect reply must have `pong: true`, or the SDK never answers pings');
  assert.equal(rawReply.ping, cfg.pingSecs);

  await sleep(3 * pingMs + 500);

  const troubles = c.log.filter((e) => e.at >= connectedAt && ['connecting', 'disconnected'].includes(e.event));
  assert.deepEqual(troubles.map((e) => [e.event, e.ctx]), [], 'the SDK client lost its connection');
  assert.equal(c.client.state, 'connected');
  const pings = lines(c.rec.frames).filter(isEmptyObject).length;
  const pongs = lines(c.rec.sent).filter(isEmptyObject).length;
  t.diagnostic(`SDK client: ${pings} pings received, ${pongs} pongs sent; raw client: ${raw.pings} pings`);
  assert.ok(pings >= 2, `expected at least 2 pings in ${3 * cfg.pingSecs} s, got ${pings}`);
  assert.ok(pongs >= pings - 1, `the SDK answered ${pongs} of ${pings} pings`);
  assert.equal(raw.closeInfo, null, `raw client (answering pings) was closed: ${JSON.stringify(raw.closeInfo)}`);
  assert.ok(raw.pings >= 2, `raw client: expected at least 2 pings, got ${raw.pings}`);
});

test('a raw client that does not answer pings is closed with 3012 (no pong)', { timeout: 60000 }, async (t) => {
  const cfg = target(t, NEEDED);
  if (!cfg) return;
  const pongSecs = cfg.pongSecs ?? cfg.pingSecs;
  if (cfg.pongSecs === undefined) {
    t.diagnostic(`SHARDCAST_PONG_SECS unset: assuming a pong timeout of ${pongSecs} s`);
  }
  const raw = await RawClient.open(t, cfg, { answerPings: false });
  await raw.connect(connToken(cfg.secret, { sub: `silent-${nonce()}` }));
  const connectedAt = Date.now();
  const budgetMs = (cfg.pingSecs + pongSecs) * 1000 + 1500;
  const closed = await Promise.race([raw.closed, sleep(budgetMs).then(() => null)]);
  assert.ok(closed, `not closed within ping + pong timeout + 1.5 s (${budgetMs} ms); pings received: ${raw.pings}`);
  const info = raw.disconnectInfo();
  const firstPing = raw.messages.find((m) => isEmptyObject(JSON.stringify(m.msg)));
  t.diagnostic(`closed after ${closed.at - connectedAt} ms, ${raw.pings} pings received`
    + `${firstPing ? `, ${closed.at - firstPing.at} ms after the first ping` : ''}; disconnect: ${JSON.stringify(info)}`);
  assert.ok(raw.pings >= 1, 'closed before any ping was sent');
  assert.ok(
    closed.at - firstPing.at >= pongSecs * 1000 - 250,
    `closed ${closed.at - firstPing.at} ms after the first ping, before the pong timeout (${pongSecs} s)`,
  );
  const code = info.push ? info.push.code : closed.code;
  assert.equal(code, 3012, `expected disconnect code 3012 (no pong), got ${JSON.stringify(info)}`);
  assert.equal(closed.code, 3012, `close frame code: ${JSON.stringify(closed)}`);
  assert.match(closed.reason, /no pong/i);
});

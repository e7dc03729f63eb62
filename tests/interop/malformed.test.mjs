// Malformed commands on a raw connection: the server answers with an error
// reply (107 bad request / 104 method not found) or disconnects with 3501
// (bad request), and other clients are not affected.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  target, ALL_BUT_PING, connectedClient, subscribed, RawClient, connToken, nonce, publishOk,
  waitUntil, sleep,
} from './helpers.mjs';

// Each input, with the error codes an error reply to it may carry, and the id
// that reply must carry (none for a line that is not JSON).
const INPUTS = [
  { text: 'not json', codes: [107], id: undefined },
  { text: '{"id":5,"unknown_method":{}}', codes: [104, 107], id: 5 },
  { text: '{"id":6,"subscribe":{"channel":123}}', codes: [107], id: 6 },
];
const DISCONNECT_BAD_REQUEST = 3501;

/**
 * Sends `text` and returns what the server did within `ms`:
 *   { kind: 'error', reply }                     an error reply
 *   { kind: 'disconnect', code, reason, push }   the connection was closed
 *   { kind: 'nothing' }                          neither (fails the test)
 */
async function outcomeOf(raw, text, ms = 3000) {
  const from = raw.messages.length;
  raw.sendRaw(text);
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const reply = raw.messages.slice(from).map((m) => m.msg).find((m) => m.error);
    if (reply) return { kind: 'error', reply };
    if (raw.closeInfo) {
      const { push } = raw.disconnectInfo();
      return {
        kind: 'disconnect',
        code: push ? push.code : raw.closeInfo.code,
        reason: push ? push.reason : raw.closeInfo.reason,
        push,
        close: raw.closeInfo,
      };
    }
    await sleep(10);
  }
  return { kind: 'nothing', received: raw.messages.slice(from).map((m) => m.msg) };
}

test('malformed commands get error replies or a 3501 disconnect; other clients unaffected', { timeout: 40000 }, async (t) => {
  const cfg = target(t, ALL_BUT_PING);
  if (!cfg) return;
  const run = nonce();
  const mine = (d) => d && d.run === run;

  const watcher = await connectedClient(t, cfg, { user: `watcher-${run}` });
  const w = await subscribed(watcher.client, 'news', mine);
  const expectDelivered = async (step) => {
    const data = { kind: 'malformed', run, step };
    await publishOk(cfg, 'news', data);
    await waitUntil(() => w.pubs.some((d) => d.step === step), 5000, `publication '${step}' at the SDK watcher`);
  };
  await expectDelivered('before');

  const openRaw = async (i) => {
    const raw = await RawClient.open(t, cfg);
    await raw.connect(connToken(cfg.secret, { sub: `malformed-${run}-${i}` }));
    return raw;
  };

  let raw = await openRaw(0);
  const outcomes = [];
  for (const [i, input] of INPUTS.entries()) {
    if (raw.closeInfo) raw = await openRaw(i); // the server dropped the previous one
    const outcome = await outcomeOf(raw, input.text);
    outcomes.push({ input: input.text, ...outcome });
    t.diagnostic(`${input.text} -> ${JSON.stringify(outcome)}`);

    if (outcome.kind === 'error') {
      const { reply } = outcome;
      assert.ok(
        input.codes.includes(reply.error.code),
        `${input.text}: error code ${reply.error.code}, expected one of ${input.codes}: ${JSON.stringify(reply)}`,
      );
      assert.equal(typeof reply.error.message, 'string');
      if (input.id !== undefined) {
        assert.equal(reply.id, input.id, `${input.text}: reply id: ${JSON.stringify(reply)}`);
      } else {
        assert.ok(!reply.id, `${input.text}: an error to a line without id must carry no id: ${JSON.stringify(reply)}`);
      }
      // The connection keeps working after an error reply.
      const probe = `probe-${run}-${i}`;
      await raw.subscribe(probe);
      assert.equal(raw.closeInfo, null);
    } else if (outcome.kind === 'disconnect') {
      assert.equal(outcome.code, DISCONNECT_BAD_REQUEST, `${input.text}: disconnect ${JSON.stringify(outcome)}`);
      assert.equal(outcome.close.code, DISCONNECT_BAD_REQUEST, `${input.text}: close frame ${JSON.stringify(outcome.close)}`);
      assert.match(outcome.reason, /bad request/i);
    } else {
      assert.fail(`${input.text}: neither an error reply nor a disconnect within 3 s: ${JSON.stringify(outcome)}`);
    }
    await expectDelivered(`after-${i}`);
  }
  t.diagnostic(`server behaviour: ${outcomes.map((o) => `${o.input} => ${o.kind === 'error' ? `error ${o.reply.error.code}` : o.kind === 'disconnect' ? `disconnect ${o.code}` : o.kind}`).join('; ')}`);
  assert.equal(watcher.client.state, 'connected');
  assert.deepEqual(w.pubs.map((d) => d.step), ['before', ...INPUTS.map((_, i) => `after-${i}`)]);
});

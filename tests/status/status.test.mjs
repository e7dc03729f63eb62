// The live status page (/status) in Debian's headless Chromium, driven by playwright-core.
//
// Target, from the environment (set by tests/e2e/status_page.rs):
//   SHARDCAST_STATUS_URL  http://127.0.0.1:PORT/status   (the internal metrics listener)
//   SHARDCAST_WS          ws://127.0.0.1:PORT/connection/websocket
//   SHARDCAST_TOKEN       a valid connection token
//   SHARDCAST_CHROMIUM    optional, default /usr/bin/chromium (apt-get install chromium)
//
// No browser is downloaded: playwright-core drives the system Chromium. Every wait is bounded
// and the browser is closed whatever happens.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const N = 5;
const WAIT_MS = 10_000;

function env(name) {
  const v = process.env[name];
  assert.ok(v, `${name} is not set (run through \`cargo test --test e2e status_page\`)`);
  return v;
}

async function deps() {
  try {
    const [{ chromium }, { WebSocket }] = await Promise.all([import('playwright-core'), import('ws')]);
    return { chromium, WebSocket };
  } catch (err) {
    throw new Error(`cannot load playwright-core/ws (${err.message}): run \`npm ci\` in tests/status`);
  }
}

/** A raw protocol client: JSON lines over one WebSocket, answering server pings (`{}`). */
function protocolClient(WebSocket, url, token) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const waiting = new Map();
    let nextId = 1;
    const send = (method, params) => new Promise((ok, fail) => {
      const id = nextId++;
      const timer = setTimeout(() => { waiting.delete(id); fail(new Error(`no reply to ${method}`)); }, WAIT_MS);
      waiting.set(id, (reply) => { clearTimeout(timer); ok(reply); });
      ws.send(JSON.stringify({ id, [method]: params }));
    });
    const timer = setTimeout(() => { ws.terminate(); reject(new Error('WebSocket connect timed out')); }, WAIT_MS);
    ws.on('error', (e) => { clearTimeout(timer); reject(e); });
    ws.on('message', (data) => {
      for (const line of data.toString().split('\n').filter(Boolean)) {
        const msg = JSON.parse(line);
        if (Object.keys(msg).length === 0) ws.send('{}');
        else if (msg.id !== undefined && waiting.has(msg.id)) {
          waiting.get(msg.id)(msg);
          waiting.delete(msg.id);
        }
      }
    });
    ws.on('open', async () => {
      try {
        const reply = await send('connect', { token });
        clearTimeout(timer);
        if (!reply.connect) throw new Error(`connect refused: ${JSON.stringify(reply)}`);
        const closed = new Promise((r) => ws.once('close', r));
        resolve({
          send,
          close: async () => {
            if (ws.readyState !== WebSocket.CLOSED) {
              ws.close();
              const t = setTimeout(() => ws.terminate(), 2000);
              await closed;
              clearTimeout(t);
            }
          },
        });
      } catch (e) {
        clearTimeout(timer);
        ws.terminate();
        reject(e);
      }
    });
  });
}

test('status page shows live figures in headless Chromium', { timeout: 90_000 }, async (t) => {
  const statusUrl = env('SHARDCAST_STATUS_URL');
  const wsUrl = env('SHARDCAST_WS');
  const token = env('SHARDCAST_TOKEN');
  const { chromium, WebSocket } = await deps();

  const profile = await mkdtemp(join(tmpdir(), 'shardcast-status-chromium-'));
  const clients = [];
  let context;
  try {
    // A persistent context is how playwright takes a user data dir: a fresh temp one here.
    context = await chromium.launchPersistentContext(profile, {
      executablePath: process.env.SHARDCAST_CHROMIUM || '/usr/bin/chromium',
      headless: true,
      timeout: 30_000,
      args: [
        '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ],
    });
    const page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(WAIT_MS);
    // Script errors and failed loads, but for the fetches this test makes fail on purpose.
    const pageErrors = [];
    let failingOnPurpose = false;
    const onPurpose = (url) => failingOnPurpose && url.endsWith('/status.json');
    page.on('pageerror', (e) => pageErrors.push(`script error: ${e.message}`));
    page.on('console', (m) => {
      if (m.type() === 'error' && !onPurpose(m.location().url)) pageErrors.push(`console: ${m.text()} (${m.location().url})`);
    });
    page.on('response', (r) => { if (r.status() >= 400) pageErrors.push(`HTTP ${r.status()} ${r.url()}`); });
    page.on('requestfailed', (r) => { if (!onPurpose(r.url())) pageErrors.push(`failed: ${r.url()} ${r.failure()?.errorText}`); });

    const res = await page.goto(statusUrl, { timeout: WAIT_MS });
    assert.equal(res.status(), 200, 'GET /status');

    // The first sample: the key figures appear.
    await page.waitForFunction(() => window.__samples >= 1, null, { timeout: WAIT_MS });
    const text = (sel) => page.locator(sel).first().textContent();
    const totalText = (await text('#total-connections')).trim();
    assert.match(totalText, /^\d+$/, 'total connections is a number');
    const baseline = Number(totalText);
    const rows = await page.locator('#shards tr[data-shard]').count();
    assert.ok(rows >= 1, 'at least one shard row');
    assert.match((await text('#shards tr[data-shard] .connections')).trim(), /^\d+$/);
    assert.match((await text('#bytes-per-connection')).trim(), /^\d+(\.\d+)? (B|KiB|MiB|GiB)$/);
    assert.match((await text('#rss')).trim(), /^\d+(\.\d+)? (B|KiB|MiB|GiB)$/);
    assert.equal((await text('#redis-state')).trim(), 'standalone');
    assert.match((await text('#uptime')).trim(), /\d+m \d\ds$/);
    assert.equal((await text('#draining')).trim(), 'serving');
    assert.equal(await page.locator('#nodes tr').count(), 1, 'standalone: this node alone');
    assert.match(await text('#nodes tr'), /\(this node\)/);
    assert.equal(await page.locator('#error').isVisible(), false, 'no error banner');
    t.diagnostic(`baseline: ${baseline} connections, ${rows} shard rows`);

    // N more connections, subscribed to one channel, with a trickle of publications.
    for (let i = 0; i < N; i++) clients.push(await protocolClient(WebSocket, wsUrl, token));
    for (const c of clients) {
      const r = await c.send('subscribe', { channel: 'chat:status' });
      assert.ok(r.subscribe, `subscribe: ${JSON.stringify(r)}`);
    }
    let publishing = true;
    const publisher = (async () => {
      for (let n = 0; publishing && n < 200; n++) {
        await clients[0].send('publish', { channel: 'chat:status', data: { n } });
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
    try {
      await page.waitForFunction(({ want, shards }) => {
        const total = Number(document.getElementById('total-connections').textContent);
        const perShard = [...document.querySelectorAll('#shards tr[data-shard] .connections')]
          .reduce((a, el) => a + Number(el.textContent), 0);
        const rate = Number(document.getElementById('total-rate').dataset.value || 0);
        const canvas = document.getElementById('chart-connections');
        // Lines, not dots: at least two samples drawn for every shard.
        return total >= want && perShard === total && rate > 0 && Number(canvas.dataset.points) >= 2 * shards;
      }, { want: baseline + N, shards: rows }, { timeout: WAIT_MS, polling: 100 });
    } finally {
      publishing = false;
      await publisher;
    }
    // Both charts have actually drawn something.
    for (const id of ['chart-connections', 'chart-messages']) {
      const inked = await page.evaluate((id) => {
        const c = document.getElementById(id);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i] !== 0) n++;
        return { n, w: c.width, h: c.height };
      }, id);
      assert.ok(inked.w > 0 && inked.h > 0 && inked.n > 100, `${id} is drawn: ${JSON.stringify(inked)}`);
    }
    t.diagnostic(`after ${N} connections: ${await text('#total-connections')} shown, ` +
      `${await text('#total-rate')} messages/s, ${await page.evaluate(() => window.__samples)} samples`);

    // Close them: the figure goes back down.
    await Promise.all(clients.splice(0).map((c) => c.close()));
    await page.waitForFunction(
      (want) => Number(document.getElementById('total-connections').textContent) === want,
      baseline, { timeout: WAIT_MS, polling: 100 },
    );

    // A failing fetch shows the error banner; it goes away once fetches work again.
    failingOnPurpose = true;
    await page.route('**/status.json', (route) => route.abort());
    await page.locator('#error').waitFor({ state: 'visible', timeout: WAIT_MS });
    assert.match(await text('#error'), /Cannot load \/status\.json/);
    await page.unroute('**/status.json');
    await page.locator('#error').waitFor({ state: 'hidden', timeout: WAIT_MS });

    await page.waitForFunction((n) => window.__samples > n, await page.evaluate(() => window.__samples), { timeout: WAIT_MS });
    failingOnPurpose = false;
    assert.deepEqual(pageErrors, [], 'no script errors or failed loads on the page');
  } finally {
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    if (context) await context.close().catch(() => {});
    await rm(profile, { recursive: true, force: true }).catch(() => {});
  }
});

// A small application backend for the proxy tests: the six Centrifugo proxy endpoints over
// plain node:http, with the request and response JSON of Centrifugo's proxy documentation.
// Started by tests/e2e/proxy.rs (and by hand: `node tests/interop/backend/backend.mjs`).
//
// Not a *.test.mjs file and not under a `test` directory, so `node --test tests/interop`
// does not run it.
//
// Start-up: listens on 127.0.0.1, port 0 (or $BACKEND_PORT), and prints `{"port": N}` as its
// first stdout line. It exits when its stdin closes (the test that started it died) and on
// SIGTERM/SIGINT.
//
// Proxies (POST, JSON body; the reply is always HTTP 200 with JSON unless a control says not):
//   /centrifugo/connect      identity from the Cookie header:
//                              session=<user>   → {"result": {user, info: {name: user},
//                                                  data: {welcome: user}}}
//                              expire=<secs>    → adds expire_at = now + secs
//                              channels=a,b     → adds channels: ["a", "b"]
//                              no session       → {"disconnect": {"code": 4501, "reason": "unauthorized"}}
//                              session=error    → {"error": {"code": 1000, "message": "custom"}}
//   /centrifugo/refresh      user starting with `expired` → {"result": {"expired": true}};
//                            else {"result": {"expire_at": now + refresh_secs, "info": {...}}}
//   /centrifugo/subscribe    channel containing `:forbidden` → error 403 "permission denied";
//                            else {"result": {"info": {channel}, "data": {"granted": channel}}},
//                            plus expire_at = now + 2 for a channel containing `:expiring`
//   /centrifugo/publish      channel containing `:readonly` → error 403 "permission denied";
//                            else {"result": {"data": {"text": <data.text>, "by": user, "moderated": true}}}
//   /centrifugo/sub_refresh  channel containing `expired` → {"result": {"expired": true}};
//                            else {"result": {"expire_at": now + sub_refresh_secs}}
//   /centrifugo/rpc          method echo → {"result": {"data": <data>}}; fail → error 1001
//                            "rpc failed"; bye → disconnect 4500 "bye"; other → error 404
//                            "method not found"
//
// Control (for the tests):
//   GET    /requests   every proxy request so far, in arrival order: [{path, headers, body, at}]
//                      (headers as node gives them: lower-case names; body parsed, or the raw
//                      text under `raw` if it was not JSON; at = ms since the epoch). At most
//                      MAX_RECORDS are kept; the oldest go first, counted in `dropped` of
//                      GET /stats.
//   DELETE /requests   forgets them
//   POST   /control    JSON with any of:
//                        stall_ms          every proxy answers only after this many ms (0 = off)
//                        status            HTTP status of every proxy answer (200 = normal)
//                        raw               a body sent instead of the JSON answer ("" = off)
//                        refresh_secs      expire_at distance of refresh answers (default 3600)
//                        sub_refresh_secs  the same for sub_refresh (default 3600)
//                      answers the whole control state; `{"reset": true}` restores the defaults
//   GET    /stats      {requests: total seen, in_flight, dropped}
//   anything else      404

import http from 'node:http';

const MAX_RECORDS = 10000;
const MAX_BODY_BYTES = 1 << 20;

const DEFAULTS = Object.freeze({
  stall_ms: 0,
  status: 200,
  raw: '',
  refresh_secs: 3600,
  sub_refresh_secs: 3600,
});

let control = { ...DEFAULTS };
let records = [];
const stats = { requests: 0, in_flight: 0, dropped: 0 };

const now = () => Math.floor(Date.now() / 1000);

/** Cookie header → { name: value } (first occurrence wins). */
export function parseCookies(header) {
  const out = {};
  for (const part of String(header || '').split(';')) {
    const eq = part.indexOf('=');
    if (eq < 0) continue;
    const k = part.slice(0, eq).trim();
    const v = part.slice(eq + 1).trim();
    if (k && !(k in out)) out[k] = decodeURIComponent(v);
  }
  return out;
}

const error = (code, message) => ({ error: { code, message } });
const disconnect = (code, reason) => ({ disconnect: { code, reason } });

/** The answer of one proxy, from its path, the request headers and the parsed body. */
export function answer(path, headers, body) {
  switch (path) {
    case '/centrifugo/connect': {
      const c = parseCookies(headers.cookie);
      const user = c.session;
      if (!user) return disconnect(4501, 'unauthorized');
      if (user === 'error') return error(1000, 'custom');
      const result = { user, info: { name: user }, data: { welcome: user } };
      if (c.expire) result.expire_at = now() + Number(c.expire);
      if (c.channels) result.channels = c.channels.split(',').filter((s) => s !== '');
      return { result };
    }
    case '/centrifugo/refresh': {
      if (String(body.user).startsWith('expired')) return { result: { expired: true } };
      return {
        result: { expire_at: now() + control.refresh_secs, info: { name: body.user, refreshed: true } },
      };
    }
    case '/centrifugo/subscribe': {
      const ch = String(body.channel);
      if (ch.includes(':forbidden')) return error(403, 'permission denied');
      const result = { info: { channel: ch }, data: { granted: ch } };
      if (ch.includes(':expiring')) result.expire_at = now() + 2;
      return { result };
    }
    case '/centrifugo/publish': {
      const ch = String(body.channel);
      if (ch.includes(':readonly')) return error(403, 'permission denied');
      const text = body.data && typeof body.data === 'object' ? body.data.text : undefined;
      return { result: { data: { text, by: body.user, moderated: true } } };
    }
    case '/centrifugo/sub_refresh': {
      if (String(body.channel).includes('expired')) return { result: { expired: true } };
      return { result: { expire_at: now() + control.sub_refresh_secs } };
    }
    case '/centrifugo/rpc':
      switch (body.method) {
        case 'echo':
          return { result: { data: body.data } };
        case 'fail':
          return error(1001, 'rpc failed');
        case 'bye':
          return disconnect(4500, 'bye');
        default:
          return error(404, 'method not found');
      }
    default:
      return null;
  }
}

function send(res, status, value) {
  const text = typeof value === 'string' ? value : JSON.stringify(value);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(text),
  });
  res.end(text);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > MAX_BODY_BYTES) {
        reject(new Error(`body over ${MAX_BODY_BYTES} bytes`));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function record(entry) {
  records.push(entry);
  if (records.length > MAX_RECORDS) {
    stats.dropped += records.length - MAX_RECORDS;
    records = records.slice(records.length - MAX_RECORDS);
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function handle(req, res) {
  const path = new URL(req.url, 'http://backend').pathname;
  if (path === '/requests') {
    if (req.method === 'GET') return send(res, 200, records);
    if (req.method === 'DELETE') {
      records = [];
      return send(res, 200, { ok: true });
    }
    return send(res, 405, { error: 'GET or DELETE' });
  }
  if (path === '/stats' && req.method === 'GET') return send(res, 200, stats);
  if (path === '/control' && req.method === 'POST') {
    let patch;
    try {
      patch = JSON.parse((await readBody(req)) || '{}');
    } catch (e) {
      return send(res, 400, { error: `bad JSON: ${e.message}` });
    }
    if (patch.reset) control = { ...DEFAULTS };
    for (const k of Object.keys(DEFAULTS)) {
      if (k in patch) control[k] = patch[k];
    }
    return send(res, 200, control);
  }
  if (!path.startsWith('/centrifugo/') || answer(path, {}, {}) === null) {
    return send(res, 404, { error: `no such endpoint ${path}` });
  }
  if (req.method !== 'POST') return send(res, 405, { error: 'proxy requests are POST' });

  stats.requests += 1;
  stats.in_flight += 1;
  try {
    const text = await readBody(req);
    let body;
    try {
      body = JSON.parse(text);
    } catch {
      body = { raw: text };
    }
    record({ path, headers: req.headers, body, at: Date.now() });
    if (control.stall_ms > 0) await sleep(control.stall_ms);
    if (control.raw !== '') return send(res, control.status, control.raw);
    return send(res, control.status, answer(path, req.headers, body && typeof body === 'object' ? body : {}));
  } finally {
    stats.in_flight -= 1;
  }
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((e) => {
    if (!res.headersSent) send(res, 500, { error: String(e && e.message) });
    else res.destroy();
  });
});
// Keep-alive as a real backend would; the server under test pools connections.
server.keepAliveTimeout = 30000;

const bye = () => {
  server.close();
  process.exit(0);
};
process.on('SIGTERM', bye);
process.on('SIGINT', bye);
process.stdin.on('end', bye);
process.stdin.on('close', bye);
process.stdin.on('error', bye);
process.stdin.resume();

server.listen(Number(process.env.BACKEND_PORT || 0), '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ port: server.address().port })}\n`);
});

"""Interop with the official Python SDK (centrifuge-python), run by tests/e2e/sdk.rs.

Reads SHARDCAST_WS, SHARDCAST_HTTP, SHARDCAST_API_KEY, SHARDCAST_SECRET; prints one line per
check and `N passed, M failed` last; exits non-zero on any failure.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
import time
import urllib.request

from centrifuge import (
    Client,
    PublicationContext,
    ReplyError,
    SubscriptionEventHandler,
)

WS = os.environ["SHARDCAST_WS"]
HTTP = os.environ["SHARDCAST_HTTP"].rstrip("/")
API_KEY = os.environ["SHARDCAST_API_KEY"]
SECRET = os.environ["SHARDCAST_SECRET"].encode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(sub: str, ttl: int = 600) -> str:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": sub, "exp": int(time.time()) + ttl}).encode())
    sig = hmac.new(SECRET, f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(sig)}"


def api(method: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{HTTP}/api/{method}",
        data=json.dumps(body).encode(),
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


class Collect(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.items = []
        self.event = asyncio.Event()

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.items.append(ctx.pub.data)
        self.event.set()


async def until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return pred()


async def main() -> int:
    results = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        results.append(ok)
        print(f"{'ok' if ok else 'FAILED'} - {name}{': ' + detail if detail and not ok else ''}")

    clients = []
    for i in range(4):
        c = Client(WS, token=token(f"py{i}"))
        clients.append(c)
    handlers = [Collect() for _ in clients]
    subs = [c.new_subscription("news", events=h) for c, h in zip(clients, handlers)]
    for c in clients:
        await c.connect()
    for s in subs:
        await s.subscribe()
    await asyncio.gather(*(s.ready(timeout=10) for s in subs))
    check("four clients connected and subscribed", True)

    n = 100
    loop = asyncio.get_running_loop()
    for i in range(n):
        r = await loop.run_in_executor(None, api, "publish", {"channel": "news", "data": {"n": i}})
        if r != {"result": {}}:
            check("api publish", False, json.dumps(r))
            break
    got_all = await until(lambda: all(len(h.items) >= n for h in handlers))
    check(f"every client received {n} publications", got_all, str([len(h.items) for h in handlers]))
    in_order = all([d["n"] for d in h.items[:n]] == list(range(n)) for h in handlers)
    check("in publish order", in_order)

    # Client publish where allowed, refused (103) where not; presence in chat.
    chat = [Collect(), Collect()]
    chat_subs = [clients[i].new_subscription("chat:py", events=chat[i]) for i in range(2)]
    for s in chat_subs:
        await s.subscribe()
        await s.ready(timeout=10)
    await chat_subs[0].publish({"text": "hello"})
    check("client publish in chat reaches the other subscriber",
          await until(lambda: chat[1].items == [{"text": "hello"}]), str(chat[1].items))
    try:
        await subs[0].publish({"text": "nope"})
        check("client publish in news refused", False, "no error")
    except ReplyError as e:
        check("client publish in news refused with 103", e.code == 103, str(e))
    presence = await chat_subs[0].presence()
    check("presence lists both chat clients", len(presence.clients) == 2, str(presence))
    stats = await chat_subs[1].presence_stats()
    check("presence_stats", (stats.num_clients, stats.num_users) == (2, 2), str(stats))

    # Recovery (feed: history_size 100, recover): a client away for 20 publications gets all
    # of them, in order, on reconnect, with recovered=True; then history pages through them.
    class Recovering(Collect):
        def __init__(self) -> None:
            super().__init__()
            self.subscribed = []

        async def on_subscribed(self, ctx) -> None:
            self.subscribed.append(ctx)

    rec = Recovering()
    feed = clients[2].new_subscription("feed:py", events=rec)
    await feed.subscribe()
    await feed.ready(timeout=10)
    first = rec.subscribed[0]
    check("history channel subscribe is recoverable with a position",
          first.recoverable and first.stream_position is not None, str(first))
    for i in range(3):
        await loop.run_in_executor(None, api, "publish", {"channel": "feed:py", "data": {"n": i}})
    check("live publications before going away", await until(lambda: len(rec.items) == 3),
          str(rec.items))
    await clients[2].disconnect()
    for i in range(3, 23):
        await loop.run_in_executor(None, api, "publish", {"channel": "feed:py", "data": {"n": i}})
    await clients[2].connect()
    await feed.subscribe()
    await feed.ready(timeout=10)
    got = await until(lambda: len(rec.items) >= 23)
    again = rec.subscribed[-1] if len(rec.subscribed) > 1 else None
    check("reconnect recovers the 20 missed publications",
          got and again is not None and again.was_recovering and again.recovered
          and [d["n"] for d in rec.items] == list(range(23)),
          f"{again} {[d['n'] for d in rec.items]}")
    page = await feed.history(limit=5, reverse=True)
    check("history: the newest five, newest first",
          [p.offset for p in page.publications] == [23, 22, 21, 20, 19]
          and page.offset == 23, str(page))

    for c in clients:
        await c.disconnect()
    failed = results.count(False)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

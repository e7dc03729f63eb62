"""The server API methods and options of issue 19 through the official Python client (cent),
run by tests/e2e/server_api.rs.

Calls subscribe, refresh, batch (sequential and parallel), publish and broadcast with tags,
skip_history, b64data and idempotency keys, unsubscribe of one client, info's process stats,
and a field the API does not know, through `cent.Client`, and checks the typed results it
decodes. What the WebSocket clients received is checked by the Rust side afterwards.

Reads SHARDCAST_HTTP, SHARDCAST_API_KEY and the world the Rust side set up: SHARDCAST_CAROL1 and
SHARDCAST_CAROL2 (client ids of two connections of user carol, subscribed to nothing) and user
dave (one connection). Prints one line per check and `N passed, M failed` last; exits non-zero
on any failure.
"""

import base64
import os
import time

from cent import (
    BatchRequest,
    BroadcastRequest,
    ChannelsRequest,
    Client,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
    RefreshRequest,
    RefreshResult,
    StreamPosition,
    SubscribeRequest,
    SubscribeResult,
    UnsubscribeRequest,
)
from cent.dto import BoolValue, ChannelOptionsOverride
from cent.exceptions import CentApiResponseError, CentTransportError

from checks import check, eventually, finish

API = os.environ["SHARDCAST_HTTP"].rstrip("/") + "/api"
KEY = os.environ["SHARDCAST_API_KEY"]
CAROL1 = os.environ["SHARDCAST_CAROL1"]
CAROL2 = os.environ["SHARDCAST_CAROL2"]

client = Client(API, KEY, timeout=10)




def b64(raw):
    return base64.b64encode(raw).decode()


def presence(channel):
    return set(client.presence(PresenceRequest(channel=channel)).presence)


EPOCH = {}


@check("subscribe: one client of carol to feed:s, with data for the push")
def _():
    r = client.subscribe(
        SubscribeRequest(user="carol", channel="feed:s", client=CAROL1, data={"hello": 1})
    )
    assert isinstance(r, SubscribeResult), type(r)
    eventually(
        "feed:s has one subscriber",
        lambda: client.channels(ChannelsRequest(pattern="feed:s")).channels.get("feed:s"),
    )
    assert client.channels(ChannelsRequest()).channels["feed:s"].num_clients == 1


@check("subscribe: every connection of carol to chat:s")
def _():
    client.subscribe(SubscribeRequest(user="carol", channel="chat:s"))
    eventually("both carol connections are in chat:s", lambda: presence("chat:s") == {CAROL1, CAROL2})


@check("subscribe: recover_since where the namespace does not recover is 108")
def _():
    try:
        client.subscribe(
            SubscribeRequest(
                user="carol", channel="chat:t", recover_since=StreamPosition(offset=1, epoch="x")
            )
        )
    except CentApiResponseError as e:
        assert e.code == 108, (e.code, e.message)
    else:
        raise AssertionError("no error")


@check("publish: tags come back in history")
def _():
    r = client.publish(PublishRequest(channel="feed:s", data={"n": 1}, tags={"k": "v"}))
    assert r.offset == 1 and r.epoch, r
    EPOCH["feed"] = r.epoch
    h = client.history(HistoryRequest(channel="feed:s", limit=10))
    assert [(p.data, p.tags, p.offset) for p in h.publications] == [({"n": 1}, {"k": "v"}, 1)], h


@check("publish: skip_history publishes without an offset and keeps nothing")
def _():
    r = client.publish(PublishRequest(channel="feed:s", data={"n": 2}, skip_history=True))
    assert (r.offset, r.epoch) == (0, ""), r
    h = client.history(HistoryRequest(channel="feed:s", limit=10))
    assert [p.offset for p in h.publications] == [1] and h.offset == 1, h


@check("publish: b64data of JSON text is published as data")
def _():
    r = client.publish(PublishRequest(channel="feed:s", data=None, b64data=b64(b'{"n":3}')))
    assert r.offset == 2, r
    h = client.history(HistoryRequest(channel="feed:s", limit=1, reverse=True))
    assert h.publications[0].data == {"n": 3}, h


@check("publish: b64data of binary bytes, and a bad one is 107")
def _():
    client.publish(PublishRequest(channel="chat:s", data=None, b64data=b64(b"\x00\x01\xff")))
    try:
        client.publish(PublishRequest(channel="chat:s", data=None, b64data="not base64!"))
    except CentApiResponseError as e:
        assert e.code == 107, (e.code, e.message)
    else:
        raise AssertionError("bad base64 accepted")


@check("broadcast: tags and idempotency_key per channel, a repeat gets the first results")
def _():
    req = BroadcastRequest(
        channels=["feed:s", "chat:s"], data={"n": 4}, tags={"b": "1"}, idempotency_key="bk"
    )
    first = client.broadcast(req)
    again = client.broadcast(req)
    feed, chat = first.responses
    assert feed.error is None and feed.result.offset == 3, feed
    assert chat.error is None and chat.result.offset == 0, chat
    assert [x.result.offset for x in again.responses] == [3, 0], again


@check("broadcast: b64data and skip_history")
def _():
    r = client.broadcast(
        BroadcastRequest(channels=["feed:s"], data=None, b64data=b64(b'{"n":5}'), skip_history=True)
    )
    assert r.responses[0].error is None and r.responses[0].result.offset == 0, r
    h = client.history(HistoryRequest(channel="feed:s", limit=0))
    assert h.offset == 3, h


@check("batch: sequential replies in order")
def _():
    r = client.batch(
        BatchRequest(
            requests=[
                PublishRequest(channel="feed:s", data={"n": 6}),
                PresenceStatsRequest(channel="chat:s"),
                HistoryRequest(channel="feed:s", limit=0),
            ]
        )
    )
    pub, stats, hist = r.replies
    assert pub.offset == 4 and pub.epoch == EPOCH["feed"], pub
    assert (stats.num_clients, stats.num_users) == (2, 1), stats
    assert hist.offset == 4, hist


@check("batch: parallel replies in order")
def _():
    r = client.batch(
        BatchRequest(
            requests=[
                PublishRequest(channel="chat:s", data={"n": 7}),
                InfoRequest(),
                ChannelsRequest(pattern="chat:*"),
                HistoryRequest(channel="feed:s", limit=0),
            ],
            parallel=True,
        )
    )
    pub, info, chans, hist = r.replies
    assert (pub.offset, pub.epoch) == (0, ""), pub
    assert len(info.nodes) == 1 and info.nodes[0].num_clients == 3, info
    assert list(chans.channels) == ["chat:s"], chans
    assert hist.offset == 4, hist


@check("a field the API does not know is refused with 400, also one Centrifugo has")
def _():
    for call in [
        lambda: client.publish(PublishRequest(channel="feed:s", data={}, colour="red")),
        lambda: client.subscribe(
            SubscribeRequest(
                user="carol",
                channel="chat:u",
                override=ChannelOptionsOverride(presence=BoolValue(value=False)),
            )
        ),
    ]:
        try:
            call()
        except CentTransportError as e:
            assert e.status_code == 400, e
        else:
            raise AssertionError("unknown field accepted")
    # Nothing was published.
    assert client.history(HistoryRequest(channel="feed:s", limit=0)).offset == 4


@check("info: process stats of the node")
def _():
    n = client.info(InfoRequest()).nodes[0]
    assert n.process is not None, n
    assert n.process.rss > 1 << 20 and n.process.cpu >= 0.0, n.process


@check("refresh: carol's second connection gets a new expiry")
def _():
    r = client.refresh(RefreshRequest(user="carol", client=CAROL2, expire_at=int(time.time()) + 600))
    assert isinstance(r, RefreshResult), type(r)


@check("unsubscribe: only carol's second connection leaves chat:s")
def _():
    client.unsubscribe(UnsubscribeRequest(user="carol", channel="chat:s", client=CAROL2))
    eventually("only carol1 is in chat:s", lambda: presence("chat:s") == {CAROL1})


@check("refresh: expired ends dave's connection")
def _():
    client.refresh(RefreshRequest(user="dave", expired=True))
    eventually(
        "dave is gone",
        lambda: client.info(InfoRequest()).nodes[0].num_clients == 2,
    )


finish()

"""Interop with the official Python HTTP API client (cent), run by tests/e2e/security_api.rs.

Calls every server API method shardcast supports through `cent.Client` and checks the typed
results it decodes (values, not only "no exception").

Reads SHARDCAST_HTTP, SHARDCAST_API_KEY, SHARDCAST_VERSION and the world the Rust side set up:
SHARDCAST_ALICE (client id of user alice, subscribed to chat:room and feed:x) and SHARDCAST_BOB
(client id of user bob, subscribed to chat:room). Prints one line per check and
`N passed, M failed` last; exits non-zero on any failure.
"""

import os

from cent import (
    BroadcastRequest,
    BroadcastResult,
    ChannelsRequest,
    ChannelsResult,
    Client,
    Disconnect,
    DisconnectRequest,
    DisconnectResult,
    HistoryRemoveRequest,
    HistoryRemoveResult,
    HistoryRequest,
    HistoryResult,
    InfoRequest,
    InfoResult,
    PresenceRequest,
    PresenceResult,
    PresenceStatsRequest,
    PresenceStatsResult,
    PublishRequest,
    PublishResult,
    StreamPosition,
    UnsubscribeRequest,
    UnsubscribeResult,
)
from cent.exceptions import CentApiResponseError, CentUnauthorizedError

from checks import check, eventually, finish

API = os.environ["SHARDCAST_HTTP"].rstrip("/") + "/api"
KEY = os.environ["SHARDCAST_API_KEY"]
VERSION = os.environ["SHARDCAST_VERSION"]
ALICE = os.environ["SHARDCAST_ALICE"]
BOB = os.environ["SHARDCAST_BOB"]

client = Client(API, KEY, timeout=10)




@check("info decodes into cent's Node model with our figures")
def _():
    r = client.info(InfoRequest())
    assert isinstance(r, InfoResult), type(r)
    assert len(r.nodes) == 1, r.nodes
    n = r.nodes[0]
    assert len(n.uid) == 16 and n.name, n
    assert n.version == VERSION, n.version
    assert (n.num_clients, n.num_users, n.num_subs) == (2, 2, 3), n
    assert n.num_channels == 2, n
    assert n.uptime >= 0
    # Centrifugo's `process` object (issue 19) decodes into cent's ProcessStats; `metrics` is
    # not ours: cent leaves it empty...
    assert n.metrics is None, n
    assert n.process is not None and n.process.rss > 1 << 20 and n.process.cpu >= 0.0, n
    # ...and ours come through as extra fields.
    extra = n.model_extra
    assert extra["broker"] == "memory" and extra["shards"] == 2, extra
    host, port = extra["metrics_listen"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0, extra["metrics_listen"]
    assert extra["draining"] is False and extra["redis"] is None, extra
    assert isinstance(extra["counters"], dict) and isinstance(extra["gauges"], dict), extra


@check("channels: every channel, then a pattern")
def _():
    r = client.channels(ChannelsRequest())
    assert isinstance(r, ChannelsResult)
    assert set(r.channels) == {"chat:room", "feed:x"}, r.channels
    assert r.channels["chat:room"].num_clients == 2, r.channels
    assert r.channels["feed:x"].num_clients == 1, r.channels
    r = client.channels(ChannelsRequest(pattern="chat:*"))
    assert list(r.channels) == ["chat:room"], r.channels


@check("presence: both clients with their users")
def _():
    r = client.presence(PresenceRequest(channel="chat:room"))
    assert isinstance(r, PresenceResult)
    assert set(r.presence) == {ALICE, BOB}, r.presence
    assert r.presence[ALICE].user == "alice" and r.presence[ALICE].client == ALICE
    assert r.presence[BOB].user == "bob" and r.presence[BOB].client == BOB


@check("presence_stats")
def _():
    r = client.presence_stats(PresenceStatsRequest(channel="chat:room"))
    assert isinstance(r, PresenceStatsResult)
    assert (r.num_clients, r.num_users) == (2, 2), r


EPOCH = {}


@check("publish: a history channel gets offset and epoch, a plain one neither")
def _():
    r = client.publish(PublishRequest(channel="feed:x", data={"n": 1}))
    assert isinstance(r, PublishResult)
    assert r.offset == 1 and len(r.epoch) > 0, r
    EPOCH["feed"] = r.epoch
    r = client.publish(PublishRequest(channel="chat:room", data={"text": "hi"}))
    assert (r.offset, r.epoch) == (0, ""), r


@check("publish: idempotency_key repeats the first result")
def _():
    first = client.publish(PublishRequest(channel="feed:x", data={"n": 2}, idempotency_key="k1"))
    again = client.publish(PublishRequest(channel="feed:x", data={"n": 2}, idempotency_key="k1"))
    assert first.offset == 2 and first.epoch == EPOCH["feed"], first
    assert (again.offset, again.epoch) == (first.offset, first.epoch), again


@check("broadcast: one typed response per channel, an error where the channel is unknown")
def _():
    r = client.broadcast(
        BroadcastRequest(channels=["feed:x", "chat:room", "nope:x"], data={"n": 3})
    )
    assert isinstance(r, BroadcastResult)
    assert len(r.responses) == 3, r.responses
    feed, chat, nope = r.responses
    assert feed.error is None and feed.result.offset == 3, feed
    assert feed.result.epoch == EPOCH["feed"], feed
    assert chat.error is None and chat.result.offset == 0, chat
    assert nope.result is None and nope.error.code == 102, nope


@check("history: publications with data and offsets, since and reverse")
def _():
    r = client.history(HistoryRequest(channel="feed:x", limit=10))
    assert isinstance(r, HistoryResult)
    assert [p.data for p in r.publications] == [{"n": 1}, {"n": 2}, {"n": 3}], r
    assert [p.offset for p in r.publications] == [1, 2, 3], r
    assert (r.offset, r.epoch) == (3, EPOCH["feed"]), r
    since = StreamPosition(offset=1, epoch=EPOCH["feed"])
    r = client.history(HistoryRequest(channel="feed:x", limit=10, since=since))
    assert [p.offset for p in r.publications] == [2, 3], r
    r = client.history(HistoryRequest(channel="feed:x", limit=1, reverse=True))
    assert [p.data for p in r.publications] == [{"n": 3}], r
    r = client.history(HistoryRequest(channel="feed:x"))
    assert r.publications == [] and r.offset == 3, r


@check("history_remove: publications go, the position stays")
def _():
    r = client.history_remove(HistoryRemoveRequest(channel="feed:x"))
    assert isinstance(r, HistoryRemoveResult)
    r = client.history(HistoryRequest(channel="feed:x", limit=10))
    assert r.publications == [] and (r.offset, r.epoch) == (3, EPOCH["feed"]), r


@check("logical errors raise CentApiResponseError with Centrifugo's codes")
def _():
    for call, code in [
        (lambda: client.publish(PublishRequest(channel="nope:x", data={})), 102),
        (lambda: client.history(HistoryRequest(channel="chat:room", limit=1)), 108),
        (lambda: client.presence(PresenceRequest(channel="feed:x")), 108),
    ]:
        try:
            call()
        except CentApiResponseError as e:
            assert e.code == code, (e.code, e.message)
        else:
            raise AssertionError(f"no error {code}")


@check("a wrong key raises CentUnauthorizedError")
def _():
    try:
        Client(API, "not-the-key", timeout=10).info(InfoRequest())
    except CentUnauthorizedError:
        pass
    else:
        raise AssertionError("wrong key accepted")


@check("unsubscribe: bob leaves chat:room")
def _():
    r = client.unsubscribe(UnsubscribeRequest(user="bob", channel="chat:room"))
    assert isinstance(r, UnsubscribeResult)
    eventually(
        "bob is out of presence",
        lambda: set(client.presence(PresenceRequest(channel="chat:room")).presence) == {ALICE},
    )


@check("disconnect: alice is closed with the given code")
def _():
    r = client.disconnect(
        DisconnectRequest(user="alice", disconnect=Disconnect(code=4501, reason="bye"))
    )
    assert isinstance(r, DisconnectResult)
    eventually(
        "alice's connection is gone",
        lambda: client.info(InfoRequest()).nodes[0].num_clients == 1,
    )
    r = client.channels(ChannelsRequest())
    assert "feed:x" not in r.channels and "chat:room" not in r.channels, r.channels


finish()

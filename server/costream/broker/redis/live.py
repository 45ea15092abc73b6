"""The live tail of the Redis broker: pub/sub links, their readers, and the routing of channels.

The live tail comes over pub/sub links, each one connection with one reader task: a
single link (``SUBSCRIBE``) to one Redis; one link per master (``SSUBSCRIBE``) on a
cluster, each conversation's channel on the link of the master owning its slot. When a
link breaks (killed, Redis restarted, or silent for too long) its reader reconnects with
backoff, subscribes again, and calls ``on_resync`` for every conversation it had, as soon
as its subscription is back, so consumers re-read the log. On a cluster, a ``MOVED``
answer or a subscription dropped by Redis (the slot moved: resharding, failover) moves the
channel to the link of its new master, with ``on_resync`` once it is subscribed there.

``broker_redis.RedisBroker`` owns one ``LiveTail`` and names the channels (its key layout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster

from costream.backoff import Backoff
from costream.broker import FrameListener, ResyncListener
from costream.errors import StorageUnavailable

log = logging.getLogger(__name__)

_SUBSCRIBE_TIMEOUT_S: Final = 5.0
_LIVE_PING_S: Final = 1.0  # ping the pub/sub connection after this long without a message
_LIVE_DEAD_S: Final = 5.0  # no message and no pong for this long: the connection is dead
_RECONNECT_FIRST_S: Final = 0.05
_RECONNECT_CAP_S: Final = 2.0

UNAVAILABLE: Final = (
    redis_errors.ConnectionError,  # also BusyLoadingError, AuthenticationError
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.ClusterError,  # a redirection loop ("TTL exhausted")
    redis_errors.RedisClusterException,  # no startup node reachable, a slot not covered
    OSError,
    TimeoutError,
)
"""The errors that mean "the storage did not answer", as opposed to a bug of ours."""

LinkClient = Callable[[ClusterNode | None], aioredis.Redis]
"""Makes the client of a link: to the one Redis (``None``), or to one cluster master."""


class _Link:
    """One pub/sub connection and its reader task: to the one Redis, or to one cluster master."""

    def __init__(self, name: str, client: aioredis.Redis, *, sharded: bool) -> None:
        self.name = name  # host:port of a cluster master, "" for the one Redis
        self.client = client  # its own pool: a subscribed connection never serves a command
        self.sharded = sharded  # SSUBSCRIBE (a cluster) rather than SUBSCRIBE
        self.channels: set[bytes] = set()  # the wanted channels routed to this link
        self.confirmed: set[bytes] = set()  # subscribed on the current connection
        self.pubsub: PubSub | None = None  # set while the connection is up
        self.task: asyncio.Task[None] | None = None

    async def subscribe(self, *channels: bytes) -> None:
        """Ask for ``channels``, if the connection is up (when it comes back, the reader does)."""
        pubsub = self.pubsub
        if pubsub is None or not channels:
            return
        if not self.sharded:
            await pubsub.subscribe(*channels)
            return
        for channel in channels:  # one SSUBSCRIBE per channel: they are in different slots
            await pubsub.ssubscribe(channel)

    async def unsubscribe(self, channel: bytes) -> None:
        pubsub = self.pubsub
        if pubsub is None:
            return
        with contextlib.suppress(*UNAVAILABLE):
            if self.sharded:
                await pubsub.sunsubscribe(channel)
            else:
                await pubsub.unsubscribe(channel)


class LiveTail:
    """The subscriptions of one broker: delivers published frames, calls ``on_resync`` after breaks."""

    def __init__(
        self,
        cluster: RedisCluster | None,
        link_client: LinkClient,
        *,
        describe: Callable[[BaseException], str],
        where: str,
    ) -> None:
        self._cluster = cluster  # its slot map routes the channels; None for one Redis
        self._link_client = link_client
        self._describe = describe  # an error as a message free of secrets
        self._where = where
        self._links: dict[str, _Link] = {}  # by master name ("" for the one Redis)
        if cluster is None:
            self._links[""] = _Link("", link_client(None), sharded=False)
        self._on_frame: FrameListener | None = None
        self._on_resync: ResyncListener | None = None
        self._channels: dict[bytes, str] = {}  # wanted: channel -> conversation id
        self._link_of: dict[bytes, _Link] = {}  # wanted channel -> the link it is routed to
        self._routing = asyncio.Lock()  # one change of routes at a time
        self._resync_pending: set[str] = set()  # lost with a connection, not yet back
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._started = False
        self._closed = False

    # ---- lifecycle ----------------------------------------------------------------
    async def start(self, on_frame: FrameListener, on_resync: ResyncListener) -> None:
        """Start a reader per link; frames and resyncs go to the listeners from now on."""
        self._on_frame, self._on_resync = on_frame, on_resync
        self._closed = False
        self._started = True
        for link in self._links.values():
            self._start_reader(link)

    def _start_reader(self, link: _Link) -> None:
        if self._started and link.task is None:
            name = f"costream-redis-live{'-' if link.name else ''}{link.name}"
            link.task = asyncio.create_task(self._read_link(link), name=name)

    async def stop(self) -> None:
        """Stop the readers; a subscription still waited for fails with ``StorageUnavailable``."""
        self._closed = True
        self._started = False
        for link in list(self._links.values()):
            if link.task is not None:
                link.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await link.task
                link.task = None
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(StorageUnavailable("broker closed"))
        self._waiters.clear()

    async def aclose(self) -> None:
        """Close the links' clients (after ``stop``)."""
        for link in list(self._links.values()):
            with contextlib.suppress(*UNAVAILABLE):
                await link.client.aclose()

    # ---- subscriptions ---------------------------------------------------------------
    async def subscribe(self, conversation_id: str, channel: bytes) -> None:
        """Subscribed when this returns: every frame published from now on is delivered."""
        if self._closed:
            raise StorageUnavailable("broker closed")
        link = self._link_of.get(channel)
        if self._channels.get(channel) == conversation_id and link and channel in link.confirmed:
            return
        self._channels[channel] = conversation_id
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(conversation_id, []).append(waiter)
        try:
            try:
                if self._cluster is not None:
                    await self._cluster.initialize()  # the slots, to find the channel's master
                async with self._routing:
                    await self._route(channel, resubscribe=True)
            except UNAVAILABLE as error:
                # `from None`: the chained error's text is not scrubbed.
                raise StorageUnavailable(self._describe(error)) from None
            await asyncio.wait_for(asyncio.shield(waiter), _SUBSCRIBE_TIMEOUT_S)
        except TimeoutError:
            self._give_up(conversation_id, channel, waiter)
            raise StorageUnavailable(
                f"redis at {self._where} did not confirm a subscription"
            ) from None
        except StorageUnavailable:
            self._give_up(conversation_id, channel, waiter)
            raise

    def _give_up(self, conversation_id: str, channel: bytes, waiter: asyncio.Future[None]) -> None:
        """Forget a subscription that did not come through, unless another call waits for it."""
        waiters = self._waiters.get(conversation_id, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._waiters.pop(conversation_id, None)
            self._channels.pop(channel, None)
            link = self._link_of.pop(channel, None)
            if link is not None:
                link.channels.discard(channel)

    async def unsubscribe(self, conversation_id: str, channel: bytes) -> None:
        """Stop delivering a conversation's frames."""
        self._channels.pop(channel, None)
        self._resync_pending.discard(conversation_id)
        link = self._link_of.pop(channel, None)
        if link is not None:
            link.channels.discard(channel)
            link.confirmed.discard(channel)
            await link.unsubscribe(channel)

    # ---- routing ---------------------------------------------------------------------
    def _owner(self, channel: bytes) -> _Link:
        """The link a channel belongs on: the one Redis's, or that of its slot's master."""
        if self._cluster is None:
            return self._links[""]
        node = self._cluster.nodes_manager.get_node_from_slot(self._cluster.keyslot(channel))
        link = self._links.get(node.name)
        if link is None:
            client = self._link_client(node)
            link = self._links[node.name] = _Link(node.name, client, sharded=True)
            self._start_reader(link)
        return link

    async def _route(self, channel: bytes, *, resubscribe: bool) -> None:
        """Put a wanted channel on its link (moving it from another), and subscribe it there.
        Already on it: subscribe again only if ``resubscribe`` and not confirmed yet."""
        link = self._owner(channel)
        current = self._link_of.get(channel)
        if current is link and (not resubscribe or channel in link.confirmed):
            return
        link.channels.add(channel)
        self._link_of[channel] = link
        if current is not None and current is not link:
            current.channels.discard(channel)
            if channel in current.confirmed:
                # Still subscribed there (Redis drops a moved slot's subscriptions itself).
                current.confirmed.discard(channel)
                self._resync_pending.add(self._channels[channel])
                await current.unsubscribe(channel)
        # On a broken connection the reader subscribes everything again.
        with contextlib.suppress(*UNAVAILABLE):
            await link.subscribe(channel)

    async def _reroute(self, *, refresh: bool) -> None:
        """Move every channel whose slot changed master; ``refresh``: ask the cluster first."""
        cluster = self._cluster
        if cluster is None:
            return
        if refresh:
            with contextlib.suppress(*UNAVAILABLE):
                await cluster.nodes_manager.initialize()
        async with self._routing:
            for channel in list(self._channels):
                with contextlib.suppress(*UNAVAILABLE):
                    await self._route(channel, resubscribe=False)

    # ---- readers ---------------------------------------------------------------------
    async def _read_link(self, link: _Link) -> None:
        """A link's reader task: keep its connection up, for as long as the link is needed."""
        backoff = Backoff(_RECONNECT_FIRST_S, _RECONNECT_CAP_S)  # no limit: retried for ever
        failures = 0  # connection attempts failed in a row
        where = f" to {link.name}" if link.name else ""
        while True:
            pubsub = link.client.pubsub()
            try:
                await self._listen(link, pubsub)
            except UNAVAILABLE as error:
                was_up = link.pubsub is not None
                failures = 0 if was_up else failures + 1
                # Once per outage at warning level; the retries every few seconds at debug.
                level = logging.WARNING if failures <= 1 else logging.DEBUG
                what = "lost" if was_up else "cannot be re-established"
                log.log(
                    level, "redis pub/sub connection%s %s: %s", where, what, self._describe(error)
                )
            except Exception:
                log.exception("redis pub/sub reader%s failed", where)
            finally:
                if link.pubsub is not None:
                    backoff.reset()  # it was up: reconnect at once
                link.pubsub = None
                # Whatever was delivering before the break may have missed frames.
                self._resync_pending.update(
                    self._channels[c] for c in link.confirmed if c in self._channels
                )
                link.confirmed.clear()
                with contextlib.suppress(*UNAVAILABLE):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # untyped in older redis-py
            if link.sharded:
                # The master may be gone (failover): its channels move to the new one.
                await self._reroute(refresh=True)
                if not link.channels and self._is_retired(link):
                    self._links.pop(link.name, None)
                    link.task = None
                    with contextlib.suppress(*UNAVAILABLE):
                        await link.client.aclose()
                    return
            delay = backoff.next_delay()
            assert delay is not None  # a Backoff without attempts or budget never runs out
            await asyncio.sleep(delay)

    def _is_retired(self, link: _Link) -> bool:
        """Whether a link's node is no longer a master of the cluster."""
        assert self._cluster is not None
        return all(node.name != link.name for node in self._cluster.get_primaries())

    async def _listen(self, link: _Link, pubsub: PubSub) -> None:
        """Connect, subscribe the link's channels, and deliver until the connection fails."""
        await pubsub.connect()  # type: ignore[no-untyped-call,unused-ignore]  # untyped in older redis-py
        link.pubsub = pubsub
        await link.subscribe(*link.channels)
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        while True:
            try:
                message = await pubsub.get_message(timeout=_LIVE_PING_S)
            except redis_errors.MovedError as moved:
                # An SSUBSCRIBE reached a master that no longer owns the channel's slot.
                last_heard = loop.time()
                if self._cluster is not None:
                    with contextlib.suppress(*UNAVAILABLE):
                        await self._cluster.nodes_manager.move_slot(moved)
                await self._reroute(refresh=False)
                continue
            if message is not None:
                last_heard = loop.time()
                if self._handle(link, message):
                    await self._reroute(refresh=True)
                continue
            # Silence: a half-open connection raises nothing, so ask for a pong.
            if loop.time() - last_heard > _LIVE_DEAD_S:
                raise redis_errors.TimeoutError("no pong on the pub/sub connection")
            await pubsub.ping(b"costream")

    def _handle(self, link: _Link, message: dict[str, Any]) -> bool:
        """Deliver one message of a link; True when Redis dropped a subscription (slot moved)."""
        kind = message["type"]
        channel = message["channel"] or b""
        conversation_id = self._channels.get(channel)
        if conversation_id is None or self._link_of.get(channel) is not link:
            return False  # a pong, a channel no longer wanted, or one now on another link
        if kind in ("message", "smessage"):
            if self._on_frame is not None:
                try:
                    self._on_frame(conversation_id, message["data"])
                except Exception:
                    log.exception("frame listener failed")
        elif kind in ("subscribe", "ssubscribe"):
            link.confirmed.add(channel)
            for waiter in self._waiters.pop(conversation_id, []):
                if not waiter.done():
                    waiter.set_result(None)
            if conversation_id in self._resync_pending:
                self._resync_pending.discard(conversation_id)
                if self._on_resync is not None:
                    try:
                        self._on_resync(conversation_id)
                    except Exception:
                        log.exception("resync listener failed")
        elif kind == "sunsubscribe" and link.sharded:
            # Not asked for (the channel is still wanted here): its slot left this master.
            if channel in link.confirmed:
                link.confirmed.discard(channel)
                self._resync_pending.add(conversation_id)
            return True
        return False

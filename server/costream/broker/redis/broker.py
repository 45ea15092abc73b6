"""The Redis broker: any number of server processes share conversations through Redis.

``--redis-url`` names one Redis (``redis://``, ``rediss://`` for TLS, user and password in
the URL as usual) or a Redis Cluster: ``redis+cluster://[user:pass@]host:port[,host:port]``
(``rediss+cluster://`` for TLS), whose masters are discovered from those startup nodes.

The keys of a conversation and the Lua scripts over them are in ``scripts``.

Every append is one Lua script: check the fencing token, then per body
HINCRBY the head, splice the seq in (like ``protocol.with_seq``), XADD and publish the
same bytes, then trim. Redis runs a script atomically, so a frame is in the log before it
is published and the publications of a conversation are in seq order. On a cluster the
script publishes with ``SPUBLISH``, so a publication stays on the conversation's shard.

The live tail (``live.LiveTail``) comes over pub/sub links: ``SUBSCRIBE`` on
one Redis, ``SSUBSCRIBE`` per master on a cluster, reconnected after a break with
``on_resync`` for every conversation it had.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Sequence
from typing import Any, Final, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.maint_notifications import MaintNotificationsConfig
from redis.typing import EncodableT

from costream.broker import (
    LOG_RETAIN,
    LOG_RETAIN_BYTES,
    MAX_RUN_BYTES,
    ActiveRun,
    AppendConflict,
    Broker,
    FrameListener,
    LogState,
    ResyncListener,
    RunLease,
)
from costream.broker.redis import scripts
from costream.broker.redis.endpoint import Endpoint, secrets_of
from costream.broker.redis.live import UNAVAILABLE, LiveTail
from costream.errors import LeaseLost, RunActive, RunTooLarge, StorageUnavailable

_COMMAND_TIMEOUT_S: Final = 5.0
_CONNECT_TIMEOUT_S: Final = 3.0

_PRESENCE_PARTS: Final = ("presence", "people", "names", "meta")  # the presence script's KEYS


# Replies as they come with decode_responses=False (redis-py types them as bytes | str).
_Hash = dict[bytes, bytes]


def _seq_of_entry_id(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


class RedisBroker(Broker):
    """Conversations in Redis (one server or a cluster), shared by every process connected to it."""

    def __init__(
        self,
        url: str,
        log_retain: int = LOG_RETAIN,
        *,
        log_retain_bytes: int = LOG_RETAIN_BYTES,
        max_run_bytes: int = MAX_RUN_BYTES,
        conversation_ttl_s: float = 0.0,
    ) -> None:
        self.log_retain = log_retain
        self.log_retain_bytes = log_retain_bytes
        self.max_run_bytes = max_run_bytes
        # Given to the conversations this broker creates; each keeps its own (scripts).
        self.conversation_ttl_ms = round(conversation_ttl_s * 1000)
        self._endpoint = Endpoint.parse(url)
        self._where = self._endpoint.where
        self._secrets = secrets_of(url)
        self._options: dict[str, Any] = {
            "socket_timeout": _COMMAND_TIMEOUT_S,
            "socket_connect_timeout": _CONNECT_TIMEOUT_S,
            "socket_keepalive": True,
            # No automatic retries: a timed-out append may have run, and running it again
            # would log its events twice. The callers decide what to retry. (A cluster's
            # MOVED and TRYAGAIN are still followed: the command did not run.)
            "retry": Retry(NoBackoff(), 0),
            # With maintenance notifications on ("auto"), redis-py skips its check for a
            # pooled connection the server closed, so the first command after a Redis
            # restart would fail.
            "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        }
        self._cluster: RedisCluster | None = None
        self._redis: aioredis.Redis | RedisCluster
        if self._endpoint.nodes:
            startup = [ClusterNode(host, port) for host, port in self._endpoint.nodes]
            self._cluster = RedisCluster.from_url(
                self._endpoint.url, startup_nodes=startup, **self._options
            )
            self._redis = self._cluster
        else:
            self._redis = aioredis.Redis.from_url(url, **self._options)
        self._live = LiveTail(
            self._cluster, self._link_client, describe=self._describe, where=self._where
        )
        self._scripts = scripts.Scripts(self._redis, sharded=self._cluster is not None)
        self._closed = False

    def _link_client(self, node: ClusterNode | None) -> aioredis.Redis:
        """A client of its own for a pub/sub link: to the one Redis, or to one cluster master."""
        if node is None:
            return aioredis.Redis.from_url(self._endpoint.url, **self._options)
        url = self._endpoint.node_url(node.host, int(node.port))
        return aioredis.Redis.from_url(url, **self._options)

    # ---- errors --------------------------------------------------------------------
    def _describe(self, error: BaseException) -> str:
        text = f"{type(error).__name__}: {error}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return f"redis at {self._where} did not answer ({text})"

    @contextlib.contextmanager
    def _storage(self) -> Iterator[None]:
        """Turn Redis being away into ``StorageUnavailable`` with a message free of secrets."""
        if self._closed:
            raise StorageUnavailable("broker closed")
        try:
            yield
        except UNAVAILABLE as error:
            # `from None`: the chained error's text is not scrubbed.
            raise StorageUnavailable(self._describe(error)) from None

    # ---- lifecycle ----------------------------------------------------------------
    async def start(self, on_frame: FrameListener, on_resync: ResyncListener) -> None:
        self._closed = False
        if self._cluster is not None:
            # redis-py's RedisCluster loads the slot map on first use; the load benchmark saw
            # a burst of first commands on a fresh client fail ("Connection closed by
            # server"), so it is loaded here, once. A cluster not up yet loads on first use.
            with contextlib.suppress(*UNAVAILABLE, StorageUnavailable):
                with self._storage():
                    await self._cluster.initialize()
        await self._live.start(on_frame, on_resync)

    async def close(self) -> None:
        self._closed = True
        await self._live.stop()
        with contextlib.suppress(*UNAVAILABLE):
            await self._redis.aclose()
        await self._live.aclose()

    async def ping(self) -> bool:
        """Whether Redis answers; on a cluster, whether every master does."""
        if self._closed:
            return False
        try:
            if self._cluster is not None:
                return bool(await self._cluster.ping(target_nodes=RedisCluster.PRIMARIES))
            return bool(await self._redis.ping())
        except UNAVAILABLE:
            return False

    # ---- records -------------------------------------------------------------------
    async def create_conversation(self, conversation_id: str, record: dict[str, bytes]) -> str:
        epoch = secrets.token_urlsafe(12)
        fields: dict[EncodableT, EncodableT] = dict(record.items())
        fields.update(
            {
                "epoch": epoch.encode(),
                "head": b"0",
                "fence": b"0",
                "snapshot_seq": b"0",
                "ttl_ms": str(self.conversation_ttl_ms).encode(),
            }
        )
        meta = scripts.key(conversation_id, "meta")
        with self._storage():
            async with self._redis.pipeline(transaction=True) as pipe:
                # A new log: nothing of an earlier incarnation may survive.
                pipe.delete(*(scripts.key(conversation_id, part) for part in scripts.LOG_PARTS))
                pipe.hset(meta, mapping=fields)
                if self.conversation_ttl_ms > 0:
                    pipe.pexpire(meta, self.conversation_ttl_ms)
                await pipe.execute()
        return epoch

    async def get_record(self, conversation_id: str) -> dict[str, bytes] | None:
        with self._storage():
            raw = cast(_Hash, await self._redis.hgetall(scripts.key(conversation_id, "meta")))
        if not raw:
            return None
        record = {key.decode(): value for key, value in raw.items()}
        for name in scripts.META_FIELDS:
            record.pop(name, None)
        return record

    async def update_record(self, conversation_id: str, fields: dict[str, bytes]) -> None:
        if not fields:
            return
        flat = [item for pair in fields.items() for item in pair]
        with self._storage():
            code = await self._scripts.update_record(
                keys=[scripts.key(conversation_id, "meta")], args=flat
            )
        if code == scripts.VANISHED:
            raise StorageUnavailable("conversation vanished")

    async def add_to_record(self, conversation_id: str, field: str, amount: float) -> float:
        with self._storage():
            value = await self._scripts.add_to_record(
                keys=[scripts.key(conversation_id, "meta")], args=[field, repr(float(amount))]
            )
        if value is None:
            raise StorageUnavailable("conversation vanished")
        return float(value)

    # ---- maps and lists ----------------------------------------------------------------
    async def _collection(
        self, conversation_id: str, part: str, op: str, *args: bytes | str
    ) -> int:
        """Write a map or list in the script that keeps the conversation's keys alive."""
        if not part.isprintable() or " " in part:
            raise ValueError(f"a map or list name is one word: {part!r}")
        keys = [scripts.key(conversation_id, "meta"), scripts.key(conversation_id, part)]
        with self._storage():
            answer = int(await self._scripts.collection(keys=keys, args=[part, op, *args]))
        if answer == scripts.VANISHED:
            raise StorageUnavailable("conversation vanished")
        return answer

    async def map_get(self, conversation_id: str, name: str, key: str) -> bytes | None:
        with self._storage():
            value = await self._redis.hget(scripts.key(conversation_id, f"map:{name}"), key)
        return cast(bytes | None, value)

    async def map_set(self, conversation_id: str, name: str, key: str, value: bytes) -> None:
        await self._collection(conversation_id, f"map:{name}", "set", key, value)

    async def map_delete(self, conversation_id: str, name: str, key: str) -> bool:
        return bool(await self._collection(conversation_id, f"map:{name}", "delete", key))

    async def map_all(self, conversation_id: str, name: str) -> dict[str, bytes]:
        with self._storage():
            raw = cast(
                _Hash, await self._redis.hgetall(scripts.key(conversation_id, f"map:{name}"))
            )
        return {key.decode(): value for key, value in raw.items()}

    async def list_append(self, conversation_id: str, name: str, items: Sequence[bytes]) -> None:
        if items:
            await self._collection(conversation_id, f"list:{name}", "push", *items)

    async def list_all(self, conversation_id: str, name: str) -> list[bytes]:
        with self._storage():
            items = await self._redis.lrange(scripts.key(conversation_id, f"list:{name}"), 0, -1)
        return cast(list[bytes], items)

    # ---- the log -------------------------------------------------------------------
    async def log_state(self, conversation_id: str) -> LogState | None:
        with self._storage():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hmget(scripts.key(conversation_id, "meta"), ["epoch", "head", "snapshot_seq"])
                pipe.xrange(scripts.key(conversation_id, "log"), "-", "+", count=1)
                (epoch, head, snapshot_seq), first = await pipe.execute()
        if epoch is None:
            return None
        head_seq = int(head or 0)
        first_seq = _seq_of_entry_id(first[0][0]) if first else head_seq + 1
        return LogState(epoch.decode(), head_seq, first_seq, int(snapshot_seq or 0))

    async def read_log(self, conversation_id: str, after_seq: int, limit: int) -> list[bytes]:
        if limit <= 0:
            return []
        with self._storage():
            frames = await self._scripts.read_log(
                keys=[scripts.key(conversation_id, "log")], args=[max(after_seq, 0) + 1, limit]
            )
        return cast(list[bytes], frames)

    async def read_snapshot(self, conversation_id: str) -> bytes | None:
        with self._storage():
            snapshot = await self._redis.get(scripts.key(conversation_id, "snapshot"))
        return cast(bytes | None, snapshot)

    # ---- runs ----------------------------------------------------------------------
    async def _run_script(
        self, script: AsyncScript, conversation_id: str, *args: bytes | str | int
    ) -> Any:
        """Run one of the run scripts (their KEYS and first ARGV are the same)."""
        keys = [scripts.key(conversation_id, part) for part in scripts.RUN_PARTS]
        with self._storage():
            return await script(
                keys=keys,
                args=[
                    scripts.channel(conversation_id),
                    self.log_retain,
                    self.log_retain_bytes,
                    self.max_run_bytes,
                    *args,
                ],
            )

    async def start_run(
        self, conversation_id: str, run_id: str, body: bytes, ttl_ms: int
    ) -> RunLease:
        fence = int(
            await self._run_script(self._scripts.start_run, conversation_id, run_id, ttl_ms, body)
        )
        if fence == scripts.RUN_ACTIVE:
            raise RunActive(conversation_id)
        if fence == scripts.VANISHED:
            raise StorageUnavailable("conversation vanished")
        return RunLease(conversation_id, run_id, fence)

    async def append(
        self, lease: RunLease, bodies: Sequence[bytes], expected_head: int | None = None
    ) -> int:
        conversation_id = lease.conversation_id
        expected = "" if expected_head is None else str(expected_head)
        seq = int(
            await self._run_script(
                self._scripts.append, conversation_id, lease.fence, expected, *bodies
            )
        )
        if seq == scripts.LEASE_LOST:
            raise LeaseLost(conversation_id)
        if seq == scripts.TOO_LARGE:
            raise RunTooLarge(conversation_id, self.max_run_bytes)
        if seq == scripts.CONFLICT:
            # The script does not return the head on a conflict; read it for the message.
            state = await self.log_state(conversation_id)
            assert expected_head is not None
            raise AppendConflict(conversation_id, state.head if state else 0, expected_head)
        return seq

    async def finish_run(
        self, lease: RunLease, bodies: Sequence[bytes], snapshot: bytes | None
    ) -> int:
        conversation_id = lease.conversation_id
        has_snapshot = b"0" if snapshot is None else b"1"
        finish = self._scripts.finish_run
        seq = int(
            await self._run_script(
                finish, conversation_id, lease.fence, has_snapshot, snapshot or b"", *bodies
            )
        )
        if seq == scripts.LEASE_LOST:
            raise LeaseLost(conversation_id)
        return seq

    async def renew_lease(self, lease: RunLease, ttl_ms: int) -> bool:
        conversation_id = lease.conversation_id
        answer = int(
            await self._run_script(self._scripts.renew_lease, conversation_id, lease.fence, ttl_ms)
        )
        if answer == scripts.LEASE_LOST:
            raise LeaseLost(conversation_id)
        return answer == 1

    async def request_cancel(self, conversation_id: str) -> str | None:
        with self._storage():
            run_id = await self._scripts.request_cancel(keys=[scripts.key(conversation_id, "run")])
        return None if run_id is None else bytes(run_id).decode()

    async def active_run(self, conversation_id: str) -> ActiveRun | None:
        with self._storage():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(scripts.key(conversation_id, "run"))
                pipe.exists(scripts.key(conversation_id, "lease"))
                run, lease_alive = await pipe.execute()
        if not run:
            return None
        return ActiveRun(
            run_id=run[b"run_id"].decode(),
            fence=int(run[b"fence"]),
            start_seq=int(run[b"start_seq"]),
            lease_alive=bool(lease_alive),
        )

    async def take_over_run(self, conversation_id: str, ttl_ms: int) -> RunLease | None:
        taken = await self._run_script(self._scripts.take_over_run, conversation_id, ttl_ms)
        if taken is None:
            return None
        fence, run_id = taken
        return RunLease(conversation_id, bytes(run_id).decode(), int(fence))

    # ---- presence --------------------------------------------------------------------
    async def _presence_call(
        self, conversation_id: str, mode: str, ttl_ms: int, args: Sequence[str | bytes]
    ) -> int:
        with self._storage():
            count = await self._scripts.presence(
                keys=[scripts.key(conversation_id, part) for part in _PRESENCE_PARTS],
                args=[scripts.channel(conversation_id), mode, ttl_ms, *args],
            )
        return int(count)

    async def presence_join(
        self, conversation_id: str, viewer_id: str, ttl_ms: int, person: bytes | None = None
    ) -> int:
        return await self._presence_call(
            conversation_id, "join", ttl_ms, [person or b"", viewer_id]
        )

    async def presence_people(self, conversation_id: str) -> list[bytes]:
        with self._storage():
            listed = await self._scripts.people(
                keys=[scripts.key(conversation_id, part) for part in _PRESENCE_PARTS[1:]]
            )
        return [bytes(entry) for entry in cast(list[bytes], listed)]

    async def presence_leave(self, conversation_id: str, viewer_id: str) -> int:
        return await self._presence_call(conversation_id, "leave", 0, [viewer_id])

    async def presence_refresh(
        self, conversation_id: str, viewer_ids: Sequence[str], ttl_ms: int
    ) -> int:
        return await self._presence_call(conversation_id, "refresh", ttl_ms, viewer_ids)

    # ---- live tail -------------------------------------------------------------------
    async def subscribe(self, conversation_id: str) -> None:
        """Subscribed when this returns: every frame published from now on is delivered."""
        await self._live.subscribe(conversation_id, scripts.channel(conversation_id))

    async def unsubscribe(self, conversation_id: str) -> None:
        await self._live.unsubscribe(conversation_id, scripts.channel(conversation_id))

"""The Redis broker: any number of server processes share conversations through one Redis.

Keys of one conversation share the hash tag ``{<id>}``, so a Redis Cluster keeps a
conversation on one shard and a Lua script may touch all of them:

- ``costream:{id}:meta``      hash: the record's fields, ``epoch``, ``head``, ``fence``, ``snapshot_seq``
- ``costream:{id}:log``       stream: one entry per event, id ``<seq>-0``, field ``f`` = the frame
- ``costream:{id}:run``       hash of the active run: ``run_id``, ``fence``, ``start_seq``, ``cancel``
- ``costream:{id}:lease``     string = the fence, with a PX ttl; gone = the producer stopped renewing
- ``costream:{id}:presence``  sorted set: viewer id -> expiry (ms, Redis's clock)
- ``costream:{id}:snapshot``  the latest MESSAGES_SNAPSHOT frame
- ``costream:{id}:map:<name>``, ``costream:{id}:list:<name>``  store.py's maps and lists
- ``costream:{id}:live``      the pub/sub channel of the live tail

Every append is one Lua script: check the fencing token, then per body HINCRBY the head,
splice the seq in (like ``protocol.with_seq``), XADD and PUBLISH the same bytes, then
trim. Redis runs a script atomically, so a frame is in the log before it is published
and the publications of a conversation are in seq order.

One pub/sub connection per broker feeds ``on_frame`` from one reader task. When that
connection breaks (killed, Redis restarted, or silent for too long) the reader reconnects
with backoff, subscribes again, and calls ``on_resync`` for every conversation it had, as
soon as its subscription is back, so consumers re-read the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Iterator, Sequence
from typing import Any, Final, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig
from redis.typing import EncodableT

from .broker import ActiveRun, Broker, FrameListener, LogState, ResyncListener, RunLease
from .errors import LeaseLost, RunActive, StorageUnavailable

log = logging.getLogger(__name__)

_COMMAND_TIMEOUT_S: Final = 5.0
_CONNECT_TIMEOUT_S: Final = 3.0
_SUBSCRIBE_TIMEOUT_S: Final = 5.0
_LIVE_PING_S: Final = 1.0  # ping the pub/sub connection after this long without a message
_LIVE_DEAD_S: Final = 5.0  # no message and no pong for this long: the connection is dead
_BACKOFF_MIN_S: Final = 0.05
_BACKOFF_MAX_S: Final = 2.0

# The errors that mean "the storage did not answer", as opposed to a bug of ours.
_UNAVAILABLE: Final = (
    redis_errors.ConnectionError,  # also BusyLoadingError, AuthenticationError
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    OSError,
    TimeoutError,
)

# Codes the run scripts return instead of a seq or a fence.
_LEASE_LOST: Final = -1
_RUN_ACTIVE: Final = -1
_VANISHED: Final = -2

# Shared by the run scripts. KEYS: meta, log, run, lease, snapshot. ARGV[1]: the live
# channel, ARGV[2]: log_retain, ARGV[3]: the fence (or the ttl for take_over).
_RUN_PRELUDE: Final = """
local meta, log, run, lease, snapshot = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local channel, retain = ARGV[1], tonumber(ARGV[2])

local function append(body)
  local seq = redis.call('HINCRBY', meta, 'head', 1)
  -- protocol.with_seq: {"type":..} becomes {"seq":N,"type":..}
  local frame = '{"seq":' .. string.format('%d', seq) .. ',' .. string.sub(body, 2)
  redis.call('XADD', log, string.format('%d-0', seq), 'f', frame)
  redis.call('PUBLISH', channel, frame)
  return seq
end

local function trim()
  -- Keep the last `retain` events and everything after the latest snapshot.
  local head = tonumber(redis.call('HGET', meta, 'head') or '0')
  local snap = tonumber(redis.call('HGET', meta, 'snapshot_seq') or '0')
  local keep_from = math.min(head - retain + 1, snap + 1)
  if keep_from > 1 then
    redis.call('XTRIM', log, 'MINID', string.format('%d-0', keep_from))
  end
end

local function holds_lease(fence)
  return redis.call('HGET', run, 'fence') == fence and redis.call('GET', lease) == fence
end

local function head()
  return tonumber(redis.call('HGET', meta, 'head') or '0')
end
"""

# ARGV[3]: run id, ARGV[4]: ttl ms, ARGV[5]: the RUN_STARTED body. Returns the new fence.
_START_RUN: Final = (
    _RUN_PRELUDE
    + """
if redis.call('EXISTS', meta) == 0 then return -2 end
if redis.call('EXISTS', run) == 1 then return -1 end
local fence = string.format('%d', redis.call('HINCRBY', meta, 'fence', 1))
redis.call('HSET', run, 'run_id', ARGV[3], 'fence', fence,
           'start_seq', string.format('%d', head() + 1), 'cancel', '0')
redis.call('SET', lease, fence, 'PX', ARGV[4])
append(ARGV[5])
trim()
return tonumber(fence)
"""
)

# ARGV[4..]: bodies. Returns the seq of the last (the head).
_APPEND: Final = (
    _RUN_PRELUDE
    + """
if not holds_lease(ARGV[3]) then return -1 end
local seq = head()
for i = 4, #ARGV do seq = append(ARGV[i]) end
trim()
return seq
"""
)

# ARGV[4]: '1' when ARGV[5] is a snapshot body, ARGV[6..]: bodies.
_FINISH_RUN: Final = (
    _RUN_PRELUDE
    + """
if not holds_lease(ARGV[3]) then return -1 end
local seq = head()
for i = 6, #ARGV do seq = append(ARGV[i]) end
redis.call('DEL', run, lease)
if ARGV[4] == '1' then
  local at = string.format('%d', seq)
  redis.call('SET', snapshot, '{"seq":' .. at .. ',' .. string.sub(ARGV[5], 2))
  redis.call('HSET', meta, 'snapshot_seq', at)
end
trim()
return seq
"""
)

# ARGV[4]: ttl ms. Returns 1 when a cancel was requested, else 0.
_RENEW_LEASE: Final = (
    _RUN_PRELUDE
    + """
if not holds_lease(ARGV[3]) then return -1 end
redis.call('SET', lease, ARGV[3], 'PX', ARGV[4])
if redis.call('HGET', run, 'cancel') == '1' then return 1 end
return 0
"""
)

# ARGV[3]: ttl ms. Returns {fence, run id}, or nil when no run or its lease is alive.
_TAKE_OVER_RUN: Final = (
    _RUN_PRELUDE
    + """
if redis.call('EXISTS', run) == 0 or redis.call('EXISTS', lease) == 1 then return false end
local fence = string.format('%d', redis.call('HINCRBY', meta, 'fence', 1))
redis.call('HSET', run, 'fence', fence)
redis.call('SET', lease, fence, 'PX', ARGV[3])
return {fence, redis.call('HGET', run, 'run_id')}
"""
)

# KEYS: run. Returns the run id, or nil when nothing runs.
_REQUEST_CANCEL: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'cancel', '1')
return redis.call('HGET', KEYS[1], 'run_id')
"""

# KEYS: presence. ARGV: channel, 'join'/'leave'/'refresh', ttl ms, viewer ids.
# Redis's own clock (TIME), so the server processes' clocks do not matter.
_PRESENCE: Final = """
local key, channel, mode, ttl = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local before = redis.call('ZCARD', key)
for i = 4, #ARGV do
  if mode == 'leave' then
    redis.call('ZREM', key, ARGV[i])
  else
    redis.call('ZADD', key, string.format('%d', now + ttl), ARGV[i])
  end
end
redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. string.format('%d', now))
local count = redis.call('ZCARD', key)
if count > 0 then
  -- The key lives as long as its longest-lived viewer.
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', key, last[2])
end
if mode ~= 'refresh' or count ~= before then
  redis.call('PUBLISH', channel, '{"type":"presence","viewers":' .. count .. '}')
end
return count
"""

# KEYS: meta. ARGV: field, value, field, value... Returns -2 for an unknown conversation.
_UPDATE_RECORD: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 0
"""

# KEYS: meta. ARGV: field, amount. Returns the new value, or nil for an unknown conversation.
_ADD_TO_RECORD: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('HINCRBYFLOAT', KEYS[1], ARGV[1], ARGV[2])
"""

_LOG_STATE_FIELDS: Final = ("head", "fence", "snapshot_seq")  # in meta, not in the record


# Replies as they come with decode_responses=False (redis-py types them as bytes | str).
_Hash = dict[bytes, bytes]


def _key(conversation_id: str, part: str) -> str:
    return f"costream:{{{conversation_id}}}:{part}"


def _channel(conversation_id: str) -> bytes:
    return _key(conversation_id, "live").encode()


# The keys a new conversation starts without (its maps and lists have open-ended names).
_LOG_PARTS: Final = ("meta", "log", "run", "lease", "snapshot", "presence")


def _seq_of_entry_id(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


def _secrets_of(url: str) -> list[str]:
    """The password of a redis URL in every spelling that could end up in a message."""
    parts = urlsplit(url)
    found = [parts.password or "", *parse_qs(parts.query).get("password", [])]
    return [s for text in found if text for s in {text, unquote(text)}]


class RedisBroker(Broker):
    """Conversations in Redis, shared by every process connected to it."""

    def __init__(self, url: str, log_retain: int = 10_000) -> None:
        self.log_retain = log_retain
        parts = urlsplit(url)
        self._where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
        self._secrets = _secrets_of(url)
        options: dict[str, Any] = {
            "socket_timeout": _COMMAND_TIMEOUT_S,
            "socket_connect_timeout": _CONNECT_TIMEOUT_S,
            "socket_keepalive": True,
            # No automatic retries: a timed-out append may have run, and running it again
            # would log its events twice. The callers decide what to retry.
            "retry": Retry(NoBackoff(), 0),
            # With maintenance notifications on ("auto"), redis-py skips its check for a
            # pooled connection the server closed, so the first command after a Redis
            # restart would fail.
            "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        }
        self._redis = aioredis.Redis.from_url(url, **options)
        # Pub/sub gets its own pool, so a subscribed connection never serves a command.
        self._live = aioredis.Redis.from_url(url, **options)
        self._start_run = self._redis.register_script(_START_RUN)
        self._append = self._redis.register_script(_APPEND)
        self._finish_run = self._redis.register_script(_FINISH_RUN)
        self._renew_lease = self._redis.register_script(_RENEW_LEASE)
        self._take_over_run = self._redis.register_script(_TAKE_OVER_RUN)
        self._request_cancel = self._redis.register_script(_REQUEST_CANCEL)
        self._presence = self._redis.register_script(_PRESENCE)
        self._update_record = self._redis.register_script(_UPDATE_RECORD)
        self._add_to_record = self._redis.register_script(_ADD_TO_RECORD)

        self._on_frame: FrameListener | None = None
        self._on_resync: ResyncListener | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pubsub: PubSub | None = None  # set while the pub/sub connection is up
        self._channels: dict[bytes, str] = {}  # wanted: channel -> conversation id
        self._confirmed: set[str] = set()  # subscribed on the current connection
        self._resync_pending: set[str] = set()  # lost with a connection, not yet back
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._closed = False

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
        except _UNAVAILABLE as error:
            # `from None`: the chained error's text is not scrubbed.
            raise StorageUnavailable(self._describe(error)) from None

    # ---- lifecycle ----------------------------------------------------------------
    async def start(self, on_frame: FrameListener, on_resync: ResyncListener) -> None:
        self._on_frame, self._on_resync = on_frame, on_resync
        self._closed = False
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_live(), name="costream-redis-live")

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(StorageUnavailable("broker closed"))
        self._waiters.clear()
        with contextlib.suppress(*_UNAVAILABLE):
            await self._redis.aclose()
        with contextlib.suppress(*_UNAVAILABLE):
            await self._live.aclose()

    async def ping(self) -> bool:
        if self._closed:
            return False
        try:
            return bool(await self._redis.ping())
        except _UNAVAILABLE:
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
            }
        )
        with self._storage():
            async with self._redis.pipeline(transaction=True) as pipe:
                # A new log: nothing of an earlier incarnation may survive.
                pipe.delete(*(_key(conversation_id, part) for part in _LOG_PARTS))
                pipe.hset(_key(conversation_id, "meta"), mapping=fields)
                await pipe.execute()
        return epoch

    async def get_record(self, conversation_id: str) -> dict[str, bytes] | None:
        with self._storage():
            raw = cast(_Hash, await self._redis.hgetall(_key(conversation_id, "meta")))
        if not raw:
            return None
        record = {key.decode(): value for key, value in raw.items()}
        for name in _LOG_STATE_FIELDS:
            record.pop(name, None)
        return record

    async def update_record(self, conversation_id: str, fields: dict[str, bytes]) -> None:
        if not fields:
            return
        flat = [item for pair in fields.items() for item in pair]
        with self._storage():
            code = await self._update_record(keys=[_key(conversation_id, "meta")], args=flat)
        if code == _VANISHED:
            raise StorageUnavailable("conversation vanished")

    async def add_to_record(self, conversation_id: str, field: str, amount: float) -> float:
        with self._storage():
            value = await self._add_to_record(
                keys=[_key(conversation_id, "meta")], args=[field, repr(float(amount))]
            )
        if value is None:
            raise StorageUnavailable("conversation vanished")
        return float(value)

    # ---- maps and lists ----------------------------------------------------------------
    async def map_get(self, conversation_id: str, name: str, key: str) -> bytes | None:
        with self._storage():
            value = await self._redis.hget(_key(conversation_id, f"map:{name}"), key)
        return cast(bytes | None, value)

    async def map_set(self, conversation_id: str, name: str, key: str, value: bytes) -> None:
        with self._storage():
            await self._redis.hset(_key(conversation_id, f"map:{name}"), key, value)

    async def map_delete(self, conversation_id: str, name: str, key: str) -> bool:
        with self._storage():
            removed = await self._redis.hdel(_key(conversation_id, f"map:{name}"), key)
        return bool(removed)

    async def map_all(self, conversation_id: str, name: str) -> dict[str, bytes]:
        with self._storage():
            raw = cast(_Hash, await self._redis.hgetall(_key(conversation_id, f"map:{name}")))
        return {key.decode(): value for key, value in raw.items()}

    async def list_append(self, conversation_id: str, name: str, items: Sequence[bytes]) -> None:
        if not items:
            return
        with self._storage():
            await self._redis.rpush(_key(conversation_id, f"list:{name}"), *items)

    async def list_all(self, conversation_id: str, name: str) -> list[bytes]:
        with self._storage():
            items = await self._redis.lrange(_key(conversation_id, f"list:{name}"), 0, -1)
        return cast(list[bytes], items)

    # ---- the log -------------------------------------------------------------------
    async def log_state(self, conversation_id: str) -> LogState | None:
        with self._storage():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hmget(_key(conversation_id, "meta"), ["epoch", "head", "snapshot_seq"])
                pipe.xrange(_key(conversation_id, "log"), "-", "+", count=1)
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
            entries = await self._redis.xrange(
                _key(conversation_id, "log"), f"{max(after_seq, 0) + 1}-0", "+", count=limit
            )
        return [fields[b"f"] for _, fields in cast(list[tuple[bytes, _Hash]], entries)]

    async def read_snapshot(self, conversation_id: str) -> bytes | None:
        with self._storage():
            snapshot = await self._redis.get(_key(conversation_id, "snapshot"))
        return cast(bytes | None, snapshot)

    # ---- runs ----------------------------------------------------------------------
    def _run_keys(self, conversation_id: str) -> list[str]:
        return [_key(conversation_id, part) for part in ("meta", "log", "run", "lease", "snapshot")]

    def _run_args(self, conversation_id: str, *args: bytes | str | int) -> list[bytes | str | int]:
        return [_channel(conversation_id), self.log_retain, *args]

    async def start_run(
        self, conversation_id: str, run_id: str, body: bytes, ttl_ms: int
    ) -> RunLease:
        with self._storage():
            fence = int(
                await self._start_run(
                    keys=self._run_keys(conversation_id),
                    args=self._run_args(conversation_id, run_id, ttl_ms, body),
                )
            )
        if fence == _RUN_ACTIVE:
            raise RunActive(conversation_id)
        if fence == _VANISHED:
            raise StorageUnavailable("conversation vanished")
        return RunLease(conversation_id, run_id, fence)

    async def append(self, lease: RunLease, bodies: Sequence[bytes]) -> int:
        conversation_id = lease.conversation_id
        with self._storage():
            seq = int(
                await self._append(
                    keys=self._run_keys(conversation_id),
                    args=self._run_args(conversation_id, lease.fence, *bodies),
                )
            )
        if seq == _LEASE_LOST:
            raise LeaseLost(conversation_id)
        return seq

    async def finish_run(
        self, lease: RunLease, bodies: Sequence[bytes], snapshot: bytes | None
    ) -> int:
        conversation_id = lease.conversation_id
        has_snapshot = b"0" if snapshot is None else b"1"
        with self._storage():
            seq = int(
                await self._finish_run(
                    keys=self._run_keys(conversation_id),
                    args=self._run_args(
                        conversation_id, lease.fence, has_snapshot, snapshot or b"", *bodies
                    ),
                )
            )
        if seq == _LEASE_LOST:
            raise LeaseLost(conversation_id)
        return seq

    async def renew_lease(self, lease: RunLease, ttl_ms: int) -> bool:
        conversation_id = lease.conversation_id
        with self._storage():
            answer = int(
                await self._renew_lease(
                    keys=self._run_keys(conversation_id),
                    args=self._run_args(conversation_id, lease.fence, ttl_ms),
                )
            )
        if answer == _LEASE_LOST:
            raise LeaseLost(conversation_id)
        return answer == 1

    async def request_cancel(self, conversation_id: str) -> str | None:
        with self._storage():
            run_id = await self._request_cancel(keys=[_key(conversation_id, "run")])
        return None if run_id is None else bytes(run_id).decode()

    async def active_run(self, conversation_id: str) -> ActiveRun | None:
        with self._storage():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(_key(conversation_id, "run"))
                pipe.exists(_key(conversation_id, "lease"))
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
        with self._storage():
            taken = await self._take_over_run(
                keys=self._run_keys(conversation_id),
                args=self._run_args(conversation_id, ttl_ms),
            )
        if taken is None:
            return None
        fence, run_id = taken
        return RunLease(conversation_id, bytes(run_id).decode(), int(fence))

    # ---- presence --------------------------------------------------------------------
    async def _presence_call(
        self, conversation_id: str, mode: str, ttl_ms: int, viewer_ids: Sequence[str]
    ) -> int:
        with self._storage():
            count = await self._presence(
                keys=[_key(conversation_id, "presence")],
                args=[_channel(conversation_id), mode, ttl_ms, *viewer_ids],
            )
        return int(count)

    async def presence_join(self, conversation_id: str, viewer_id: str, ttl_ms: int) -> int:
        return await self._presence_call(conversation_id, "join", ttl_ms, [viewer_id])

    async def presence_leave(self, conversation_id: str, viewer_id: str) -> int:
        return await self._presence_call(conversation_id, "leave", 0, [viewer_id])

    async def presence_refresh(
        self, conversation_id: str, viewer_ids: Sequence[str], ttl_ms: int
    ) -> int:
        return await self._presence_call(conversation_id, "refresh", ttl_ms, viewer_ids)

    # ---- live tail -------------------------------------------------------------------
    async def subscribe(self, conversation_id: str) -> None:
        """Subscribed when this returns: every frame published from now on is delivered."""
        if self._closed:
            raise StorageUnavailable("broker closed")
        channel = _channel(conversation_id)
        if self._channels.get(channel) == conversation_id and conversation_id in self._confirmed:
            return
        self._channels[channel] = conversation_id
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(conversation_id, []).append(waiter)
        pubsub = self._pubsub
        if pubsub is not None:
            # On a broken connection the reader subscribes everything again, so the
            # waiter is answered either way.
            with contextlib.suppress(*_UNAVAILABLE):
                await pubsub.subscribe(channel)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), _SUBSCRIBE_TIMEOUT_S)
        except TimeoutError:
            waiters = self._waiters.get(conversation_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(conversation_id, None)
                self._channels.pop(channel, None)
            raise StorageUnavailable(
                f"redis at {self._where} did not confirm a subscription"
            ) from None

    async def unsubscribe(self, conversation_id: str) -> None:
        channel = _channel(conversation_id)
        self._channels.pop(channel, None)
        self._confirmed.discard(conversation_id)
        self._resync_pending.discard(conversation_id)
        pubsub = self._pubsub
        if pubsub is not None:
            with contextlib.suppress(*_UNAVAILABLE):
                await pubsub.unsubscribe(channel)

    async def _read_live(self) -> None:
        """The reader task: keep one pub/sub connection up, for as long as the broker runs."""
        delay = _BACKOFF_MIN_S
        failures = 0  # connection attempts failed in a row
        while True:
            pubsub = self._live.pubsub()
            try:
                await self._listen(pubsub)
            except _UNAVAILABLE as error:
                was_up = self._pubsub is not None
                failures = 0 if was_up else failures + 1
                # Once per outage at warning level; the retries every few seconds at debug.
                level = logging.WARNING if failures <= 1 else logging.DEBUG
                what = "lost" if was_up else "cannot be re-established"
                log.log(level, "redis pub/sub connection %s: %s", what, self._describe(error))
            except Exception:
                log.exception("redis pub/sub reader failed")
            finally:
                if self._pubsub is not None:
                    delay = _BACKOFF_MIN_S  # it was up: reconnect at once
                self._pubsub = None
                # Whatever was delivering before the break may have missed frames.
                self._resync_pending |= self._confirmed
                self._confirmed.clear()
                with contextlib.suppress(*_UNAVAILABLE):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)

    async def _listen(self, pubsub: PubSub) -> None:
        """Connect, subscribe every wanted channel, and deliver until the connection fails."""
        await pubsub.connect()  # type: ignore[no-untyped-call]  # untyped in redis-py
        self._pubsub = pubsub
        if self._channels:
            await pubsub.subscribe(*self._channels)
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        while True:
            message = await pubsub.get_message(timeout=_LIVE_PING_S)
            if message is not None:
                last_heard = loop.time()
                self._handle(message)
                continue
            # Silence: a half-open connection raises nothing, so ask for a pong.
            if loop.time() - last_heard > _LIVE_DEAD_S:
                raise redis_errors.TimeoutError("no pong on the pub/sub connection")
            await pubsub.ping(b"costream")

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        conversation_id = self._channels.get(message["channel"] or b"")
        if conversation_id is None:
            return  # a pong, or a channel no longer wanted
        if kind == "message":
            if self._on_frame is not None:
                try:
                    self._on_frame(conversation_id, message["data"])
                except Exception:
                    log.exception("frame listener failed")
        elif kind == "subscribe":
            self._confirmed.add(conversation_id)
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

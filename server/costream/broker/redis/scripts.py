"""The Redis broker's data: the keys of a conversation, and the Lua scripts over them.

Keys of one conversation share the hash tag ``{<id>}``, so a Redis Cluster keeps a
conversation on one shard and a Lua script may touch all of them:

- ``costream:{id}:meta``      hash: the record's fields, ``epoch``, ``head``, ``fence``,
  ``snapshot_seq``, and ``ttl_ms``, ``tail_bytes``, ``finished_bytes``, ``parts`` (below)
- ``costream:{id}:log``       stream: one entry per event, id ``<seq>-0``, field ``f`` = the frame
- ``costream:{id}:run``       hash of the active run: ``run_id``, ``fence``, ``start_seq``, ``cancel``
- ``costream:{id}:lease``     string = the fence, with a PX ttl; gone = the producer stopped renewing
- ``costream:{id}:presence``  sorted set: viewer id -> expiry (ms, Redis's clock)
- ``costream:{id}:people``    sorted set: listed viewer id -> when it joined (ms)
- ``costream:{id}:names``     hash: listed viewer id -> its encoded ``protocol.Person``
- ``costream:{id}:snapshot``  the latest MESSAGES_SNAPSHOT frame
- ``costream:{id}:map:<name>``, ``costream:{id}:list:<name>``  store.py's maps and lists
- ``costream:{id}:live``      the pub/sub channel of the live tail (in the same slot)

Bytes: ``finished_bytes`` counts the retained frames at or before ``snapshot_seq`` (trimmed
to ``log_retain_bytes``), ``tail_bytes`` those after it, and the run hash's ``bytes`` the
frames of the run (capped by ``max_run_bytes``).

Expiry: ``ttl_ms`` is the conversation's idle TTL, set when it is created (absent or 0: its
keys never expire). Every write script, and presence, ends with ``keep_alive``: meta, log,
run, snapshot and the maps and lists named in ``parts`` (space-separated, e.g.
``map:files list:history``) get an expiry of at least now (or the last viewer's expiry)
plus ``ttl_ms``, never shortened. The lease and the presence keys have expiries of their
own. ``keep_alive`` reaches the keys through the meta key's name: undeclared keys, but in
the declared key's slot, which a cluster allows.

Each script runs atomically by Redis on one slot. Every script touches the keys of one conversation only (they share the hash tag ``{id}``),
so on a Redis Cluster each runs on the shard that owns the conversation. A script that
publishes calls ``redis.call(PUBLISH, ...)``: ``lua`` defines ``PUBLISH`` as ``PUBLISH`` on
a single Redis, and as ``SPUBLISH`` on a cluster, where the channel ``costream:{id}:live``
is in the script's slot, so the publication stays on that shard (Redis 7 allows
``SPUBLISH`` in a script for a channel of the script's slot).
"""

from __future__ import annotations

from typing import Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from costream import protocol


def key(conversation_id: str, part: str) -> str:
    """The name of one of a conversation's keys (``part``: ``meta``, ``log``, ...)."""
    return f"costream:{{{conversation_id}}}:{part}"


def channel(conversation_id: str) -> bytes:
    """The pub/sub channel of a conversation's live tail."""
    return key(conversation_id, "live").encode()


# The keys a new conversation starts without (its maps and lists have open-ended names).
LOG_PARTS: Final = ("meta", "log", "run", "lease", "snapshot", "presence", "people", "names")
# The KEYS of the run scripts, in order.
RUN_PARTS: Final = ("meta", "log", "run", "lease", "snapshot")


def _lua_string(text: str) -> str:
    if not text.isascii() or "'" in text or "\\" in text:
        raise ValueError(f"not a plain Lua string: {text!r}")
    return f"'{text}'"


# The frame layout comes from protocol.py: the scripts build frames with the same bytes.
_LAYOUT: Final = (
    f"local SEQ_PREFIX = {_lua_string(protocol.SEQ_PREFIX)}\n"
    f"local PRESENCE_PREFIX = {_lua_string(protocol.PRESENCE_PREFIX)}\n"
    f"local PEOPLE_FIELD = {_lua_string(protocol.PEOPLE_FIELD)}\n"
    # The first PRESENCE_MAX_PEOPLE listed viewers' entries, in the order they joined.
    "local function listed_people(people, names)\n"
    f"  local ids = redis.call('ZRANGE', people, 0, {protocol.PRESENCE_MAX_PEOPLE - 1})\n"
    "  if #ids == 0 then return {} end\n"
    "  local listed = {}\n"
    "  for _, entry in ipairs(redis.call('HMGET', names, unpack(ids))) do\n"
    "    if entry then table.insert(listed, entry) end\n"
    "  end\n"
    "  return listed\n"
    "end\n"
    + """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- See the module docstring. `slack`: skip when meta's expiry is that close to the new one
-- already (an append's fast path: the keys were all pushed back a moment ago).
local function keep_alive(meta, after, slack)
  local ttl = tonumber(redis.call('HGET', meta, 'ttl_ms') or '0') or 0
  if ttl <= 0 then return end
  local at = after + ttl
  if slack > 0 and redis.call('PEXPIRETIME', meta) >= at - math.min(slack, ttl / 10) then
    return
  end
  local prefix = string.sub(meta, 1, -5)
  local keys = {meta, prefix .. 'log', prefix .. 'run', prefix .. 'snapshot'}
  for part in string.gmatch(redis.call('HGET', meta, 'parts') or '', '%S+') do
    table.insert(keys, prefix .. part)
  end
  for _, k in ipairs(keys) do
    local expires = redis.call('PEXPIRETIME', k)
    if expires == -1 or (expires >= 0 and expires < at) then
      redis.call('PEXPIREAT', k, string.format('%d', at))
    end
  end
end

-- Name a map or list key (its part, 'map:<name>') in meta, so keep_alive reaches it.
local function register(meta, part)
  local parts = redis.call('HGET', meta, 'parts') or ''
  if not string.find(' ' .. parts .. ' ', ' ' .. part .. ' ', 1, true) then
    redis.call('HSET', meta, 'parts', parts == '' and part or (parts .. ' ' .. part))
  end
end
"""
)


def lua(script: str, *, sharded: bool) -> str:
    """The script's source, with ``PUBLISH`` bound to the command of the deployment and
    ``SEQ_PREFIX`` / ``PRESENCE_PREFIX`` to the frame layout of :mod:`costream.protocol`."""
    command = "SPUBLISH" if sharded else "PUBLISH"
    return f"local PUBLISH = '{command}'\n{_LAYOUT}{script}"


# Codes the run scripts return instead of a seq or a fence.
LEASE_LOST: Final = -1
RUN_ACTIVE: Final = -1
VANISHED: Final = -2
CONFLICT: Final = -3  # APPEND: the expected head is neither the head nor the head after
TOO_LARGE: Final = -4  # APPEND: the run's frames would pass max_run_bytes

# The meta fields that are not the record's.
META_FIELDS: Final = (
    "head",
    "fence",
    "snapshot_seq",
    "ttl_ms",
    "tail_bytes",
    "finished_bytes",
    "parts",
)

# Shared by the run scripts. KEYS: meta, log, run, lease, snapshot. ARGV[1]: the live
# channel, ARGV[2]: log_retain, ARGV[3]: log_retain_bytes, ARGV[4]: max_run_bytes (0: no
# limit), ARGV[5]: the fence (or the ttl for take_over).
RUN_PRELUDE: Final = """
local meta, log, run, lease, snapshot = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local channel, retain = ARGV[1], tonumber(ARGV[2])
local retain_bytes, max_run_bytes = tonumber(ARGV[3]), tonumber(ARGV[4])
local added = 0  -- bytes of the frames this call appended

local function append(body)
  local seq = redis.call('HINCRBY', meta, 'head', 1)
  -- protocol.with_seq: the seq goes in front of the body's fields
  local frame = SEQ_PREFIX .. string.format('%d', seq) .. ',' .. string.sub(body, 2)
  redis.call('XADD', log, string.format('%d-0', seq), 'f', frame)
  redis.call(PUBLISH, channel, frame)
  added = added + #frame
  return seq
end

local function head()
  return tonumber(redis.call('HGET', meta, 'head') or '0')
end

local function count_added()
  if added > 0 then redis.call('HINCRBY', meta, 'tail_bytes', added) end
end

local function trim()
  -- Keep everything after the latest snapshot; of the rest (finished runs), the events
  -- within `retain` of the head and within `retain_bytes`, the oldest removed first.
  local snap = tonumber(redis.call('HGET', meta, 'snapshot_seq') or '0')
  if snap == 0 then return end
  local keep_from = math.min(head() - retain + 1, snap + 1)
  local finished = tonumber(redis.call('HGET', meta, 'finished_bytes') or '0')
  local first = 0  -- the first seq kept, once something goes
  if keep_from > 1 then
    local bound = string.format('%d-0', keep_from - 1)
    for _, entry in ipairs(redis.call('XRANGE', log, '-', bound)) do
      finished = finished - #entry[2][2]
      first = keep_from
    end
  end
  while finished > retain_bytes do
    local from = first > 0 and string.format('%d-0', first) or '-'
    local entry = redis.call('XRANGE', log, from, '+', 'COUNT', 1)[1]
    local seq = entry and tonumber(string.match(entry[1], '^(%d+)'))
    if not seq or seq > snap then  -- counted bytes no longer there: start counting afresh
      finished, first = 0, math.max(first, 1)
      break
    end
    finished = finished - #entry[2][2]
    first = seq + 1
  end
  if first > 0 then
    redis.call('XTRIM', log, 'MINID', string.format('%d-0', first))
    redis.call('HSET', meta, 'finished_bytes', string.format('%d', math.max(finished, 0)))
  end
end

local function holds_lease(fence)
  return redis.call('HGET', run, 'fence') == fence and redis.call('GET', lease) == fence
end
"""

# ARGV[5]: run id, ARGV[6]: ttl ms, ARGV[7]: the RUN_STARTED body. Returns the new fence.
START_RUN: Final = (
    RUN_PRELUDE
    + """
if redis.call('EXISTS', meta) == 0 then return -2 end
if redis.call('EXISTS', run) == 1 then return -1 end
local fence = string.format('%d', redis.call('HINCRBY', meta, 'fence', 1))
redis.call('HSET', run, 'run_id', ARGV[5], 'fence', fence,
           'start_seq', string.format('%d', head() + 1), 'cancel', '0')
redis.call('SET', lease, fence, 'PX', ARGV[6])
append(ARGV[7])
count_added()
redis.call('HSET', run, 'bytes', string.format('%d', added))
trim()
keep_alive(meta, now_ms(), 0)
return tonumber(fence)
"""
)

# ARGV[5]: the fence, ARGV[6]: the expected head ('' for none), ARGV[7..]: bodies. Returns
# the seq of the last (the head); the head without appending when the batch is already
# stored (head = expected + its length: a retry); CONFLICT when the head is neither;
# TOO_LARGE, appending nothing, when the run's frames would pass max_run_bytes.
APPEND: Final = (
    RUN_PRELUDE
    + """
if not holds_lease(ARGV[5]) then return -1 end
local seq = head()
if ARGV[6] ~= '' then
  local expected = tonumber(ARGV[6])
  if seq == expected + #ARGV - 6 and seq ~= expected then return seq end
  if seq ~= expected then return -3 end
end
if max_run_bytes > 0 then
  local size = tonumber(redis.call('HGET', run, 'bytes') or '0')
  for i = 7, #ARGV do
    size = size + #SEQ_PREFIX + #string.format('%d', seq + i - 6) + #ARGV[i]
  end
  if size > max_run_bytes then return -4 end
end
for i = 7, #ARGV do seq = append(ARGV[i]) end
count_added()
if added > 0 then redis.call('HINCRBY', run, 'bytes', added) end
trim()
keep_alive(meta, now_ms(), 1000)
return seq
"""
)

# ARGV[5]: the fence, ARGV[6]: '1' when ARGV[7] is a snapshot body, ARGV[8..]: bodies.
FINISH_RUN: Final = (
    RUN_PRELUDE
    + """
if not holds_lease(ARGV[5]) then return -1 end
local seq = head()
for i = 8, #ARGV do seq = append(ARGV[i]) end
count_added()
redis.call('DEL', run, lease)
if ARGV[6] == '1' then
  local at = string.format('%d', seq)
  redis.call('SET', snapshot, SEQ_PREFIX .. at .. ',' .. string.sub(ARGV[7], 2))
  redis.call('HSET', meta, 'snapshot_seq', at)
  -- Every retained frame is now at or before the snapshot.
  local tail = redis.call('HGET', meta, 'tail_bytes') or '0'
  redis.call('HINCRBY', meta, 'finished_bytes', tail)
  redis.call('HSET', meta, 'tail_bytes', '0')
end
trim()
keep_alive(meta, now_ms(), 0)
return seq
"""
)

# ARGV[5]: the fence, ARGV[6]: ttl ms. Returns 1 when a cancel was requested, else 0.
RENEW_LEASE: Final = (
    RUN_PRELUDE
    + """
if not holds_lease(ARGV[5]) then return -1 end
redis.call('SET', lease, ARGV[5], 'PX', ARGV[6])
keep_alive(meta, now_ms(), 1000)
if redis.call('HGET', run, 'cancel') == '1' then return 1 end
return 0
"""
)

# ARGV[5]: ttl ms. Returns {fence, run id}, or nil when no run or its lease is alive.
TAKE_OVER_RUN: Final = (
    RUN_PRELUDE
    + """
if redis.call('EXISTS', run) == 0 or redis.call('EXISTS', lease) == 1 then return false end
local fence = string.format('%d', redis.call('HINCRBY', meta, 'fence', 1))
redis.call('HSET', run, 'fence', fence)
redis.call('SET', lease, fence, 'PX', ARGV[5])
keep_alive(meta, now_ms(), 0)
return {fence, redis.call('HGET', run, 'run_id')}
"""
)

# KEYS: run. Returns the run id, or nil when nothing runs.
REQUEST_CANCEL: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'cancel', '1')
return redis.call('HGET', KEYS[1], 'run_id')
"""

# KEYS: presence, people, names, meta. ARGV: channel, 'join'/'leave'/'refresh', ttl ms, then for
# 'join' the encoded Person ('' for none) and the viewer id, else viewer ids.
# ``presence`` counts (viewer id -> expiry), ``people`` orders the listed viewers (viewer
# id -> when it joined), ``names`` holds their entries (viewer id -> encoded Person).
# Redis's own clock (TIME), so the server processes' clocks do not matter.
PRESENCE: Final = """
local key, people, names, meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local channel, mode, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = string.format('%d', now + ttl)
local before = redis.call('ZCARD', key)
local function forget(id)
  redis.call('ZREM', key, id)
  redis.call('ZREM', people, id)
  redis.call('HDEL', names, id)
end
if mode == 'join' then
  redis.call('ZADD', key, expiry, ARGV[5])
  if ARGV[4] ~= '' then
    redis.call('ZADD', people, 'NX', string.format('%d', now), ARGV[5])
    redis.call('HSET', names, ARGV[5], ARGV[4])
  end
else
  for i = 4, #ARGV do
    if mode == 'leave' then forget(ARGV[i]) else redis.call('ZADD', key, expiry, ARGV[i]) end
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', '(' .. string.format('%d', now))) do
  forget(id)
end
local count = redis.call('ZCARD', key)
local watched_until = now
if count > 0 then
  -- The keys live as long as their longest-lived viewer.
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', key, last[2])
  redis.call('PEXPIREAT', people, last[2])
  redis.call('PEXPIREAT', names, last[2])
  watched_until = math.max(now, tonumber(last[2]))
end
-- Watched is active: the conversation lives its ttl past its last viewer. (A refresh
-- naming no viewer and counting none, a mere read, is not.)
if mode ~= 'refresh' or count > 0 or #ARGV > 3 then keep_alive(meta, watched_until, 0) end
if mode ~= 'refresh' or count ~= before then
  local frame = PRESENCE_PREFIX .. count
  local listed = listed_people(people, names)
  if #listed > 0 then frame = frame .. PEOPLE_FIELD .. table.concat(listed, ',') .. ']' end
  redis.call(PUBLISH, channel, frame .. '}')
end
return count
"""

# KEYS: people, names. Returns the encoded Person entries a presence frame lists now.
PEOPLE: Final = """
return listed_people(KEYS[1], KEYS[2])
"""

# KEYS: meta. ARGV: field, value, field, value... Returns -2 for an unknown conversation.
UPDATE_RECORD: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
redis.call('HSET', KEYS[1], unpack(ARGV))
keep_alive(KEYS[1], now_ms(), 0)
return 0
"""

# KEYS: meta. ARGV: field, amount. Returns the new value, or nil for an unknown conversation.
ADD_TO_RECORD: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local value = redis.call('HINCRBYFLOAT', KEYS[1], ARGV[1], ARGV[2])
keep_alive(KEYS[1], now_ms(), 0)
return value
"""

# The maps and lists of store.py. KEYS: meta, the map or list. ARGV[1]: its part name
# ('map:<name>', 'list:<name>'), ARGV[2]: 'set' (key, value), 'delete' (key) or 'push'
# (items...). Returns -2 for an unknown conversation (nothing written), else for 'delete'
# whether the key was there.
COLLECTION: Final = """
local meta, collection, part, op = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
if redis.call('EXISTS', meta) == 0 then return -2 end
local answer = 0
if op == 'set' then
  redis.call('HSET', collection, ARGV[3], ARGV[4])
elseif op == 'delete' then
  answer = redis.call('HDEL', collection, ARGV[3])
else
  for i = 3, #ARGV do redis.call('RPUSH', collection, ARGV[i]) end
end
register(meta, part)
keep_alive(meta, now_ms(), 0)
return answer
"""

# READ_LOG (KEYS: log; ARGV: first seq, count): the frames from that seq on, a flat list.
# XRANGE itself answers [[id, [field, frame]], ...], which redis-py parses in Python into
# tuples and a dict per entry: on a catch-up or a replay that was most of the server's
# work (bench_fanout.py --part b, bench_replay.py).
READ_LOG: Final = """
local frames = {}
for i, entry in ipairs(redis.call('XRANGE', KEYS[1], ARGV[1] .. '-0', '+', 'COUNT', ARGV[2])) do
  frames[i] = entry[2][2]
end
return frames
"""


class Scripts:
    """Every script, registered with one client (redis-py loads each by its SHA on first use)."""

    def __init__(self, client: aioredis.Redis | RedisCluster, *, sharded: bool) -> None:
        def register(script: str) -> AsyncScript:
            return client.register_script(lua(script, sharded=sharded))

        self.start_run = register(START_RUN)
        self.append = register(APPEND)
        self.finish_run = register(FINISH_RUN)
        self.renew_lease = register(RENEW_LEASE)
        self.take_over_run = register(TAKE_OVER_RUN)
        self.request_cancel = register(REQUEST_CANCEL)
        self.presence = register(PRESENCE)
        self.people = register(PEOPLE)
        self.update_record = register(UPDATE_RECORD)
        self.add_to_record = register(ADD_TO_RECORD)
        self.collection = register(COLLECTION)
        self.read_log = register(READ_LOG)

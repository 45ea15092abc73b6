"""The Lua scripts of the Redis broker, each run atomically by Redis on one slot.

Every script touches the keys of one conversation only (they share the hash tag ``{id}``),
so on a Redis Cluster each runs on the shard that owns the conversation. A script that
publishes calls ``redis.call(PUBLISH, ...)``: ``lua`` defines ``PUBLISH`` as ``PUBLISH`` on
a single Redis, and as ``SPUBLISH`` on a cluster, where the channel ``costream:{id}:live``
is in the script's slot, so the publication stays on that shard (Redis 7 allows
``SPUBLISH`` in a script for a channel of the script's slot).
"""

from __future__ import annotations

from typing import Final


def lua(script: str, *, sharded: bool) -> str:
    """The script's source, with ``PUBLISH`` bound to the command of the deployment."""
    command = "SPUBLISH" if sharded else "PUBLISH"
    return f"local PUBLISH = '{command}'\n{script}"


# Codes the run scripts return instead of a seq or a fence.
LEASE_LOST: Final = -1
RUN_ACTIVE: Final = -1
VANISHED: Final = -2

# Shared by the run scripts. KEYS: meta, log, run, lease, snapshot. ARGV[1]: the live
# channel, ARGV[2]: log_retain, ARGV[3]: the fence (or the ttl for take_over).
RUN_PRELUDE: Final = """
local meta, log, run, lease, snapshot = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local channel, retain = ARGV[1], tonumber(ARGV[2])

local function append(body)
  local seq = redis.call('HINCRBY', meta, 'head', 1)
  -- protocol.with_seq: {"type":..} becomes {"seq":N,"type":..}
  local frame = '{"seq":' .. string.format('%d', seq) .. ',' .. string.sub(body, 2)
  redis.call('XADD', log, string.format('%d-0', seq), 'f', frame)
  redis.call(PUBLISH, channel, frame)
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
START_RUN: Final = (
    RUN_PRELUDE
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
APPEND: Final = (
    RUN_PRELUDE
    + """
if not holds_lease(ARGV[3]) then return -1 end
local seq = head()
for i = 4, #ARGV do seq = append(ARGV[i]) end
trim()
return seq
"""
)

# ARGV[4]: '1' when ARGV[5] is a snapshot body, ARGV[6..]: bodies.
FINISH_RUN: Final = (
    RUN_PRELUDE
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
RENEW_LEASE: Final = (
    RUN_PRELUDE
    + """
if not holds_lease(ARGV[3]) then return -1 end
redis.call('SET', lease, ARGV[3], 'PX', ARGV[4])
if redis.call('HGET', run, 'cancel') == '1' then return 1 end
return 0
"""
)

# ARGV[3]: ttl ms. Returns {fence, run id}, or nil when no run or its lease is alive.
TAKE_OVER_RUN: Final = (
    RUN_PRELUDE
    + """
if redis.call('EXISTS', run) == 0 or redis.call('EXISTS', lease) == 1 then return false end
local fence = string.format('%d', redis.call('HINCRBY', meta, 'fence', 1))
redis.call('HSET', run, 'fence', fence)
redis.call('SET', lease, fence, 'PX', ARGV[3])
return {fence, redis.call('HGET', run, 'run_id')}
"""
)

# KEYS: run. Returns the run id, or nil when nothing runs.
REQUEST_CANCEL: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'cancel', '1')
return redis.call('HGET', KEYS[1], 'run_id')
"""

# KEYS: presence. ARGV: channel, 'join'/'leave'/'refresh', ttl ms, viewer ids.
# Redis's own clock (TIME), so the server processes' clocks do not matter.
PRESENCE: Final = """
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
  redis.call(PUBLISH, channel, '{"type":"presence","viewers":' .. count .. '}')
end
return count
"""

# KEYS: meta. ARGV: field, value, field, value... Returns -2 for an unknown conversation.
UPDATE_RECORD: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 0
"""

# KEYS: meta. ARGV: field, amount. Returns the new value, or nil for an unknown conversation.
ADD_TO_RECORD: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('HINCRBYFLOAT', KEYS[1], ARGV[1], ARGV[2])
"""

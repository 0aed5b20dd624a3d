"""The Redis ledger's scripts: every Lua it runs, one script per atomic operation.

Each script touches the keys of one relay key only, all named ``<prefix>:{<key
name>}:…`` (:func:`relayd.store.redis.tagged`), so they share one Redis Cluster
slot. Their layout (docs/spend.md#the-redis-ledger):

- ``slots`` (sorted set): reservations holding a parallel slot, scored by expiry;
- ``held`` (sorted set): every reservation, carried ones too, scored by expiry;
- ``res`` (hash): reservation id → its record (below), and ``held``: the sum
  of every reservation's micro-dollars;
- ``refs`` (hash): upstream id of a carried reservation → reservation id;
- ``hits`` (hash): the rpm/tpm window, ``<second>`` → admissions and
  ``<second>t`` → tokens in that second of the last minute;
- ``spent:<window>`` (string): micro-dollars settled in a budget window;
- ``usage:<day>`` (hash): the day's aggregates for the usage report, field
  ``model␟operation␟outcome␟reason␟counter``.

Time is the server's (``TIME``), so instances whose clocks disagree still agree on
windows and expiry. A caller names a moment as an *offset from its own clock now*
(``moment - time.time()``): zero for "now" in production; a test that names
another moment moves the server's clock by as much for that call.

A reservation's record is its fields joined by U+001F: micro-dollars, input
tokens, output tokens, model, operation, budget windows (space separated), the
upstream id it is carried under ("" if none).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ADMIT",
    "CARRY",
    "COUNTERS",
    "DAY_TTL_S",
    "EXPIRE",
    "EXTEND",
    "GRACE_S",
    "HELD_FIELD",
    "HITS_TTL_S",
    "MONTH_TTL_S",
    "SEP",
    "SETTLE",
    "USAGE_TTL_S",
]

SEP: Final = "\x1f"
# The field of ``res`` that sums every reservation's micro-dollars (no id has
# this name), so an admission need not read every reservation in flight.
HELD_FIELD: Final = "held"
# Counters of a usage aggregate, in the order SETTLE takes them (after requests,
# estimated and micro_usd, which it always knows).
COUNTERS: Final = (
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "audio_input_tokens",
    "audio_output_tokens",
)
HITS_TTL_S: Final = 120  # the rpm/tpm window is 60 s; the hash outlives its last hit
DAY_TTL_S: Final = 3 * 86400  # a day window: from each write, so past its day
MONTH_TTL_S: Final = 35 * 86400  # a month window: past its month
USAGE_TTL_S: Final = 400 * 86400  # the report's daily aggregates
# Reservation keys outlive their latest expiry by this, so that an instance's
# upkeep can still charge what a dead instance held.
GRACE_S: Final = 86400

_PRELUDE: Final = f"""
local SEP = '\\31'
local HELD = '{HELD_FIELD}'
local COUNTERS = {{{", ".join(f"'{name}'" for name in COUNTERS)}}}
local function now_at(offset)
  local t = redis.call('TIME')
  local raw = tonumber(t[1]) + tonumber(t[2]) / 1000000
  return raw + tonumber(offset), raw
end
local function split(text, sep)
  local parts = {{}}
  for part in string.gmatch(text .. sep, '(.-)' .. sep) do parts[#parts + 1] = part end
  return parts
end
local function words(text)
  local parts = {{}}
  for part in string.gmatch(text, '%S+') do parts[#parts + 1] = part end
  return parts
end
-- Give key a TTL of at least this many seconds (never shorten one).
local function keep(key, seconds)
  local ms = math.ceil(seconds * 1000)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
local function window_ttl(window)
  if string.sub(window, 1, 4) == 'day:' then return {DAY_TTL_S} end
  if string.sub(window, 1, 6) == 'month:' then return {MONTH_TTL_S} end
  if window == 'total' then return nil end
  return {USAGE_TTL_S}
end
-- One event into the day's aggregates (KEYS[6]) and its money into its windows.
local function add_event(base, usage, group, micro, estimated, counts, windows)
  redis.call('HINCRBY', usage, group .. SEP .. 'requests', 1)
  if estimated then redis.call('HINCRBY', usage, group .. SEP .. 'estimated', 1) end
  for i, name in ipairs(COUNTERS) do
    if tonumber(counts[i]) ~= 0 then
      redis.call('HINCRBY', usage, group .. SEP .. name, counts[i])
    end
  end
  if tonumber(micro) ~= 0 then
    redis.call('HINCRBY', usage, group .. SEP .. 'micro_usd', micro)
    for _, window in ipairs(windows) do
      local key = base .. 'spent:' .. window
      redis.call('INCRBY', key, micro)
      local ttl = window_ttl(window)
      if ttl then redis.call('EXPIRE', key, ttl) end
    end
  end
  redis.call('EXPIRE', usage, {USAGE_TTL_S})
end
local function drop(id, rec)
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  local f = split(rec, SEP)
  if tonumber(f[1]) ~= 0 then redis.call('HINCRBY', KEYS[3], HELD, -tonumber(f[1])) end
  if f[7] and f[7] ~= '' then redis.call('HDEL', KEYS[4], f[7]) end
end
"""

# KEYS: slots, held, res, refs, hits, then the spent key of each budget.
# ARGV: now offset, expires offset, hold ('1'/'0'), id, rpm, tpm, max_parallel
# ('' when none), micro-dollars, tokens (input + output), record, then each
# budget's limit. Returns {0, hit second or -1} or {1, kind, limit, used,
# retry ms, budget index}; kinds: 1 max_parallel, 2 rpm, 3 tpm, 4 a spent budget,
# 5 a budget full of what is in flight.
ADMIT: Final = (
    _PRELUDE
    + f"""
local now, raw = now_at(ARGV[1])
local hold = ARGV[3] == '1'
local rpm, tpm, most = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local micro, wanted = tonumber(ARGV[8]), tonumber(ARGV[9])
local budgets = #ARGV - 10
local running, held = 0, 0
if hold and most then
  running = redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
  if running >= most then return {{1, 1, most, running, 1000, 0}} end
end
if hold and budgets > 0 then
  -- Every reservation's money, less that of the expired ones not charged yet
  -- (usually none: the upkeep charges them): what is live.
  held = tonumber(redis.call('HGET', KEYS[3], HELD) or '0')
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
  if #gone > 0 then
    for _, rec in ipairs(redis.call('HMGET', KEYS[3], unpack(gone))) do
      if rec then held = held - tonumber(string.match(rec, '^(%d+)')) end
    end
  end
end
local second = math.floor(now)
if rpm or tpm then
  local since = second - 60
  local count, tokens, oldest, stale = 0, 0, nil, {{}}
  local flat = redis.call('HGETALL', KEYS[5])
  for i = 1, #flat, 2 do
    local field = flat[i]
    local at = tonumber(string.match(field, '^(%d+)'))
    if at <= since then
      stale[#stale + 1] = field
    elseif string.sub(field, -1) == 't' then
      tokens = tokens + tonumber(flat[i + 1])
    else
      count = count + tonumber(flat[i + 1])
      if oldest == nil or at < oldest then oldest = at end
    end
  end
  if #stale > 0 then redis.call('HDEL', KEYS[5], unpack(stale)) end
  local retry = math.max(1, (oldest or second) + 60 - now)
  if rpm and count >= rpm then return {{1, 2, rpm, count, math.ceil(retry * 1000), 0}} end
  -- An empty window admits even an estimate above tpm: else it could never pass.
  if tpm and tokens > 0 and tokens + wanted > tpm then
    return {{1, 3, tpm, tokens, math.ceil(retry * 1000), 0}}
  end
end
if hold then
  for b = 1, budgets do
    local limit = tonumber(ARGV[10 + b])
    local spent = tonumber(redis.call('GET', KEYS[5 + b]) or '0')
    if spent >= limit or spent + micro > limit then return {{1, 4, limit, spent, 0, b}} end
    -- What is in flight may settle for less: worth a retry soon.
    if spent + held + micro > limit then return {{1, 5, limit, spent + held, 1000, b}} end
  end
end
local hit = -1
if rpm or tpm then
  hit = second
  redis.call('HINCRBY', KEYS[5], string.format('%d', second), 1)
  redis.call('HINCRBY', KEYS[5], string.format('%dt', second), ARGV[9])
  redis.call('EXPIRE', KEYS[5], {HITS_TTL_S})
end
if hold then
  local expires = raw + tonumber(ARGV[2])
  redis.call('ZADD', KEYS[1], expires, ARGV[4])
  redis.call('ZADD', KEYS[2], expires, ARGV[4])
  redis.call('HSET', KEYS[3], ARGV[4], ARGV[10])
  if micro ~= 0 then redis.call('HINCRBY', KEYS[3], HELD, ARGV[8]) end
  local ttl = expires - raw + {GRACE_S}
  keep(KEYS[1], ttl)
  keep(KEYS[2], ttl)
  keep(KEYS[3], ttl)
end
return {{0, hit}}
"""
)

# KEYS: slots, held, res, refs, hits, usage (the event's day).
# ARGV: reservation id or '', upstream id or '' (settle what it carries), hit
# second or '', tokens (actual minus estimate), has an event ('1'/'0'), group
# (model, operation, outcome, reason), micro-dollars, estimated ('1'/'0'), the six
# token counters, budget windows (space separated; a carried reservation's own
# are used instead). Returns 1, or 0 if the reservation was already gone.
SETTLE: Final = (
    _PRELUDE
    + """
local base = string.sub(KEYS[3], 1, -4)
local id, windows = ARGV[1], ARGV[15]
if ARGV[2] ~= '' then
  id = redis.call('HGET', KEYS[4], ARGV[2])
  if not id then return 0 end
end
if id ~= '' then
  local rec = redis.call('HGET', KEYS[3], id)
  if not rec then return 0 end  -- expired and charged already: never count twice
  drop(id, rec)
  if ARGV[2] ~= '' then windows = split(rec, SEP)[6] end
end
if ARGV[5] == '1' then
  if ARGV[3] ~= '' then
    local field = ARGV[3] .. 't'
    local tokens = redis.call('HGET', KEYS[5], field)
    if tokens then
      redis.call('HSET', KEYS[5], field, math.max(0, tonumber(tokens) + tonumber(ARGV[4])))
    end
  end
  local counts = {ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14]}
  add_event(base, KEYS[6], ARGV[6], ARGV[7], ARGV[8] == '1', counts, words(windows))
end
return 1
"""
)

# KEYS: slots, held, res, refs, usage (the day of "now"). ARGV: now offset.
# Charges every reservation past its expiry at its estimate (outcome "expired");
# returns their records, for the instance's own detail events.
EXPIRE: Final = (
    _PRELUDE
    + """
local base = string.sub(KEYS[3], 1, -4)
local now = now_at(ARGV[1])
local found = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  local rec = redis.call('HGET', KEYS[3], id)
  if not rec then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
  else
    drop(id, rec)
    local f = split(rec, SEP)
    local group = f[4] .. SEP .. f[5] .. SEP .. 'expired' .. SEP
    add_event(base, KEYS[5], group, f[1], true, {f[2], '0', f[3], '0', '0', '0'}, words(f[6]))
    found[#found + 1] = rec
  end
end
return found
"""
)

# KEYS: slots, held, res, refs. ARGV: expires offset, then reservation ids.
# Moves each one's expiry later (never earlier).
EXTEND: Final = (
    _PRELUDE
    + f"""
local expires, raw = now_at(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', 'GT', expires, ARGV[i])
  redis.call('ZADD', KEYS[2], 'XX', 'GT', expires, ARGV[i])
end
local ttl = expires - raw + {GRACE_S}
for i = 1, 4 do keep(KEYS[i], ttl) end
return 1
"""
)

# KEYS: slots, held, res, refs. ARGV: reservation id, upstream id, expires
# offset, the record to hold if the reservation was never held. The reservation
# leaves its parallel slot and keeps its money held under the upstream id.
CARRY: Final = (
    _PRELUDE
    + f"""
local expires, raw = now_at(ARGV[3])
local rec = redis.call('HGET', KEYS[3], ARGV[1])
if rec then
  local f = split(rec, SEP)
  rec = table.concat({{f[1], f[2], f[3], f[4], f[5], f[6], ARGV[2]}}, SEP)
else
  rec = ARGV[4]
end
redis.call('HSET', KEYS[3], ARGV[1], rec)
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], expires, ARGV[1])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[1])
local ttl = expires - raw + {GRACE_S}
for i = 2, 4 do keep(KEYS[i], ttl) end
return 1
"""
)

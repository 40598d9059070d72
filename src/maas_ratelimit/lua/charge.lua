-- Settlement after the response: charges and refunds, once per request id (common.lua is
-- prepended; __DEBT_WINDOWS__ is replaced with bucket.DEBT_WINDOWS when loaded).
-- KEYS: the n bucket keys, then the request id key if there is one.
-- ARGV: now_ms, n, request_id_ttl_ms, then per bucket: limit, window_ms, amount (negative: a
-- refund, clamped at the capacity), at (the bucket's time in its units, 0: now_ms), unit_ms.
-- Returns {status: 0 applied | 1 duplicate | 2 denied_request, then the n levels if applied}.
local now, n, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local rid = KEYS[n + 1]
if rid then
  local mark = redis.call('GET', rid)
  if mark == 'denied' then
    return {2}
  elseif mark == 'charged' then
    return {1}
  end
end
-- One charge after the other, as the memory store (a key named twice is charged twice), but
-- computed before anything is written: a script that fails half-way is not rolled back.
local states, levels, updated = {}, {}, {}
for i = 1, n do
  local base = 3 + (i - 1) * 5
  local limit, window = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local at = clock(tonumber(ARGV[base + 4]), now)
  local key = KEYS[i]
  local state = states[key]
  if state == nil then
    state = load(key)
    if state and state.err then
      return state
    end
  end
  local floor = -__DEBT_WINDOWS__ * limit * window  -- bucket.BucketSpec.floor
  local level = current_level(state, limit, window, at) - tonumber(ARGV[base + 3])
  -- a negative amount is a refund: never above the capacity, never below the floor
  level = math.min(limit * window, math.max(floor, level))
  updated[i] = next_updated(state, at)
  states[key] = {level, updated[i], window}
  levels[i] = level
end
if rid then
  redis.call('SET', rid, 'charged', 'PX', ttl)
end
local reply = {0}
for i = 1, n do
  local base = 3 + (i - 1) * 5
  write(
    KEYS[i], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), levels[i], updated[i], now,
    tonumber(ARGV[base + 5])
  )
  reply[#reply + 1] = levels[i]
end
return reply

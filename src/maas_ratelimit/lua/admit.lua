-- Admission: every limit of a request checked and taken atomically (common.lua is prepended).
-- KEYS: the n bucket keys, then the request id key if there is one.
-- ARGV: now_ms, n, request_id_ttl_ms, then per bucket: limit, window_ms, need, take, shadow (0|1),
-- at (the bucket's time in its units, 0: now_ms), unit_ms (store.py).
-- Returns {admitted (0|1), then per bucket: sufficient (0|1), level after}.
local now, n, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local specs, levels, sufficient, updated = {}, {}, {}, {}
local admitted = 1
-- Every level is read before anything is written: a key named twice gives up one take, as in
-- the memory store, and a script that fails on a bad key has written nothing.
for i = 1, n do
  local base = 3 + (i - 1) * 7
  local spec = {
    limit = tonumber(ARGV[base + 1]), window = tonumber(ARGV[base + 2]),
    need = tonumber(ARGV[base + 3]), take = tonumber(ARGV[base + 4]),
    shadow = ARGV[base + 5] == '1',
    at = clock(tonumber(ARGV[base + 6]), now), unit = tonumber(ARGV[base + 7]),
  }
  specs[i] = spec
  local state = load(KEYS[i])
  if state and state.err then
    return state
  end
  local level = current_level(state, spec.limit, spec.window, spec.at)
  levels[i] = level
  updated[i] = next_updated(state, spec.at)
  sufficient[i] = level >= spec.need
  if not sufficient[i] and not spec.shadow then
    admitted = 0
  end
end
local reply = {admitted}
for i = 1, n do
  local spec, level = specs[i], levels[i]
  if admitted == 1 and sufficient[i] then
    level = level - spec.take
  end
  write(KEYS[i], spec.limit, spec.window, level, updated[i], now, spec.unit)
  reply[#reply + 1] = sufficient[i] and 1 or 0
  reply[#reply + 1] = level
end
if admitted == 0 and #KEYS > n then
  redis.call('SET', KEYS[n + 1], 'denied', 'PX', ttl)
end
return reply

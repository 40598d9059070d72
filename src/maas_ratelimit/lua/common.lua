-- Shared by admit.lua and charge.lua (prepended to each): exact integer arithmetic on doubles,
-- and the BucketState load/store of bucket.py. Redis runs Lua 5.1; luajit runs it in the tests.
local function fmt(x)
  return string.format('%.0f', x)
end

-- floor(x / d) for integers |x| < 2^53, d > 0; the double quotient may be off by one
local function floordiv(x, d)
  local q = math.floor(x / d)
  local r = x - q * d
  if r < 0 then
    q = q - 1
  elseif r >= d then
    q = q + 1
  end
  return q
end

local function ceildiv(x, d)
  return -floordiv(-x, d)
end

-- floor(r * b / c) for 0 <= r < c, b > 0, when r * b may exceed 2^53: binary long
-- multiplication, keeping the running product as quotient and remainder modulo c
local function mulfloordiv(r, b, c)
  if r * b < 9007199254740992 then
    return floordiv(r * b, c)
  end
  local bits = {}
  while b > 0 do
    local bit = b % 2
    bits[#bits + 1] = bit
    b = (b - bit) / 2
  end
  local q, rem = 0, 0
  for i = #bits, 1, -1 do
    q, rem = q * 2, rem * 2
    if rem >= c then
      q, rem = q + 1, rem - c
    end
    if bits[i] == 1 then
      rem = rem + r
      if rem >= c then
        q, rem = q + 1, rem - c
      end
    end
  end
  return q
end

-- level * new // old (floored, as Python's //), without forming the product
local function rescale(level, old, new)
  local tokens = floordiv(level, old)
  local rest = level - tokens * old
  return tokens * new + mulfloordiv(rest, new, old)
end

-- the stored BucketState {level, updated, scale}, false for none, or an error reply (a table
-- with `err`) for a key this store did not write
local function load(key)
  local state = redis.call('HMGET', key, 'v', 't', 's')
  if not state[1] then
    return false
  end
  local level, updated, scale = tonumber(state[1]), tonumber(state[2]), tonumber(state[3])
  if not (level and updated and scale) or scale <= 0 then
    return redis.error_reply('corrupt bucket state at ' .. key)
  end
  return {level, updated, scale}
end

-- bucket.current_level
local function current_level(state, limit, window, now)
  local capacity = limit * window
  if not state then
    return capacity
  end
  local level, updated, scale = state[1], state[2], state[3]
  if scale ~= window then
    level = rescale(level, scale, window)
  end
  local elapsed = math.max(0, now - updated)
  return math.min(capacity, level + elapsed * limit)
end

-- bucket.next_updated: a bucket's time only moves forward (replicas' clocks differ)
local function next_updated(state, now)
  if not state then
    return now
  end
  return math.max(state[2], now)
end

-- MemoryBucketStore._put: the state at `updated` (in the bucket's units of `unit` ms), expiring
-- when the bucket is full again (a frozen calendar bucket: when its period is over)
local function write(key, limit, window, level, updated, now, unit)
  local until_full = math.max(0, ceildiv(limit * window - level, limit))
  redis.call('HSET', key, 'v', fmt(level), 't', fmt(updated), 's', fmt(window))
  redis.call('PEXPIRE', key, fmt(math.max(1, (updated + until_full) * unit - now)))
end

-- a bucket's own time (store.py): `at` in its units, or the call's now
local function clock(at, now)
  if at > 0 then
    return at
  end
  return now
end

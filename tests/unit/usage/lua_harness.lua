-- Test harness for envoy/lua/usage.lua, run by test_usage_lua.py with the real LuaJIT:
--
--   luajit tests/unit/usage/lua_harness.lua path/to/usage.lua  < test-code.lua
--
-- Loads usage.lua with dofile (as Envoy loads it: a chunk that defines the envoy_on_* globals),
-- then runs the Lua code read from stdin with the helpers below in scope. What that code returns
-- is printed to stdout as one line of JSON (strings byte by byte: every byte outside printable
-- ASCII as \u00XX, so Python reads it back with .encode("latin-1")). An error exits with 1.
--
-- The fake Envoy handle implements just the API usage.lua uses, with Envoy's semantics where
-- they matter: getBytes checks its bounds, setBytes also sets content-length (as Envoy's
-- BufferWrapper does), dynamicMetadata():get returns a copy, bodyChunks yields buffer objects,
-- and a headers object taken before body() is dead afterwards (Envoy 1.40 raises "object used
-- outside of proper scope" when the script touches it; handle:headers() gives a live one).

local usage_path = assert(arg[1], "usage: luajit lua_harness.lua path/to/usage.lua < code")

local globals_before = {}
for name in pairs(_G) do
  globals_before[name] = true
end
local usage = dofile(usage_path)
local new_globals = {}
for name in pairs(_G) do
  if not globals_before[name] then
    new_globals[#new_globals + 1] = name
  end
end
table.sort(new_globals)
M = usage -- what the chunk returns: its pure parts
NEW_GLOBALS = table.concat(new_globals, " ") -- what it defined besides: the entry points

-- --- JSON ---------------------------------------------------------------------------------------

local function encode_string(s)
  return '"' .. s:gsub('[%c"\\\128-\255]', function(c)
    return string.format("\\u%04x", c:byte())
  end) .. '"'
end

local function is_array(t)
  local n = 0
  for _ in pairs(t) do
    n = n + 1
  end
  if n == 0 then
    return false
  end
  for i = 1, n do
    if t[i] == nil then
      return false
    end
  end
  return true
end

function json(value)
  local kind = type(value)
  if value == nil then
    return "null"
  elseif kind == "boolean" then
    return tostring(value)
  elseif kind == "number" then
    if value ~= value or value == math.huge or value == -math.huge then
      return encode_string(tostring(value))
    elseif value == math.floor(value) and math.abs(value) < 2 ^ 53 then
      return string.format("%d", value)
    end
    return string.format("%.17g", value)
  elseif kind == "string" then
    return encode_string(value)
  elseif kind == "table" then
    local parts = {}
    if is_array(value) then
      for _, item in ipairs(value) do
        parts[#parts + 1] = json(item)
      end
      return "[" .. table.concat(parts, ",") .. "]"
    end
    local keys = {}
    for key in pairs(value) do
      keys[#keys + 1] = tostring(key)
    end
    table.sort(keys)
    for _, key in ipairs(keys) do
      local item = value[key]
      if item == nil then
        item = value[tonumber(key)]
      end
      parts[#parts + 1] = encode_string(key) .. ":" .. json(item)
    end
    return "{" .. table.concat(parts, ",") .. "}"
  end
  error("cannot encode a " .. kind)
end

-- --- splitting bodies into chunks ---------------------------------------------------------------

-- Every way to cut `s` in two (including the empty first and last pieces): {{a, b}, ...}.
function splits(s)
  local out = {}
  for i = 0, #s do
    out[#out + 1] = { s:sub(1, i), s:sub(i + 1) }
  end
  return out
end

-- `s` in pieces of `size` bytes (the last may be shorter).
function pieces(s, size)
  local out = {}
  for i = 1, #s, size do
    out[#out + 1] = s:sub(i, i + size - 1)
  end
  return out
end

-- --- the pure parts -----------------------------------------------------------------------------

-- Feeds the chunks to a new Scanner. Returns what it found and the largest tail it kept.
function scan(chunks)
  local scanner = M.Scanner.new()
  local max_tail = 0
  for _, chunk in ipairs(chunks) do
    scanner:feed(chunk)
    max_tail = math.max(max_tail, #scanner.tail)
  end
  return { usage = scanner.usage, malformed = scanner.malformed, max_tail = max_tail }
end

-- Feeds the chunks to a new SseFilter. Returns what went out per chunk, all of it, and what is
-- still held back.
function sse(chunks)
  local filter = M.SseFilter.new()
  local outputs = {}
  for i, chunk in ipairs(chunks) do
    outputs[i] = filter:feed(chunk)
  end
  return { out = table.concat(outputs), outputs = outputs, pending = filter.pending }
end

-- The number of 2-way splits of `s` for which check(a, b) returns false; and the first such.
function failing_splits(s, check)
  local failures, first = 0, nil
  for _, pair in ipairs(splits(s)) do
    if not check(pair[1], pair[2]) then
      failures = failures + 1
      first = first or pair
    end
  end
  return { failures = failures, first = first, tried = #s + 1 }
end

-- --- a fake Envoy handle ------------------------------------------------------------------------

local function fake_headers(map, store)
  if not store then
    store = {}
    for key, value in pairs(map or {}) do
      store[key:lower()] = value
    end
  end
  local headers = { store = store, dead = false }
  local function check(self)
    if self.dead then
      error("object used outside of proper scope")
    end
  end
  function headers:get(key)
    check(self)
    return self.store[key:lower()]
  end
  function headers:replace(key, value)
    check(self)
    self.store[key:lower()] = value
  end
  return headers
end

local function fake_buffer(data, headers)
  local buffer = { data = data }
  function buffer:length()
    return #self.data
  end
  function buffer:getBytes(index, length)
    if index < 0 or length < 0 or index + length > #self.data then
      error("index/length must be >= 0 and (index + length) must be <= buffer size")
    end
    return self.data:sub(index + 1, index + length)
  end
  function buffer:setBytes(bytes)
    assert(type(bytes) == "string", "setBytes takes a string")
    self.data = bytes
    headers.store["content-length"] = tostring(#bytes)
    return #bytes
  end
  return buffer
end

-- One stream: the dynamic metadata a request and its response share.
function fake_stream()
  local stream = { metadata = {} }
  local dynamic = {}
  function dynamic:set(namespace, key, value)
    assert(type(namespace) == "string" and type(key) == "string", "set(namespace, key, value)")
    stream.metadata[namespace] = stream.metadata[namespace] or {}
    stream.metadata[namespace][key] = value
  end
  function dynamic:get(namespace)
    local entry = stream.metadata[namespace]
    if entry == nil then
      return nil
    end
    local copy = {}
    for key, value in pairs(entry) do
      copy[key] = value
    end
    return copy
  end
  local info = {}
  function info:dynamicMetadata()
    return dynamic
  end
  stream.info = info
  return stream
end

-- Runs envoy_on_request. `body` nil: a request without a body (Envoy's body() gives nil).
function on_request(stream, headers, body, without_length)
  local handle = { stream = stream }
  if body and not without_length and headers["content-length"] == nil then
    headers["content-length"] = tostring(#body) -- as a client sends it
  end
  handle.headers_ = fake_headers(headers)
  handle.body_ = body and fake_buffer(body, handle.headers_) or nil
  function handle:headers()
    return self.headers_
  end
  function handle:body()
    -- Envoy waits for the body here; the headers object the script held is dead afterwards
    self.headers_.dead = true
    self.headers_ = fake_headers(nil, self.headers_.store)
    return self.body_
  end
  function handle:streamInfo()
    return self.stream.info
  end
  envoy_on_request(handle)
  return {
    body = handle.body_ and handle.body_.data or nil,
    headers = handle.headers_.store,
    metadata = stream.metadata["maas.usage"],
  }
end

-- A chunk that is never delivered: the stream is reset there (Envoy abandons the script).
RESET = setmetatable({}, { __tostring = function() return "RESET" end })

-- Runs envoy_on_response over `chunks` (strings, or RESET). Returns what the client gets, the
-- metadata, how many chunks the filter read, and the error that ended it, if any.
function on_response(stream, headers, chunks, route_metadata)
  local handle = { stream = stream, read = 0 }
  function handle:metadata() -- the route's metadata for this filter, as Envoy's handle gives it
    local values = route_metadata or {}
    return { get = function(_, key) return values[key] end }
  end
  handle.headers_ = fake_headers(headers)
  handle.chunks = {}
  for i, data in ipairs(chunks) do
    handle.chunks[i] = data == RESET and RESET or fake_buffer(data, handle.headers_)
  end
  function handle:headers()
    return self.headers_
  end
  function handle:streamInfo()
    return self.stream.info
  end
  function handle:bodyChunks()
    local i = 0
    return function()
      i = i + 1
      if self.chunks[i] == RESET then
        error("stream reset")
      end
      self.read = i <= #self.chunks and i or self.read
      return self.chunks[i]
    end
  end
  local ok, err = pcall(envoy_on_response, handle)
  local out = {}
  for _, chunk in ipairs(handle.chunks) do
    if chunk ~= RESET then
      out[#out + 1] = chunk.data
    end
  end
  return {
    body = table.concat(out),
    metadata = stream.metadata["maas.usage"],
    read = handle.read,
    error = not ok and tostring(err) or nil,
  }
end

-- --- run the test code from stdin ---------------------------------------------------------------

local code = io.read("*a")
local chunk, err = loadstring(code, "=test")
if not chunk then
  io.stderr:write(err, "\n")
  os.exit(1)
end
local ok, result = pcall(chunk)
if not ok then
  io.stderr:write(tostring(result), "\n")
  os.exit(1)
end
io.write(json(result), "\n")

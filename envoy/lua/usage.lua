-- maas-gateway usage filter (Envoy Lua): what an LLM response used, for the token rate limits.
--
-- On the request: a streaming chat/completions request that did not ask for usage gets
-- `stream_options.include_usage: true`, so that the stream ends with a usage event (vLLM sends
-- no usage otherwise); the filter remembers that it added it and removes that event again on the
-- way out, so the client sees the stream it asked for.
--
-- On the response: the last `"usage": {...}` object in the body (a JSON body, or the final SSE
-- event) is read while the body streams through, without buffering it, into dynamic metadata
-- under `maas.usage`:
--   prompt_tokens, completion_tokens, total_tokens   numbers (completion 0 for embeddings)
--   charge_prompt, charge_completion                 set only when the usage is to be charged
--   status, streamed                                 the HTTP status and "true" for an event
--                                                    stream (set when charged, for the ledger)
--   outcome                                          "charged", or why not: no_usage,
--                                                    upstream_error, client_error, rate_limited,
--                                                    incomplete (the body never ended)
-- Envoy's rate limit filter then sends the charge after the response (apply_on_stream_done,
-- hits_addend from the metadata). Nothing is charged for 4xx/5xx answers or bodies without
-- usage; usage headers (x-usage-*-tokens by default) are trusted first when a backend sends them.
--
-- Reservations: for a request whose body is buffered anyway (a JSON POST with a content-length
-- of at most MAX_INJECT_BYTES), the filter also estimates what the request may use, as strings
-- of integers (they become rate limit descriptor entries, which are strings):
--   reserve_prompt       ceil(body bytes / 4)
--   reserve_completion   max_completion_tokens, else max_tokens, else DEFAULT_RESERVE_COMPLETION
--                        (times n when n > 1; 0 for embeddings)
-- maas-ratelimit takes that estimate from the token bucket on admission, so concurrent requests
-- see it, and settles it against the real usage after the response (docs/usage-accounting.md).
--
-- Everything is pattern matching on bytes: no JSON library exists in Envoy's LuaJIT, and none is
-- needed for two small, well-known shapes. The pure parts (Scanner, estimate, inject, SseFilter)
-- are tested on their own with LuaJIT (tests/unit/usage).

local NS = "maas.usage"
-- Request bodies are buffered (to add include_usage, and to estimate the reservation) only up to
-- this size, well below Envoy's default 1 MiB buffer limit: a larger body would otherwise be
-- refused with 413.
local MAX_INJECT_BYTES = 512 * 1024
local TAIL_BYTES = 4096 -- a usage object split across chunks is found if it is shorter than this
-- Completion tokens reserved for a request that sets no max_tokens / max_completion_tokens: an
-- estimate, not a limit (the backend's own default may differ; the real usage is settled later).
local DEFAULT_RESERVE_COMPLETION = 256
-- A rough, deliberately generous prompt estimate: about 4 bytes of JSON per token (English text
-- runs at ~4 characters per token, and the JSON around it counts too, so this over-estimates).
local BYTES_PER_PROMPT_TOKEN = 4
-- No estimate exceeds this (Envoy's own cap on a hits_addend); keeps "%d" formatting exact.
local MAX_RESERVE = 1000000000

local M = {}

-- Usage headers a backend (or a middleware in front of it) may send, most trusted first.
M.USAGE_HEADERS = {
  prompt = "x-usage-prompt-tokens",
  completion = "x-usage-completion-tokens",
  total = "x-usage-total-tokens",
}

local function number_in(object, key)
  local value = object:match('"' .. key .. '"%s*:%s*(%d+)')
  return value and tonumber(value) or nil
end

-- Scanner: feed body chunks in order; remembers the last complete usage object seen.
local Scanner = {}
Scanner.__index = Scanner
M.Scanner = Scanner

function Scanner.new()
  return setmetatable({ tail = "", usage = nil, malformed = false }, Scanner)
end

local USAGE_KEY = '"usage"'

function Scanner:feed(chunk)
  local text = self.tail .. chunk
  -- Most chunks hold no usage at all: a plain find skips them cheaply, keeping only enough bytes
  -- to recognise a key split across two chunks (measured: docs/usage-accounting.md).
  local first = text:find(USAGE_KEY, 1, true)
  if not first then
    self.tail = text:sub(-(#USAGE_KEY - 1))
    return
  end
  text = text:sub(first)
  local consumed = 0
  for object, finish in text:gmatch('"usage"%s*:%s*(%b{})()') do
    local prompt = number_in(object, "prompt_tokens")
    local completion = number_in(object, "completion_tokens")
    local total = number_in(object, "total_tokens")
    if prompt or completion or total then
      self.usage = { prompt = prompt, completion = completion, total = total }
    else
      self.malformed = true -- a usage object without any count we understand
    end
    consumed = finish - 1
  end
  local rest = text:sub(consumed + 1)
  if #rest > TAIL_BYTES then
    rest = rest:sub(-TAIL_BYTES)
  end
  self.tail = rest
end

-- The counts to charge: {prompt, completion} as integers, or nil.
-- When only a total is reported it is charged as prompt tokens (at the prompt weight).
function M.counts(usage)
  if not usage then
    return nil
  end
  local prompt, completion = usage.prompt, usage.completion
  if prompt == nil and completion == nil then
    prompt = usage.total
  end
  if prompt == nil and usage.total and completion then
    prompt = math.max(0, usage.total - completion)
  end
  if completion == nil and usage.total and prompt then
    completion = math.max(0, usage.total - prompt)
  end
  return { prompt = prompt or 0, completion = completion or 0 }
end

-- A non-negative integer after "key": in the body (the key in quotes, so "max_tokens" is not
-- found inside "xmax_tokens" nor inside a JSON string, where its quotes would be escaped),
-- capped at MAX_RESERVE; nil when absent or not a plain integer.
local function reserve_count(body, key)
  local digits = body:match('"' .. key .. '"%s*:%s*(%d+)')
  if not digits then
    return nil
  end
  if #digits > 9 then
    return MAX_RESERVE
  end
  return tonumber(digits)
end

-- estimate(body, path): {prompt, completion}, the tokens a request may use, as integers.
-- The prompt is ceil(bytes / 4) of the request body. The completion is the request's own limit
-- (max_completion_tokens wins over max_tokens, as in vLLM), DEFAULT_RESERVE_COMPLETION without
-- one, times `n` (choices) when that is above 1, and 0 for embeddings (no completion tokens).
function M.estimate(body, path)
  local prompt = math.floor((#body + BYTES_PER_PROMPT_TOKEN - 1) / BYTES_PER_PROMPT_TOKEN)
  local completion = 0
  if not (path or ""):find("/embeddings", 1, true) then
    completion = reserve_count(body, "max_completion_tokens")
      or reserve_count(body, "max_tokens")
      or DEFAULT_RESERVE_COMPLETION
    local n = reserve_count(body, "n")
    if n and n > 1 then
      completion = completion * n
    end
  end
  return {
    prompt = math.min(prompt, MAX_RESERVE),
    completion = math.min(completion, MAX_RESERVE),
  }
end

-- How include_usage is turned on, tried in order; the first rule that matches is applied.
local INJECTIONS = {
  { '"include_usage"%s*:%s*false', '"include_usage":true' },
  { '"stream_options"%s*:%s*{%s*}', '"stream_options":{"include_usage":true}' },
  { '("stream_options"%s*:%s*{)', '%1"include_usage":true,' },
  -- an explicit null: replaced, since a second "stream_options" key would lose to it (last wins)
  { '"stream_options"%s*:%s*null', '"stream_options":{"include_usage":true}' },
  { '^(%s*{)', '%1"stream_options":{"include_usage":true},' },
}

-- inject(body): the request body with stream_options.include_usage = true, or nil when it needs
-- no change (not streaming, or the client asked for usage itself).
function M.inject(body)
  if not body:find('"stream"%s*:%s*true') then
    return nil
  end
  if body:find('"include_usage"%s*:%s*true') then
    return nil
  end
  for _, rule in ipairs(INJECTIONS) do
    local out, n = body:gsub(rule[1], rule[2], 1)
    if n > 0 then
      return out
    end
  end
  return nil
end

-- SseFilter: removes the usage-only event ("choices":[] with a usage object) from a stream,
-- for clients that did not ask for it. Works on whole events: a partial event at the end of a
-- chunk is held back until the rest arrives (SSE events end with a blank line: LF or CRLF).
local SseFilter = {}
SseFilter.__index = SseFilter
M.SseFilter = SseFilter

function SseFilter.new()
  return setmetatable({ pending = "" }, SseFilter)
end

local function is_usage_event(event)
  return event:find('"choices"%s*:%s*%[%s*%]') and event:find('"usage"%s*:%s*{')
end

-- Returns the bytes to pass on for this chunk.
-- An event longer than this is no usage event (those are ~200 bytes): stop holding it back and
-- pass it on as it comes, so a stream without blank lines cannot make the filter buffer it all.
local MAX_PENDING = 64 * 1024

function SseFilter:feed(chunk)
  if self.passing then
    -- inside an over-long event: pass bytes through until its end, then filter again
    local s, e = chunk:find("\r?\n\r?\n")
    if not s then
      return chunk
    end
    self.passing = false
    return chunk:sub(1, e) .. self:feed(chunk:sub(e + 1))
  end
  local text = self.pending .. chunk
  local last = nil
  -- the previous text had no event end; only its last 3 bytes can start one
  local search = math.max(1, #self.pending - 3)
  while true do
    local s, e = text:find("\r?\n\r?\n", search)
    if not s then
      break
    end
    last = e
    search = e + 1
  end
  if not last then
    if #text > MAX_PENDING then
      self.pending = ""
      self.passing = true
      return text
    end
    self.pending = text
    return ""
  end
  self.pending = text:sub(last + 1)
  local complete = text:sub(1, last)
  local kept = {}
  for event in complete:gmatch("(.-\r?\n\r?\n)") do
    if not is_usage_event(event) then
      kept[#kept + 1] = event
    end
  end
  return table.concat(kept)
end

-- ---------------------------------------------------------------------------------------------
-- The Envoy entry points.

local function set(handle, key, value)
  handle:streamInfo():dynamicMetadata():set(NS, key, value)
end

function envoy_on_request(handle)
  local headers = handle:headers()
  if headers:get(":method") ~= "POST" then
    return
  end
  local content_type = headers:get("content-type") or ""
  if not content_type:find("json", 1, true) then
    return
  end
  -- Without a length (chunked) or above the limit, the body is not buffered: such a streaming
  -- request that did not ask for usage goes uncharged, and is counted as outcome no_usage; and
  -- no request of that kind gets a reservation (it is admitted on credit > 0 alone).
  local length = tonumber(headers:get("content-length") or "")
  if not length or length == 0 or length > MAX_INJECT_BYTES then
    return
  end
  -- read before body(): Envoy invalidates this headers object once body() has waited for the
  -- body ("object used outside of proper scope")
  local path = headers:get(":path")
  local body = handle:body()
  if body == nil or body:length() == 0 then
    return
  end
  local bytes = body:getBytes(0, body:length())
  -- The reservation (of the body as the client sent it). An estimate that fails for any reason
  -- only means no reservation: the request goes on, admitted as before (credit > 0).
  local ok, estimate = pcall(M.estimate, bytes, path)
  if ok and estimate then
    set(handle, "reserve_prompt", string.format("%d", estimate.prompt))
    set(handle, "reserve_completion", string.format("%d", estimate.completion))
  end
  local changed = M.inject(bytes)
  if changed then
    body:setBytes(changed)
    set(handle, "injected", "true")
  end
end

local function header_count(headers, name)
  local digits = (headers:get(name) or ""):match("^%s*(%d+)%s*$") -- not "-5", "inf", "0x10"
  return digits and tonumber(digits) or nil
end

-- The usage header names: the defaults above, or the route's filter metadata
--   metadata: {filter_metadata: {envoy.filters.http.lua: {usage_headers: {prompt: ..., ...}}}}
-- so that a backend (or middleware) with other names needs no change to this file.
function M.usage_header_names(handle)
  local ok, configured = pcall(function()
    return handle:metadata():get("usage_headers")
  end)
  if not ok or type(configured) ~= "table" then
    return M.USAGE_HEADERS
  end
  local names = {}
  for kind, default in pairs(M.USAGE_HEADERS) do
    local name = configured[kind]
    names[kind] = type(name) == "string" and name ~= "" and name:lower() or default
  end
  return names
end

local function header_usage(headers, names)
  local prompt = header_count(headers, names.prompt)
  local completion = header_count(headers, names.completion)
  local total = header_count(headers, names.total)
  if prompt or completion or total then
    return { prompt = prompt, completion = completion, total = total }
  end
  return nil
end

-- outcome(status, usage): "charged" or the reason nothing is charged.
function M.outcome(status, usage)
  if status >= 500 then
    return "upstream_error"
  elseif status == 429 then
    return "rate_limited"
  elseif status >= 400 then
    return "client_error"
  elseif status >= 300 or not M.counts(usage) then
    return "no_usage"
  end
  return "charged"
end

local function report(handle, usage, status, streamed)
  local outcome = M.outcome(status, usage)
  set(handle, "outcome", outcome)
  if outcome ~= "charged" then
    return
  end
  local counts = M.counts(usage)
  -- for the usage ledger's record (descriptor entries are strings)
  set(handle, "status", string.format("%d", status))
  set(handle, "streamed", streamed and "true" or "false")
  set(handle, "prompt_tokens", counts.prompt)
  set(handle, "completion_tokens", counts.completion)
  set(handle, "total_tokens", counts.prompt + counts.completion)
  set(handle, "charge_prompt", "prompt_tokens")
  set(handle, "charge_completion", "completion_tokens")
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = tonumber(headers:get(":status") or "0") or 0
  local meta = handle:streamInfo():dynamicMetadata():get(NS)
  -- The usage event we asked for is removed from event streams only: any other body (an error,
  -- a backend that does not stream) has no such event and must not be held back.
  local strip = meta ~= nil
    and meta["injected"] == "true"
    and status < 300
    and (headers:get("content-type") or ""):find("text/event-stream", 1, true) ~= nil
  local sse = strip and SseFilter.new() or nil
  local streamed = (headers:get("content-type") or ""):find("text/event-stream", 1, true) ~= nil
  local from_headers = header_usage(headers, M.usage_header_names(handle))
  local scanner = nil
  if from_headers or status >= 300 then
    report(handle, from_headers, status, streamed)
    if not sse then
      return -- nothing to read in the body; it is passed on untouched
    end
  else
    -- Until the body is complete nothing is charged (a reset mid-body leaves it so).
    set(handle, "outcome", "incomplete")
    scanner = Scanner.new()
  end
  for chunk in handle:bodyChunks() do
    local bytes = chunk:getBytes(0, chunk:length())
    if scanner then
      scanner:feed(bytes)
    end
    if sse then
      chunk:setBytes(sse:feed(bytes))
    end
  end
  if scanner then
    report(handle, scanner.usage, status, streamed)
  end
end

return M

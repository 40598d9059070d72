"""The Redis store's Lua scripts (src/maas_ratelimit/lua/) under the real LuaJIT, as Lua 5.1 runs
them in Redis: they compile, touch no global but those Redis provides, and their integer helpers
agree with Python's arithmetic where doubles lose exactness (past 2**53).

The store contract (test_store_contract.py) runs the same scripts in a real Redis; these tests
pin what that cannot see: a typo'd global that only one branch reaches, and the edges of the
arithmetic a bucket rarely meets.
"""

from __future__ import annotations

import subprocess

import pytest

from maas_ratelimit import redis_scripts
from maas_ratelimit.bucket import DEBT_WINDOWS

# A fake `redis` (HMGET/HSET/PEXPIRE/GET/SET on a Lua table) and a strict environment: reading or
# writing any global that Redis's scripting environment does not provide is an error.
PRELUDE = r"""
local store = {}
local calls = {}
local function call(cmd, key, ...)
  local args = {...}
  calls[#calls + 1] = cmd
  if cmd == 'HMGET' then
    local h = store[key]
    if not h then return {false, false, false} end
    return {h[args[1]] or false, h[args[2]] or false, h[args[3]] or false}
  elseif cmd == 'HSET' then
    local h = store[key] or {}
    for i = 1, #args, 2 do h[args[i]] = args[i + 1] end
    store[key] = h
    return 1
  elseif cmd == 'PEXPIRE' then
    return 1
  elseif cmd == 'GET' then
    return store[key] or false
  elseif cmd == 'SET' then
    store[key] = args[1]
    return 'OK'
  end
  error('unexpected redis command ' .. cmd)
end
local redis = {call = call, error_reply = function(msg) return {err = msg} end}
local function strict(keys, argv)
  local allowed = {redis = redis, KEYS = keys, ARGV = argv, string = string, math = math,
                   tonumber = tonumber, tostring = tostring, type = type, table = table}
  return setmetatable({}, {
    __index = function(_, name)
      local value = allowed[name]
      if value == nil then error('read of undeclared global ' .. tostring(name), 2) end
      return value
    end,
    __newindex = function(_, name) error('write of global ' .. tostring(name), 2) end,
  })
end
local function run(text, keys, argv)
  local chunk = assert(loadstring(text, 'script'))
  setfenv(chunk, strict(keys, argv))
  return chunk()
end
local function out(...)
  local parts = {}
  for i, v in ipairs({...}) do
    parts[i] = type(v) == 'number' and string.format('%.0f', v) or tostring(v)
  end
  io.write(table.concat(parts, ' '), '\n')
end
"""


def run_lua(luajit: str, code: str) -> list[str]:
    done = subprocess.run(
        [luajit, "-"], input=(PRELUDE + code).encode(), capture_output=True, timeout=60, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"luajit failed: {done.stderr.decode(errors='replace')}", pytrace=False)
    return done.stdout.decode().splitlines()


def long_string(text: str) -> str:
    """A Lua long-bracket literal of `text` (a level of '=' that the text does not contain)."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[\n{text}]{'=' * level}]"


def test_the_scripts_are_the_package_files_with_the_debt_floor_filled_in() -> None:
    assert redis_scripts.ADMIT.startswith(redis_scripts.read("common.lua"))
    assert redis_scripts.ADMIT.endswith(redis_scripts.read("admit.lua"))
    assert "__DEBT_WINDOWS__" in redis_scripts.read("charge.lua")
    assert "__DEBT_WINDOWS__" not in redis_scripts.CHARGE
    assert f"-{DEBT_WINDOWS} * limit * window" in redis_scripts.CHARGE


def test_admit_runs_in_a_strict_environment_and_takes_from_every_bucket(luajit: str) -> None:
    # two buckets (limit 5 per 120000 ms, need 1000 scaled units, take 120000), a request id
    lines = run_lua(
        luajit,
        f"""
local reply = run({long_string(redis_scripts.ADMIT)}, {{'a', 'b', 'rid'}},
  {{'1000', '2', '600000', '5', '120000', '1', '120000', '0', '0', '1',
                           '5', '120000', '1', '120000', '1', '0', '1'}})
out(unpack(reply))
out(store.a.v, store.a.t, store.a.s)
""",
    )
    capacity = 5 * 120000
    assert lines == [
        f"1 1 {capacity - 120000} 1 {capacity - 120000}",
        f"{capacity - 120000} 1000 120000",
    ]


def test_a_refused_admission_takes_nothing_and_marks_the_request_denied(luajit: str) -> None:
    lines = run_lua(
        luajit,
        f"""
store.a = {{v = '0', t = '1000', s = '120000'}}
local reply = run({long_string(redis_scripts.ADMIT)}, {{'a', 'rid'}},
  {{'1000', '1', '600000', '5', '120000', '1', '120000', '0', '0', '1'}})
out(unpack(reply))
out(store.rid)
""",
    )
    assert lines == ["0 0 0", "denied"]


def test_charge_runs_in_a_strict_environment_once_per_request_id(luajit: str) -> None:
    lines = run_lua(
        luajit,
        f"""
local script = {long_string(redis_scripts.CHARGE)}
local argv = {{'1000', '1', '600000', '100', '60000', '50', '0', '1'}}
out(unpack(run(script, {{'t', 'rid'}}, argv)))
out(unpack(run(script, {{'t', 'rid'}}, argv)))
store.rid2 = 'denied'
out(unpack(run(script, {{'t', 'rid2'}}, argv)))
-- an absurd charge stops at the debt floor
out(unpack(run(script, {{'t'}}, {{'1000', '1', '600000', '100', '60000', '1e15', '0', '1'}})))
""",
    )
    floor = -DEBT_WINDOWS * 100 * 60000
    assert lines == [f"0 {100 * 60000 - 50}", "1", "2", f"0 {floor}"]


def test_a_corrupt_bucket_is_an_error_reply_and_nothing_is_written(luajit: str) -> None:
    lines = run_lua(
        luajit,
        f"""
store.a = {{v = 'x', t = '1', s = '1'}}
local reply = run({long_string(redis_scripts.ADMIT)}, {{'a', 'b'}},
  {{'1000', '2', '600000', '5', '120000', '1', '1', '0', '0', '1',
                           '5', '120000', '1', '1', '0', '0', '1'}})
out(reply.err, store.b == nil)
""",
    )
    assert lines == ["corrupt bucket state at a true"]


# Integers where a double's quotient is off by one, products past 2**53, and the usual small ones.
EDGES = [0, 1, 2, 3, 7, 119_999, 120_000, 2**52 - 1, 2**52 + 1, 2**53 - 1, -1, -(2**53 - 1)]
DIVISORS = [1, 3, 7, 60_000, 120_000, 2**31 - 1, 2**52 + 3]


def test_the_integer_helpers_agree_with_python(luajit: str) -> None:
    helpers = redis_scripts.read("common.lua") + "\nreturn floordiv, ceildiv, mulfloordiv, rescale"
    cases_fd = [(x, d) for x in EDGES for d in DIVISORS]
    cases_mfd = [
        (r, b, c)
        for c in [3, 120_000, 2**40 + 7, 2**52 + 3]
        for r in [0, 1, c - 1, c // 2]
        for b in [1, 120_000, 2**31 - 1, 2**45 + 11]
    ]
    cases_rs = [
        (level, old, new)
        for level in [0, 1, 599_999, 2**50 + 5, -(2**50)]
        for old in [1, 60_000, 120_000]
        for new in [1, 60_000, 3_600_000]
        if abs(level * new // old) < 2**53  # what a bucket holds (bucket.MAX_EXACT)
    ]
    calls = [f"out(floordiv({x}, {d}), ceildiv({x}, {d}))" for x, d in cases_fd]
    calls += [f"out(mulfloordiv({r}, {b}, {c}))" for r, b, c in cases_mfd]
    calls += [f"out(rescale({lv}, {o}, {n}))" for lv, o, n in cases_rs]
    lines = run_lua(
        luajit,
        "local chunk = assert(loadstring("
        + long_string(helpers)
        + "))\nsetfenv(chunk, strict({}, {}))\n"
        + "local floordiv, ceildiv, mulfloordiv, rescale = chunk()\n"
        + "\n".join(calls),
    )
    expected = [[x // d, -(-x // d)] for x, d in cases_fd]
    expected += [[r * b // c] for r, b, c in cases_mfd]
    expected += [[lv * n // o] for lv, o, n in cases_rs]
    # compared as integers: Lua may print a zero as "-0"
    assert [[int(v) for v in line.split()] for line in lines] == expected

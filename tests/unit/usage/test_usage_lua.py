"""envoy/lua/usage.lua with the real LuaJIT (Envoy's Lua): the usage scanner, the request rewrite,
the SSE filter, and the Envoy entry points driven with a fake handle (lua_harness.lua).

Each `lua(...)` call runs one luajit process (a few milliseconds): the loops over every split
point run inside it. Bodies travel as Lua string literals, results come back as JSON in which a
string is its bytes (`raw()` turns it back into bytes).
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
USAGE_LUA = ROOT / "envoy" / "lua" / "usage.lua"
HARNESS = Path(__file__).with_name("lua_harness.lua")

# --- what vLLM sends ----------------------------------------------------------------------------

CHAT_BODY = (
    b'{"id":"chatcmpl-8c2f","object":"chat.completion","created":1718000000,"model":"tiny",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help",'
    b'"tool_calls":[]},"logprobs":null,"finish_reason":"length","stop_reason":null}],'
    b'"usage":{"prompt_tokens":15,"total_tokens":23,"completion_tokens":8,'
    b'"prompt_tokens_details":null,"completion_tokens_details":null},"prompt_logprobs":null}'
)
CHUNK = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1718000000,"model":"tiny",'
EVENTS = [
    b"data: " + CHUNK + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
    b'"logprobs":null,"finish_reason":null}]}\n\n',
    b"data: " + CHUNK + b'"choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,'
    b'"finish_reason":null}]}\n\n',
    b"data: " + CHUNK + b'"choices":[{"index":0,"delta":{"content":" there"},"logprobs":null,'
    b'"finish_reason":"length","stop_reason":null}]}\n\n',
]
USAGE_EVENT = (
    b"data: " + CHUNK + b'"choices":[],"usage":{"prompt_tokens":16,"total_tokens":19,'
    b'"completion_tokens":3}}\n\n'
)
DONE = b"data: [DONE]\n\n"
STREAM = b"".join(EVENTS) + USAGE_EVENT + DONE
STREAM_WITHOUT_USAGE = b"".join(EVENTS) + DONE
STREAM_USAGE = {"prompt": 16, "completion": 3, "total": 19}
CHAT_USAGE = {"prompt": 15, "completion": 8, "total": 23}

CHAT_REQUEST = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 3,
    "stream": True,
}
JSON_HEADERS = {
    ":method": "POST",
    ":path": "/v1/chat/completions",
    "content-type": "application/json",
}
SSE_RESPONSE = {":status": "200", "content-type": "text/event-stream; charset=utf-8"}
JSON_RESPONSE = {":status": "200", "content-type": "application/json"}
CHARGED_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens", "charge_prompt",
                "charge_completion", "status", "streamed"}  # fmt: skip


# --- running LuaJIT -----------------------------------------------------------------------------


def run_lua(luajit: str, code: str) -> Any:
    done = subprocess.run(
        [luajit, str(HARNESS), str(USAGE_LUA)],
        input=code.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"luajit failed: {done.stderr.decode(errors='replace')}", pytrace=False)
    return json.loads(done.stdout)


@pytest.fixture
def lua(luajit: str) -> Any:
    return lambda code: run_lua(luajit, code)


def s(data: bytes | str) -> str:
    """A Lua string literal of exactly these bytes."""
    raw_bytes = data.encode() if isinstance(data, str) else data
    out = []
    for byte in raw_bytes:
        char = chr(byte)
        if 0x20 <= byte < 0x7F and char not in '"\\':
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def t(items: Sequence[bytes | str] | Mapping[str, str]) -> str:
    """A Lua table of strings: a list, or a map with string keys."""
    if isinstance(items, Mapping):
        return "{" + ", ".join(f"[{s(k)}] = {s(v)}" for k, v in items.items()) + "}"
    return "{" + ", ".join(s(item) for item in items) + "}"


def raw(value: str) -> bytes:
    """A string from the harness's JSON back to its bytes."""
    return value.encode("latin-1")


def body(value: Mapping[str, object], **dumps: Any) -> bytes:
    return json.dumps(value, **dumps).encode()


# --- loading ------------------------------------------------------------------------------------


def test_the_chunk_defines_only_the_envoy_entry_points_and_returns_its_parts(lua: Any) -> None:
    result = lua("""
        local parts = {}
        for name, value in pairs(M) do parts[#parts + 1] = name .. ":" .. type(value) end
        table.sort(parts)
        return {globals = NEW_GLOBALS, parts = parts}
    """)
    assert result["globals"] == "envoy_on_request envoy_on_response"
    assert result["parts"] == [
        "Scanner:table",
        "SseFilter:table",
        "USAGE_HEADERS:table",
        "counts:function",
        "estimate:function",
        "inject:function",
        "outcome:function",
        "usage_header_names:function",
    ]


# --- Scanner ------------------------------------------------------------------------------------


def test_scanner_reads_vllms_chat_body(lua: Any) -> None:
    result = lua(f"return scan({{{s(CHAT_BODY)}}})")
    assert result["usage"] == CHAT_USAGE
    assert result["malformed"] is False


def test_scanner_reads_the_final_event_of_vllms_stream(lua: Any) -> None:
    result = lua(f"return scan({{{s(STREAM)}}})")
    assert result["usage"] == STREAM_USAGE
    assert result["malformed"] is False


@pytest.mark.parametrize(
    ("data", "expected"), [(CHAT_BODY, CHAT_USAGE), (STREAM, STREAM_USAGE)], ids=["chat", "stream"]
)
def test_scanner_finds_the_same_usage_at_every_split(
    lua: Any, data: bytes, expected: dict[str, int]
) -> None:
    result = lua(f"""
        local data = {s(data)}
        local function same(usage)
            return usage and usage.prompt == {expected["prompt"]}
                and usage.completion == {expected["completion"]}
                and usage.total == {expected["total"]}
        end
        local sizes = {{}}
        for _, size in ipairs({{1, 2, 3, 7, 64}}) do
            local r = scan(pieces(data, size))
            sizes[#sizes + 1] = same(r.usage) and not r.malformed
        end
        local splits = failing_splits(data, function(a, b)
            local r = scan({{a, b}})
            return same(r.usage) and not r.malformed
        end)
        return {{sizes = sizes, splits = splits}}
    """)
    assert result["sizes"] == [True] * 5
    assert result["splits"] == {"failures": 0, "tried": len(data) + 1}


def test_embeddings_usage_has_no_completion_tokens(lua: Any) -> None:
    embeddings = (
        b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],'
        b'"model":"tiny","usage":{"prompt_tokens":5,"total_tokens":5}}'
    )
    result = lua(f"""
        local r = scan({{{s(embeddings)}}})
        return {{usage = r.usage, counts = M.counts(r.usage)}}
    """)
    assert result["usage"] == {"prompt": 5, "total": 5}
    assert result["counts"] == {"prompt": 5, "completion": 0}


@pytest.mark.parametrize(
    "data",
    [
        b'{"object":"chat.completion","choices":[{"message":{"content":"hi"}}]}',
        b"",
        b"data: [DONE]\n\n",
        b'{"usage":null}',
        b'{"usage_stats":{"prompt_tokens":3}}',
        b'{"token_usage":{"prompt_tokens":3,"completion_tokens":4}}',
        b'{"x":{"prompt_tokens":3,"completion_tokens":4}}',
    ],
)
def test_a_body_without_usage_has_none(lua: Any, data: bytes) -> None:
    result = lua(f"return scan({{{s(data)}}})")
    assert "usage" not in result
    assert result["malformed"] is False


# model output that spells out a usage object: inside a JSON string every quote is escaped
QUOTED_USAGE = b'\\"usage\\": {\\"prompt_tokens\\": 99, \\"completion_tokens\\": 99}'


def test_usage_quoted_in_the_model_output_is_not_usage(lua: Any) -> None:
    content_only = b'{"choices":[{"message":{"content":"say ' + QUOTED_USAGE + b'"}}]}'
    content_then_usage = CHAT_BODY.replace(b"Hello! How can I help", QUOTED_USAGE)
    streamed = EVENTS[1].replace(b'"Hi"', b'"' + QUOTED_USAGE + b'"')
    stream_after_usage = STREAM + streamed  # a late content event after the usage
    result = lua(f"""
        local function at_every_split(data, prompt)
            return failing_splits(data, function(a, b)
                local r = scan({{a, b}})
                if prompt == nil then return r.usage == nil end
                return r.usage ~= nil and r.usage.prompt == prompt
            end).failures
        end
        return {{
            content_only = scan({{{s(content_only)}}}),
            content_then_usage = scan({{{s(content_then_usage)}}}),
            stream_after_usage = scan({{{s(stream_after_usage)}}}),
            failures = {{
                at_every_split({s(content_only)}, nil),
                at_every_split({s(content_then_usage)}, 15),
                at_every_split({s(stream_after_usage)}, 16),
            }},
        }}
    """)
    assert "usage" not in result["content_only"]
    assert result["content_only"]["malformed"] is False
    assert result["content_then_usage"]["usage"] == CHAT_USAGE
    assert result["stream_after_usage"]["usage"] == STREAM_USAGE
    assert result["failures"] == [0, 0, 0]


@pytest.mark.parametrize(
    ("data", "malformed"),
    [
        (b'{"usage":{"prompt_tokens":"many","completion_tokens":null}}', True),
        (b'{"usage":{}}', True),
        (b'{"usage":{"prompt_tokens":-1}}', True),
        (b'{"usage":{"prompt_tokens":15,"total_tok', False),  # truncated: never complete
        (b'{"usage":{"prompt_tokens":15,"total_tokens":23', False),
        (b'{"usage":', False),
        (b'{"usage":[15,8]}', False),
        (b'}}}{{{"usage":{{{"usage"', False),
        (b'"usage"' * 1000, False),
        (b"\x00" * 100 + b'{"usage":\x00{}', False),
    ],
)
def test_malformed_usage_is_never_an_error(lua: Any, data: bytes, malformed: bool) -> None:
    result = lua(f"""
        local data = {s(data)}
        local r = scan({{data}})
        local bytewise = scan(pieces(data, 1))
        return {{r = r, same = bytewise.malformed == r.malformed and bytewise.usage == nil}}
    """)
    assert "usage" not in result["r"]
    assert result["r"]["malformed"] is malformed
    assert result["same"] is True


def test_a_huge_body_is_read_with_a_bounded_tail(lua: Any) -> None:
    result = lua(f"""
        local content = string.rep("All work and no play. {{}} \\"usage\\" ", 5 * 1024 * 1024 / 32)
        local data = '{{"choices":[{{"message":{{"content":"' .. content .. '"}}}}],'
            .. {s(b'"usage":{"prompt_tokens":15,"total_tokens":23,"completion_tokens":8}}')}
        local results = {{}}
        for _, size in ipairs({{16384, 65536, #data}}) do
            local r = scan(pieces(data, size))
            results[#results + 1] = {{usage = r.usage, max_tail = r.max_tail}}
        end
        -- an object that never closes, then megabytes: the tail never keeps more
        local never_closed = '{{"usage":{{"prompt_tokens":1' .. string.rep("x", 1024 * 1024)
        local open = scan(pieces(never_closed, 1000))
        return {{size = #data, results = results, open = open}}
    """)
    assert result["size"] > 5_000_000
    for item in result["results"]:
        assert item["usage"] == CHAT_USAGE
        assert item["max_tail"] <= 4096
    assert "usage" not in result["open"]
    assert result["open"]["max_tail"] <= 4096


def test_the_tail_stays_bounded_after_every_feed_of_a_stream(lua: Any) -> None:
    result = lua(f"""
        local data = string.rep({s(EVENTS[1])}, 300) .. {s(USAGE_EVENT + DONE)}
        local scanner = M.Scanner.new()
        local worst = 0
        for _, chunk in ipairs(pieces(data, 777)) do
            scanner:feed(chunk)
            worst = math.max(worst, #scanner.tail)
        end
        return {{usage = scanner.usage, worst = worst, size = #data}}
    """)
    assert result["size"] > 40_000
    assert result["usage"] == STREAM_USAGE
    assert result["worst"] <= 4096


def test_bytes_that_are_not_utf8_are_no_error(lua: Any) -> None:
    bad = b"\xff\xfe"
    cases = [
        bad + CHAT_BODY,
        CHAT_BODY.replace(b"Hello!", b"Hello" + bad + b"\x80\xc3"),
        CHAT_BODY + bad,
        CHAT_BODY.replace(b'"total_tokens":23,', b'"total_tokens":23,' + bad),
        STREAM.replace(b" there", b" \xc3\x28\xa0\xa1" + bad),
    ]
    result = lua(f"""
        local out = {{}}
        for i, data in ipairs({t(cases)}) do
            local r = scan(pieces(data, 5))
            local f = sse(pieces(data, 5))
            out[i] = {{usage = r.usage, inject = M.inject(data), sse = #f.out + #f.pending}}
        end
        out[#out + 1] = {{only_bad = scan({{{s(bad)}}}), inject = M.inject({s(bad)})}}
        return out
    """)
    assert [item["usage"] for item in result[:4]] == [CHAT_USAGE] * 4
    assert result[4]["usage"] == STREAM_USAGE
    assert [item.get("inject") for item in result[:5]] == [None] * 5
    # every byte comes out or is held back, except the usage event of the stream
    assert [item["sse"] for item in result[:5]] == [
        *(len(data) for data in cases[:4]),
        len(cases[4]) - len(USAGE_EVENT),
    ]
    assert result[5] == {"only_bad": {"malformed": False, "max_tail": 2}}


def test_with_continuous_usage_stats_the_last_usage_wins(lua: Any) -> None:
    events = [
        b"data: " + CHUNK + b'"choices":[{"index":0,"delta":{"content":"a"}}],'
        b'"usage":{"prompt_tokens":16,"total_tokens":' + str(16 + n).encode() + b","
        b'"completion_tokens":' + str(n).encode() + b"}}\n\n"
        for n in (1, 2, 3)
    ]
    data = b"".join(events) + USAGE_EVENT.replace(b":3}", b":4}").replace(b":19", b":20") + DONE
    result = lua(f"""
        local data = {s(data)}
        return {{
            whole = scan({{data}}).usage,
            failures = failing_splits(data, function(a, b)
                local u = scan({{a, b}}).usage
                return u.prompt == 16 and u.completion == 4 and u.total == 20
            end).failures,
            bytewise = scan(pieces(data, 1)).usage,
        }}
    """)
    assert result["whole"] == {"prompt": 16, "completion": 4, "total": 20}
    assert result["bytewise"] == result["whole"]
    assert result["failures"] == 0


def test_numbers_with_spaces_and_other_keys_first(lua: Any) -> None:
    data = b'{"usage" : { "completion_tokens" : 8 ,\n "prompt_tokens":\t15, "total_tokens" :23 } }'
    assert lua(f"return scan({{{s(data)}}})")["usage"] == CHAT_USAGE


# --- counts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ("{prompt = 15, completion = 8, total = 23}", {"prompt": 15, "completion": 8}),
        ("{prompt = 15, completion = 8}", {"prompt": 15, "completion": 8}),
        ("{prompt = 15, completion = 8, total = 999}", {"prompt": 15, "completion": 8}),
        ("{total = 23}", {"prompt": 23, "completion": 0}),  # only a total: charged as prompt
        ("{prompt = 5, total = 5}", {"prompt": 5, "completion": 0}),  # embeddings
        ("{prompt = 15, total = 23}", {"prompt": 15, "completion": 8}),
        ("{completion = 8, total = 23}", {"prompt": 15, "completion": 8}),
        ("{prompt = 15}", {"prompt": 15, "completion": 0}),
        ("{completion = 8}", {"prompt": 0, "completion": 8}),
        ("{prompt = 30, total = 23}", {"prompt": 30, "completion": 0}),  # never negative
        ("{completion = 30, total = 23}", {"prompt": 0, "completion": 30}),
        ("{prompt = 0, completion = 0, total = 0}", {"prompt": 0, "completion": 0}),
    ],
)
def test_counts(lua: Any, usage: str, expected: dict[str, int]) -> None:
    assert lua(f"return M.counts({usage})") == expected


def test_counts_of_nothing(lua: Any) -> None:
    assert lua("return M.counts(nil)") is None


# --- inject -------------------------------------------------------------------------------------


def inject(lua: Any, data: bytes) -> bytes | None:
    result = lua(f"return {{M.inject({s(data)})}}")
    assert isinstance(result, list | dict)
    return raw(result[0]) if result else None


@pytest.mark.parametrize(
    "dumps",
    [{}, {"separators": (",", ":")}, {"indent": 2}, {"separators": (" , ", " : ")}],
    ids=["default", "compact", "indented", "spaced"],
)
def test_inject_adds_stream_options_and_keeps_the_rest(lua: Any, dumps: dict[str, Any]) -> None:
    changed = inject(lua, body(CHAT_REQUEST, **dumps))
    assert changed is not None
    assert json.loads(changed) == {**CHAT_REQUEST, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize(
    ("stream_options", "expected"),
    [
        ({}, {"include_usage": True}),
        ({"include_usage": False}, {"include_usage": True}),
        ({"continuous_usage_stats": True}, {"include_usage": True, "continuous_usage_stats": True}),
        (
            {"include_usage": False, "continuous_usage_stats": False},
            {"include_usage": True, "continuous_usage_stats": False},
        ),
        (None, {"include_usage": True}),  # a second key would lose: JSON's last key wins
    ],
)
def test_inject_completes_the_clients_stream_options(
    lua: Any, stream_options: dict[str, bool] | None, expected: dict[str, bool]
) -> None:
    for dumps in ({}, {"indent": 1}):
        changed = inject(lua, body({**CHAT_REQUEST, "stream_options": stream_options}, **dumps))
        assert changed is not None
        parsed = json.loads(changed, object_pairs_hook=no_repeated_keys)
        assert parsed == {**CHAT_REQUEST, "stream_options": expected}


def no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), keys
    return dict(pairs)


def test_inject_output_has_no_repeated_keys(lua: Any) -> None:
    changed = inject(lua, body(CHAT_REQUEST))
    assert changed is not None
    json.loads(changed, object_pairs_hook=no_repeated_keys)


@pytest.mark.parametrize(
    "data",
    [
        body({**CHAT_REQUEST, "stream_options": {"include_usage": True}}),
        body({**CHAT_REQUEST, "stream_options": {"include_usage": True}}, indent=2),
        body({**CHAT_REQUEST, "stream": False}),
        body({**CHAT_REQUEST, "stream": False, "stream_options": {"include_usage": False}}),
        body({key: value for key, value in CHAT_REQUEST.items() if key != "stream"}),
        body({**CHAT_REQUEST, "stream": False, "messages": [{"content": '"stream": true'}]}),
        b"",
        b"not json",
    ],
    ids=[
        "usage-asked",
        "usage-asked-indented",
        "not-streaming",
        "not-streaming-with-options",
        "no-stream-key",
        "stream-quoted-in-a-message",
        "empty",
        "not-json",
    ],
)
def test_inject_leaves_alone_what_needs_no_change(lua: Any, data: bytes) -> None:
    assert inject(lua, data) is None


def test_inject_with_spaces_around_the_colon(lua: Any) -> None:
    data = b'  {"model": "tiny", "stream" : true, "messages": []}'
    changed = inject(lua, data)
    assert changed is not None
    assert json.loads(changed) == {
        "model": "tiny",
        "stream": True,
        "messages": [],
        "stream_options": {"include_usage": True},
    }


# --- SseFilter ----------------------------------------------------------------------------------


def test_sse_filter_removes_exactly_the_usage_event(lua: Any) -> None:
    result = lua(f"return sse({{{s(STREAM)}}})")
    assert raw(result["out"]) == STREAM_WITHOUT_USAGE
    assert result["pending"] == ""


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_sse_filter_at_every_split_point(lua: Any, newline: bytes) -> None:
    stream = STREAM.replace(b"\n", newline)
    expected = STREAM_WITHOUT_USAGE.replace(b"\n", newline)
    usage_start = stream.index(b"data: " + CHUNK + b'"choices":[]')
    usage_end = usage_start + len(USAGE_EVENT.replace(b"\n", newline))
    result = lua(f"""
        local stream, expected = {s(stream)}, {s(expected)}
        local function ok(chunks)
            local r = sse(chunks)
            return r.out == expected and r.pending == ""
        end
        -- every split in three within the usage event and its neighbours' edges
        local three = 0
        for i = {usage_start - 3}, {usage_end + 3} do
            for j = i, {usage_end + 3} do
                if not ok({{stream:sub(1, i), stream:sub(i + 1, j), stream:sub(j + 1)}}) then
                    three = three + 1
                end
            end
        end
        return {{
            two = failing_splits(stream, function(a, b) return ok({{a, b}}) end),
            three = three,
            bytewise = ok(pieces(stream, 1)),
            sizes = {{ok(pieces(stream, 2)), ok(pieces(stream, 13)), ok(pieces(stream, 100))}},
        }}
    """)
    assert result["two"] == {"failures": 0, "tried": len(stream) + 1}
    assert result["three"] == 0
    assert result["bytewise"] is True
    assert result["sizes"] == [True, True, True]


def test_sse_filter_releases_what_it_held_back_with_the_next_chunk(lua: Any) -> None:
    first, second = EVENTS[0], EVENTS[1]
    result = lua(f"""
        return sse({{
            {s(first[:10])}, {s(first[10:-1])}, {s(first[-1:] + second[:5])},
            {s(second[5:] + USAGE_EVENT[:20])}, {s(USAGE_EVENT[20:] + DONE)},
        }})
    """)
    assert [raw(out) for out in result["outputs"]] == [b"", b"", first, second, DONE]
    assert result["pending"] == ""


def test_sse_filter_keeps_every_other_event_byte_for_byte(lua: Any) -> None:
    kept = [
        b": a comment\n\n",
        b"event: ping\ndata: {}\n\n",
        b'data: {"choices":[],"note":"no usage here"}\n\n',  # empty choices, no usage: kept
        # usage with choices (continuous usage stats): a content event, kept
        b"data: " + CHUNK + b'"choices":[{"index":0,"delta":{"content":"x"}}],'
        b'"usage":{"prompt_tokens":1,"total_tokens":2,"completion_tokens":1}}\n\n',
        b'data: {"choices":[{"delta":{"content":"\\"choices\\":[],\\"usage\\":{"}}]}\n\n',
        b"data: \xff\xfe\n\n",
        b"data: multi\ndata: line\n\n",
        DONE,
    ]
    stream = b"".join(kept[:4]) + USAGE_EVENT + b"".join(kept[4:]) + USAGE_EVENT
    result = lua(f"return sse(pieces({s(stream)}, 9))")
    assert raw(result["out"]) == b"".join(kept)
    assert result["pending"] == ""


def test_sse_filter_holds_an_unfinished_event(lua: Any) -> None:
    result = lua(f"return sse({{{s(EVENTS[0] + b'data: {')}}})")
    assert raw(result["out"]) == EVENTS[0]
    assert raw(result["pending"]) == b"data: {"


# --- outcome ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "usage", "expected"),
    [
        (200, "{prompt = 15, completion = 8}", "charged"),
        (201, "{total = 5}", "charged"),
        (200, "nil", "no_usage"),
        (204, "nil", "no_usage"),
        (302, "{prompt = 15}", "no_usage"),
        (429, "nil", "rate_limited"),
        (429, "{prompt = 15}", "rate_limited"),
        (400, "{prompt = 15}", "client_error"),
        (403, "nil", "client_error"),
        (404, "nil", "client_error"),
        (500, "{prompt = 15}", "upstream_error"),
        (503, "nil", "upstream_error"),
    ],
)
def test_outcome(lua: Any, status: int, usage: str, expected: str) -> None:
    assert lua(f"return M.outcome({status}, {usage})") == expected


# --- estimate: the reservation -----------------------------------------------------------------


def estimate(lua: Any, data: bytes, path: str = "/v1/chat/completions") -> dict[str, int]:
    result = lua(f"return M.estimate({s(data)}, {s(path)})")
    assert isinstance(result, dict)
    return result


@pytest.mark.parametrize(
    ("request_body", "completion"),
    [
        ({**CHAT_REQUEST, "max_tokens": 40}, 40),
        ({"messages": [], "max_completion_tokens": 77}, 77),
        # max_completion_tokens wins, as in vLLM (and the demo backend)
        ({"max_tokens": 500, "max_completion_tokens": 12}, 12),
        ({"max_completion_tokens": 12, "max_tokens": 500}, 12),
        # neither: the documented default
        ({"messages": [{"role": "user", "content": "hi"}]}, 256),
        ({"max_tokens": None}, 256),
        ({"max_tokens": "40"}, 256),
        ({"max_tokens": -5}, 256),
        # n choices of up to max_tokens each
        ({"max_tokens": 10, "n": 3}, 30),
        ({"max_tokens": 10, "n": 1}, 10),
        ({"n": 2}, 512),
        # absurd numbers are capped (1e9, Envoy's own cap on hits_addend), never an error
        ({"max_tokens": 10**30}, 10**9),
        ({"max_tokens": 10**8, "n": 10**8}, 10**9),
    ],
)
def test_estimate_of_the_completion(
    lua: Any, request_body: dict[str, object], completion: int
) -> None:
    data = body(request_body)
    assert estimate(lua, data) == {"prompt": math.ceil(len(data) / 4), "completion": completion}


@pytest.mark.parametrize(("size", "prompt"), [(1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_estimate_of_the_prompt_is_a_quarter_of_the_body_rounded_up(
    lua: Any, size: int, prompt: int
) -> None:
    data = b"{" + b" " * (size - 2) + b"}" if size >= 2 else b"x"
    assert len(data) == size
    assert estimate(lua, data)["prompt"] == prompt


def test_estimate_of_a_big_body(lua: Any) -> None:
    data = body({**CHAT_REQUEST, "messages": [{"role": "user", "content": "word " * 40_000}]})
    assert estimate(lua, data) == {"prompt": math.ceil(len(data) / 4), "completion": 3}


@pytest.mark.parametrize(
    "data",
    [
        # a key inside a string: its quotes are escaped in JSON, so it is no key
        body({"messages": [{"role": "user", "content": 'say "max_tokens": 9999'}]}),
        # other keys that merely contain the name
        b'{"xmax_tokens": 9999, "max_tokens_hint": 9999, "nn": 9}',
    ],
    ids=["quoted-in-content", "longer-keys"],
)
def test_estimate_reads_only_the_keys_themselves(lua: Any, data: bytes) -> None:
    assert estimate(lua, data)["completion"] == 256


def test_estimate_of_embeddings_has_no_completion(lua: Any) -> None:
    data = body({"model": "tiny", "input": "four words right here"})
    assert estimate(lua, data, "/llm/tiny/v1/embeddings") == {
        "prompt": math.ceil(len(data) / 4),
        "completion": 0,
    }


@pytest.mark.parametrize(
    "data", [b"", b"not json at all", b'{"max_tokens": ', b"\xff\xfe\x00{", b'{"n": 0}']
)
def test_estimate_of_odd_bodies_is_no_error(lua: Any, data: bytes) -> None:
    result = estimate(lua, data)
    assert result == {"prompt": math.ceil(len(data) / 4), "completion": 256}


# --- the Envoy entry points, with a fake handle -------------------------------------------------


def test_a_streaming_request_gets_include_usage(lua: Any) -> None:
    request = body(CHAT_REQUEST)
    result = lua(f"return on_request(fake_stream(), {t(JSON_HEADERS)}, {s(request)})")
    # the reservation is estimated on the body as the client sent it
    assert result["metadata"] == {"injected": "true", **reserved(request)}
    changed = raw(result["body"])
    assert json.loads(changed) == {**CHAT_REQUEST, "stream_options": {"include_usage": True}}
    assert result["headers"]["content-length"] == str(len(changed))


@pytest.mark.parametrize(
    ("headers", "data", "reserves"),
    [
        (JSON_HEADERS, body({**CHAT_REQUEST, "stream": False}), True),
        (JSON_HEADERS, body({**CHAT_REQUEST, "stream_options": {"include_usage": True}}), True),
        ({**JSON_HEADERS, ":method": "GET"}, body(CHAT_REQUEST), False),
        ({**JSON_HEADERS, "content-type": "text/plain"}, body(CHAT_REQUEST), False),
        ({":method": "POST"}, body(CHAT_REQUEST), False),
        (JSON_HEADERS, b"", False),
        (JSON_HEADERS, None, False),
    ],
    ids=["not-streaming", "usage-asked", "get", "text", "no-content-type", "empty", "no-body"],
)
def test_requests_left_alone(
    lua: Any, headers: dict[str, str], data: bytes | None, reserves: bool
) -> None:
    result = lua(
        f"return on_request(fake_stream(), {t(headers)}, {s(data) if data is not None else 'nil'})"
    )
    # unchanged; a buffered JSON body still gets its reservation estimated, nothing else does
    if reserves:
        assert data is not None
        assert result["metadata"] == reserved(data)
    else:
        assert "metadata" not in result
    assert result.get("body") == (None if data is None else data.decode())
    expected_length = None if data is None else str(len(data))
    assert result["headers"].get("content-length") == expected_length


def test_a_large_request_is_not_buffered(lua: Any) -> None:
    # above 512 KiB the body is left alone (Envoy would refuse buffering it past 1 MiB)
    big = body({**CHAT_REQUEST, "messages": [{"role": "user", "content": "x" * 600_000}]})
    result = lua(f"return on_request(fake_stream(), {t(JSON_HEADERS)}, {s(big)})")
    assert "metadata" not in result
    assert result["body"] == big.decode()


def test_a_request_without_content_length_is_not_buffered(lua: Any) -> None:
    request = body(CHAT_REQUEST)
    result = lua(f"return on_request(fake_stream(), {t(JSON_HEADERS)}, {s(request)}, true)")
    assert "metadata" not in result


@pytest.mark.parametrize(
    ("request_body", "completion"),
    [
        ({**CHAT_REQUEST, "stream": False, "max_tokens": 40}, "40"),
        ({**CHAT_REQUEST, "stream": False, "max_completion_tokens": 7}, "7"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, "256"),
    ],
)
def test_a_buffered_request_gets_a_reservation(
    lua: Any, request_body: dict[str, object], completion: str
) -> None:
    request = body(request_body)
    result = lua(f"return on_request(fake_stream(), {t(JSON_HEADERS)}, {s(request)})")
    # strings of integers: they become rate limit descriptor entries, which are strings
    assert result["metadata"] == {
        "reserve_prompt": str(math.ceil(len(request) / 4)),
        "reserve_completion": completion,
    }
    assert result["body"] == request.decode()


def test_an_embeddings_request_reserves_no_completion(lua: Any) -> None:
    request = body({"model": "tiny", "input": "four words right here"})
    headers = {**JSON_HEADERS, ":path": "/llm/tiny/v1/embeddings"}
    result = lua(f"return on_request(fake_stream(), {t(headers)}, {s(request)})")
    assert result["metadata"] == reserved(request, completion=0)


def test_a_failing_estimate_only_means_no_reservation(lua: Any) -> None:
    # whatever goes wrong in the estimate, the request goes on, and injection still happens
    request = body(CHAT_REQUEST)
    result = lua(f"""
        M.estimate = function() error("boom") end
        return on_request(fake_stream(), {t(JSON_HEADERS)}, {s(request)})
    """)
    assert result["metadata"] == {"injected": "true"}
    assert json.loads(raw(result["body"]))["stream_options"] == {"include_usage": True}


def reserved(request: bytes, completion: int = 3) -> dict[str, str]:
    """The reservation metadata of a buffered request: ceil(bytes / 4), and the completion
    (by default CHAT_REQUEST's max_tokens)."""
    return {
        "reserve_prompt": str(math.ceil(len(request) / 4)),
        "reserve_completion": str(completion),
    }


def full_exchange(
    request: bytes, response_headers: Mapping[str, str], chunks: Sequence[bytes]
) -> str:
    return f"""
        local stream = fake_stream()
        on_request(stream, {t(JSON_HEADERS)}, {s(request)})
        return on_response(stream, {t(response_headers)}, {t(chunks)})
    """


def charged(prompt: int, completion: int, *, streamed: bool = False) -> dict[str, object]:
    return {
        "status": "200",  # status and streamed: for the usage ledger's record
        "streamed": "true" if streamed else "false",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "charge_prompt": "prompt_tokens",
        "charge_completion": "completion_tokens",
        "outcome": "charged",
    }


def test_an_injected_stream_loses_its_usage_event_and_is_charged(lua: Any) -> None:
    result = lua(full_exchange(body(CHAT_REQUEST), SSE_RESPONSE, [STREAM[:300], STREAM[300:]]))
    assert raw(result["body"]) == STREAM_WITHOUT_USAGE
    assert result["metadata"] == {
        "injected": "true",
        **reserved(body(CHAT_REQUEST)),
        **charged(16, 3, streamed=True),
    }


def test_an_injected_stream_at_every_split_point(lua: Any) -> None:
    result = lua(f"""
        local request, data, expected = {s(body(CHAT_REQUEST))}, {s(STREAM)},
            {s(STREAM_WITHOUT_USAGE)}
        return failing_splits(data, function(a, b)
            local stream = fake_stream()
            on_request(stream, {t(JSON_HEADERS)}, request)
            local r = on_response(stream, {t(SSE_RESPONSE)}, {{a, b}})
            local m = r.metadata
            return r.body == expected and m.outcome == "charged" and m.prompt_tokens == 16
                and m.completion_tokens == 3 and m.total_tokens == 19
                and m.charge_prompt == "prompt_tokens"
                and m.charge_completion == "completion_tokens"
        end)
    """)
    assert result == {"failures": 0, "tried": len(STREAM) + 1}


def test_a_stream_that_asked_for_usage_keeps_it(lua: Any) -> None:
    request = body({**CHAT_REQUEST, "stream_options": {"include_usage": True}})
    result = lua(full_exchange(request, SSE_RESPONSE, [STREAM]))
    assert raw(result["body"]) == STREAM
    assert result["metadata"] == {**reserved(request), **charged(16, 3, streamed=True)}


def test_a_json_response_is_charged_and_passed_on(lua: Any) -> None:
    request = body({**CHAT_REQUEST, "stream": False})
    result = lua(full_exchange(request, JSON_RESPONSE, [CHAT_BODY[:50], CHAT_BODY[50:]]))
    assert raw(result["body"]) == CHAT_BODY
    assert result["metadata"] == {**reserved(request), **charged(15, 8)}
    assert result["read"] == 2


def test_an_injected_request_answered_without_a_stream_is_passed_on_whole(lua: Any) -> None:
    # a backend that ignores "stream": its JSON body has no event to remove, and no blank line
    result = lua(full_exchange(body(CHAT_REQUEST), JSON_RESPONSE, [CHAT_BODY]))
    assert raw(result["body"]) == CHAT_BODY
    assert result["metadata"] == {
        "injected": "true",
        **reserved(body(CHAT_REQUEST)),
        **charged(15, 8),
    }


def test_a_stream_without_usage_is_not_charged(lua: Any) -> None:
    request = body({**CHAT_REQUEST, "stream_options": {"include_usage": True}})
    result = lua(full_exchange(request, SSE_RESPONSE, [STREAM_WITHOUT_USAGE]))
    assert raw(result["body"]) == STREAM_WITHOUT_USAGE
    assert result["metadata"] == {**reserved(request), "outcome": "no_usage"}


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        ("500", "upstream_error"),
        ("503", "upstream_error"),
        ("429", "rate_limited"),
        ("403", "client_error"),
        ("400", "client_error"),
        ("302", "no_usage"),
    ],
)
def test_error_responses_are_not_charged(lua: Any, status: str, outcome: str) -> None:
    error = b'{"error":{"message":"boom"},"usage":{"prompt_tokens":15,"completion_tokens":8}}'
    result = lua(full_exchange(body(CHAT_REQUEST), {**JSON_RESPONSE, ":status": status}, [error]))
    # the reservation stays in the metadata: maas-ratelimit refunds it for such an outcome
    assert result["metadata"] == {
        "injected": "true",
        **reserved(body(CHAT_REQUEST)),
        "outcome": outcome,
    }
    assert not CHARGED_KEYS & set(result["metadata"])
    assert raw(result["body"]) == error
    assert result["read"] == 0  # the body is passed on untouched, unread


def test_usage_headers_win_over_the_body(lua: Any) -> None:
    headers = {**JSON_RESPONSE, "x-usage-prompt-tokens": "100", "x-usage-completion-tokens": "20"}
    request = body({**CHAT_REQUEST, "stream": False})
    result = lua(full_exchange(request, headers, [CHAT_BODY]))
    assert result["metadata"] == {**reserved(request), **charged(100, 20)}
    assert raw(result["body"]) == CHAT_BODY


def test_usage_headers_on_an_injected_stream_still_remove_the_event(lua: Any) -> None:
    headers = {**SSE_RESPONSE, "x-usage-prompt-tokens": "100", "x-usage-completion-tokens": "20"}
    result = lua(full_exchange(body(CHAT_REQUEST), headers, [STREAM[:333], STREAM[333:]]))
    assert raw(result["body"]) == STREAM_WITHOUT_USAGE
    assert result["metadata"] == {
        "injected": "true",
        **reserved(body(CHAT_REQUEST)),
        **charged(100, 20, streamed=True),
    }


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-usage-total-tokens": "42"}, charged(42, 0)),
        ({"x-usage-prompt-tokens": "7", "x-usage-total-tokens": "10"}, charged(7, 3)),
        ({"x-usage-completion-tokens": " 9 "}, charged(0, 9)),
        # not a count: the body decides
        ({"x-usage-prompt-tokens": "-5"}, charged(15, 8)),
        ({"x-usage-prompt-tokens": "inf"}, charged(15, 8)),
        ({"x-usage-prompt-tokens": "nan"}, charged(15, 8)),
        ({"x-usage-prompt-tokens": "0x10"}, charged(15, 8)),
        ({"x-usage-prompt-tokens": ""}, charged(15, 8)),
    ],
)
def test_usage_headers(lua: Any, headers: dict[str, str], expected: dict[str, object]) -> None:
    request = body({**CHAT_REQUEST, "stream": False})
    result = lua(full_exchange(request, {**JSON_RESPONSE, **headers}, [CHAT_BODY]))
    assert result["metadata"] == {**reserved(request), **expected}


def test_a_body_that_never_ends_is_incomplete(lua: Any) -> None:
    result = lua(f"""
        local stream = fake_stream()
        on_request(stream, {t(JSON_HEADERS)}, {s(body(CHAT_REQUEST))})
        return on_response(stream, {t(SSE_RESPONSE)}, {{{s(STREAM[:200])}, RESET}})
    """)
    assert "stream reset" in result["error"]
    assert result["metadata"] == {
        "injected": "true",
        **reserved(body(CHAT_REQUEST)),
        "outcome": "incomplete",
    }


def test_the_fake_handle_reports_errors_of_the_filter(lua: Any) -> None:
    # the harness itself: an error inside envoy_on_response is not swallowed silently
    result = lua(f"""
        local stream = fake_stream()
        return on_response(stream, {t(JSON_RESPONSE)}, {{{s(CHAT_BODY)}}})
    """)
    assert "error" not in result
    assert result["metadata"] == charged(15, 8)


@pytest.mark.parametrize("piece", [1000, 70_000])
def test_an_over_long_event_is_passed_on_not_buffered(lua: Any, piece: int) -> None:
    # a stream whose event never ends within 64 KiB (no blank line): passed on as it comes,
    # and filtering resumes after its end, so the usage event after it is still removed
    long_event = b"data: " + b"x" * 100_000 + b"\n\n"
    stream = long_event + USAGE_EVENT + DONE
    result = lua(f"return sse(pieces({s(stream)}, {piece}))")
    assert raw(result["out"]) == long_event + DONE
    assert result["pending"] == ""


def test_usage_header_names_come_from_the_routes_metadata(lua: Any) -> None:
    names = {"prompt": "X-Prompt-Tokens", "completion": "x-completion-tokens"}  # total: default
    headers = {**JSON_RESPONSE, "x-prompt-tokens": "11", "x-completion-tokens": "4",
               "x-usage-prompt-tokens": "999"}  # fmt: skip
    result = lua(
        f"""
        local stream = fake_stream()
        return on_response(stream, {t(headers)}, {t([CHAT_BODY])},
                           {{usage_headers = {t(names)}}})
        """
    )
    assert result["metadata"] == charged(11, 4)
    assert lua("return M.usage_header_names({metadata = function() error('none') end})") == {
        "prompt": "x-usage-prompt-tokens",
        "completion": "x-usage-completion-tokens",
        "total": "x-usage-total-tokens",
    }

"""How the usage readers behave in the real Envoy: envoy/lua/usage.lua (the gateway's reader) and,
for the comparison that chose it (docs/usage-accounting.md), the ext_proc candidate.

Envoy is a plain proxy here (no ext_authz, no rate limit) in front of the usage bench's
vLLM-shaped upstream (bench/usage/upstream.py), with a JSON access log of what the reader put into
`maas.usage`. `make bench-usage` measures the same configurations; these tests pin what they do:
the usage read, resets, stripping of an injected usage event, local replies, large requests, and
what a client sees when the reader itself fails.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.usage.children import Children
from bench.usage.client import Result, chat_body, one_request
from bench.usage.constants import PROMPT_TOKENS, USAGE_LUA, Json
from bench.usage.envoy import EXT_PROC_FILTER, Envoy, lua_filter, responder, start_envoy
from bench.usage.measure import stream_headers
from bench.usage.upstream import compact_json

pytestmark = pytest.mark.e2e

READERS = ("lua", "ext_proc")


class Rig:
    """The upstream (one for the module), and Envoys with a reader, each started once."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.children = Children(work)
        self.upstream = self.children.role("upstream", "upstream")[1]
        self.envoys: dict[str, Envoy] = {}
        self.counter = 0

    def envoy(self, name: str, filters: list[Json], extproc_port: int | None = None) -> Envoy:
        if name not in self.envoys:
            self.envoys[name] = start_envoy(
                self.children, self.work, name, filters, self.upstream, extproc_port=extproc_port
            )
        return self.envoys[name]

    def reader(self, config: str) -> Envoy:
        """A long-lived Envoy with `config`'s reader (baseline: none)."""
        if config == "ext_proc":
            if "ext_proc" not in self.envoys:
                _, port = self.children.role("extproc", "extproc")
                return self.envoy("ext_proc", [EXT_PROC_FILTER], port)
            return self.envoys["ext_proc"]
        return self.envoy(config, [lua_filter(USAGE_LUA)] if config == "lua" else [])

    def stop(self, envoy: Envoy) -> None:
        self.children.stop(envoy.service)
        self.envoys = {k: v for k, v in self.envoys.items() if v is not envoy}

    async def call(
        self,
        envoy: Envoy,
        body: bytes,
        headers: dict[str, str] | None = None,
        path: str = "/v1/chat/completions",
    ) -> tuple[Result, Json]:
        """One request, and the `maas.usage` its access log entry shows ({} for none)."""
        self.counter += 1
        request_id = f"t-{self.counter}"
        tagged = {**(headers or {}), "x-bench-id": request_id}
        result = await one_request(envoy.port, body, tagged, path)
        entry = envoy.entry(request_id) or {}
        return result, entry.get("usage") or {}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("usage-readers"))
    try:
        yield rig
    finally:
        rig.children.stop_all()


def charged(usage: Json, completion: int) -> bool:
    return (
        usage.get("outcome") == "charged"
        and usage.get("prompt_tokens") == PROMPT_TOKENS
        and usage.get("completion_tokens") == completion
    )


def incremental(result: Result) -> None:
    """A stream of 50 events 20 ms apart reached the client as it was produced, not at the end."""
    times = result.chunk_times
    assert result.complete
    assert len(times) >= 25, f"{len(times)} chunks"
    assert result.first_body < times[len(times) // 2] < result.last_byte


# --- the usage read ------------------------------------------------------------------------------

CASES = {
    "streamed, include_usage asked": (chat_body(True, True), stream_headers(30, 0), 30),
    "JSON answer (8 KB)": (chat_body(False), {"x-bench-json-bytes": "8192"}, 8192 // 4),
    "streamed, 256 KiB events (usage after 2 MB)": (
        chat_body(True, True), stream_headers(8, 0, 1 << 18), 8),
}  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize("config", READERS)
@pytest.mark.parametrize("case", list(CASES))
async def test_the_reader_puts_the_models_usage_into_metadata(
    rig: Rig, config: str, case: str
) -> None:
    body, headers, completion = CASES[case]
    result, usage = await rig.call(rig.reader(config), body, headers)
    assert result.complete and result.status == 200
    assert charged(usage, completion), usage


@pytest.mark.asyncio
@pytest.mark.parametrize("config", READERS)
async def test_an_upstream_reset_mid_stream_is_incomplete_and_charges_nothing(
    rig: Rig, config: str
) -> None:
    reset = {**stream_headers(30, 2), "x-bench-reset-after": "10"}
    result, usage = await rig.call(rig.reader(config), chat_body(True, True), reset)
    assert not result.complete
    assert usage.get("outcome") == "incomplete"
    assert "prompt_tokens" not in usage


@pytest.mark.asyncio
@pytest.mark.parametrize("config", READERS)
async def test_a_stream_goes_through_the_reader_incrementally(rig: Rig, config: str) -> None:
    result, _ = await rig.call(rig.reader(config), chat_body(True, True), stream_headers(50, 20))
    incremental(result)


# --- stripping an injected usage event (Lua) -----------------------------------------------------


@pytest.mark.asyncio
async def test_an_injected_usage_event_is_stripped_and_the_usage_charged(rig: Rig) -> None:
    not_asked = chat_body(True)
    result, usage = await rig.call(rig.reader("lua"), not_asked, stream_headers(30, 0))
    reference, _ = await rig.call(rig.reader("baseline"), not_asked, stream_headers(30, 0))
    assert result.headers.get("x-bench-saw-include-usage") == "true"  # injected upstream
    assert result.complete and b'"usage"' not in result.body
    assert result.body == reference.body  # the client gets the stream it asked for
    assert charged(usage, 30), usage
    assert usage.get("injected") == "true"


@pytest.mark.asyncio
async def test_stripping_keeps_the_delivery_incremental(rig: Rig) -> None:
    result, _ = await rig.call(rig.reader("lua"), chat_body(True), stream_headers(50, 20))
    incremental(result)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "headers",
    [{**stream_headers(10, 0), "x-bench-eol": "crlf"}, {"x-bench-mode": "json"}],
    ids=["SSE with CRLF line ends (sse-starlette)", "a 200 JSON answer to a streaming request"],
)
async def test_answers_that_are_not_lf_framed_sse_pass_untouched(
    rig: Rig, headers: dict[str, str]
) -> None:
    result, _ = await rig.call(rig.reader("lua"), chat_body(True), headers)
    reference, _ = await rig.call(rig.reader("baseline"), chat_body(True), headers)
    assert result.complete
    assert result.body.rstrip() == reference.body.rstrip()


@pytest.mark.asyncio
async def test_known_limit_an_unterminated_last_event_does_not_reach_the_client(rig: Rig) -> None:
    # docs/usage-accounting.md, known limit 6: bytes after the last blank line are dropped
    headers = {**stream_headers(10, 0), "x-bench-tail": "nonl"}
    result, _ = await rig.call(rig.reader("lua"), chat_body(True), headers)
    reference, _ = await rig.call(rig.reader("baseline"), chat_body(True), headers)
    assert result.complete
    # the baseline ends with the unterminated `data: [DONE]\n`; through the reader, nothing after
    # the last blank line arrives
    done = reference.body.rindex(b"data: [DONE]")
    assert reference.body[done:].strip() == b"data: [DONE]"
    assert result.body == reference.body[:done]


# --- large requests ------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("config", ["baseline", *READERS])
@pytest.mark.parametrize("stream", [False, True], ids=["JSON", "streaming"])
async def test_a_request_over_envoys_buffer_limit_is_served(
    rig: Rig, config: str, stream: bool
) -> None:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": "lorem ipsum " * 100_000}],  # 1.2 MB
        "stream": stream,
    }
    result, usage = await rig.call(
        rig.reader(config), compact_json(body).encode(), stream_headers(10, 0)
    )
    assert result.status == 200 and result.complete
    if config == "lua":
        # not read (over 512 KiB): nothing injected, so a stream that did not ask has no usage
        assert usage.get("outcome") == ("no_usage" if stream else "charged"), usage


# --- local replies -------------------------------------------------------------------------------

LOCAL_REPLIES = {  # path -> (status, outcome the Lua reader records)
    "/local401": (401, "client_error"),  # a direct_response at the router
    "/local429": (429, "rate_limited"),
    "/before403": (403, "client_error"),  # a filter before the reader (as ext_authz)
    "/after429": (429, "rate_limited"),  # a filter after it (as the rate limit filter)
}


@pytest.mark.asyncio
@pytest.mark.parametrize("config", ["baseline", *READERS])
async def test_the_reader_runs_on_every_local_reply(rig: Rig, config: str) -> None:
    extproc_port = None
    reader: list[Json] = []
    if config == "ext_proc":
        _, extproc_port = rig.children.role("extproc", "extproc-local")
        reader = [EXT_PROC_FILTER]
    elif config == "lua":
        reader = [lua_filter(USAGE_LUA)]
    filters = [responder("/before403", 403), *reader, responder("/after429", 429)]
    envoy = rig.envoy(f"local-{config}", filters, extproc_port)
    for path, (status, outcome) in LOCAL_REPLIES.items():
        before = envoy.stats().get("http.bench.ext_proc.streams_started", 0)
        result, usage = await rig.call(envoy, chat_body(False), path=path)
        started = envoy.stats().get("http.bench.ext_proc.streams_started", 0) - before
        assert result.status == status, path
        if config == "lua":
            assert usage.get("outcome") == outcome, path
        elif config == "ext_proc":
            assert started == 1, path
        else:
            assert usage == {}, path


# --- a failing Lua reader: the client never notices; the usage is lost --------------------------

BROKEN = {  # where error("boom") goes (after the line that matches) -> outcome per request
    "envoy_on_response": (
        r"function envoy_on_response\(handle\)\n",
        {"asked": None, "injected": None, "json": None},
    ),
    "envoy_on_request": (
        r"function envoy_on_request\(handle\)\n",
        {"asked": "charged", "injected": "no_usage", "json": "charged"},
    ),
    "bodyChunks": (
        r"for chunk in handle:bodyChunks\(\) do\n",
        {"asked": "incomplete", "injected": "incomplete", "json": "incomplete"},
    ),
}
REQUESTS = {
    "asked": (chat_body(True, True), stream_headers(30, 5)),
    "injected": (chat_body(True), stream_headers(30, 5)),
    "json": (chat_body(False), {"x-bench-json-bytes": "4096"}),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("where", list(BROKEN))
async def test_a_lua_runtime_error_never_reaches_the_client(rig: Rig, where: str) -> None:
    pattern, outcomes = BROKEN[where]
    patched, n = re.subn(pattern, lambda m: m.group(0) + '  error("boom")\n', USAGE_LUA.read_text())
    assert n == 1, f"usage.lua changed: {pattern!r} matched {n} times"
    script = rig.work / f"usage-broken-{where}.lua"
    script.write_text(patched)
    envoy = rig.envoy(f"lua-broken-{where}", [lua_filter(script)])
    for request, (body, headers) in REQUESTS.items():
        errors = envoy.stats().get("http.bench.lua.errors", 0)
        result, usage = await rig.call(envoy, body, headers)
        assert envoy.stats().get("http.bench.lua.errors", 0) > errors, request
        assert result.status == 200 and result.complete, request
        assert usage.get("outcome") == outcomes[request], (request, usage)
    assert envoy.log_lines("boom")
    rig.stop(envoy)


# --- a failing ext_proc server: what the comparison found -----------------------------------------


def extproc_filter(fail_open: bool) -> Json:
    config: Json = json.loads(json.dumps(EXT_PROC_FILTER))
    config["typed_config"]["failure_mode_allow"] = fail_open
    return config


def mode(fail_open: bool) -> str:
    return "fail-open" if fail_open else "fail-closed"


@pytest.mark.asyncio
@pytest.mark.parametrize("fail_open", [False, True], ids=mode)
async def test_an_extproc_server_stopped(rig: Rig, fail_open: bool) -> None:
    server, port = rig.children.role("extproc", f"extproc-down-{mode(fail_open)}")
    envoy = rig.envoy(f"extproc-down-{mode(fail_open)}", [extproc_filter(fail_open)], port)
    result, usage = await rig.call(envoy, chat_body(True, True), stream_headers(10, 0))
    assert result.status == 200 and charged(usage, 10)
    rig.children.stop(server)
    cases = {
        "streamed": (chat_body(True, True), stream_headers(10, 0), "/v1/chat/completions", 200),
        "JSON": (chat_body(False), {}, "/v1/chat/completions", 200),
        "local 401": (chat_body(False), {}, "/local401", 401),  # as an ext_authz denial
    }
    for request, (body, headers, path, status) in cases.items():
        result, usage = await rig.call(envoy, body, headers, path=path)
        # fail-closed turns its outage into 500s, local replies included; fail-open loses usage
        assert result.status == (status if fail_open else 500), request
        assert result.complete and usage.get("outcome") != "charged", request
    if not fail_open:  # Envoy reconnects once the server is back on its port
        rig.children.role("extproc", f"extproc-back-{mode(fail_open)}", port=port)
        await asyncio.sleep(0.3)
        result, usage = await rig.call(envoy, chat_body(True, True), stream_headers(10, 0))
        assert result.status == 200 and charged(usage, 10)
    rig.stop(envoy)


@pytest.mark.asyncio
@pytest.mark.parametrize("fail_open", [False, True], ids=mode)
@pytest.mark.parametrize(
    "fault",
    ["killed 0.5 s into a 2 s stream", "400 ms late on one chunk (message_timeout 200 ms)"],
)
async def test_an_extproc_server_failing_mid_stream(rig: Rig, fail_open: bool, fault: str) -> None:
    name = f"extproc-{'kill' if 'killed' in fault else 'stall'}-{mode(fail_open)}"
    extra: tuple[str, ...] = ()
    if "late" in fault:
        extra = ("--stall-after", "5", "--stall-ms", "400")
    server, port = rig.children.role("extproc", name, *extra)
    envoy = rig.envoy(name, [extproc_filter(fail_open)], port)
    if "killed" in fault:
        call = asyncio.create_task(rig.call(envoy, chat_body(True, True), stream_headers(100, 20)))
        await asyncio.sleep(0.5)
        rig.children.stop(server, signal.SIGKILL)
        result, usage = await call
    else:
        result, usage = await rig.call(envoy, chat_body(True, True), stream_headers(30, 5))
    assert result.status == 200  # the headers had gone out
    # fail-closed cuts a stream the client was already reading; fail-open finishes it
    assert result.complete is fail_open
    assert usage.get("outcome") == "incomplete"
    rig.children.stop(server)
    rig.stop(envoy)

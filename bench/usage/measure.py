"""The measurements: latency and CPU of each usage reader against the plain proxy."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Service
from bench.usage.children import Children
from bench.usage.client import Client, Result, chat_body, one_request
from bench.usage.constants import (
    USAGE_LUA,
    Json,
)
from bench.usage.envoy import EXT_PROC_FILTER, Envoy, lua_filter, start_envoy


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def dist(values: list[float]) -> Json:
    ms = [v * 1000 for v in values] or [math.nan]
    return {
        "n": len(values),
        "p50_ms": statistics.median(ms),
        "p99_ms": pct(ms, 0.99),
        "mean_ms": statistics.fmean(ms),
        "min_ms": min(ms),
    }


@dataclass
class Params:
    rounds: int  # each configuration is started once per round; rounds interleave configurations
    stream_requests: int  # per row per round
    stream_events: int
    stream_delay_ms: float
    json_requests: int
    json_bytes: int
    bulk_mb: int
    bulk_event_bytes: int
    bulk_requests: int
    cpu_only_requests: int  # token streams for the rows measured for CPU only
    warmup: int


def stream_headers(events: int, delay_ms: float, event_bytes: int = 0) -> dict[str, str]:
    headers = {"x-bench-events": str(events), "x-bench-delay-ms": str(delay_ms)}
    if event_bytes:
        headers["x-bench-event-bytes"] = str(event_bytes)
    return headers


@dataclass
class Row:
    name: str
    config: str  # which Envoy serves it
    body: bytes  # what the client sends
    latency: bool  # measured for latency; else for CPU only


def prefilter_lua(work: Path) -> Path:
    """usage.lua with a cheaper Scanner:feed, measured for CPU only (a proposal, not the product).

    When the text holds no `"usage"` at all (almost every chunk), a plain string.find says so
    without the Lua pattern scan, and only the last 6 bytes (a possibly split `"usage"` key) are
    kept instead of a 4 KiB tail that every later chunk would scan again.
    """
    source = USAGE_LUA.read_text()
    anchor = "function Scanner:feed(chunk)\n  local text = self.tail .. chunk\n"
    if source.count(anchor) != 1:
        raise RuntimeError("usage.lua's Scanner:feed changed; update prefilter_lua()")
    patched = source.replace(
        anchor,
        anchor
        + "  if not text:find('\"usage\"', 1, true) then -- bench: the proposed fast path\n"
        + "    self.tail = text:sub(-6)\n"
        + "    return\n"
        + "  end\n",
    )
    path = work / "usage-prefilter.lua"
    path.write_text(patched)
    return path


@dataclass
class Sample:
    """Sequential requests through one Envoy: client timings and the CPU the processes used."""

    results: list[Result]
    bytes: int
    wall_s: float
    envoy_cpu_s: float
    extproc_cpu_s: float
    extproc_msgs: int

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not (r.complete and r.status == 200))


async def run_requests(
    envoy: Envoy,
    extproc: Service | None,
    body: bytes,
    headers: dict[str, str],
    count: int,
    *,
    warmup: int,
) -> Sample:
    client = Client(envoy.port)
    try:
        for _ in range(warmup):
            await client.request("/v1/chat/completions", body, headers, keep_body=False)
        stats = envoy.stats()
        envoy_cpu = envoy.cpu()
        extproc_cpu = extproc.cpu() if extproc else 0.0
        wall = time.perf_counter()
        results = [
            await client.request("/v1/chat/completions", body, headers, keep_body=False)
            for _ in range(count)
        ]
        wall = time.perf_counter() - wall
        envoy_cpu = envoy.cpu() - envoy_cpu
        extproc_cpu = (extproc.cpu() - extproc_cpu) if extproc else 0.0
    finally:
        await client.close()
    sent = envoy.stats().get("http.bench.ext_proc.stream_msgs_sent", 0)
    return Sample(
        results=results,
        bytes=sum(r.nbytes for r in results),
        wall_s=wall,
        envoy_cpu_s=envoy_cpu,
        extproc_cpu_s=extproc_cpu,
        extproc_msgs=sent - stats.get("http.bench.ext_proc.stream_msgs_sent", 0),
    )


def cpu_row(samples: list[Sample]) -> Json:
    requests = sum(len(s.results) for s in samples)
    mb = sum(s.bytes for s in samples) / (1 << 20)
    envoy_s = sum(s.envoy_cpu_s for s in samples)
    extproc_s = sum(s.extproc_cpu_s for s in samples)
    return {
        "requests": requests,
        "failed": sum(s.failed for s in samples),
        "mb": mb,
        "wall_s": sum(s.wall_s for s in samples),
        "mb_per_s": mb / sum(s.wall_s for s in samples),
        "envoy_us_per_mb": envoy_s * 1e6 / mb,
        "extproc_us_per_mb": extproc_s * 1e6 / mb,
        "total_us_per_mb": (envoy_s + extproc_s) * 1e6 / mb,
        "envoy_us_per_request": envoy_s * 1e6 / requests,
        "extproc_us_per_request": extproc_s * 1e6 / requests,
        "total_us_per_request": (envoy_s + extproc_s) * 1e6 / requests,
        "extproc_msgs_per_request": sum(s.extproc_msgs for s in samples) / requests,
    }


def latency_table(results: dict[str, list[Result]]) -> Json:
    table: Json = {}
    for row, values in results.items():
        ok = [r for r in values if r.complete and r.status == 200]
        table[row] = {
            "failed": len(values) - len(ok),
            "first_byte": dist([r.first_byte for r in ok]),
            "first_event": dist([r.first_body for r in ok]),
            "last_byte": dist([r.last_byte for r in ok]),
        }
    base = table["baseline"]
    for row in table.values():
        for metric in ("first_byte", "first_event", "last_byte"):
            for q in ("p50_ms", "p99_ms"):
                row[metric][f"added_{q}"] = row[metric][q] - base[metric][q]
    return table


def with_extra(table: Json) -> Json:
    base = table["baseline"]
    for row in table.values():
        row["extra_us_per_mb"] = row["total_us_per_mb"] - base["total_us_per_mb"]
        row["extra_us_per_request"] = row["total_us_per_request"] - base["total_us_per_request"]
    return table


async def measure(children: Children, work: Path, upstream: int, p: Params) -> Json:
    small = stream_headers(p.stream_events, p.stream_delay_ms)
    bulk_events = p.bulk_mb * (1 << 20) // p.bulk_event_bytes
    bulk = stream_headers(bulk_events, 0, event_bytes=p.bulk_event_bytes)
    json_headers = {"x-bench-json-bytes": str(p.json_bytes)}
    asked = chat_body(stream=True, include_usage=True)
    rows = [
        Row("baseline", "baseline", asked, latency=True),
        Row("lua", "lua", asked, latency=True),
        Row("lua+inject", "lua", chat_body(stream=True), latency=True),
        Row("lua-prefilter", "lua-prefilter", asked, latency=False),
        Row("ext_proc", "ext_proc", asked, latency=True),
    ]
    filters: dict[str, list[Json]] = {
        "baseline": [],
        "lua": [lua_filter(USAGE_LUA)],
        "lua-prefilter": [lua_filter(prefilter_lua(work))],
        "ext_proc": [EXT_PROC_FILTER],
    }
    streamed: dict[str, list[Result]] = {r.name: [] for r in rows if r.latency}
    answered: dict[str, list[Result]] = {c: [] for c in ("baseline", "lua", "ext_proc")}
    stream_cpu: dict[str, list[Sample]] = {r.name: [] for r in rows}
    bulk_cpu: dict[str, list[Sample]] = {r.name: [] for r in rows}
    usage_seen: dict[str, Json] = {}
    for round_ in range(p.rounds):
        for config, config_filters in filters.items():
            extproc, extproc_port = None, None
            if config == "ext_proc":
                extproc, extproc_port = children.role("extproc", "extproc")
            envoy = start_envoy(
                children,
                work,
                f"perf-{config}",
                config_filters,
                upstream,
                extproc_port=extproc_port,
            )
            try:
                for row in (r for r in rows if r.config == config):
                    # one tagged request: the access log shows the usage this reader produced
                    tag = f"check-{row.name}"
                    await one_request(envoy.port, row.body, {**small, "x-bench-id": tag})
                    usage_seen[row.name] = (envoy.entry(tag) or {}).get("usage") or {}
                    count = p.stream_requests if row.latency else p.cpu_only_requests
                    print(f"  round {round_ + 1}: {row.name}: {count} token streams", flush=True)
                    sample = await run_requests(
                        envoy, extproc, row.body, small, count, warmup=p.warmup
                    )
                    stream_cpu[row.name].append(sample)
                    if row.latency:
                        streamed[row.name] += sample.results
                    print(f"  round {round_ + 1}: {row.name}: {p.bulk_requests} bulk", flush=True)
                    bulk_cpu[row.name].append(
                        await run_requests(
                            envoy, extproc, row.body, bulk, p.bulk_requests, warmup=1
                        )
                    )
                if config in answered:
                    print(f"  round {round_ + 1}: {config}: {p.json_requests} JSON", flush=True)
                    sample = await run_requests(
                        envoy, extproc, chat_body(stream=False), json_headers, p.json_requests,
                        warmup=p.warmup,
                    )  # fmt: skip
                    answered[config] += sample.results
            finally:
                children.stop(envoy.service)
                if extproc is not None:
                    children.stop(extproc)
    return {
        "latency_stream": latency_table(streamed),
        "latency_json": latency_table(answered),
        "cpu_stream": with_extra({name: cpu_row(s) for name, s in stream_cpu.items()}),
        "cpu_bulk": with_extra({name: cpu_row(s) for name, s in bulk_cpu.items()}),
        "usage_metadata_seen": usage_seen,
    }

"""The tables `make bench-usage` prints."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import subprocess
from pathlib import Path

from bench.usage.constants import (
    REPO,
    USAGE_LUA,
    Json,
)


def _fmt(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def _cell(d: Json, q: str) -> str:
    return f"{_fmt(d[q + '_ms'])} ({d['added_' + q + '_ms']:+.2f})"


def _latency_rows(table: Json, metrics: list[str]) -> list[str]:
    titles = [f"{m.replace('_', ' ')} {q}" for m in metrics for q in ("p50", "p99")]
    lines = ["| row | " + " | ".join(titles) + " | failed |", "|---|" + "---:|" * (len(titles) + 1)]
    for row, values in table.items():
        cells = [_cell(values[m], q) for m in metrics for q in ("p50", "p99")]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {values['failed']} |")
    return lines


def _show(value: object) -> str:
    """maas.usage, short: `charged 17+30` (prompt+completion), `incomplete`, `injected`, or -."""
    if not isinstance(value, dict) or not value:
        return "-"
    parts = [str(value.get("outcome", "(no outcome)"))]
    if "prompt_tokens" in value:
        parts.append(f"{value['prompt_tokens']}+{value.get('completion_tokens')}")
    if value.get("injected") == "true":
        parts.append("(injected)")
    return " ".join(parts)


def render(report: Json) -> str:
    p = report["params"]
    out = [
        f"Streamed latency, ms (added vs baseline): {p['stream_events']} events "
        f"{p['stream_delay_ms']:g} ms apart, {p['rounds'] * p['stream_requests']} sequential "
        "requests per row",
        *_latency_rows(report["latency_stream"], ["first_byte", "first_event", "last_byte"]),
        "",
        f"JSON latency, ms (added vs baseline): {p['json_bytes']} B answer, "
        f"{p['rounds'] * p['json_requests']} sequential requests per row",
        *_latency_rows(report["latency_json"], ["first_byte", "last_byte"]),
        "",
        f"CPU per token stream ({p['stream_events']} events, ~200 B each, "
        f"{p['stream_delay_ms']:g} ms apart), µs of CPU per request",
        "| row | Envoy | ext_proc server | total | extra vs baseline | extra per MB "
        "| ext_proc msgs/request | requests | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, c in report["cpu_stream"].items():
        out.append(
            f"| {row} | {c['envoy_us_per_request']:.0f} | {c['extproc_us_per_request']:.0f} "
            f"| {c['total_us_per_request']:.0f} | {c['extra_us_per_request']:+.0f} "
            f"| {c['extra_us_per_mb']:+.0f} | {c['extproc_msgs_per_request']:.1f} "
            f"| {c['requests']} | {c['failed']} |"
        )
    out += [
        "",
        f"CPU per MB, bulk: {p['bulk_mb']} MB streamed in {p['bulk_event_bytes'] // 1024} KiB "
        f"events, no delay, {p['rounds'] * p['bulk_requests']} requests per row",
        "| row | MB/s | Envoy µs/MB | ext_proc µs/MB | total µs/MB | extra vs baseline µs/MB "
        "| ext_proc msgs/request | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, c in report["cpu_bulk"].items():
        out.append(
            f"| {row} | {c['mb_per_s']:.0f} | {c['envoy_us_per_mb']:.0f} "
            f"| {c['extproc_us_per_mb']:.0f} | {c['total_us_per_mb']:.0f} "
            f"| {c['extra_us_per_mb']:+.0f} | {c['extproc_msgs_per_request']:.1f} "
            f"| {c['failed']} |"
        )
    out += [
        "",
        "maas.usage each reader produced (one tagged request per row; prompt+completion):",
        *(f"- {row}: {_show(usage)}" for row, usage in report["usage_metadata_seen"].items()),
    ]
    # a blank line between a title and its table or list: the output pastes into Markdown
    spaced: list[str] = []
    for line in out:
        after_title = spaced and spaced[-1] and not spaced[-1].startswith(("|", "- "))
        if after_title and line.startswith(("|", "- ")):
            spaced.append("")
        spaced.append(line)
    return "\n".join(spaced)


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def machine() -> Json:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from maas_demo.envoy import find_envoy  # noqa: PLC0415

    version = subprocess.run(
        [str(find_envoy()), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    tracked = subprocess.run(
        ["git", "diff", "--quiet", "HEAD", "--", str(USAGE_LUA)], cwd=REPO, check=False
    ).returncode
    return {
        "usage_lua_sha256": hashlib.sha256(USAGE_LUA.read_bytes()).hexdigest(),
        "usage_lua_as_committed": tracked == 0,
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "loadavg": loadavg(),
        "python": platform.python_version(),
        "envoy": version.rsplit(" ", 1)[-1],
        "kernel": platform.release(),
    }

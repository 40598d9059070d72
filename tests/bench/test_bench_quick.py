"""`make bench-quick` runs every scenario and produces its table, JSON and chart (so it never rots).

Benchmarks are not tests: the figures and whether floors were met are not asserted here, only that
each scenario ran to the end, measured something and reported it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import SCENARIOS

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def run_quick(module: str, out: Path) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE --quick --out OUT`, which must succeed."""
    run = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr[-4000:]}"
    return run


def test_quick_bench_runs_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    run = run_quick("bench", out)
    header = run.stdout.splitlines()[0].split()
    assert header[:5] == ["scenario", "metric", "ours", "baseline", "ratio"]
    assert f"wrote {out / 'bench.json'}" in run.stdout

    document = json.loads((out / "bench.json").read_text())
    assert document["mode"] == "quick"
    assert document["failed"] == []
    assert set(document["scenarios"]) == set(SCENARIOS)
    assert all(count > 0 for count in document["scenarios"].values()), document["scenarios"]
    for figure in document["figures"]:
        assert math.isfinite(figure["value"]), figure
        if figure["floor"] is not None:
            assert figure["met"] in (True, False), figure
    assert any(f["ratio"] is not None for f in document["figures"])
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_usage_bench_measures_every_reader(tmp_path: Path) -> None:
    out = tmp_path / "usage.json"
    run_quick("bench.usage", out)
    document = json.loads(out.read_text())
    assert document["machine"]["usage_lua_as_committed"] is True
    assert set(document["latency_stream"]) == {"baseline", "lua", "lua+inject", "ext_proc"}
    for table in ("latency_stream", "latency_json"):
        for row, figures in document[table].items():
            assert figures["failed"] == 0, (table, row)
            assert math.isfinite(figures["first_byte"]["p50_ms"]), (table, row)
    for table in ("cpu_stream", "cpu_bulk"):
        for row, figures in document[table].items():
            assert figures["failed"] == 0 and figures["requests"] > 0, (table, row)
    # every reader (not the baseline) read the one tagged request's usage
    seen = document["usage_metadata_seen"]
    assert seen["baseline"] == {}
    assert all(seen[r].get("outcome") == "charged" for r in seen if r != "baseline"), seen

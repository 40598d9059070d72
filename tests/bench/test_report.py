"""The bench report: ratios, floors, the table and the files it writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.report import Figure, Floor, table, write_chart, write_json


def test_ratio_and_floor_on_ratio() -> None:
    figure = Figure("Check", "throughput", "calls/s", 900.0, 1000.0, "noop", Floor(">=", 0.8))
    assert figure.ratio == 0.9
    assert figure.met is True
    slower = Figure("Check", "throughput", "calls/s", 700.0, 1000.0, "noop", Floor(">=", 0.8))
    assert slower.met is False


def test_floor_on_value_and_missing_baseline() -> None:
    exact = Figure("cold", "TokenReviews per token", "", 1.0, floor=Floor("==", 1), on_ratio=False)
    assert exact.ratio is None
    assert exact.met is True
    assert (
        Figure("cold", "TokenReviews", "", 2.0, floor=Floor("==", 1), on_ratio=False).met is False
    )
    # a floor on a ratio that cannot be computed is unknown, not met
    assert Figure("x", "y", "", 1.0, 0.0, "b", Floor(">=", 0.8)).met is None
    assert Figure("x", "y", "", math.nan, floor=Floor("<=", 300), on_ratio=False).met is False


def test_table_shows_ratio_floor_verdict_and_notes() -> None:
    rows = [
        Figure("Check", "throughput", "calls/s", 4500.0, 5000.0, "noop", Floor(">=", 0.8),
               note="h2load used 20% of a core"),
        Figure("Check", "CPU per call", "µs", 300.0, 200.0, "noop", Floor("<=", 1.25)),
    ]  # fmt: skip
    text = table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["scenario", "metric"]
    assert "0.90x" in lines[2] and "yes" in lines[2] and "4,500" in lines[2]
    assert "1.50x" in lines[3] and "NO" in lines[3]
    assert lines[-1] == "[1] h2load used 20% of a core"


def test_json_and_chart_files(tmp_path: Path) -> None:
    rows = [Figure("Check", "throughput", "calls/s", 4500.0, 5000.0, "noop", Floor(">=", 0.8))]
    write_json(tmp_path / "b.json", rows, {"mode": "quick"})
    document = json.loads((tmp_path / "b.json").read_text())
    assert document["mode"] == "quick"
    assert document["figures"][0]["ratio"] == 0.9
    assert document["figures"][0]["floor"] == ">= 0.8"
    assert document["figures"][0]["met"] is True
    write_chart(tmp_path / "b.png", rows)
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""Figures, each paired with its baseline from the same run, and how they are written out."""

from __future__ import annotations

import json
import math
import operator
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
}


@dataclass(frozen=True)
class Floor:
    """What the ratio (or, without a baseline, the value) must satisfy, e.g. Floor(">=", 0.8)."""

    op: str
    bound: float

    def met(self, figure: float) -> bool:
        return not math.isnan(figure) and _COMPARE[self.op](figure, self.bound)

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}"


@dataclass(frozen=True)
class Figure:
    scenario: str  # what ran, e.g. "Check, static key"
    metric: str  # what was measured, e.g. "throughput at saturation"
    unit: str
    value: float
    baseline: float | None = None  # the same metric for the baseline, same run
    baseline_name: str = ""
    floor: Floor | None = None
    on_ratio: bool = True  # the floor applies to value/baseline (else to the value itself)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0 or math.isnan(self.baseline):
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        if self.floor is None:
            return None
        subject = self.ratio if self.on_ratio else self.value
        return None if subject is None else self.floor.met(subject)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["floor"] = str(self.floor) if self.floor else None
        out["floor_applies_to"] = "ratio" if self.on_ratio else "value"
        out["ratio"] = self.ratio
        out["met"] = self.met
        return out


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(figures: Sequence[Figure]) -> str:
    """A fixed-width table; notes (load generator CPU, caveats) listed under it, numbered."""
    header = ("scenario", "metric", "ours", "baseline", "ratio", "floor", "met", "baseline is")
    rows = [header]
    notes: list[str] = []
    for f in figures:
        ratio = f.ratio
        metric = f"{f.metric} ({f.unit})" if f.unit else f.metric
        if f.note:
            notes.append(f.note)
            metric += f" [{len(notes)}]"
        rows.append(
            (
                f.scenario,
                metric,
                _num(f.value),
                _num(f.baseline),
                "-" if ratio is None else f"{ratio:.2f}x",
                "-" if f.floor is None else f"{'ratio' if f.on_ratio else 'value'} {f.floor}",
                {True: "yes", False: "NO", None: "-"}[f.met],
                f.baseline_name,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [f"[{n}] {note}" for n, note in enumerate(notes, 1)]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
    }


def write_json(path: Path, figures: Sequence[Figure], extra: dict[str, Any]) -> None:
    document = {"environment": environment(), **extra, "figures": [f.as_json() for f in figures]}
    path.write_text(json.dumps(document, indent=2) + "\n")


def _label(figure: Figure, width: int = 64) -> str:
    text = f"{figure.scenario}: {figure.metric}"
    return text if len(text) <= width else text[: width - 1] + "…"


def write_chart(path: Path, figures: Sequence[Figure]) -> None:
    """Each figure with a baseline as its ratio to the baseline, on a log scale (ratios here run
    from ~0.1 to ~50); a line from 1 to the ratio, floors on the ratio as black ticks."""
    import matplotlib  # noqa: PLC0415 - heavy, and only needed for the chart

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt  # noqa: PLC0415

    paired = [f for f in figures if f.ratio]
    if not paired:
        return
    fig, ax = plt.subplots(figsize=(12, 0.3 * len(paired) + 1.4))
    ratios = [f.ratio or 1.0 for f in paired]
    colours = [{False: "#c0392b", None: "#5d8aa8", True: "#27ae60"}[f.met] for f in paired]
    rows = list(range(len(paired)))
    ax.hlines(rows, [1.0] * len(rows), ratios, colors=colours, lw=3)
    ax.scatter(ratios, rows, color=colours, zorder=3, s=18)
    column = matplotlib.transforms.blended_transform_factory(ax.transAxes, ax.transData)
    for i, f in enumerate(paired):
        if f.floor is not None and f.on_ratio:
            ax.plot([f.floor.bound] * 2, [i - 0.4, i + 0.4], color="black", lw=2)
        # in a column right of the plot: next to the dots they collide with the floor ticks
        ax.text(1.01, i, f"{ratios[i]:.2f}x", transform=column, fontsize=7, va="center")
    ax.set_xscale("log")
    ax.set_xlim(min(0.5, min(ratios) * 0.8), max(2.0, max(ratios) * 1.6))
    ax.set_yticks(rows, [_label(f) for f in paired], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("ours / baseline (same run, log scale); black tick: floor; green met, red missed")
    ax.set_title("maas-gateway policy plane against its floor")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # tight_layout alone clips long labels
    plt.close(fig)

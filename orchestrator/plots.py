"""Metric charts, drawn with matplotlib (the Agg backend: no display, no GUI toolkit) into PNG or SVG.

The only module that imports matplotlib, and only when a chart is drawn: `pipe` starts without it. A chart has
one line per metric (a point per run), its gate's thresholds as dashed lines and the promoted run as a star.
Each metric's line carries the SVG id `series-<metric>`, so a test or the web UI can find its points.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.store.records import iso_utc

FORMATS = ("png", "svg")
_INSTALL = "charts need matplotlib: pip install 'pipe-orchestrator[plots]'"


@dataclass(frozen=True)
class Point:
    run_id: str
    number: int  # the run's position in the pipeline's history, from 1
    started_at: datetime
    value: float


@dataclass(frozen=True)
class Series:
    name: str
    points: list[Point]  # oldest first
    gates: list[tuple[str, float]] = field(default_factory=list)  # (label, threshold) lines to draw


@dataclass(frozen=True)
class PlotData:
    series: list[Series]
    promoted: str | None  # the promoted run's id (marked), see promoted_run

    def to_json(self) -> dict[str, Any]:
        return {"promoted": self.promoted, "series": [
            {"name": s.name, "gates": [{"label": label, "value": v} for label, v in s.gates],
             "points": [{"run_id": p.run_id, "number": p.number, "value": p.value,
                         "started_at": iso_utc(p.started_at)}
                        for p in s.points]} for s in self.series]}




def write(data: PlotData, out: Path, x: str = "run") -> None:
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise UsageError(f"{out}: write a .png or a .svg")
    out.write_bytes(render(data, fmt, x))


def svg(data: PlotData, x: str = "run", width: float = 8.0, height: float = 3.6) -> str:
    """The chart as an <svg> element to put inline in HTML: no XML prolog, DOCTYPE or metadata (so no URL)."""
    text = render(data, "svg", x, width, height).decode("utf-8")
    text = text[text.index("<svg"):]
    for namespace in (' xmlns:xlink="http://www.w3.org/1999/xlink"', ' xmlns="http://www.w3.org/2000/svg"'):
        text = text.replace(namespace, "", 1)  # HTML knows both: inline, the page names no URL at all
    return text


def render(data: PlotData, fmt: str, x: str = "run", width: float = 8.0, height: float = 3.6) -> bytes:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(width, height), dpi=100)
    try:
        _draw(axes, data, x)
        figure.tight_layout()
        buffer = io.BytesIO()
        metadata: dict[str, Any] = {"Date": None, "Creator": None} if fmt == "svg" else {"Software": None}
        if fmt == "svg":
            metadata |= {"Format": None, "Type": None}
        figure.savefig(buffer, format=fmt, metadata=metadata)
        return buffer.getvalue()
    finally:
        plt.close(figure)


def _draw(axes: Any, data: PlotData, x: str) -> None:
    by_time = x == "time"
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    for i, series in enumerate(data.series):
        if not series.points:
            continue
        colour = colours[i % len(colours)]
        xs = [p.started_at if by_time else p.number for p in series.points]
        ys = [p.value for p in series.points]
        (line,) = axes.plot(xs, ys, marker="o", markersize=4, color=colour, label=series.name)
        line.set_gid(f"series-{series.name}")
        for label, value in series.gates:
            gate = axes.axhline(value, linestyle="--", linewidth=1, color=colour, alpha=0.7)
            gate.set_gid(f"gate-{series.name}")
            axes.annotate(label, xy=(0.0, value), xycoords=("axes fraction", "data"), fontsize=7, color=colour,
                          xytext=(2, 2), textcoords="offset points")
        promoted = [(xv, yv) for xv, yv, p in zip(xs, ys, series.points, strict=True) if p.run_id == data.promoted]
        if promoted:
            (star,) = axes.plot([promoted[0][0]], [promoted[0][1]], marker="*", markersize=14, color="#f5b700",
                                markeredgecolor="black", linestyle="none",
                                label="promoted" if i == 0 else "_promoted")
            star.set_gid(f"promoted-{series.name}")
    axes.set_xlabel("run time" if by_time else "run number")
    axes.grid(True, alpha=0.3)
    if by_time:
        axes.figure.autofmt_xdate()
    else:
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(s.points for s in data.series):
        axes.legend(fontsize=8, loc="best")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError(_INSTALL) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True

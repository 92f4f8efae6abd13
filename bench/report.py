"""Bench: statistics and reports -- JSON, a Markdown table, PNG plots (matplotlib, Agg).

Every scenario returns one dict: ``scenario``, ``params``, ``systems`` (one row of numbers
per system), ``targets`` (``{name: {"value", "target", "met"}}``), ``series`` (time series
for the plots, down-sampled), ``table_md``. ``write`` stores it as ``<scenario>.json`` and
``<scenario>.md`` and draws ``<scenario>*.png``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.loadgen import Sample

Point = tuple[float, float]
SERIES_MAX_POINTS = 1500


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_ms(samples: Iterable[Sample]) -> dict[str, float | None]:
    """p50/p95/p99/max latency in ms of the successful samples."""
    values = [s.latency * 1000.0 for s in samples if s.ok]
    return {
        "p50_ms": _round(percentile(values, 50)),
        "p95_ms": _round(percentile(values, 95)),
        "p99_ms": _round(percentile(values, 99)),
        "max_ms": _round(max(values) if values else None),
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def errors_by_kind(samples: Iterable[Sample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            key = s.error or f"http_{s.status}"
            out[key] = out.get(key, 0) + 1
    return out


def downsample(points: Sequence[Point], max_points: int = SERIES_MAX_POINTS) -> list[Point]:
    """Every k-th point so at most ``max_points`` remain (rounded for small JSON)."""
    step = max(1, math.ceil(len(points) / max_points))
    return [(round(t, 3), round(v, 3)) for t, v in points[::step]]


# --------------------------------------------------------------------------- targets


def target(value: float | None, *, text: str, ok: Callable[[float], bool]) -> dict[str, Any]:
    """One target: its measured value, what it should be, whether it is met."""
    return {
        "value": None if value is None else round(float(value), 4),
        "target": text,
        "met": bool(value is not None and ok(float(value))),
    }


# --------------------------------------------------------------------------- markdown


Column = tuple[str, str, str]  # (key in the row, header, format spec)


def fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def markdown_table(rows: dict[str, dict[str, Any]], columns: Sequence[Column]) -> str:
    header = "| system | " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|---|" + "|".join("---:" for _ in columns) + "|"
    lines = [header, rule]
    notes: list[str] = []
    for name, row in rows.items():
        why = row.get("skipped") or row.get("error")
        if why:
            notes.append(f"- {name}: not measured: {str(why).splitlines()[0]}")
            lines.append(f"| {name} | " + " | ".join("–" for _ in columns) + " |")
            continue
        cells = [fmt(row.get(key), spec) for key, _, spec in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def targets_table(targets: dict[str, dict[str, Any]]) -> str:
    lines = ["| target | value | wanted | met |", "|---|---:|---|:---:|"]
    for name, t in targets.items():
        mark = "yes" if t["met"] else ("**no**" if t["value"] is not None else "not measured")
        lines.append(f"| {name} | {fmt(t['value'], '.4g')} | {t['target']} | {mark} |")
    return "\n".join(lines)


def scenario_markdown(result: dict[str, Any]) -> str:
    parts = [f"### {result['scenario']}", "", result.get("description", ""), ""]
    if result.get("table_md"):
        parts += [result["table_md"], ""]
    parts += [targets_table(result.get("targets", {})), ""]
    for note in result.get("notes", []):
        parts.append(f"- {note}")
    for plot in result.get("plots", []):
        parts.append(f"\n![{plot}]({plot})")
    return "\n".join(parts).rstrip() + "\n"


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib: float | None = None
    try:
        import psutil

        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": mem_gib,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
        return res.stdout.strip() or "?"
    except OSError:
        return "?"


# --------------------------------------------------------------------------- files


def write(result: dict[str, Any], out_dir: Path) -> Path:
    """Write ``<scenario>.json`` and ``<scenario>.md``; return the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = result["scenario"]
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(scenario_markdown(result))
    return path


def plot_panels(
    out_path: Path,
    *,
    title: str,
    panels: Sequence[tuple[str, str, dict[str, Sequence[Point]], str]],
) -> Path:
    """One PNG, one panel per (title, y-label, {system: points}, style 'line'|'dots')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), squeeze=False)
    for ax, (name, ylabel, series, style) in zip(axes[:, 0], panels, strict=True):
        for system, points in series.items():
            if not points:
                continue
            xs = [p[0] for p in points]
            ys = [p[1] for p in points]
            if style == "dots":
                ax.scatter(xs, ys, s=3, alpha=0.5, label=system)
            else:
                ax.plot(xs, ys, linewidth=1.2, label=system, drawstyle="steps-post")
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if any(series.values()):
            ax.legend(fontsize=8, loc="best", markerscale=3)
    axes[-1, 0].set_xlabel("seconds since the run started")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=80)
    plt.close(fig)
    return out_path


def plot_bars(out_path: Path, *, title: str, ylabel: str, values: dict[str, float | None]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = [k for k, v in values.items() if v is not None]
    ax.bar(names, [float(values[k] or 0.0) for k in names], color="tab:blue")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)
    return out_path

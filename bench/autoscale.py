"""Bench: scenario 5, ``autoscale`` — sdproxy's policy against KPA, KEDA and an oracle.

One job: replay a bursty, day-shaped arrival trace in virtual time against the pod model
(``bench._autoscale_sim``: shared FIFO queue, one generation per pod, cold start from
order to ready, billing from order to removal, scale-in of idle pods only) once per
policy (``bench._autoscale_policies``), and report GPU-pod-seconds and queue waits.

Public entry points (called by ``python -m bench``):
``run_autoscale(quick=..., seed=...) -> dict`` (JSON-serialisable) and
``plot_autoscale(result, out_dir) -> list[Path]``.

Targets (issue 6): sdproxy within 1.15x of the oracle's GPU-pod-seconds, with a p95
wait no worse than Knative KPA's.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench._autoscale_frontier import (
    dominance,
    frontier_markdown,
    predict_table,
    run_sweep,
    summarise,
)
from bench._autoscale_policies import KedaPolicy, KpaPolicy, OraclePolicy, SdproxyPolicy
from bench._autoscale_sim import Policy, Request, SimConfig, SimResult, Simulation
from sdproxy.core.autoscale import AutoscaleConfig

HOUR = 3600.0
MAX_PODS = 20
COLD_START_S = 90.0
TICK_S = 2.0  # KPA's tick-interval; every policy is ticked alike

# (hour, arrivals per second): a working day. The rate is linear between points.
DAY_SHAPE: tuple[tuple[float, float], ...] = (
    (0.0, 0.0003),  # night: a stray request every hour or so
    (6.0, 0.0003),
    (7.0, 0.05),
    (9.0, 1.0),  # morning ramp
    (12.0, 1.2),
    (12.5, 0.5),  # lunch dip
    (13.5, 0.5),
    (14.5, 1.4),  # afternoon peak
    (17.0, 1.3),
    (19.0, 0.4),
    (21.0, 0.1),
    (23.0, 0.0003),
    (24.0, 0.0003),
)
# a two-hour compressed day for --quick: idle, ramp, plateau with spikes, decline, idle
QUICK_SHAPE: tuple[tuple[float, float], ...] = (
    (0.0, 0.0),
    (0.2, 0.0),
    (0.5, 1.0),
    (1.3, 1.2),
    (1.6, 0.1),
    (1.75, 0.0),
    (2.0, 0.0),
)


def _rate(shape: Sequence[tuple[float, float]], t: float) -> float:
    hour = t / HOUR
    for (h0, r0), (h1, r1) in itertools.pairwise(shape):
        if h0 <= hour <= h1:
            return r0 + (r1 - r0) * (hour - h0) / (h1 - h0)
    return 0.0


def _spikes(rng: random.Random, *, duration_s: float, count: int) -> list[tuple[float, float]]:
    """(start, length) of bursts: a batch job adds 2.5 req/s for 1-3 minutes."""
    day = (0.35 * duration_s, 0.8 * duration_s)
    return [(rng.uniform(*day), rng.uniform(60.0, 180.0)) for _ in range(count)]


def _service_s(rng: random.Random) -> float:
    """One generation: 2-8 s, most near 4 s (triangular), a 512x512 20-step txt2img."""
    return rng.triangular(2.0, 8.0, 4.0)


def make_trace(*, quick: bool, seed: int, days: int = 1) -> tuple[list[Request], float]:
    """Arrivals (non-homogeneous Poisson by thinning) and the trace length in seconds.

    One day: the day shape plus random bursts. Several days (``days`` > 1): the same
    shape every day, the bursts become daily batch jobs (the same schedule each day, each
    start moved by up to 30 s and its length by up to 15 %), and the last day has one more
    burst at a random time that no history can foresee."""
    rng = random.Random(seed)
    shape = QUICK_SHAPE if quick else DAY_SHAPE
    day_s = shape[-1][0] * HOUR
    spikes = _spikes(rng, duration_s=day_s, count=2 if quick else 6)
    if days > 1:
        spikes = [
            (d * day_s + start + rng.uniform(-30.0, 30.0), length * rng.uniform(0.85, 1.15))
            for d in range(days)
            for start, length in spikes
        ]
        spikes.extend(_spikes(rng, duration_s=day_s, count=1))
        spikes[-1] = (spikes[-1][0] + (days - 1) * day_s, spikes[-1][1])
    duration = days * day_s
    if days == 1:
        return _thinned(rng, duration=duration, spikes=spikes, shape=shape), duration
    # several days: the shape by thinning, each burst as its own Poisson stream
    # (a superposition, so the thinning need not draw at the burst rate all week)
    out = _thinned(rng, duration=duration, spikes=[], shape=shape, day_s=day_s)
    for start, length in spikes:
        t = start
        while (t := t + rng.expovariate(2.5)) < min(start + length, duration):
            out.append(Request(arrival_s=t, service_s=_service_s(rng)))
    out.sort(key=lambda r: r.arrival_s)
    return out, duration


def _thinned(
    rng: random.Random,
    *,
    duration: float,
    spikes: Sequence[tuple[float, float]],
    shape: Sequence[tuple[float, float]],
    day_s: float = math.inf,
) -> list[Request]:
    def rate(t: float) -> float:
        extra = sum(2.5 for start, length in spikes if start <= t < start + length)
        return _rate(shape, t % day_s) + extra

    peak = max(r for _, r in shape) + 2.5 * len(spikes)
    out: list[Request] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration:
            return out
        if rng.random() * peak < rate(t):
            out.append(Request(arrival_s=t, service_s=_service_s(rng)))


def sdproxy_config() -> AutoscaleConfig:
    """The CLI defaults (--idle-to-zero-s 300, --scale-down-delay-s 60, --max-scale-step 4)."""
    return AutoscaleConfig(
        min_pods=0,
        max_pods=MAX_PODS,
        idle_to_zero_s=300.0,
        scale_down_delay_s=60.0,
        max_scale_step=4,
    )


def _policies(trace: Sequence[Request], horizon: float) -> list[Callable[[], Policy]]:
    return [
        lambda: SdproxyPolicy(sdproxy_config()),
        lambda: KpaPolicy(max_pods=MAX_PODS),
        lambda: KedaPolicy(max_pods=MAX_PODS),
        lambda: OraclePolicy(
            trace=trace,
            lookahead_s=COLD_START_S + TICK_S,
            horizon_s=horizon,
            max_pods=MAX_PODS,
        ),
    ]


def _summary(res: SimResult, *, arrivals: int) -> dict[str, Any]:
    waits = sorted(res.waits)
    return {
        **summarise(res),
        "wait_mean_s": round(sum(waits) / len(waits), 3) if waits else 0.0,
        "arrivals": arrivals,
        "dropped": res.dropped,
        "pods_ordered": res.pods_ordered,
        "end_s": res.end_s,
        "series": {
            "t_s": res.series_t,
            "pods": res.series_pods,
            "ready": res.series_ready,
            "queued": res.series_queued,
        },
    }


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else (1.0 if a == 0 else math.inf)


def _targets(policies: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ours, oracle, kpa = policies["sdproxy"], policies["oracle"], policies["knative-kpa"]
    gpu = _ratio(ours["gpu_pod_seconds"], oracle["gpu_pod_seconds"])
    p95 = _ratio(ours["wait_p95_s"], kpa["wait_p95_s"])
    return {
        "gpu_seconds_vs_oracle": {"value": gpu, "target": "<= 1.15", "met": gpu <= 1.15},
        "p95_wait_vs_kpa": {
            "value": p95,
            "sdproxy_s": ours["wait_p95_s"],
            "kpa_s": kpa["wait_p95_s"],
            "target": "<= 1.0",
            "met": ours["wait_p95_s"] <= kpa["wait_p95_s"],
        },
    }


def _find(rows: list[dict[str, Any]], family: str, **knobs: float) -> dict[str, Any]:
    return next(r for r in rows if r["family"] == family and r["knobs"] == {**r["knobs"], **knobs})


def _frontier_targets(frontier: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Issue 16's targets over the two sweeps."""
    out: dict[str, dict[str, Any]] = {}
    for name, data in frontier.items():
        dom = data["dominance"]
        share = round(dom["dominated"] / dom["total"], 3) if dom["total"] else None
        out[f"peers_dominated_{name}"] = {
            "value": share,
            "dominated": dom["dominated"],
            "total": dom["total"],
            "target": "== 1.0 (every KPA/KEDA point: some sdproxy point <= GPU-pod-s, < p95)",
            "met": share == 1.0,
        }
        w10 = _find(data["rows"], "sdproxy", wait_target_s=10.0, idle_to_zero_s=300.0)
        out[f"wait_target_10_p95_{name}"] = {
            "value": w10["wait_p95_s"],
            "target": "<= 10 s (--wait-target-s 10, reactive)",
            "met": w10["wait_p95_s"] <= 10.0,
        }
    table = frontier["3day"]["predict"]
    good = [r for r in table if r["predict_p99_s"] <= 10.0 and r["gpu_ratio"] <= 1.05]
    best = min(good, key=lambda r: r["predict_gpu"], default=None)
    if best is None:  # none meets both: report the lowest-p99 one honestly
        best = min(table, key=lambda r: (r["predict_p99_s"], r["predict_gpu"]))
    knobs = {k: best[k] for k in ("wait_target_s", "idle_to_zero_s")}
    out["predict_p99_days_2_3"] = {
        "value": best["predict_p99_s"],
        "reactive_p99_s": best["reactive_p99_s"],
        "at": knobs,
        "target": "<= 10 s",
        "met": best["predict_p99_s"] <= 10.0,
    }
    out["predict_gpu_vs_reactive_days_2_3"] = {
        "value": best["gpu_ratio"],
        "at": knobs,
        "target": "<= 1.05",
        "met": best["gpu_ratio"] <= 1.05,
    }
    return out


def run_autoscale(*, quick: bool, seed: int = 1) -> dict[str, Any]:
    """Replay the day trace against each policy at its defaults (time series), then sweep
    every policy's knobs on the day trace and the 3-day trace (the frontier)."""
    trace, horizon = make_trace(quick=quick, seed=seed)
    sim = SimConfig(cold_start_s=COLD_START_S, tick_s=TICK_S, sample_s=10.0 if quick else 60.0)
    policies: dict[str, dict[str, Any]] = {}
    for make in _policies(trace, horizon):
        policy = make()
        res = Simulation(trace=trace, policy=policy, config=sim).run(horizon_s=horizon)
        policies[policy.name] = _summary(res, arrivals=len(trace))
    frontier: dict[str, dict[str, Any]] = {}
    for name, days in (("day", 1), ("3day", 3)):
        rows = run_sweep(
            quick=quick,
            seed=seed,
            days=days,
            sim=SimConfig(cold_start_s=COLD_START_S, tick_s=TICK_S, sample_s=math.inf),
            max_pods=MAX_PODS,
            lookahead_s=COLD_START_S + TICK_S,
        )
        many, length = make_trace(quick=quick, seed=seed, days=days)
        frontier[name] = {
            "days": days,
            "duration_s": length,
            "arrivals": len(many),
            "rows": rows,
            "dominance": dominance(rows),
        }
        if days > 1:
            frontier[name]["dominance_days_2_on"] = dominance(rows, key="days_2_on")
            frontier[name]["predict"] = predict_table(rows)
    return {
        "scenario": "autoscale",
        "quick": quick,
        "seed": seed,
        "trace": {
            "duration_s": horizon,
            "arrivals": len(trace),
            "service_s_mean": round(sum(r.service_s for r in trace) / max(1, len(trace)), 3),
            "max_pods": MAX_PODS,
        },
        "sim": asdict(sim),
        "sdproxy_config": asdict(sdproxy_config()),
        "policies": policies,
        "frontier": frontier,
        "table_md": frontier_markdown(frontier),
        "targets": {**_targets(policies), **_frontier_targets(frontier)},
    }


def plot_autoscale(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Pods over time and queue depth over time, one line per policy (PNG, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    policies = result["policies"]
    written = []
    for key, label, name in (
        ("pods", "pods (ordered or ready)", "autoscale_pods.png"),
        ("queued", "requests queued", "autoscale_queue.png"),
    ):
        fig, axes = plt.subplots(len(policies), 1, figsize=(12, 2.2 * len(policies)), sharex=True)
        for ax, (policy, data) in zip(axes, policies.items(), strict=True):
            hours = [t / HOUR for t in data["series"]["t_s"]]
            ax.step(hours, data["series"][key], where="post", linewidth=0.8)
            ax.set_title(
                f"{policy}: {data['gpu_pod_seconds']:.0f} GPU-pod-s, "
                f"p95 wait {data['wait_p95_s']:.1f} s",
                fontsize=9,
            )
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("hour of the (virtual) day")
        fig.suptitle(f"autoscale scenario: {label} ({'quick' if result['quick'] else 'full'})")
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    for name, data in result.get("frontier", {}).items():
        written.append(_plot_frontier(plt, name, data, out_dir))
    return written


MARKERS = {
    "sdproxy": ("o", "tab:blue"),
    "sdproxy+predict": ("D", "tab:green"),
    "knative-kpa": ("s", "tab:red"),
    "keda-http": ("^", "tab:orange"),
    "oracle": ("*", "black"),
}


def _plot_frontier(plt: Any, name: str, data: dict[str, Any], out_dir: Path) -> Path:
    """GPU-pod-seconds against p95 and p99 wait, one marker per policy setting; for a
    several-day trace a second row for days 2 on (what --predict learned for)."""
    parts: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = [
        ("all days", lambda r: r)
    ]
    if data["days"] > 1:
        parts.append(("days 2-3", lambda r: r["days_2_on"]))
    fig, axes = plt.subplots(len(parts), 2, figsize=(13, 5 * len(parts)), squeeze=False)
    for (title, pick), row_axes in zip(parts, axes, strict=True):
        for ax, key in zip(row_axes, ("wait_p95_s", "wait_p99_s"), strict=True):
            _frontier_panel(ax, data["rows"], pick, key)
            ax.set_title(f"{title}: {key[5:8]}", fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"autoscale frontier, {data['days']}-day trace ({data['arrivals']} requests); "
        "labels: --wait-target-s (idle-to-zero 300 s)"
    )
    fig.tight_layout()
    path = out_dir / f"autoscale_frontier_{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _frontier_panel(
    ax: Any, rows: list[dict[str, Any]], pick: Callable[[dict[str, Any]], dict[str, Any]], key: str
) -> None:
    for family, (marker, colour) in MARKERS.items():
        mine = sorted(
            (r for r in rows if r["family"] == family), key=lambda r: pick(r)["gpu_pod_seconds"]
        )
        if not mine:
            continue
        xs = [pick(r)["gpu_pod_seconds"] / 1000 for r in mine]
        ys = [max(pick(r)[key], 0.05) for r in mine]
        ax.scatter(xs, ys, marker=marker, color=colour, label=family, s=28, alpha=0.85)
        for r, x, y in zip(mine, xs, ys, strict=True):
            w = r["knobs"].get("wait_target_s")
            if w is not None and r["knobs"].get("idle_to_zero_s") == 300.0:
                ax.annotate(f"{w:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("GPU-pod-seconds (thousands)")
    ax.set_ylabel(f"{key[5:8]} queue wait (s, log; 0 drawn at 0.05)")
    ax.axhline(10.0, color="grey", linewidth=0.6, linestyle="--")
    ax.grid(alpha=0.3, which="both")


if __name__ == "__main__":  # python -m bench.autoscale [--quick]
    import json
    import sys

    result = run_autoscale(quick="--quick" in sys.argv)
    print(json.dumps(result["targets"], indent=1))

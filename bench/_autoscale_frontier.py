"""Bench: the autoscale frontier — every policy swept over its knobs, on two traces.

One job: run sdproxy (at several ``--wait-target-s``, with and without ``--predict``),
Knative KPA and KEDA over the knob ranges of issue 16 on the day trace and on a 3-day
trace, in virtual time (two worker processes; every run is deterministic), and judge
the frontier: which peer points some sdproxy point dominates (<= its GPU-pod-seconds and
a lower p95 wait), and what ``--predict`` buys on days 2-3.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bench._autoscale_policies import KedaPolicy, KpaPolicy, OraclePolicy, SdproxyPolicy
from bench._autoscale_sim import Policy, SimConfig, SimResult, Simulation
from sdproxy.core.autoscale import AutoscaleConfig

SDPROXY_FAMILIES = ("sdproxy", "sdproxy+predict")
PEER_FAMILIES = ("knative-kpa", "keda-http")


@dataclass(frozen=True, kw_only=True)
class Point:
    """One policy at one setting of its knobs."""

    family: str
    knobs: tuple[tuple[str, float], ...] = field(default=())

    @property
    def label(self) -> str:
        return self.family + "".join(f" {k}={v:g}" for k, v in self.knobs)


def sweep(*, quick: bool, days: int) -> list[Point]:
    """The knob ranges of issue 16 (fewer with ``quick``)."""
    targets = (0.0, 2.0, 10.0, 60.0) if quick else (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
    idles = (300.0,) if quick else (60.0, 300.0)
    families = SDPROXY_FAMILIES if days > 1 else SDPROXY_FAMILIES[:1]
    points = [
        Point(family=f, knobs=(("wait_target_s", w), ("idle_to_zero_s", i)))
        for f in families
        for w in targets
        for i in idles
    ]
    stabilisations = (60.0, 300.0) if quick else (60.0, 120.0, 300.0, 600.0)
    cooldowns = (300.0,) if quick else (60.0, 300.0)
    points += [
        Point(family="keda-http", knobs=(("stabilization_s", s), ("cooldown_s", c)))
        for s in stabilisations
        for c in cooldowns
    ]
    utilisations = (0.7,) if quick else (0.5, 0.7, 1.0)
    windows = (60.0,) if quick else (30.0, 60.0, 180.0)
    points += [
        Point(family="knative-kpa", knobs=(("target_utilization", u), ("stable_window_s", w)))
        for u in utilisations
        for w in windows
    ]
    return [*points, Point(family="oracle")]


def make_policy(
    point: Point, *, max_pods: int, trace: Any, horizon: float, lookahead_s: float
) -> Policy:
    knobs = dict(point.knobs)
    if point.family in SDPROXY_FAMILIES:
        config = AutoscaleConfig(
            min_pods=0,
            max_pods=max_pods,
            idle_to_zero_s=knobs["idle_to_zero_s"],
            scale_down_delay_s=60.0,
            max_scale_step=4,
            wait_target_s=knobs["wait_target_s"],
            predict=point.family == "sdproxy+predict",
        )
        return SdproxyPolicy(config, name=point.label)
    if point.family == "keda-http":
        return KedaPolicy(
            max_pods=max_pods,
            stabilization_s=knobs["stabilization_s"],
            cooldown_s=knobs["cooldown_s"],
            name=point.label,
        )
    if point.family == "knative-kpa":
        return KpaPolicy(
            max_pods=max_pods,
            target_utilization=knobs["target_utilization"],
            stable_window_s=knobs["stable_window_s"],
            name=point.label,
        )
    return OraclePolicy(trace=trace, lookahead_s=lookahead_s, horizon_s=horizon, max_pods=max_pods)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarise(res: SimResult, *, since_s: float = 0.0) -> dict[str, float]:
    """GPU-pod-seconds and waits of the requests that arrived from ``since_s`` on."""
    waits = sorted(w for w, at in zip(res.waits, res.served_at, strict=True) if at >= since_s)
    return {
        "gpu_pod_seconds": round(Simulation.billed(res, since_s), 1),
        "wait_p50_s": round(percentile(waits, 50), 3),
        "wait_p95_s": round(percentile(waits, 95), 3),
        "wait_p99_s": round(percentile(waits, 99), 3),
        "wait_max_s": round(waits[-1] if waits else 0.0, 3),
        "served": len(waits),
    }


@functools.cache
def _trace(quick: bool, seed: int, days: int) -> Any:
    from bench.autoscale import make_trace

    return make_trace(quick=quick, seed=seed, days=days)


def _run_point(args: tuple[Point, bool, int, int, SimConfig, int, float]) -> dict[str, Any]:
    point, quick, seed, days, sim, max_pods, lookahead = args
    trace, horizon = _trace(quick, seed, days)
    policy = make_policy(
        point, max_pods=max_pods, trace=trace, horizon=horizon, lookahead_s=lookahead
    )
    res = Simulation(trace=trace, policy=policy, config=sim).run(horizon_s=horizon)
    row: dict[str, Any] = {"family": point.family, "knobs": dict(point.knobs)}
    row.update(summarise(res))
    row["dropped"] = res.dropped
    if days > 1:
        row["days_2_on"] = summarise(res, since_s=horizon / days)
    return row


def run_sweep(
    *, quick: bool, seed: int, days: int, sim: SimConfig, max_pods: int, lookahead_s: float
) -> list[dict[str, Any]]:
    jobs = [
        (p, quick, seed, days, sim, max_pods, lookahead_s) for p in sweep(quick=quick, days=days)
    ]
    with ProcessPoolExecutor(max_workers=2) as pool:
        return list(pool.map(_run_point, jobs))


def dominance(rows: Sequence[dict[str, Any]], *, key: str | None = None) -> dict[str, Any]:
    """For every peer point, the cheapest sdproxy point that dominates it (<= GPU-pod-s and
    a strictly lower p95 wait), or None."""

    def metrics(row: dict[str, Any]) -> dict[str, Any]:
        return row if key is None else row[key]

    ours = [r for r in rows if r["family"] in SDPROXY_FAMILIES]
    out = []
    for peer in (r for r in rows if r["family"] in PEER_FAMILIES):
        pm = metrics(peer)
        better = [
            r
            for r in ours
            if metrics(r)["gpu_pod_seconds"] <= pm["gpu_pod_seconds"]
            and metrics(r)["wait_p95_s"] < pm["wait_p95_s"]
        ]
        best = min(better, key=lambda r: metrics(r)["gpu_pod_seconds"], default=None)
        out.append(
            {
                "peer": _label(peer),
                "gpu_pod_seconds": pm["gpu_pod_seconds"],
                "wait_p95_s": pm["wait_p95_s"],
                "dominated_by": None if best is None else _label(best),
            }
        )
    dominated = sum(1 for o in out if o["dominated_by"] is not None)
    return {"peers": out, "dominated": dominated, "total": len(out)}


def _label(row: dict[str, Any]) -> str:
    return row["family"] + "".join(f" {k}={v:g}" for k, v in row["knobs"].items())


def predict_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Days 2 on, each sdproxy setting with and without --predict."""
    plain = {tuple(r["knobs"].items()): r for r in rows if r["family"] == "sdproxy"}
    table = []
    for r in rows:
        if r["family"] != "sdproxy+predict":
            continue
        base = plain.get(tuple(r["knobs"].items()))
        if base is None:
            continue
        a, b = base["days_2_on"], r["days_2_on"]
        table.append(
            {
                **r["knobs"],
                "reactive_gpu": a["gpu_pod_seconds"],
                "reactive_p95_s": a["wait_p95_s"],
                "reactive_p99_s": a["wait_p99_s"],
                "predict_gpu": b["gpu_pod_seconds"],
                "predict_p95_s": b["wait_p95_s"],
                "predict_p99_s": b["wait_p99_s"],
                "gpu_ratio": round(b["gpu_pod_seconds"] / a["gpu_pod_seconds"], 4)
                if a["gpu_pod_seconds"]
                else math.inf,
            }
        )
    return table


def frontier_markdown(frontier: dict[str, dict[str, Any]]) -> str:
    """One table per trace (every point, cheapest first per family) and the --predict
    table of days 2 on."""
    parts: list[str] = []
    for data in frontier.values():
        dominated = {p["peer"]: p["dominated_by"] for p in data["dominance"]["peers"]}
        later = "days_2_on" in data["rows"][0]
        head = "| policy | knobs | GPU-pod-s | p95 wait s | p99 wait s |"
        rule = "|---|---|---:|---:|---:|"
        if later:
            head += " days 2-3: GPU-pod-s | p95 | p99 |"
            rule += "---:|---:|---:|"
        head += " dominated by |"
        rule += "---|"
        parts += [
            f"**{data['days']}-day trace** ({data['arrivals']} requests):",
            "",
            head,
            rule,
        ]
        rows = sorted(data["rows"], key=lambda r: (r["family"], r["gpu_pod_seconds"]))
        for r in rows:
            knobs = ", ".join(f"{k} {v:g}" for k, v in r["knobs"].items())
            line = (
                f"| {r['family']} | {knobs} | {r['gpu_pod_seconds']:,.0f} | "
                f"{r['wait_p95_s']:.2f} | {r['wait_p99_s']:.2f} |"
            )
            if later:
                d = r["days_2_on"]
                line += (
                    f" {d['gpu_pod_seconds']:,.0f} | {d['wait_p95_s']:.2f} | "
                    f"{d['wait_p99_s']:.2f} |"
                )
            by = dominated.get(_label(r), "")
            line += f" {by if by is not None else '**none**'} |"
            parts.append(line)
        parts.append("")
        if "predict" in data:
            parts += [
                "**--predict on days 2-3** (same knobs without and with it):",
                "",
                "| wait target s | idle-to-zero s | GPU-pod-s reactive | with --predict | "
                "ratio | p95 reactive | with | p99 reactive | with |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for t in data["predict"]:
                parts.append(
                    f"| {t['wait_target_s']:g} | {t['idle_to_zero_s']:g} | "
                    f"{t['reactive_gpu']:,.0f} | {t['predict_gpu']:,.0f} | {t['gpu_ratio']:.3f} | "
                    f"{t['reactive_p95_s']:.2f} | {t['predict_p95_s']:.2f} | "
                    f"{t['reactive_p99_s']:.2f} | {t['predict_p99_s']:.2f} |"
                )
            parts.append("")
    return "\n".join(parts)

"""Unit tests: bench.autoscale — the quick replay's structure and conservation laws.

The targets (1.15x oracle GPU-pod-seconds, p95 wait <= KPA) are benchmark figures, not
assertions: they are printed and recorded, never asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench._autoscale_frontier import dominance
from bench._autoscale_policies import KpaPolicy, OraclePolicy, _forward_max
from bench._autoscale_sim import Request, SimConfig, SimObservation, Simulation
from bench.autoscale import make_trace, plot_autoscale, run_autoscale

POLICIES = {"sdproxy", "knative-kpa", "keda-http", "oracle"}


@pytest.fixture(scope="module")
def quick() -> dict[str, Any]:
    result = run_autoscale(quick=True, seed=1)
    print("autoscale quick targets:", json.dumps(result["targets"]))
    return result


def test_result_is_json_and_complete(quick: dict[str, Any]) -> None:
    assert json.loads(json.dumps(quick))["scenario"] == "autoscale"
    assert set(quick["policies"]) == POLICIES
    for data in quick["policies"].values():
        for key in ("gpu_pod_seconds", "wait_p50_s", "wait_p95_s", "wait_max_s", "served"):
            assert data[key] >= 0
        series = data["series"]
        assert len(series["t_s"]) == len(series["pods"]) == len(series["queued"]) > 10
    for target in quick["targets"].values():
        assert {"value", "target", "met"} <= set(target)
        assert isinstance(target["met"], bool)


def test_every_arrival_is_served_or_counted(quick: dict[str, Any]) -> None:
    arrivals = quick["trace"]["arrivals"]
    assert arrivals > 100
    for data in quick["policies"].values():
        assert data["served"] + data["dropped"] == arrivals
        assert min(data["series"]["pods"]) >= 0
        assert min(data["series"]["queued"]) >= 0
        assert data["wait_p50_s"] <= data["wait_p95_s"] <= data["wait_max_s"]


def test_replay_is_deterministic() -> None:
    assert make_trace(quick=True, seed=7) == make_trace(quick=True, seed=7)
    assert make_trace(quick=True, seed=7) != make_trace(quick=True, seed=8)


def test_oracle_waits_at_most_a_tick(quick: dict[str, Any]) -> None:
    assert quick["policies"]["oracle"]["wait_max_s"] <= 2 * quick["sim"]["tick_s"]


def test_pod_model_bills_from_order_and_waits_cold_start() -> None:
    """One request at t=0.5, a policy that wants one pod while there is work: the request
    waits one cold start, the pod is billed from order to its removal after the work."""

    class OnePod:
        name = "one"

        def tick(self, obs: SimObservation, now: float) -> int:
            return 1 if obs.inflight + obs.queued else 0

    trace = [Request(arrival_s=0.5, service_s=4.0)]
    cfg = SimConfig(cold_start_s=10.0, tick_s=1.0)
    res = Simulation(trace=trace, policy=OnePod(), config=cfg).run(horizon_s=30.0)
    assert res.waits == [pytest.approx(10.5)]  # ordered at the t=1 tick, ready at 11
    # billed 1 -> 15: done at 15, removed by the tick at the same instant
    assert res.gpu_pod_seconds == pytest.approx(14.0)


def test_kpa_asks_two_pods_for_one_request() -> None:
    kpa = KpaPolicy(max_pods=10)
    seen = SimObservation(
        inflight=1, queued=0, ready=1, starting=0, per_pod_limit=1, mean_demand=1.0
    )
    assert kpa.tick(seen, 0.0) == 2  # ceil(1 / 0.7)


def test_oracle_orders_one_cold_start_ahead() -> None:
    trace = [Request(arrival_s=100.0, service_s=5.0)]
    oracle = OraclePolicy(trace=trace, lookahead_s=10.0, horizon_s=200.0, max_pods=4)
    empty = SimObservation(
        inflight=0, queued=0, ready=0, starting=0, per_pod_limit=1, mean_demand=0.0
    )
    assert [oracle.tick(empty, t) for t in (80.0, 90.0, 104.0, 106.0)] == [0, 1, 1, 0]


def test_forward_max() -> None:
    assert _forward_max([1, 3, 2, 0, 0, 5], width=2) == [3, 3, 2, 0, 5, 5]


def test_plots_are_written(quick: dict[str, Any], tmp_path: Path) -> None:
    paths = plot_autoscale(quick, tmp_path)
    assert [p.name for p in paths] == [
        "autoscale_pods.png",
        "autoscale_queue.png",
        "autoscale_frontier_day.png",
        "autoscale_frontier_3day.png",
    ]
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)


def test_frontier_sweeps_every_family_on_both_traces(quick: dict[str, Any]) -> None:
    day, three = quick["frontier"]["day"], quick["frontier"]["3day"]
    assert {r["family"] for r in day["rows"]} == {"sdproxy", "knative-kpa", "keda-http", "oracle"}
    assert {r["family"] for r in three["rows"]} >= {"sdproxy", "sdproxy+predict"}
    assert three["arrivals"] > 2.5 * day["arrivals"]
    for data in (day, three):
        peers = [r for r in data["rows"] if r["family"] in ("knative-kpa", "keda-http")]
        assert data["dominance"]["total"] == len(peers)
        for row in data["rows"]:
            assert row["served"] + row["dropped"] <= data["arrivals"]
            assert row["wait_p95_s"] <= row["wait_p99_s"] <= row["wait_max_s"]
    for row in three["rows"]:  # days 2 on are a part of the whole
        assert row["days_2_on"]["gpu_pod_seconds"] < row["gpu_pod_seconds"]
        assert row["days_2_on"]["served"] < row["served"]
    assert {r["wait_target_s"] for r in three["predict"]} == {0.0, 2.0, 10.0, 60.0}
    for name in ("peers_dominated_day", "predict_p99_days_2_3", "wait_target_10_p95_3day"):
        assert quick["targets"][name]["value"] is not None


def test_dominance_needs_cheaper_or_equal_and_strictly_lower_p95() -> None:
    def row(family: str, gpu: float, p95: float) -> dict[str, Any]:
        return {"family": family, "knobs": {"k": gpu}, "gpu_pod_seconds": gpu, "wait_p95_s": p95}

    rows = [
        row("sdproxy", 100.0, 5.0),
        row("sdproxy", 80.0, 9.0),
        row("keda-http", 100.0, 6.0),  # dominated only by the 100 / 5.0 point
        row("keda-http", 90.0, 9.0),  # 80 / 9.0: equal p95 is not dominated
        row("knative-kpa", 70.0, 20.0),  # cheaper than every sdproxy point
    ]
    dom = dominance(rows)
    assert (dom["dominated"], dom["total"]) == (1, 3)
    assert [p["dominated_by"] for p in dom["peers"]] == ["sdproxy k=100", None, None]


def test_three_day_trace_repeats_the_batch_jobs() -> None:
    """Each busy minute of day 1 (a batch job: +150 a minute) comes back on days 2 and 3
    within two minutes of the same time of day."""
    trace, horizon = make_trace(quick=False, seed=1, days=3)
    assert horizon == 3 * 86_400.0
    per_minute = [0] * int(horizon // 60)
    for r in trace:
        per_minute[int(r.arrival_s // 60)] += 1
    day = 1440
    busy = [m for m in range(day) if per_minute[m] > 180]
    assert len(busy) >= 4

    def excess(m: int) -> int:  # five minutes around m against the five half an hour before
        return sum(per_minute[m - 2 : m + 3]) - sum(per_minute[m - 32 : m - 27])

    for minute in busy:
        for d in (1, 2):
            assert excess(d * day + minute) > 100, (minute, d)

"""Unit tests: bench.autoscale — the quick replay's structure and conservation laws.

The targets (1.15x oracle GPU-pod-seconds, p95 wait <= KPA) are benchmark figures, not
assertions: they are printed and recorded, never asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

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
    assert len(paths) == 2
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)

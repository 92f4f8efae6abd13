"""Unit tests: sdproxy.core.queueing — Erlang C, the M/G/c wait quantile, pods for a target."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdproxy.core.queueing import (
    ServiceStats,
    erlang_c,
    servers_for_wait,
    wait_quantile_s,
)


@pytest.mark.parametrize(
    ("servers", "load", "expected"),
    [
        (1, 0.5, 0.5),  # M/M/1: P(wait) = rho
        (2, 1.0, 1.0 / 3.0),  # textbook: c = 2, a = 1
        (10, 8.0, 0.409),  # tables: C(10, 8) = 0.409
    ],
)
def test_erlang_c_known_values(servers: int, load: float, expected: float) -> None:
    assert erlang_c(servers, load) == pytest.approx(expected, abs=1e-3)


def test_erlang_c_edges() -> None:
    assert erlang_c(3, 0.0) == 0.0
    assert erlang_c(3, 3.0) == 1.0  # unstable: everyone waits
    assert erlang_c(500, 450.0) < 1.0  # the recurrence does not overflow


def test_mm1_quantile_matches_closed_form() -> None:
    """M/M/1, rho = 0.8, mean service 1 s: P(W > t) = 0.8 exp(-0.2 t)."""
    q = wait_quantile_s(servers=1, rate=0.8, service_s=1.0, scv=1.0, quantile=0.95)
    assert q == pytest.approx(math.log(0.8 / 0.05) / 0.2)
    # deterministic service halves the wait (Allen-Cunneen)
    d = wait_quantile_s(servers=1, rate=0.8, service_s=1.0, scv=0.0, quantile=0.95)
    assert d == pytest.approx(q / 2)


def test_quantile_matches_a_simulated_mmc_queue() -> None:
    """The model against a FIFO M/M/3 queue simulated here (50k customers)."""
    rng, rate, service, c = random.Random(3), 2.4, 1.0, 3
    free = [0.0] * c
    t, waits = 0.0, []
    for _ in range(50_000):
        t += rng.expovariate(rate)
        i = min(range(c), key=free.__getitem__)
        start = max(t, free[i])
        waits.append(start - t)
        free[i] = start + rng.expovariate(1.0 / service)
    waits.sort()
    measured = waits[int(0.95 * len(waits))]
    model = wait_quantile_s(servers=c, rate=rate, service_s=service, scv=1.0, quantile=0.95)
    assert model == pytest.approx(measured, rel=0.15)


def test_servers_for_wait_is_the_fewest() -> None:
    kw = {"rate": 1.2, "service_s": 4.7, "scv": 0.07, "quantile": 0.95}
    for target in (0.0, 1.0, 10.0, 60.0):
        c = servers_for_wait(target_s=target, limit=100, **kw)
        assert wait_quantile_s(servers=c, **kw) <= target
        assert c == 1 or wait_quantile_s(servers=c - 1, **kw) > target
    assert servers_for_wait(target_s=10.0, limit=3, **kw) == 3  # the bound wins
    assert (
        servers_for_wait(rate=0.0, service_s=4.0, scv=1.0, target_s=1, quantile=0.95, limit=9) == 0
    )


@given(
    rate=st.floats(0.001, 20.0),
    service=st.floats(0.1, 30.0),
    target=st.floats(0.0, 120.0),
)
def test_a_longer_target_never_needs_more_servers(
    rate: float, service: float, target: float
) -> None:
    kw = {"rate": rate, "service_s": service, "scv": 0.5, "quantile": 0.95, "limit": 10_000}
    loose = servers_for_wait(target_s=target + 5.0, **kw)
    tight = servers_for_wait(target_s=target, **kw)
    assert 1 <= loose <= tight
    assert tight > rate * service or tight == 10_000


def test_service_stats_moments() -> None:
    stats = ServiceStats()
    assert stats.scv == 1.0
    for s in (2.0, 4.0, 6.0) * 200:
        stats = stats.observe(s)
    assert stats.mean_s == pytest.approx(4.0, abs=0.3)
    assert stats.scv == pytest.approx(8 / 3 / 16, abs=0.05)  # var 8/3, mean 4
    assert stats.observe(math.nan) == stats
    assert stats.observe(-1.0) == stats

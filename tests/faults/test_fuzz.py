"""Fuzz: hypothesis-generated requests against a live proxy in front of simulated pods.

Methods, paths (dot and empty segments, escapes, unicode, the proxy's own /-/ prefix, the
job API),
headers (identity, Expect, encodings, garbage values) and bodies (JSON of any shape and
depth, broken JSON, bytes). Whatever arrives: never a 500 from the proxy, never a
traceback in its log, every error a JSON body with a stable code, and no pod ever runs
more than one generation.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import ProxyFactory, SimFactory

pytestmark = pytest.mark.timeout(300)

SEGMENTS = st.sampled_from(
    ["sdapi", "v1", "txt2img", "img2img", "progress", "interrupt", "options", "sd-models",
     "..", ".", "", "%2e%2e", "%00", "%0d%0a", "-", "server-kill", "train", "é", "a" * 300,
     "jobs", "result", "AAAAAAAAAAAAAAAAAAAAAA"]
)  # fmt: skip
PATHS = st.one_of(
    # (a path starting "//" is a network-path reference to the client library: left out)
    st.lists(SEGMENTS, min_size=1, max_size=6)
    .map(lambda s: "/" + "/".join(s))
    .filter(lambda p: not p.startswith("//")),
    st.sampled_from(
        [
            "/sdapi/v1/txt2img",
            "/sdapi/v1/options",
            "/sdapi/v1/progress",
            "/-/x",
            "/-/jobs/sdapi/v1/txt2img",
            "/-/jobs",
            "/-/jobs?limit=x&cursor=%00",
            "/-/jobs/AAAAAAAAAAAAAAAAAAAAAA/result?wait=nan",
            "/-/jobs/-/jobs",
            "/-/peer/jobs/AAAAAAAAAAAAAAAAAAAAAA",
            "/-/peer/jobs/import",
        ]
    ),
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=30,
)
BODIES = st.one_of(
    st.none(),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"prompt": st.text(max_size=10)},
        optional={
            "steps": st.integers(-5, 40) | st.text(max_size=3),
            "width": st.sampled_from([64, 128, -1, 0, "x"]),
            "override_settings": st.dictionaries(st.just("sd_model_checkpoint"), st.text()),
        },
    ).map(lambda v: json.dumps(v).encode()),
    st.integers(1, 2000).map(lambda n: b"[" * n),
    st.binary(max_size=64),
)
HEADERS = st.dictionaries(
    st.sampled_from(
        [
            "X-Sdproxy-Client",
            "X-Sdproxy-Job",
            "Accept-Encoding",
            "Content-Type",
            "Cookie",
            "X-Request-Id",
            "X-Sdproxy-Caller",
            "Accept",
            "Prefer",
            "Idempotency-Key",
            "X-Sdproxy-Callback",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    max_size=4,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=PATHS,
    headers=HEADERS,
    body=BODIES,
)
async def test_the_http_surface_never_answers_500(
    proxy_factory: ProxyFactory,
    sim_pods: SimFactory,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | None,
) -> None:
    proxy = await _proxy(proxy_factory, sim_pods)
    caplog.clear()  # one example's records only
    caplog.set_level(logging.WARNING)
    async with proxy.client.request(
        method, path, headers=headers, data=body, allow_redirects=False
    ) as resp:
        data = await resp.read()
    assert resp.status != 500, (method, path, data[:300])
    if resp.status >= 400 and resp.headers.get("X-Sdproxy-Pod") is None and method != "HEAD":
        document: Any = json.loads(data)  # the proxy's own errors are JSON with a code
        assert isinstance(document.get("error"), str), document
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


#: the proxy started for this test run's fixtures (hypothesis runs many examples per run)
_STARTED: dict[int, Any] = {}


async def _proxy(proxy_factory: ProxyFactory, sim_pods: SimFactory) -> Any:
    """One proxy and two pods for all the examples of one run of the test."""
    key = id(proxy_factory)
    if key not in _STARTED:
        _STARTED.clear()
        sims = await sim_pods(2, step_ms=1.0)
        _STARTED[key] = await proxy_factory(sims.urls, "--max-queue", "50")
    return _STARTED[key]

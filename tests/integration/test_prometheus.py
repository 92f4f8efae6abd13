"""Integration: a real Prometheus server scrapes metrics_app and reads the snapshot back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sdproxy.runtime.metrics import Metrics, metrics_app
from sdproxy.runtime.status import Status
from tests.conftest import free_port, require_binary
from tests.integration.test_metrics import exercise_all, sample_snapshot

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: sdproxy
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, *, target_port: int) -> AsyncIterator[str]:
    """Start Prometheus scraping 127.0.0.1:target_port; yield its base URL."""
    binary = require_binary("prometheus", install="apt-get install prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(CONFIG.format(port=target_port))
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=log,
            stderr=log,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    except BaseException:
        print(log_path.read_text(errors="replace")[-4000:])  # shown by pytest on failure
        raise
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def query_until(
    session: aiohttp.ClientSession, base: str, *, query: str, expect: str, deadline_s: float
) -> list[Any]:
    """Poll the instant-query API until the single result's value equals ``expect``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    last: Any = None
    while loop.time() < deadline:
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with session.get(f"{base}/api/v1/query", params={"query": query}) as resp:
                last = await resp.json() if resp.status == 200 else await resp.text()
            result = last["data"]["result"] if isinstance(last, dict) else []
            if len(result) == 1 and result[0]["value"][1] == expect:
                return list(result)
        await asyncio.sleep(0.25)
    pytest.fail(f"{query} never became {expect}; last answer: {last}")


async def test_prometheus_scrapes_state_from_the_snapshot(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    snap = sample_snapshot(depth=3)
    metrics = Metrics(snapshot=lambda: Status.from_json(snap))
    exercise_all(metrics)
    target = await aiohttp_server(metrics_app(metrics), host="127.0.0.1")
    async with (
        prometheus(tmp_path, target_port=target.port) as base,
        aiohttp.ClientSession() as session,
    ):
        await query_until(session, base, query="up", expect="1", deadline_s=12)
        result = await query_until(
            session, base, query='sdproxy_queue_depth{priority="normal"}', expect="3", deadline_s=5
        )
        assert result[0]["metric"]["job"] == "sdproxy"
        # read at scrape time: the next scrape sees it
        snap["queue"]["depth"] = snap["queue"]["by_priority"]["normal"] = 7
        await query_until(session, base, query="sum(sdproxy_queue_depth)", expect="7", deadline_s=5)
        await query_until(
            session, base, query='sdproxy_pods{state="ready"}', expect="1", deadline_s=2
        )

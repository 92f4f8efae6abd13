"""Integration: /-/status content negotiation, and the HTML page rendered by headless Chromium."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sdproxy.runtime.status_page import prefers_html, status_response
from tests.conftest import require_binary
from tests.integration.test_metrics import POD_A, POD_B, sample_snapshot

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
EVIL_POD = "<img src=x onerror=\"document.body.setAttribute('data-pwned','yes')\">"
EVIL_CHECKPOINT = "</script><script>document.body.setAttribute('data-pwned','yes')</script>"


class StatusApp:
    """A tiny app whose /-/status calls status_response with a snapshot the test changes."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot
        self.json_requests = 0
        #: called after an HTML page was rendered (to change what the next fetch sees)
        self.after_html: Callable[[dict[str, Any]], None] | None = None
        self.app = web.Application()
        self.app.router.add_get("/-/status", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        response = status_response(request, self.snapshot)
        if response.content_type == "application/json":
            self.json_requests += 1
        elif self.after_html is not None:
            self.after_html(self.snapshot)
        return response


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        pytest.param(BROWSER_ACCEPT, True, id="browser"),
        pytest.param("application/json", False, id="json"),
        pytest.param("", False, id="no-accept"),
        pytest.param("*/*", False, id="curl"),
        pytest.param("text/html;q=0.5, application/json", False, id="json-ranked-higher"),
        pytest.param("application/json;q=0.1, text/*", True, id="text-wildcard"),
        pytest.param("text/html;q=0, */*", False, id="html-refused"),
    ],
)
def test_negotiation(accept: str, html: bool) -> None:
    assert prefers_html(accept) is html


async def test_json_for_programs_html_for_browsers(aiohttp_client: Any) -> None:
    client = await aiohttp_client(StatusApp(sample_snapshot(depth=4)).app)
    as_json = await client.get("/-/status", headers={"Accept": "application/json"})
    assert as_json.content_type == "application/json"
    assert (await as_json.json())["queue"]["depth"] == 4
    assert as_json.headers["Vary"] == "Accept"
    as_html = await client.get("/-/status", headers={"Accept": BROWSER_ACCEPT})
    assert as_html.content_type == "text/html"
    page = await as_html.text()
    assert "default-src 'none'" in as_html.headers["Content-Security-Policy"]
    code = re.sub(r'<script type="application/json".*?</script>', "", page, flags=re.S)
    assert not re.search(r"<(link|img)\b|src=|https?://", code), "page must be self-contained"


async def test_embedded_snapshot_cannot_close_its_script(aiohttp_client: Any) -> None:
    snap = sample_snapshot()
    snap["pods"][0]["checkpoint"] = EVIL_CHECKPOINT
    client = await aiohttp_client(StatusApp(snap).app)
    page = await (await client.get("/-/status", headers={"Accept": BROWSER_ACCEPT})).text()
    assert page.count("</script>") == 2  # the data block and the code, nothing injected


async def dump_dom(chromium: str, url: str, profile: Path) -> str:
    """The DOM after the page's scripts ran for 5 s of virtual time."""
    proc = await asyncio.create_subprocess_exec(
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def element_text(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match, f"no element #{element_id} in the DOM"
    return match.group(1)


@pytest.fixture
def chromium() -> str:
    return require_binary("chromium", install="apt-get install chromium")


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_page_shows_live_numbers(chromium: str, aiohttp_server: Any, tmp_path: Path) -> None:
    status = StatusApp(sample_snapshot(depth=3))
    server = await aiohttp_server(status.app, host="127.0.0.1")
    url = f"http://127.0.0.1:{server.port}/-/status"
    first = await dump_dom(chromium, url, tmp_path / "profile1")
    assert element_text(first, "queue-depth") == "3"
    assert element_text(first, "queue-policy") == "fair"
    assert 'data-tenant="batch"' in first and "12.5" in first  # its GPU-seconds
    assert element_text(first, "desired-pods") == "2"
    assert element_text(first, "ready-pods") == "1"
    assert element_text(first, "leader") == "yes"
    assert f'data-pod="{POD_A}"' in first and f'data-pod="{POD_B}"' in first

    status.snapshot["queue"]["depth"] = 7
    status.snapshot["autoscaler"]["desired"] = 3
    second = await dump_dom(chromium, url, tmp_path / "profile2")
    assert element_text(second, "queue-depth") == "7"
    assert element_text(second, "desired-pods") == "3"


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_page_refreshes_itself_from_the_json(
    chromium: str, aiohttp_server: Any, tmp_path: Path
) -> None:
    """The page is rendered with depth 3; only its own fetch can show 11 and the new pod."""

    def change(snapshot: dict[str, Any]) -> None:
        snapshot["queue"]["depth"] = 11
        snapshot["pods"].append(dict(snapshot["pods"][0], id="10.0.0.9:7860", state="warming"))
        snapshot["autoscaler"]["events"].append(
            {"at": "2026-11-25T18:01:00Z", "from": 2, "to": 3, "reason": "queue 11 > 2"}
        )

    status = StatusApp(sample_snapshot(depth=3))
    status.after_html = change
    server = await aiohttp_server(status.app, host="127.0.0.1")
    dom = await dump_dom(chromium, f"http://127.0.0.1:{server.port}/-/status", tmp_path)
    assert status.json_requests >= 1
    assert element_text(dom, "queue-depth") == "11"
    assert 'data-pod="10.0.0.9:7860"' in dom
    assert "queue 11 &gt; 2" in dom
    assert element_text(dom, "fetch-error") == ""


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_hostile_pod_ids_are_shown_as_text(
    chromium: str, aiohttp_server: Any, tmp_path: Path
) -> None:
    snap = sample_snapshot()
    snap["pods"][0]["id"] = EVIL_POD
    snap["pods"][0]["checkpoint"] = EVIL_CHECKPOINT
    server = await aiohttp_server(StatusApp(snap).app, host="127.0.0.1")
    dom = await dump_dom(chromium, f"http://127.0.0.1:{server.port}/-/status", tmp_path)
    assert element_text(dom, "queue-depth") == "3"  # the page still works
    assert "&lt;img src=x onerror=" in dom  # shown as text in the pods table
    assert "data-pwned" not in dom.split("<body", 1)[1].split(">", 1)[0]


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_page_lists_recent_jobs_without_bodies(
    chromium: str, aiohttp_server: Any, tmp_path: Path
) -> None:
    snap = sample_snapshot()
    snap["jobs"] = {
        "counts": {"queued": 1, "running": 0, "succeeded": 2, "failed": 0, "cancelled": 0},
        "store_bytes": 3 * 1048576,
        "max_bytes": 1024 * 1048576,
        "ttl_s": 3600.0,
        "recent": [
            {"id": "Zx9abc…", "tenant": None, "status": "queued", "wait_s": 2.5, "pod": None},
            {
                "id": "Qq1def…",
                "tenant": "t1",
                "status": "succeeded",
                "wait_s": 0.25,
                "pod": EVIL_POD,
            },
        ],
    }
    server = await aiohttp_server(StatusApp(snap).app, host="127.0.0.1")
    dom = await dump_dom(chromium, f"http://127.0.0.1:{server.port}/-/status", tmp_path)
    assert element_text(dom, "jobs-store") == "3.0 MiB"
    assert "queued 1, running 0, succeeded 2" in element_text(dom, "jobs-counts")
    assert "Zx9abc…" in dom and "Qq1def…" in dom and ">2.5<" in dom
    assert "&lt;img src=x onerror=" in dom
    assert "data-pwned" not in dom.split("<body", 1)[1].split(">", 1)[0]

"""Integration: what clients can make the proxy log, on real sockets.

A flood of requests aiohttp cannot parse costs one WARNING line each at most, at most
``BAD_REQUEST_LINES_PER_S`` a second, never a traceback; a path with percent-encoded
control characters (decoded before the handler sees it) is logged escaped, so it can
neither split a line nor drive a terminal.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import re
from collections.abc import Callable, Iterator

import pytest

from sdproxy.runtime.logs import BAD_REQUEST_LINES_PER_S, SERVER_LOGGER, setup_logging
from sdproxy.settings import LogSettings
from tests.integration.conftest import ProxyFactory, ProxyUnderTest, SimFactory

pytestmark = pytest.mark.timeout(60)

#: raw control characters a log line must not carry (a newline only ends a line)
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
#: requests aiohttp refuses with 400 before any handler runs, and the answer's first bytes
MALFORMED = [
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: zz\r\n\r\n",
    b"GET / HTTP/1.1\r\nHo\x01st: a\r\n\r\n",
    b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/9.x\r\nHost: a\r\n\r\n",
    # a bad method after a good request on the same connection: aiohttp logs it at ERROR
    b"GET /-/healthz HTTP/1.1\r\nHost: a\r\n\r\nG\x01T / HTTP/1.1\r\nHost: a\r\n\r\n",
]


@pytest.fixture
def captured_logs() -> Iterator[Callable[[str], io.StringIO]]:
    """``captured_logs(fmt)``: the proxy's logging set up as ``serve`` does, into a buffer
    (process-wide state, put back afterwards)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("sdproxy.access", "aiohttp.access")
    saved = {n: (logging.getLogger(n).level, logging.getLogger(n).disabled) for n in names}
    server_filters = list(logging.getLogger(SERVER_LOGGER).filters)

    def start(fmt: str) -> io.StringIO:
        stream = io.StringIO()
        setup_logging(LogSettings(log_level="info", log_format=fmt), stream=stream)
        return stream

    yield start
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    for name, (lvl, disabled) in saved.items():
        logging.getLogger(name).setLevel(lvl)
        logging.getLogger(name).disabled = disabled
    logging.getLogger(SERVER_LOGGER).filters[:] = server_filters


async def exchange(proxy: ProxyUnderTest, raw: bytes) -> bytes:
    """Send ``raw`` on a fresh connection; everything the proxy answers until it closes."""
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


async def test_a_flood_of_malformed_requests_logs_few_one_line_warnings(
    proxy_factory: ProxyFactory, sim_pods: SimFactory, captured_logs: Callable[[str], io.StringIO]
) -> None:
    stream = captured_logs("text")
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = MALFORMED * 10
    answers = await asyncio.gather(*(exchange(proxy, raw) for raw in sent))
    elapsed = loop.time() - start
    assert all(b"HTTP/1.1 400 Bad Request\r\n" in a or b" 400 " in a for a in answers)
    text = stream.getvalue()
    assert "Traceback" not in text
    server = [line for line in text.splitlines() if f" {SERVER_LOGGER} " in line]
    assert server, "the bad requests are still logged"
    assert all(" WARNING aiohttp.server bad request: " in line for line in server), server
    # fixed one-second windows from the first line: at most this many were written
    assert len(server) <= BAD_REQUEST_LINES_PER_S * (math.floor(elapsed) + 1) < len(sent)
    assert not [line for line in text.splitlines() if " ERROR " in line]


HOSTILE_PATH = b"/sdapi/v1/x%0Dforged%1B[2J%00%7F%C2%9B%E2%80%AE"


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_control_characters_in_a_path_are_logged_escaped(
    proxy_factory: ProxyFactory,
    sim_pods: SimFactory,
    captured_logs: Callable[[str], io.StringIO],
    fmt: str,
) -> None:
    stream = captured_logs(fmt)
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    request = b"GET " + HOSTILE_PATH + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    answer = await exchange(proxy, request)
    # no sd-webui route has control characters: the proxy refuses it (and logs it escaped)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert b'"bad_request"' in answer
    text = stream.getvalue()
    assert not RAW.search(text), repr(text)
    [access] = [line for line in text.splitlines() if "sdproxy.access" in line]
    if fmt == "json":
        assert json.loads(access)["path"] == "/sdapi/v1/x\rforged\x1b[2J\x00\x7f\x9b\u202e"
    else:
        assert " GET /sdapi/v1/x\\rforged\\x1b[2J\\x00\\x7f\\x9b\\u202e 400 " in access

"""Test helper: a headless Chromium driven over the Chrome DevTools Protocol (CDP).

No browser automation package: Chromium's ``--remote-debugging-port`` serves the
protocol as JSON over a websocket (chromedevtools.github.io/devtools-protocol), which
aiohttp speaks. One ``Chromium`` process; each ``Browser`` is its own browser context
(``Target.createBrowserContext``: separate cookies, like separate people) with one page.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

START_TIMEOUT_S = 20.0


class CdpError(Exception):
    pass


class Session:
    """One CDP websocket (the browser's); commands by id, events dropped but logged."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reader = asyncio.create_task(self._read(), name="cdp-read")

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            future = self._waiting.pop(data.get("id", -1), None)
            if future is None or future.done():
                continue
            if "error" in data:
                future.set_exception(CdpError(str(data["error"])))
            else:
                future.set_result(data.get("result", {}))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(CdpError("the browser closed its websocket"))

    async def call(self, method: str, session_id: str | None = None, **params: Any) -> Any:
        ident = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session_id is not None:
            message["sessionId"] = session_id
        await self.ws.send_str(json.dumps(message))
        return await asyncio.wait_for(future, 30)

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class Browser:
    """A page in its own browser context: its own cookie jar."""

    def __init__(self, cdp: Session, context_id: str, target_id: str, session_id: str) -> None:
        self.cdp = cdp
        self.context_id = context_id
        self.target_id = target_id
        self.session_id = session_id

    async def goto(self, url: str) -> None:
        await self.cdp.call("Page.navigate", self.session_id, url=url)

    async def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.cdp.call(
            "Runtime.evaluate",
            self.session_id,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            raise CdpError(str(result["exceptionDetails"])[:500])
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, *, timeout_s: float = 30.0) -> Any:
        """Poll ``expression`` until it is truthy; its value. Errors while the page
        navigates count as not yet."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        last: Any = None
        while True:
            with contextlib.suppress(CdpError):
                last = await self.eval(expression)
                if last:
                    return last
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{expression!r} still {last!r} after {timeout_s} s")
            await asyncio.sleep(0.2)

    async def cookies(self) -> list[dict[str, Any]]:
        result = await self.cdp.call("Network.getCookies", self.session_id)
        return list(result.get("cookies", []))

    async def close(self) -> None:
        await self.cdp.call("Target.disposeBrowserContext", browserContextId=self.context_id)


class Chromium:
    def __init__(self, cdp: Session) -> None:
        self.cdp = cdp

    async def new_browser(self) -> Browser:
        context = await self.cdp.call("Target.createBrowserContext")
        context_id = context["browserContextId"]
        target = await self.cdp.call(
            "Target.createTarget", url="about:blank", browserContextId=context_id
        )
        attached = await self.cdp.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        browser = Browser(self.cdp, context_id, target["targetId"], attached["sessionId"])
        await self.cdp.call("Page.enable", browser.session_id)
        await self.cdp.call("Network.enable", browser.session_id)
        return browser


def _debugging_port(profile: Path) -> tuple[str, str] | None:
    """Chromium writes its port and browser path to DevToolsActivePort once it listens."""
    port_file = profile / "DevToolsActivePort"
    lines = port_file.read_text().splitlines() if port_file.exists() else []
    return (lines[0], lines[1]) if len(lines) >= 2 else None


@contextlib.asynccontextmanager
async def chromium(binary: str, profile: Path) -> AsyncIterator[Chromium]:
    """A headless Chromium on an ephemeral debugging port, killed on exit (``profile``:
    a directory of its own)."""
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--remote-debugging-port=0",
        "--remote-debugging-address=127.0.0.1",
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while (found := _debugging_port(profile)) is None:
            if proc.returncode is not None or asyncio.get_running_loop().time() > deadline:
                raise RuntimeError("chromium did not open its debugging port")
            await asyncio.sleep(0.1)
        port, path = found
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
            cdp = Session(ws)
            try:
                yield Chromium(cdp)
            finally:
                await cdp.close()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()

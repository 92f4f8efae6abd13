"""Runtime: ``sdproxy gate --ui`` — the browser UI through the pod-side gate.

UI traffic (every path but the API's: ``/sdapi/``, ``--ui-api-prefix``) passes
through the gate untouched — HTTP as light calls, websockets relayed frame by frame
(sdproxy.runtime.websocket) — instead of a ``/run/predict`` POST taking a heavy slot
and ``/queue/join`` reaching sd-webui as a plain GET (404).

A UI generation is counted as a claim of the pod's slot while it runs, so the occupancy
every front replica follows shows it (a replica that does not know the browser's session
sends the pod no API job meanwhile): Gradio's queue tells its client
``{"msg": "process_starts"}`` when the event starts and ``"process_completed"`` when it
ends (gradio/queueing.py ``process_events``); the gate watches those messages on the
websocket. The claim is taken when a slot is free — sd-webui runs the generation under
its lock only once the API job ahead of it has finished, so that is when it truly runs —
and released at completion or when the websocket closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from aiohttp import web

from sdproxy.core.podgate import Claim
from sdproxy.core.queue import TicketId
from sdproxy.runtime import forward, websocket
from sdproxy.runtime.jobs import new_request_id

if TYPE_CHECKING:
    from sdproxy.runtime.podgate import GateServer

API_PREFIXES = ("/sdapi/", "/-/")
ROUTE = "/queue/join (ui)"


class UiGeneration:
    """The slot claim of one UI websocket's running generation (at most one at a time)."""

    def __init__(self, gate: GateServer, request: web.Request) -> None:
        self.gate = gate
        self.request_id = request.headers.get("X-Request-Id") or new_request_id()
        self.ticket: TicketId | None = None
        self._waiting: asyncio.Task[None] | None = None

    def on_message(self, direction: str, text: str) -> None:
        if direction != "down" or '"msg"' not in text:
            return
        if '"process_starts"' in text and self._waiting is None and self.ticket is None:
            self._waiting = asyncio.get_running_loop().create_task(
                self._claim_when_free(), name=f"gate-ui-{self.request_id}"
            )
        elif '"process_completed"' in text:
            self.close()

    async def _claim_when_free(self) -> None:
        while self.ticket is None:
            claim = Claim(
                request_id=self.request_id,
                replica=None,
                caller=None,
                route=ROUTE,
                started_at=self.gate.clock(),
            )
            ticket = self.gate.core.claim(claim)
            if ticket is not None:
                self.ticket = ticket
                self.gate.changed()
                return
            await self.gate._next_change()

    def close(self) -> None:
        """The generation ended (or its websocket closed): free the slot."""
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
        if self.ticket is not None:
            self.gate.core.release(self.ticket)
            self.ticket = None
            self.gate.changed()


def is_ui(path: str, prefixes: tuple[str, ...]) -> bool:
    return not path.startswith((*API_PREFIXES, *prefixes))


async def relay(gate: GateServer, request: web.Request) -> web.StreamResponse:
    """A UI request: a websocket relayed (its generations claimed), HTTP passed on."""
    if not websocket.is_upgrade(request):
        return await gate._pass(request)
    assert gate.session is not None
    generation = UiGeneration(gate, request)
    try:
        return await websocket.relay(
            request,
            gate.session,
            url=gate.config.upstream + request.path_qs,
            headers=forward.upstream_headers(request, {}),
            on_message=generation.on_message,
        )
    finally:
        with contextlib.suppress(Exception):
            generation.close()

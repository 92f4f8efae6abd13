"""Runtime: the other proxy replicas — for global demand and job-bound calls through any
replica.

Peers come from ``--peer URL`` (static) or, with ``--peer-service``, from the EndpointSlices
of the proxy's own Service (the same list+watch as pod discovery). Each replica serves
``GET /-/peer``: its replica id, how many heavy requests it has queued, how many it received
since it started (the arrival rate of ``--wait-target-s``), and how many run on pods WITHOUT
a gate (in-flight work on gated pods is seen by everyone at the gates). Every
replica polls every peer each ``INTERVAL_S``; a peer not heard from for ``STALE_S`` no
longer counts (a dead replica's queue died with it). So every replica computes the same
global demand: all queues, plus the in-flight work at the gates, plus every replica's work
on ungated pods — and exports the same ``sdproxy_desired_pods``. With ``--ui`` the
document also lists the browser sessions the replica holds (by a hash of their token),
those it ended lately and its lobby (sdproxy.runtime.ui).

A job-bound call (progress, interrupt) for a job another replica holds in its QUEUE is
asked of the peers (``GET /-/peer/job?caller=KEY``, ``POST /-/peer/job/cancel?caller=KEY``,
KEY being the caller identity the call is matched by, as in sdproxy.runtime.jobs); one
RUNNING on a gated pod is found in that gate's occupancy, which names the callers.
A replica answering with this replica's own id (the Service lists every replica) is
skipped. The peer endpoints are operational ones: served on ``--ops-listen`` when set (then
``--peer`` names that address, and ``--peer-service`` uses the Service port ``ops``), and
behind ``--ops-token``, which the replicas share and send.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger("sdproxy.peers")

INTERVAL_S = 0.5
STALE_S = 3.0
PEER_PATH = "/-/peer"


@dataclass(frozen=True, kw_only=True)
class PeerState:
    replica: str
    queued: int
    inflight_direct: int
    seen_at: float
    #: heavy requests it received since it started (the autoscaler's arrival rate)
    arrivals: int = 0
    #: --ui: the browser sessions the peer holds (sdproxy.runtime.ui ``peer_document``)
    ui: dict[str, Any] | None = None


class Peers:
    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        replica: str,
        urls: Sequence[str],
        clock: Callable[[], float],
        token: str = "",
    ) -> None:
        self.session = session
        #: the replicas share --ops-token, which guards /-/peer* like every ops endpoint
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.replica = replica
        self.clock = clock
        self._urls: list[str] = list(urls)
        self._state: dict[str, PeerState] = {}
        #: every replica id a peer ever answered with (a leaving replica that stopped
        #: listening is still known: it hands its jobs over after its drain)
        self.known: set[str] = set()

    @property
    def urls(self) -> list[str]:
        return list(self._urls)

    @property
    def headers(self) -> dict[str, str]:
        """What a request to a peer's /-/peer* endpoints carries (the ops token)."""
        return dict(self._headers)

    def set_urls(self, urls: Sequence[str]) -> None:
        self._urls = list(urls)
        for gone in set(self._state) - set(self._urls):
            del self._state[gone]

    def live(self) -> list[tuple[str, PeerState]]:
        """Peers heard from lately (never this replica)."""
        now = self.clock()
        return [(u, s) for u, s in self._state.items() if now - s.seen_at <= STALE_S]

    def demand(self) -> tuple[int, int]:
        """(queued, in flight on ungated pods) summed over the live peers."""
        states = [s for _u, s in self.live()]
        return sum(s.queued for s in states), sum(s.inflight_direct for s in states)

    def arrivals(self) -> dict[str, int]:
        """Each live peer's heavy-arrival counter, by replica id."""
        return {s.replica: s.arrivals for _u, s in self.live()}

    def ui_documents(self) -> list[dict[str, Any]]:
        """The UI part of every live peer's document (--ui)."""
        return [s.ui for _u, s in self.live() if s.ui is not None]

    async def run(self) -> None:
        """Poll every peer, forever."""
        while True:
            await asyncio.gather(*(self._poll(url) for url in self.urls))
            await asyncio.sleep(INTERVAL_S)

    async def _poll(self, url: str) -> None:
        data = await self._get_json(url + PEER_PATH)
        if data is None or data.get("replica") == self.replica:
            self._state.pop(url, None)
            return
        self.known.add(str(data["replica"]))
        self._state[url] = PeerState(
            replica=str(data["replica"]),
            queued=int(data["queued"]),
            inflight_direct=int(data["inflight_direct"]),
            seen_at=self.clock(),
            arrivals=int(data.get("arrivals", 0)),
            ui=data["ui"] if isinstance(data.get("ui"), dict) else None,
        )

    async def find_queued(self, key: str) -> dict[str, Any] | None:
        """The queue place of the caller's job at whichever peer holds it, if any."""
        for url, _state in self.live():
            data = await self._get_json(url + PEER_PATH + "/job", params={"caller": key})
            if data is not None:
                return data
        return None

    async def cancel_queued(self, key: str) -> bool:
        for url, _state in self.live():
            data = await self._request_json(
                "POST", url + PEER_PATH + "/job/cancel", params={"caller": key}
            )
            if data is not None and data.get("cancelled"):
                return True
        return False

    async def _get_json(self, url: str, **kw: Any) -> dict[str, Any] | None:
        return await self._request_json("GET", url, **kw)

    async def _request_json(self, method: str, url: str, **kw: Any) -> dict[str, Any] | None:
        timeout = aiohttp.ClientTimeout(total=2.0)
        try:
            async with self.session.request(
                method, url, timeout=timeout, headers=self._headers, **kw
            ) as resp:
                if resp.status != 200:
                    return None
                data = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("peer %s: %r", url, exc)
            return None
        return data if isinstance(data, dict) else None

"""Runtime: the local scaler — simulated sd-webui pods as local processes (demo, tests).

``LocalPods`` is both a Scaler (start or stop ``sdproxy sim`` processes on loopback) and
the Discovery source for them (a pod is ready once its HTTP port answers, like a
Kubernetes readiness probe; with --warmup the proxy still waits for the model to load).
Scale-in stops only pods the autoscaler named idle, so a generation is never cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from sdproxy.core.pods import Endpoint, PodId
from sdproxy.runtime.discovery import DiscoveryHealth, Sink
from sdproxy.settings import ScalerSettings

log = logging.getLogger("sdproxy.local")
PROBE_INTERVAL_S = 0.25


@dataclass(kw_only=True)
class LocalPod:
    pod_id: PodId
    port: int
    process: asyncio.subprocess.Process
    #: ``sdproxy gate`` in front of the simulated pod (--local-gates)
    gate: asyncio.subprocess.Process | None = None
    gate_port: int = 0
    ready: bool = False
    stopping: bool = False

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Where the proxy sends its work: the gate if there is one."""
        return f"http://127.0.0.1:{self.gate_port}" if self.gate else self.sim_url

    @property
    def processes(self) -> list[asyncio.subprocess.Process]:
        return [self.process] + ([self.gate] if self.gate else [])


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class LocalPods:
    """Simulated pods started and stopped on demand."""

    name = "local"

    def __init__(self, settings: ScalerSettings) -> None:
        self.settings = settings
        self.pods: dict[PodId, LocalPod] = {}
        self._changed = asyncio.Event()
        self._next_port = settings.local_base_port

    # ---- Scaler -----------------------------------------------------------------------

    def is_leader(self) -> bool:
        return True

    async def scale_to(
        self, desired: int, *, idle_pods: Sequence[PodId], known_pods: Sequence[PodId] = ()
    ) -> None:
        live = [p for p in self.pods.values() if not p.stopping]
        for _ in range(desired - len(live)):
            await self._start_pod()
        surplus = len(live) - desired
        for pod_id in idle_pods:
            if surplus <= 0:
                break
            pod = self.pods.get(pod_id)
            if pod is not None and not pod.stopping:
                self._stop_pod(pod)
                surplus -= 1

    async def _start_pod(self) -> None:
        port = self._free_port()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sdproxy", "sim",
            "--host", "127.0.0.1", "--port", str(port),
            "--startup-s", str(self.settings.local_startup_s),
            "--step-ms", str(self.settings.local_step_ms),
            *(["--ui"] if self.settings.local_ui else []),
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        pod_id = PodId(f"sim-{port}")
        pod = LocalPod(pod_id=pod_id, port=port, process=process)
        self.pods[pod_id] = pod
        if self.settings.local_gates:
            pod.gate_port = self._free_port()
            pod.gate = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sdproxy", "gate",
                "--listen", f"127.0.0.1:{pod.gate_port}", "--upstream", pod.sim_url,
                "--log-level", "warning",
                stdout=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        log.info("started simulated pod %s (pid %d) at %s", pod_id, process.pid, pod.url)
        self._changed.set()

    def _free_port(self) -> int:
        used = {p.port for p in self.pods.values()}
        port = self._next_port
        while port in used or not _port_free(port):
            port += 1
        self._next_port = port + 1 if port + 1 < 65000 else self.settings.local_base_port
        return port

    def _stop_pod(self, pod: LocalPod) -> None:
        pod.stopping = True
        for process in pod.processes:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        log.info("stopping simulated pod %s", pod.pod_id)
        self._changed.set()

    async def close(self) -> None:
        processes = [p for pod in self.pods.values() for p in pod.processes]
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), timeout=5)
            except TimeoutError:
                process.kill()
                await process.wait()
        self.pods.clear()

    # ---- Discovery --------------------------------------------------------------------

    def health(self) -> DiscoveryHealth:
        return DiscoveryHealth(connected=True)

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(pod_id=p.pod_id, url=p.url, ready=p.ready, terminating=p.stopping)
            for p in self.pods.values()
        ]

    async def run(self, sink: Sink) -> None:
        sink(self.endpoints())
        async with aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), PROBE_INTERVAL_S)
                self._changed.clear()
                if await self._probe(session):
                    sink(self.endpoints())

    async def _probe(self, session: aiohttp.ClientSession) -> bool:
        """Mark pods ready when they answer; forget exited ones. True if anything changed."""
        changed = False
        for pod in list(self.pods.values()):
            if any(p.returncode is not None for p in pod.processes):
                for process in pod.processes:  # a pod and its gate go together
                    with contextlib.suppress(ProcessLookupError):
                        process.terminate()
                del self.pods[pod.pod_id]
                changed = True
            elif not pod.ready and not pod.stopping and await self._answers(session, pod):
                pod.ready = changed = True
            elif pod.stopping:
                changed = True  # report terminating until the process is gone
        return changed

    @staticmethod
    async def _answers(session: aiohttp.ClientSession, pod: LocalPod) -> bool:
        checks = [pod.sim_url + "/internal/ping"]
        if pod.gate is not None:
            checks.append(pod.url + "/-/healthz")
        try:
            timeout = aiohttp.ClientTimeout(total=1)
            for url in checks:
                async with session.get(url, timeout=timeout) as resp:
                    if resp.status != 200:
                        return False
        except (aiohttp.ClientError, TimeoutError):
            return False
        return True

"""Bench: the load generator (aiohttp client), open-loop and closed-loop.

Open loop: requests leave at scheduled instants whatever the system's answers
(Poisson arrivals at a rate, bursts, a replayed trace), so an overloaded system builds a
queue instead of slowing the client down -- the honest way to measure overload.
Closed loop: C workers each send the next request when the last one answered
(throughput at a fixed concurrency).

Every run is bounded twice: by the number of requests it may send and by a deadline;
requests still open at the deadline are cancelled and counted as errors. Times are read
from ``time.perf_counter`` relative to the run's start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

CHUNK = 1 << 16


@dataclass(frozen=True, kw_only=True)
class RequestSpec:
    """One HTTP request to send (the body is shared between requests, never copied)."""

    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Sample:
    """What one request did: times in seconds from the run's start."""

    t_send: float
    t_done: float
    status: int  # 0: no HTTP answer (connection error, timeout, cancelled)
    bytes_out: int = 0
    bytes_in: int = 0
    error: str = ""
    pod: str = ""
    queue_ms: float | None = None
    #: which of an open loop's base URLs it went to (0 with one)
    base: int = 0
    #: an open loop's request number (``make_spec(index)``); -1 elsewhere
    index: int = -1
    #: the X-Sdproxy-Job the answer named (the job API's id)
    job_id: str = ""

    @property
    def latency(self) -> float:
        return self.t_done - self.t_send

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and not self.error


# --------------------------------------------------------------------------- schedules


def poisson(
    *, rate: float, duration_s: float, rng: random.Random, start_s: float = 0.0
) -> list[float]:
    """Arrival instants of a Poisson process (exponential gaps) at ``rate`` per second."""
    out: list[float] = []
    t = start_s
    limit = 10_000_000
    while len(out) < limit:
        t += rng.expovariate(rate)
        if t >= start_s + duration_s:
            break
        out.append(t)
    return out


def burst(*, count: int, at_s: float = 0.0, spread_s: float = 0.0) -> list[float]:
    """``count`` arrivals at ``at_s``, evenly spread over ``spread_s`` seconds."""
    if count <= 0:
        return []
    step = spread_s / count
    return [at_s + i * step for i in range(count)]


def trace(path: Path) -> list[float]:
    """Replay a recorded trace: a JSON list of arrival offsets in seconds, or one offset
    per line (CSV: the first column), sorted and shifted to start at 0."""
    text = path.read_text()
    if text.lstrip().startswith("["):
        values = [float(v) for v in json.loads(text)]
    else:
        values = [
            float(line.split(",")[0])
            for line in text.splitlines()
            if line.strip() and not line.startswith("#") and line[0] in "0123456789."
        ]
    values.sort()
    return [v - values[0] for v in values] if values else []


def merge(*schedules: Sequence[float]) -> list[float]:
    return sorted(t for sched in schedules for t in sched)


# --------------------------------------------------------------------------- progress bar


class Progress:
    """A one-line live progress bar on stderr; silent when stderr is not a TTY."""

    def __init__(self, label: str, *, total: int | None = None) -> None:
        self.label = label
        self.total = total
        self.enabled = sys.stderr.isatty()
        self._start = time.perf_counter()
        self._last = 0.0

    def update(self, *, done: int, errors: int = 0, extra: str = "", force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        elapsed = now - self._start
        if self.total:
            frac = min(1.0, done / self.total)
            bar = "#" * int(frac * 24)
            count = f"[{bar:<24}] {done}/{self.total}"
        else:
            count = f"{done} done"
        line = f"\r  {self.label:<28} {count} err {errors} {extra} {elapsed:6.1f}s"
        sys.stderr.write(line[:160].ljust(100))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 110 + "\r")
            sys.stderr.flush()


# --------------------------------------------------------------------------- one request


def new_session(*, timeout_s: float, limit: int = 0) -> aiohttp.ClientSession:
    """A client session with no connection cap (``limit=0``) and one total timeout."""
    connector = aiohttp.TCPConnector(limit=limit, force_close=False, enable_cleanup_closed=False)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


async def send(
    session: aiohttp.ClientSession, base_url: str, spec: RequestSpec, *, t0: float
) -> Sample:
    """Send one request, read the whole answer (counted, not kept), return its Sample."""
    t_send = time.perf_counter() - t0
    nbytes = 0
    try:
        async with session.request(
            spec.method, base_url + spec.path, data=spec.body, headers=spec.headers
        ) as resp:
            async for chunk in resp.content.iter_chunked(CHUNK):
                nbytes += len(chunk)
            # sdproxy's own queue wait, or HAProxy's %Tw when the bench config adds it
            queue_ms = resp.headers.get("X-Sdproxy-Queue-Ms") or resp.headers.get(
                "X-Haproxy-Queue-Ms"
            )
            return Sample(
                t_send=t_send,
                t_done=time.perf_counter() - t0,
                status=resp.status,
                bytes_out=len(spec.body or b""),
                bytes_in=nbytes,
                pod=resp.headers.get("X-Sdproxy-Pod", ""),
                queue_ms=float(queue_ms) if queue_ms else None,
                job_id=resp.headers.get("X-Sdproxy-Job", ""),
            )
    except asyncio.CancelledError:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        return Sample(
            t_send=t_send,
            t_done=time.perf_counter() - t0,
            status=0,
            bytes_in=nbytes,
            error=type(exc).__name__,
        )


# --------------------------------------------------------------------------- loops


@dataclass
class RunResult:
    samples: list[Sample]
    t0: float  # perf_counter at the run's start
    elapsed_s: float
    cancelled: int = 0


async def open_loop(
    session: aiohttp.ClientSession,
    base_url: str | Sequence[str],
    *,
    arrivals: Sequence[float],
    make_spec: Callable[[int], RequestSpec],
    deadline_s: float,
    progress: Progress | None = None,
    t0: float | None = None,
) -> RunResult:
    """Send request ``i`` at ``arrivals[i]`` seconds; wait for all up to ``deadline_s``.

    With several base URLs request ``i`` goes to ``base_url[i % len(base_url)]``
    (round-robin over front replicas, as a Service spreads connections)."""
    t0 = time.perf_counter() if t0 is None else t0
    bases = [base_url] if isinstance(base_url, str) else list(base_url)
    samples: list[Sample] = []
    tasks: dict[asyncio.Task[Sample], float] = {}
    base_of: dict[asyncio.Task[Sample], int] = {}
    index_of: dict[asyncio.Task[Sample], int] = {}
    errors = 0

    def done(task: asyncio.Task[Sample]) -> None:
        nonlocal errors
        index = index_of.pop(task, -1)
        if not task.cancelled() and task.exception() is None:
            sample = task.result()
            sample.base = base_of.pop(task, 0)
            sample.index = index
            samples.append(sample)
            errors += not sample.ok
        tasks.pop(task, None)

    for i, at in enumerate(arrivals):
        now = time.perf_counter() - t0
        if now >= deadline_s:
            break
        if at > now:
            await asyncio.sleep(at - now)
        task = asyncio.create_task(send(session, bases[i % len(bases)], make_spec(i), t0=t0))
        base_of[task] = i % len(bases)
        index_of[task] = i
        tasks[task] = at
        task.add_done_callback(done)
        if progress is not None:
            progress.update(done=len(samples), errors=errors, extra=f"open {len(tasks)}")
    while tasks and time.perf_counter() - t0 < deadline_s:
        await asyncio.wait(list(tasks), timeout=0.2)
        if progress is not None:
            progress.update(done=len(samples), errors=errors, extra=f"open {len(tasks)}")
    cancelled = await _cancel(tasks, samples, t0=t0)
    return RunResult(
        samples=samples, t0=t0, elapsed_s=time.perf_counter() - t0, cancelled=cancelled
    )


async def _cancel(
    tasks: dict[asyncio.Task[Sample], float], samples: list[Sample], *, t0: float
) -> int:
    """Cancel what is still open; each becomes an error sample ("cancelled")."""
    left = dict(tasks)
    for task in left:
        task.cancel()
    if left:
        await asyncio.gather(*left, return_exceptions=True)
    now = time.perf_counter() - t0
    for at in left.values():
        samples.append(Sample(t_send=at, t_done=now, status=0, error="cancelled"))
    return len(left)


async def closed_loop(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    spec: RequestSpec,
    concurrency: int,
    duration_s: float,
    max_requests: int = 10_000_000,
    progress: Progress | None = None,
) -> RunResult:
    """``concurrency`` workers send back to back for ``duration_s`` (or ``max_requests``)."""
    t0 = time.perf_counter()
    samples: list[Sample] = []
    budget = [max_requests]

    async def worker() -> None:
        while budget[0] > 0 and time.perf_counter() - t0 < duration_s:
            budget[0] -= 1
            samples.append(await send(session, base_url, spec, t0=t0))
            if progress is not None:
                progress.update(done=len(samples), errors=sum(not s.ok for s in samples[-1:]))

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*workers), timeout=duration_s + 60.0)
    return RunResult(samples=samples, t0=t0, elapsed_s=time.perf_counter() - t0)


async def poller(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    spec: RequestSpec,
    interval_s: float,
    stop: asyncio.Event,
    t0: float,
    max_samples: int = 100_000,
) -> list[Sample]:
    """One client polling ``spec`` every ``interval_s`` until ``stop`` (e.g. progress)."""
    samples: list[Sample] = []
    while not stop.is_set() and len(samples) < max_samples:
        samples.append(await send(session, base_url, spec, t0=t0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
    return samples

"""Sim: the mutable state of one simulated pod — its GPU lock, worker threads and job.

Mirrors sd-webui: ``queue_lock`` (modules/call_queue.py) is a plain ``threading.Lock``
that wakes waiters in no particular order; every plain-``def`` FastAPI route runs on one
of anyio's 40 worker threads for its whole life; ``shared.state``
(modules/shared_state.py) holds the ONE running job that progress/interrupt/skip see.
Counters for ``/sim/stats`` live here too. Time comes from the injected ``clock``.
"""

from __future__ import annotations

import asyncio
import datetime
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from sdproxy.sim.checkpoints import Catalog, Checkpoint
from sdproxy.sim.config import SimConfig
from sdproxy.sim.options import default_options

Clock = Callable[[], float]
#: shared_state.State's class defaults, what progress shows before the first job
IDLE_STATE: dict[str, object] = {
    "skipped": False,
    "interrupted": False,
    "stopping_generation": False,
    "job": "",
    "job_count": 0,
    "job_timestamp": "0",
    "job_no": 0,
    "sampling_step": 0,
    "sampling_steps": 0,
}


class ShuffledLock:
    """A mutual-exclusion lock that hands over to a RANDOM waiter on release.

    asyncio.Lock is FIFO; sd-webui's threading.Lock promises no order, and a proxy must
    not rely on one. Ownership passes directly to the chosen waiter, so no newcomer can
    barge in between.
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._locked = False
        self._waiters: list[asyncio.Future[None]] = []

    def locked(self) -> bool:
        return self._locked

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if not self._locked:
            self._locked = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed the lock, but cancelled before running: pass it on
            elif fut in self._waiters:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.pop(self._rng.randrange(len(self._waiters)))
            if not fut.done():
                fut.set_result(None)  # ownership moves; _locked stays True
                return
        self._locked = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class WorkerPool:
    """The server's bounded thread pool: a request holds one slot for its whole life."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.in_use = 0
        self._sem = asyncio.Semaphore(size)

    async def __aenter__(self) -> None:
        await self._sem.acquire()
        self.in_use += 1

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.in_use -= 1
        self._sem.release()


@dataclass
class Job:
    """sd-webui's ``shared.state`` while one job runs (modules/shared_state.py State)."""

    job: str
    task_id: str
    job_count: int
    time_start: float
    job_timestamp: str
    #: (width, height) of the images being made, for the live preview
    size: tuple[int, int]
    job_no: int = 0
    sampling_steps: int = 0
    #: seconds per step of the current pass; 0 when no pass runs (step count frozen)
    step_s: float = 0.0
    pass_start: float = 0.0
    frozen_step: int = 0
    interrupted: bool = False
    skipped: bool = False
    #: the live preview: whether one was made, and at which step (current_image_sampling_step)
    has_image: bool = False
    image_step: int = 0
    #: set by interrupt/skip so the sampler wakes early
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def sampling_step(self, now: float) -> int:
        if self.step_s <= 0:
            return self.frozen_step
        return min(self.sampling_steps, int((now - self.pass_start) / self.step_s))

    def begin_pass(self, *, job_no: int, steps: int, step_s: float, now: float) -> None:
        self.job_no = job_no
        self.sampling_steps = steps
        self.frozen_step = 0
        self.image_step = 0  # State.nextjob; the last preview stays until a new one is made
        self.step_s = step_s
        self.pass_start = now

    def end_pass(self, now: float) -> None:
        self.frozen_step = self.sampling_step(now) if self.step_s > 0 else self.sampling_steps
        self.step_s = 0.0

    def state(self, now: float) -> dict[str, object]:
        """shared_state.State.dict() while this job runs."""
        return {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "stopping_generation": False,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": self.job_timestamp,
            "job_no": self.job_no,
            "sampling_step": self.sampling_step(now),
            "sampling_steps": self.sampling_steps,
        }


@dataclass
class Counters:
    """What ``/sim/stats`` reports; ``/sim/reset`` zeroes them."""

    heavy_inflight_max: int = 0
    completed: int = 0
    interrupted: int = 0
    failed: int = 0
    oom: int = 0
    checkpoint_switches: int = 0
    interrupts_received: int = 0
    skips_received: int = 0
    busy_s: float = 0.0


class SimPod:
    """Everything one simulated pod knows; handlers read and change it."""

    def __init__(self, config: SimConfig, *, clock: Clock, rng: random.Random) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng
        self.catalog = Catalog(config.checkpoints)
        self.lock = ShuffledLock(rng)
        self.threads = WorkerPool(config.threads)
        self.model_ready = asyncio.Event()
        #: the checkpoint in VRAM; None while a load runs
        self.loaded: Checkpoint | None = None
        #: shared.opts.data; its sd_model_checkpoint (None until the first load) names the
        #: default the pod returns to, as the client wrote it or as a load retitled it
        self.options: dict[str, object] = default_options()
        self.job: Job | None = None
        #: shared.state.dict() between jobs: the last job's values, job "" and job_count 0
        self.idle_state: dict[str, object] = dict(IDLE_STATE)
        self.heavy_inflight = 0
        self.counters = Counters()
        self._busy_since: float | None = None

    def enter_heavy(self) -> None:
        self.heavy_inflight += 1
        self.counters.heavy_inflight_max = max(
            self.counters.heavy_inflight_max, self.heavy_inflight
        )

    def leave_heavy(self) -> None:
        self.heavy_inflight -= 1

    def mark_busy(self, busy: bool) -> None:
        """Account GPU time: call with True after taking the lock, False before release."""
        now = self.clock()
        if busy:
            self._busy_since = now
        elif self._busy_since is not None:
            self.counters.busy_s += now - self._busy_since
            self._busy_since = None

    def busy_s(self) -> float:
        running = 0.0 if self._busy_since is None else self.clock() - self._busy_since
        return self.counters.busy_s + running

    def reset(self) -> None:
        self.counters = Counters(heavy_inflight_max=self.heavy_inflight)
        if self._busy_since is not None:
            self._busy_since = self.clock()

    def finish_model_load(self) -> None:
        self.loaded_weights(self.default_checkpoint)
        self.model_ready.set()

    def loaded_weights(self, checkpoint: Checkpoint) -> None:
        """sd_models.load_model_weights done: hashed, and opts retitled if the title changed."""
        self.loaded = checkpoint
        if self.catalog.mark_hashed(checkpoint):
            self.options["sd_model_checkpoint"] = self.catalog.title(checkpoint)
        self.options["sd_checkpoint_hash"] = checkpoint.sha256

    @property
    def default_checkpoint(self) -> Checkpoint:
        """sd_models.select_checkpoint: what opts names, else the first checkpoint."""
        return self.catalog.resolve(self.options["sd_model_checkpoint"]) or self.catalog.default

    def begin_job(self, job: Job) -> None:
        """shared.state.begin: flags cleared; sampling_steps stays until a pass sets it."""
        steps = self.idle_state["sampling_steps"]
        job.sampling_steps = steps if isinstance(steps, int) else 0
        self.job = job

    def end_job(self) -> None:
        """shared.state.end: job "" and job_count 0; the rest keeps the job's values."""
        if self.job is not None:
            self.idle_state = {**self.job.state(self.clock()), "job": "", "job_count": 0}
        self.job = None

    def new_task_id(self, kind: str) -> str:
        # modules/progress.py create_task_id: f"task({task_type}-{random 7 chars})"
        letters = "abcdefghijklmnopqrstuvwxyz0123456789"
        return f"task({kind}-{''.join(self.rng.choices(letters, k=7))})"


def job_timestamp() -> str:
    """shared_state.State.get_job_timestamp: wall-clock label, not an interval."""
    return datetime.datetime.now().strftime("%Y%m%d%H%M%S")

"""Sim: the simulated GPU — lock, model loading, checkpoint switches and sampling passes.

Follows sd-webui's order of events for an API generation (modules/api/api.py
``text2imgapi``): take ``queue_lock``; ``shared.state.begin``; ``process_images``
(modules/processing.py) applies ``override_settings`` (switching checkpoint if needed),
runs ``n_iter`` iterations of sampling, then restores the overridden options — and with
them the checkpoint — when ``override_settings_restore_afterwards`` is true; finally
``shared.state.end`` and release the lock. Interrupt and skip are flags the sampler checks
each step; here they wake the sleeping sampler early.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from sdproxy.core.cost import GenerationPlan
from sdproxy.sim import failures
from sdproxy.sim.state import Job, SimPod, job_timestamp


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What a finished generation produced."""

    #: images made, partial ones included (an interrupted batch still decodes)
    images: int
    interrupted: bool
    #: shared.state.job_timestamp of the job, for the response's info
    job_timestamp: str
    #: title of the checkpoint that sampled (infotext "Model"), before any restore
    checkpoint: str | None


@contextlib.asynccontextmanager
async def gpu(pod: SimPod) -> AsyncIterator[None]:
    """Hold ``queue_lock`` with the model loaded; the held time counts as busy."""
    async with pod.lock:
        # modules/initialize.py loads the model in a thread; the first request that
        # needs shared.sd_model blocks on it while holding the lock
        await pod.model_ready.wait()
        pod.mark_busy(True)
        try:
            yield
        finally:
            pod.mark_busy(False)


async def switch_checkpoint(pod: SimPod, title: str) -> None:
    """sd_models.reload_model_weights: a no-op when ``title`` is already in VRAM."""
    if pod.loaded == title:
        return
    pod.loaded = None  # weights are in flux
    await asyncio.sleep(pod.config.switch_s)
    pod.loaded = title
    pod.counters.checkpoint_switches += 1


@contextlib.asynccontextmanager
async def overrides(pod: SimPod, model: Mapping[str, object]) -> AsyncIterator[None]:
    """process_images' override_settings handling, restore-afterwards included."""
    wanted = model.get("override_settings") or {}
    assert isinstance(wanted, dict)
    checkpoint = pod.catalog.resolve(wanted.get("sd_model_checkpoint"))
    applied = {k: v for k, v in wanted.items() if k in pod.options and k != "sd_model_checkpoint"}
    if checkpoint is not None:
        applied["sd_model_checkpoint"] = checkpoint.title
    stored = {key: pod.options[key] for key in applied}
    pod.options.update(applied)
    try:
        # an unknown or absent checkpoint override reloads the pod's default
        await switch_checkpoint(pod, pod.default_checkpoint)
        yield
    finally:
        if model.get("override_settings_restore_afterwards") is not False:
            pod.options.update(stored)
            await switch_checkpoint(pod, pod.default_checkpoint)


def start_job(pod: SimPod, *, name: str, task_id: str, plan: GenerationPlan) -> Job:
    job = Job(
        job=name,
        task_id=task_id,
        job_count=plan.job_count,
        time_start=pod.clock(),
        job_timestamp=job_timestamp(),
        size=(plan.out_width, plan.out_height),
    )
    pod.job = job
    return job


async def _sample_pass(pod: SimPod, job: Job, *, steps: int, step_s: float) -> None:
    job.begin_pass(job_no=job.job_no, steps=steps, step_s=step_s, now=pod.clock())
    if not (job.interrupted or job.skipped):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(steps * step_s):
                await job.wake.wait()
    job.end_pass(pod.clock())


async def sample(pod: SimPod, job: Job, *, plan: GenerationPlan) -> Outcome:
    """process_images_inner: iterations of passes; skip ends an iteration, interrupt all."""
    images = 0
    for iteration in range(plan.iterations):
        if job.interrupted:
            break
        job.skipped = False  # the next iteration clears a skip (processing.py)
        job.wake.clear()
        for index, one in enumerate(plan.passes):
            job.job_no = iteration * len(plan.passes) + index
            await _sample_pass(
                pod, job, steps=one.steps, step_s=one.units_per_step * pod.config.step_s
            )
        images += plan.batch_size
    return Outcome(
        images=images,
        interrupted=job.interrupted,
        job_timestamp=job.job_timestamp,
        checkpoint=pod.loaded,
    )


def check_faults(pod: SimPod, plan: GenerationPlan) -> None:
    """Out of memory for too many pixels at once; a random NaN failure at --fail-rate."""
    if plan.peak_batch_pixels > pod.config.vram_pixels:
        pod.counters.oom += 1
        raise failures.out_of_memory(plan.peak_batch_pixels)
    if pod.config.fail_rate > 0 and pod.rng.random() < pod.config.fail_rate:
        raise failures.nans()


async def generate(
    pod: SimPod, *, name: str, task_id: str, model: Mapping[str, object], plan: GenerationPlan
) -> Outcome:
    """One txt2img/img2img request from lock to release."""
    async with gpu(pod):
        job = start_job(pod, name=name, task_id=task_id, plan=plan)
        try:
            async with overrides(pod, model):
                check_faults(pod, plan)
                outcome = await sample(pod, job, plan=plan)
        except failures.WebuiError:
            pod.counters.failed += 1
            raise
        finally:
            pod.job = None
    pod.counters.completed += 1
    pod.counters.interrupted += outcome.interrupted
    return outcome


async def run_fixed(pod: SimPod, *, name: str, task_id: str, units: float) -> None:
    """Extras and interrogation: locked GPU work of a fixed cost, not interruptible."""
    async with gpu(pod):
        pod.job = Job(
            job=name,
            task_id=task_id,
            job_count=1,
            time_start=pod.clock(),
            job_timestamp=job_timestamp(),
            size=(0, 0),
        )
        try:
            await asyncio.sleep(units * pod.config.step_s)
        finally:
            pod.job = None
    pod.counters.completed += 1


async def set_checkpoint(pod: SimPod, title: str) -> None:
    """POST options with a new sd_model_checkpoint: reload under the lock, and persist.

    sd-webui stores the option before its onchange callback waits for the lock, so a
    generation finishing meanwhile may "restore" the old value over it (undefined
    behaviour, SD-WEBUI.md); storing it once the lock is held keeps the new default.
    """
    async with gpu(pod):
        pod.options["sd_model_checkpoint"] = title
        await switch_checkpoint(pod, title)

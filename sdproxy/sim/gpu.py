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
from sdproxy.sim.checkpoints import Checkpoint
from sdproxy.sim.state import Job, SimPod, job_timestamp


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What a finished generation produced."""

    #: images made, partial ones included (an interrupted batch still decodes)
    images: int
    interrupted: bool
    #: shared.state.job_timestamp of the job, for the response's info
    job_timestamp: str
    #: the checkpoint that sampled (infotext "Model"), before any restore
    checkpoint: Checkpoint | None


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


async def switch_checkpoint(pod: SimPod, checkpoint: Checkpoint) -> None:
    """sd_models.reload_model_weights: a no-op when ``checkpoint`` is already in VRAM."""
    if pod.loaded is checkpoint:
        return
    pod.loaded = None  # weights are in flux
    await asyncio.sleep(pod.config.switch_s)
    pod.loaded_weights(checkpoint)
    pod.counters.checkpoint_switches += 1


@contextlib.asynccontextmanager
async def overrides(pod: SimPod, model: Mapping[str, object]) -> AsyncIterator[None]:
    """process_images' override_settings handling, restore-afterwards included.

    opts.set stores the value as the request wrote it (a name, a title, a hash); an
    override naming no known checkpoint is dropped and the pod's default is loaded.
    """
    wanted = model.get("override_settings") or {}
    assert isinstance(wanted, dict)
    applied = {k: v for k, v in wanted.items() if k in pod.options and k != "sd_model_checkpoint"}
    if pod.catalog.resolve(wanted.get("sd_model_checkpoint")) is not None:
        applied["sd_model_checkpoint"] = wanted["sd_model_checkpoint"]
    stored = {key: pod.options[key] for key in applied}
    pod.options.update(applied)
    try:
        await switch_checkpoint(pod, pod.default_checkpoint)
        yield
    finally:
        if model.get("override_settings_restore_afterwards") is not False:
            pod.options.update(stored)
            await switch_checkpoint(pod, pod.default_checkpoint)


def start_job(pod: SimPod, *, name: str, task_id: str, plan: GenerationPlan) -> Job:
    """shared.state.begin; job_count is -1 until process_images_inner sets it."""
    job = Job(
        job=name,
        task_id=task_id,
        job_count=-1,
        time_start=pod.clock(),
        job_timestamp=job_timestamp(),
        size=(plan.out_width, plan.out_height),
    )
    pod.begin_job(job)
    return job


async def _sample_pass(pod: SimPod, job: Job, *, job_no: int, steps: int, step_s: float) -> None:
    job.begin_pass(job_no=job_no, steps=steps, step_s=step_s, now=pod.clock())
    if not (job.interrupted or job.skipped):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(steps * step_s):
                await job.wake.wait()
    job.end_pass(pod.clock())


async def sample(pod: SimPod, job: Job, *, plan: GenerationPlan) -> Outcome:
    """process_images_inner: iterations of passes; skip ends an iteration, interrupt all.

    Each pass and each iteration ends with State.nextjob, so job_no counts the passes
    done; with more than one iteration state.job reads "Batch n out of N".
    """
    job.job_count = plan.job_count
    images = 0
    for iteration in range(plan.iterations):
        if job.interrupted:
            break
        job.skipped = False  # the next iteration clears a skip (processing.py)
        job.wake.clear()
        if plan.iterations > 1:
            job.job = f"Batch {iteration + 1} out of {plan.iterations}"
        for index, one in enumerate(plan.passes):
            await _sample_pass(
                pod,
                job,
                job_no=iteration * len(plan.passes) + index,
                steps=one.steps,
                step_s=one.units_per_step * pod.config.step_s,
            )
        job.job_no = (iteration + 1) * len(plan.passes)
        images += plan.batch_size  # an interrupted batch still decodes its last latent
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
            pod.end_job()
    pod.counters.completed += 1
    pod.counters.interrupted += outcome.interrupted
    return outcome


async def run_fixed(pod: SimPod, *, name: str, task_id: str, units: float) -> None:
    """Extras and interrogation: locked GPU work of a fixed cost, not interruptible."""
    async with gpu(pod):
        job = Job(
            job=name,
            task_id=task_id,
            job_count=1,
            time_start=pod.clock(),
            job_timestamp=job_timestamp(),
            size=(0, 0),
        )
        pod.begin_job(job)
        try:
            await asyncio.sleep(units * pod.config.step_s)
        finally:
            pod.end_job()
    pod.counters.completed += 1


async def set_checkpoint(pod: SimPod, wanted: str) -> None:
    """POST options with another sd_model_checkpoint: its onchange reloads under the lock.

    The option keeps the value as written (retitled if the load hashes the file), and the
    reload is a no-op when ``wanted`` names the checkpoint already loaded — but the lock
    is still taken. sd-webui stores the option before its onchange callback waits for the
    lock, so a generation finishing meanwhile may "restore" the old value over it
    (undefined behaviour, docs/sd-webui.md); storing it once the lock is held keeps it.
    """
    async with gpu(pod):
        pod.options["sd_model_checkpoint"] = wanted
        await switch_checkpoint(pod, pod.default_checkpoint)

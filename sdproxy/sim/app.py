"""Sim: one simulated sd-webui pod as an aiohttp application (``make_app``).

The sd-webui surface (``/sdapi/v1/*``, ``/internal/ping``) is wrapped in middlewares in
sd-webui's order, outermost first: ``X-Process-Time`` on every response (api.py
``log_and_time``); sd-webui's error envelope for any exception a route raises (api.py
``exception_handling``, a 500 that is never compressed); gzip of answers of 1000 bytes
or more (Starlette's ``GZipMiddleware``, sdproxy.sim.wire); the answers Starlette's
ExceptionMiddleware makes — FastAPI's plain 422 and 404, sd-webui's envelope for
``HTTPException``; and the worker pool — every sd-webui request holds one of
``--threads`` slots for its whole life, as a plain-``def`` FastAPI route holds an anyio
thread, so an exhausted pool stalls light routes too. ``/sim/*`` is the simulator's own
introspection and bypasses the pool.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler

from sdproxy.sim import heavy, light
from sdproxy.sim.config import SimConfig
from sdproxy.sim.failures import HTTPError, ValidationFailed, WebuiError
from sdproxy.sim.keys import POD
from sdproxy.sim.state import Clock, SimPod
from sdproxy.sim.wire import gzip_answers, json_answer

LOG = logging.getLogger(__name__)
API = "/sdapi/v1"
HEAVY_PATHS = frozenset(
    f"{API}/{name}" for name in ("txt2img", "img2img", "extra-single-image", "interrogate")
)
#: a proxy forwards 10 MiB img2img uploads; sd-webui itself sets no limit
CLIENT_MAX_SIZE = 256 * 1024 * 1024


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


@web.middleware
async def process_time(request: web.Request, handler: Handler) -> web.StreamResponse:
    clock = request.app[POD].clock
    start = clock()
    response = await handler(request)
    response.headers["X-Process-Time"] = f"{clock() - start:.4f}"
    return response


@web.middleware
async def webui_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """api.py exception_handling: any exception a route raises becomes the envelope."""
    try:
        return await handler(request)
    except WebuiError as exc:
        error = exc
    except web.HTTPException:
        raise
    except Exception as exc:  # api.py handle_exception answers any exception with 500
        LOG.exception("sim: unexpected error in %s %s", request.method, request.path)
        error = WebuiError(status=500, name=type(exc).__name__, errors=str(exc))
    return json_answer(error.as_json(), status=error.status)


@web.middleware
async def fastapi_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Starlette's ExceptionMiddleware: HTTPException (sd-webui's handler: the envelope),
    RequestValidationError (FastAPI's: plain 422) and the router's own plain 404/405."""
    try:
        return await handler(request)
    except (HTTPError, ValidationFailed) as exc:
        return json_answer(exc.as_json(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_answer({"detail": exc.reason}, status=exc.status)


@web.middleware
async def worker_pool(request: web.Request, handler: Handler) -> web.StreamResponse:
    if (
        request.path.startswith("/sim/")
        or request.match_info.http_exception is not None
        or request.match_info.route.name == "ui"  # Gradio's async routes hold no thread
    ):
        return await handler(request)
    pod = request.app[POD]
    heavy_route = request.method == "POST" and request.path in HEAVY_PATHS
    if heavy_route:
        pod.enter_heavy()
    try:
        async with pod.threads:
            return await handler(request)
    finally:
        if heavy_route:
            pod.leave_heavy()


async def sim_stats(request: web.Request) -> web.Response:
    """The simulator's own counters; not part of sd-webui's surface."""
    pod = request.app[POD]
    counters = pod.counters
    return web.json_response(
        {
            "heavy_inflight": pod.heavy_inflight,
            "heavy_inflight_max": counters.heavy_inflight_max,
            "heavy_waiting": pod.lock.waiting,
            "completed": counters.completed,
            "interrupted": counters.interrupted,
            "failed": counters.failed,
            "oom": counters.oom,
            "checkpoint_switches": counters.checkpoint_switches,
            "loaded_checkpoint": pod.catalog.title(pod.loaded) if pod.loaded else None,
            "default_checkpoint": pod.catalog.title(pod.default_checkpoint),
            "model_loaded": pod.model_ready.is_set(),
            "busy_s": pod.busy_s(),
            "interrupts_received": counters.interrupts_received,
            "skips_received": counters.skips_received,
            "threads_in_use": pod.threads.in_use,
            "threads": pod.threads.size,
            "running_task": pod.job.task_id if pod.job else None,
        }
    )


async def sim_reset(request: web.Request) -> web.Response:
    request.app[POD].reset()
    return web.json_response({})


def _routes(app: web.Application) -> None:
    add = app.router
    for name, handler in (
        ("txt2img", heavy.txt2img),
        ("img2img", heavy.img2img),
        ("extra-single-image", heavy.extra_single_image),
        ("interrogate", heavy.interrogate),
        ("options", light.set_options),
        ("interrupt", light.interrupt),
        ("skip", light.skip),
        ("png-info", light.png_info),
    ):
        add.add_post(f"{API}/{name}", handler)
    for name, handler in (
        ("progress", light.progress),
        ("options", light.get_options),
        ("sd-models", light.sd_models),
        ("samplers", light.samplers),
        ("memory", light.memory),
    ):
        add.add_get(f"{API}/{name}", handler, allow_head=False)
    add.add_get("/internal/ping", light.ping, allow_head=False)
    add.add_get("/sim/stats", sim_stats, allow_head=False)
    add.add_post("/sim/reset", sim_reset)


async def _model_loader(app: web.Application) -> AsyncIterator[None]:
    """Start-up: HTTP answers at once; the model becomes ready after --startup-s."""
    pod = app[POD]
    if pod.config.startup_s <= 0:
        pod.finish_model_load()
        yield
        return

    async def load() -> None:
        await asyncio.sleep(pod.config.startup_s)
        pod.finish_model_load()

    task = asyncio.create_task(load(), name="sim-model-load")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def make_app(
    config: SimConfig,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> web.Application:
    """One simulated pod. ``clock`` defaults to the running loop's monotonic time;
    ``rng`` (failures, lock order, seeds, task ids) defaults to ``Random(config.seed)``."""
    app = web.Application(
        client_max_size=CLIENT_MAX_SIZE,
        middlewares=[process_time, webui_errors, gzip_answers, fastapi_errors, worker_pool],
    )
    pod_rng = rng if rng is not None else random.Random(config.seed)
    app[POD] = SimPod(config, clock=clock or _loop_time, rng=pod_rng)
    _routes(app)
    app.cleanup_ctx.append(_model_loader)
    if config.ui:
        from sdproxy.sim import ui  # lazily: Gradio is an optional extra

        ui.mount(app, app[POD])
    return app

"""Sim: the light sd-webui routes — progress, options, models, interrupt/skip, png-info.

They never take the GPU lock (except POST options with a new checkpoint, which reloads
weights) but they do need a worker thread like every plain-``def`` route in
modules/api/api.py, so they stall when the pool is exhausted (see sdproxy.sim.app).
"""

from __future__ import annotations

from aiohttp import web

from sdproxy.sim import gpu, schema
from sdproxy.sim.failures import WebuiError, http_exception
from sdproxy.sim.images import decode_b64, png_b64, png_text_chunks
from sdproxy.sim.keys import POD
from sdproxy.sim.state import Job, SimPod

SAMPLERS = ("DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "Euler a", "Euler", "Heun", "DDIM", "UniPC")
_IDLE_STATE: dict[str, object] = {
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


def _state(job: Job, now: float) -> dict[str, object]:
    """shared_state.State.dict()."""
    return {
        "skipped": job.skipped,
        "interrupted": job.interrupted,
        "stopping_generation": False,
        "job": job.job,
        "job_count": job.job_count,
        "job_timestamp": job.job_timestamp,
        "job_no": job.job_no,
        "sampling_step": job.sampling_step(now),
        "sampling_steps": job.sampling_steps,
    }


def progress_json(pod: SimPod, *, want_image: bool) -> dict[str, object]:
    """api.py progressapi, formula included (its ETA extrapolates from elapsed time)."""
    job, now = pod.job, pod.clock()
    if job is None or job.job_count == 0:
        return {
            "progress": 0,
            "eta_relative": 0,
            "state": dict(_IDLE_STATE),
            "current_image": None,
            "textinfo": None,
            "current_task": None,
        }
    progress = 0.01 + job.job_no / job.job_count
    if job.sampling_steps > 0:
        progress += job.sampling_step(now) / job.sampling_steps / job.job_count
    elapsed = now - job.time_start
    image = None
    if want_image and job.size[0] > 0:
        image = png_b64(*job.size).decode()
    return {
        "progress": min(progress, 1.0),
        "eta_relative": elapsed / progress - elapsed,
        "state": _state(job, now),
        "current_image": image,
        "textinfo": None,
        "current_task": job.task_id,
    }


async def progress(request: web.Request) -> web.Response:
    # live previews are off unless asked: only skip_current_image=false returns one
    want = request.query.get("skip_current_image", "").lower() in ("false", "0", "no")
    return web.json_response(progress_json(request.app[POD], want_image=want))


async def interrupt(request: web.Request) -> web.Response:
    """shared.state.interrupt(): only the running job sees it; waiting ones start clean."""
    pod = request.app[POD]
    pod.counters.interrupts_received += 1
    if pod.job is not None:
        pod.job.interrupted = True
        pod.job.wake.set()
    return web.json_response({})


async def skip(request: web.Request) -> web.Response:
    pod = request.app[POD]
    pod.counters.skips_received += 1
    if pod.job is not None:
        pod.job.skipped = True
        pod.job.wake.set()
    return web.json_response(None)


async def get_options(request: web.Request) -> web.Response:
    return web.json_response(request.app[POD].options)


async def set_options(request: web.Request) -> web.Response:
    """api.py set_config: unknown checkpoint is a RuntimeError; a new one reloads."""
    pod = request.app[POD]
    body = schema.parse_json(await request.read())
    if not isinstance(body, dict):
        raise schema.unprocessable(
            [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}], body
        )
    wanted = body.pop("sd_model_checkpoint", None)
    checkpoint = pod.catalog.resolve(wanted)
    if wanted is not None and checkpoint is None:
        raise WebuiError(status=500, name="RuntimeError", errors=f"model {wanted!r} not found")
    pod.options.update(body)
    # shared.opts.set runs the onchange (reload) only when the value changes
    if checkpoint is not None and checkpoint.title != pod.options["sd_model_checkpoint"]:
        await gpu.set_checkpoint(pod, checkpoint.title)
    return web.json_response(None)


async def sd_models(request: web.Request) -> web.Response:
    return web.json_response([item.as_json() for item in request.app[POD].catalog.items])


async def samplers(request: web.Request) -> web.Response:
    return web.json_response(
        [{"name": name, "aliases": [name.lower()], "options": {}} for name in SAMPLERS]
    )


async def memory(request: web.Request) -> web.Response:
    """api.py get_memory, with the pod's real OOM count in cuda.events.oom."""
    pod, gib = request.app[POD], 2**30
    total, used = 24 * gib, (4 * gib if pod.job is None else 18 * gib)
    return web.json_response(
        {
            "ram": {"free": 48 * gib, "used": 16 * gib, "total": 64 * gib},
            "cuda": {
                "system": {"free": total - used, "used": used, "total": total},
                "active": {"current": used, "peak": used},
                "allocated": {"current": used, "peak": used},
                "reserved": {"current": used, "peak": used},
                "inactive": {"current": 0, "peak": 0},
                "events": {"retries": 0, "oom": pod.counters.oom},
            },
        }
    )


def parse_infotext(text: str) -> dict[str, object]:
    """A reduced infotext.parse_generation_parameters: prompt, negative, key: value pairs."""
    lines = text.strip().split("\n")
    last = lines.pop() if lines and ": " in lines[-1] and "Steps:" in lines[-1] else ""
    negative = [
        ln.removeprefix("Negative prompt: ") for ln in lines if ln.startswith("Negative prompt: ")
    ]
    prompt = [ln for ln in lines if not ln.startswith("Negative prompt: ")]
    params: dict[str, object] = {"Prompt": "\n".join(prompt), "Negative prompt": "".join(negative)}
    for pair in last.split(", "):
        key, sep, value = pair.partition(": ")
        if sep:
            params[key.strip()] = value.strip()
    return params


async def png_info(request: web.Request) -> web.Response:
    model = schema.validate(schema.parse_json(await request.read()), schema.PNG_INFO)
    image = str(model["image"])
    if not image.strip():
        return web.json_response({"info": "", "items": {}, "parameters": {}})
    data = decode_b64(image)
    texts = png_text_chunks(data) if data is not None else None
    if texts is None:
        raise http_exception(500, "Invalid encoded image")
    info = texts.pop("parameters", "")
    return web.json_response({"info": info, "items": texts, "parameters": parse_infotext(info)})


async def ping(request: web.Request) -> web.Response:
    # modules/api/api.py: app.add_api_route("/internal/ping", lambda: {}) — says nothing
    # about the model
    return web.json_response({})

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
from sdproxy.sim.wire import json_answer

#: sd_samplers.all_samplers of v1.10.1: (name, aliases, options); the API answers the
#: options as strings (models.SamplerItem ``options: dict[str, str]``)
SAMPLERS: tuple[tuple[str, tuple[str, ...], dict[str, str]], ...] = (
    ("DPM++ 2M", ("k_dpmpp_2m",), {"scheduler": "karras"}),
    ("DPM++ SDE", ("k_dpmpp_sde",),
     {"scheduler": "karras", "second_order": "True", "brownian_noise": "True"}),
    ("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), {"scheduler": "exponential", "brownian_noise": "True"}),
    ("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",),
     {"scheduler": "exponential", "brownian_noise": "True", "solver_type": "heun"}),
    ("DPM++ 2S a", ("k_dpmpp_2s_a",),
     {"scheduler": "karras", "uses_ensd": "True", "second_order": "True"}),
    ("DPM++ 3M SDE", ("k_dpmpp_3m_sde",),
     {"scheduler": "exponential", "discard_next_to_last_sigma": "True", "brownian_noise": "True"}),
    ("Euler a", ("k_euler_a", "k_euler_ancestral"), {"uses_ensd": "True"}),
    ("Euler", ("k_euler",), {}),
    ("LMS", ("k_lms",), {}),
    ("Heun", ("k_heun",), {"second_order": "True"}),
    ("DPM2", ("k_dpm_2",),
     {"scheduler": "karras", "discard_next_to_last_sigma": "True", "second_order": "True"}),
    ("DPM2 a", ("k_dpm_2_a",),
     {"scheduler": "karras", "discard_next_to_last_sigma": "True", "uses_ensd": "True",
      "second_order": "True"}),
    ("DPM fast", ("k_dpm_fast",), {"uses_ensd": "True"}),
    ("DPM adaptive", ("k_dpm_ad",), {"uses_ensd": "True"}),
    ("Restart", ("restart",), {"scheduler": "karras", "second_order": "True"}),
    ("DDIM", ("ddim",), {}),
    ("DDIM CFG++", ("ddim_cfgpp",), {}),
    ("PLMS", ("plms",), {}),
    ("UniPC", ("unipc",), {}),
    ("LCM", ("k_lcm",), {}),
)  # fmt: skip
#: the live preview ("Approx NN" decodes the latent at twice its size: a quarter of the image)
PREVIEW_SCALE = 4


def _preview(pod: SimPod, job: Job, step: int) -> str | None:
    """State.set_current_image, run by each progress call: a new preview every
    ``show_progress_every_n_steps`` steps; the last one stays until the next."""
    every = pod.options.get("show_progress_every_n_steps")
    enabled = pod.options.get("live_previews_enable") is True
    if enabled and isinstance(every, int) and every != -1 and step - job.image_step >= every:
        job.has_image, job.image_step = True, step
    if not job.has_image or job.size[0] <= 0:
        return None
    width, height = (max(1, side // PREVIEW_SCALE) for side in job.size)
    return png_b64(width, height).decode()


def progress_json(pod: SimPod, *, skip_image: bool) -> dict[str, object]:
    """api.py progressapi, formula included (its ETA extrapolates from elapsed time).

    ``current_task`` is always null: v1.10.1's api.py reads an import-time copy of
    modules.progress.current_task, so progress never says which request runs.
    """
    job, now = pod.job, pod.clock()
    if job is None or job.job_count == 0:
        return {
            "progress": 0,
            "eta_relative": 0,
            "state": dict(pod.idle_state),
            "current_image": None,
            "textinfo": None,
            "current_task": None,
        }
    step = job.sampling_step(now)
    progress = 0.01 + job.job_no / job.job_count
    if job.sampling_steps > 0:
        progress += step / job.sampling_steps / job.job_count
    elapsed = now - job.time_start
    image = _preview(pod, job, step)
    return {
        "progress": min(progress, 1.0),
        "eta_relative": elapsed / progress - elapsed,
        "state": job.state(now),
        "current_image": None if skip_image else image,
        "textinfo": None,
        "current_task": None,
    }


async def progress(request: web.Request) -> web.Response:
    # ProgressRequest.skip_current_image defaults to false: a preview comes unless skipped
    skip = request.query.get("skip_current_image", "").lower() in ("true", "1", "yes", "on")
    return json_answer(progress_json(request.app[POD], skip_image=skip))


async def interrupt(request: web.Request) -> web.Response:
    """shared.state.interrupt(): only the running job sees it; waiting ones start clean."""
    pod = request.app[POD]
    pod.counters.interrupts_received += 1
    if pod.job is not None:
        pod.job.interrupted = True
        pod.job.wake.set()
    else:  # the flag is set all the same; the next job's begin clears it
        pod.idle_state["interrupted"] = True
    return json_answer({})


async def skip(request: web.Request) -> web.Response:
    pod = request.app[POD]
    pod.counters.skips_received += 1
    if pod.job is not None:
        pod.job.skipped = True
        pod.job.wake.set()
    else:
        pod.idle_state["skipped"] = True
    return json_answer(None)


async def get_options(request: web.Request) -> web.Response:
    return json_answer(request.app[POD].options)


async def set_options(request: web.Request) -> web.Response:
    """api.py set_config: unknown checkpoint is a RuntimeError; another one reloads.

    opts.set runs the onchange (reload, under the lock) only when the value differs
    from the stored one as a string; the answer is ``null`` once it is done.
    """
    pod = request.app[POD]
    body = schema.require_object(schema.parse_json(await request.read()))
    wanted = body.pop("sd_model_checkpoint", None)
    if wanted is not None and pod.catalog.resolve(wanted) is None:
        raise WebuiError(status=500, name="RuntimeError", errors=f"model {wanted!r} not found")
    pod.options.update(body)
    if isinstance(wanted, str) and wanted != pod.options["sd_model_checkpoint"]:
        await gpu.set_checkpoint(pod, wanted)
    return json_answer(None)


async def sd_models(request: web.Request) -> web.Response:
    catalog = request.app[POD].catalog
    return json_answer([catalog.as_json(item) for item in catalog.items])


async def samplers(request: web.Request) -> web.Response:
    return json_answer(
        [
            {"name": name, "aliases": list(aliases), "options": options}
            for name, aliases, options in SAMPLERS
        ]
    )


async def memory(request: web.Request) -> web.Response:
    """api.py get_memory, with the pod's real OOM count in cuda.events.oom."""
    pod, gib = request.app[POD], 2**30
    total, used = 24 * gib, (4 * gib if pod.job is None else 18 * gib)
    return json_answer(
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
        return json_answer({"info": "", "items": {}, "parameters": {}})
    data = decode_b64(image)
    texts = png_text_chunks(data) if data is not None else None
    if texts is None:
        raise http_exception(500, "Invalid encoded image")
    info = texts.pop("parameters", "")
    return json_answer({"info": info, "items": texts, "parameters": parse_infotext(info)})


async def ping(request: web.Request) -> web.Response:
    # modules/api/api.py: app.add_api_route("/internal/ping", lambda: {}) — says nothing
    # about the model
    return json_answer({})

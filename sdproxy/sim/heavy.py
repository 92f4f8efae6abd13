"""Sim: the heavy sd-webui routes — txt2img, img2img, extra-single-image, interrogate.

Each validates its body like sd-webui (sdproxy.sim.schema), asks the core cost model how
long the GPU would work (sdproxy.core.cost) and runs under the pod's lock
(sdproxy.sim.gpu). Responses follow modules/api/models.py: ``TextToImageResponse``
``{"images", "parameters", "info"}`` with ``info`` a JSON string (processing.Processed.js).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

from sdproxy.core.cost import (
    GenerationPlan,
    extras_output_size,
    extras_steps,
    interrogate_steps,
    plan_img2img,
    plan_txt2img,
)
from sdproxy.sim import gpu, schema
from sdproxy.sim.checkpoints import Checkpoint
from sdproxy.sim.failures import http_exception
from sdproxy.sim.images import png_b64
from sdproxy.sim.keys import POD
from sdproxy.sim.state import SimPod
from sdproxy.sim.wire import json_answer

VERSION = "v1.10.1"


def json_with_images(images: list[bytes], rest: Mapping[str, object]) -> web.Response:
    """``{"images": [...], **rest}`` without running megabytes of base64 through json."""
    encoded = json.dumps(rest, ensure_ascii=False, separators=(",", ":")).encode()
    quoted = b",".join(b'"' + image + b'"' for image in images)
    sep = b"," if len(encoded) > 2 else b""
    body = b'{"images":[' + quoted + b"]" + sep + encoded[1:]
    return web.Response(body=body, content_type="application/json")


def _seed(pod: SimPod, value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else pod.rng.randrange(4294967294)


def infotext(
    model: Mapping[str, object], *, seed: int, size: tuple[int, int], checkpoint: Checkpoint
) -> str:
    """processing.create_infotext, the lines a real image carries in its PNG."""
    negative = model.get("negative_prompt") or ""
    fields = {
        "Steps": model.get("steps"),
        "Sampler": model.get("sampler_name") or model.get("sampler_index"),
        "CFG scale": model.get("cfg_scale"),
        "Seed": seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model hash": checkpoint.shorthash,
        "Model": checkpoint.model_name,
        "Version": VERSION,
    }
    last = ", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None)
    lines = [str(model.get("prompt") or "")]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    return "\n".join([*lines, last])


def generation_response(
    pod: SimPod, *, model: dict[str, object], plan: GenerationPlan, outcome: gpu.Outcome
) -> web.Response:
    seed = _seed(pod, model.get("seed"))
    size = (plan.out_width, plan.out_height)
    seeds = [seed + index for index in range(outcome.images)]
    checkpoint = outcome.checkpoint or pod.catalog.default
    texts = [infotext(model, seed=s, size=size, checkpoint=checkpoint) for s in seeds]
    info = {
        "prompt": model.get("prompt"),
        "all_prompts": [model.get("prompt")] * outcome.images,
        "negative_prompt": model.get("negative_prompt"),
        "seed": seed,
        "all_seeds": seeds,
        "width": size[0],
        "height": size[1],
        "sampler_name": model.get("sampler_name") or model.get("sampler_index"),
        "cfg_scale": model.get("cfg_scale"),
        "steps": model.get("steps"),
        "batch_size": plan.batch_size,
        "sd_model_name": checkpoint.model_name,
        "sd_model_hash": checkpoint.shorthash,
        "denoising_strength": model.get("denoising_strength"),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": texts,
        "job_timestamp": outcome.job_timestamp,
        "version": VERSION,
    }
    images = [png_b64(*size, infotext=text) for text in texts] if model["send_images"] else []
    # Processed.js() is json.dumps with its default separators; the answer itself is compact
    return json_with_images(images, {"parameters": model, "info": json.dumps(info)})


async def _body(request: web.Request, spec: schema.Spec) -> dict[str, object]:
    return schema.validate(schema.parse_json(await request.read()), spec)


async def txt2img(request: web.Request) -> web.Response:
    pod = request.app[POD]
    model = await _body(request, schema.TXT2IMG)
    plan = plan_txt2img(model)
    task_id = model["force_task_id"] or pod.new_task_id("txt2img")
    outcome = await gpu.generate(
        pod, name="scripts_txt2img", task_id=str(task_id), model=model, plan=plan
    )
    return generation_response(pod, model=model, plan=plan, outcome=outcome)


async def img2img(request: web.Request) -> web.Response:
    pod = request.app[POD]
    model = await _body(request, schema.IMG2IMG)
    if model["init_images"] is None:
        raise http_exception(404, "Init image not found")
    plan = plan_img2img(model)
    task_id = model["force_task_id"] or pod.new_task_id("img2img")
    outcome = await gpu.generate(
        pod, name="scripts_img2img", task_id=str(task_id), model=model, plan=plan
    )
    if not model["include_init_images"]:
        # api.py img2imgapi drops them so 10 MiB uploads are not echoed back
        model["init_images"] = None
        model["mask"] = None
    return generation_response(pod, model=model, plan=plan, outcome=outcome)


async def extra_single_image(request: web.Request) -> web.Response:
    pod = request.app[POD]
    model = await _body(request, schema.EXTRAS_SINGLE)
    if not model["image"]:
        raise http_exception(404, "Image not found")
    units = extras_steps(model)
    await gpu.run_fixed(pod, name="extras", task_id=pod.new_task_id("extras"), units=units)
    image = png_b64(*extras_output_size(model))
    return web.Response(
        body=b'{"html_info":"<p></p>","image":"' + image + b'"}', content_type="application/json"
    )


async def interrogate(request: web.Request) -> web.Response:
    pod = request.app[POD]
    model = await _body(request, schema.INTERROGATE)
    if not model["image"]:
        raise http_exception(404, "Image not found")
    if model["model"] not in ("clip", "deepdanbooru"):
        raise http_exception(404, "Model not found")
    units = interrogate_steps(model)
    await gpu.run_fixed(
        pod, name="interrogate", task_id=pod.new_task_id("interrogate"), units=units
    )
    caption = "a simulated picture of a cat" if model["model"] == "clip" else "1girl, solo"
    return json_answer({"caption": caption})

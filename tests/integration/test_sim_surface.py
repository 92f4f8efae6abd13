"""Integration: the simulated pod's sd-webui wire surface — schema, images, faults, start-up.

Real HTTP on 127.0.0.1; images are decoded with Pillow.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json as jsonlib
from typing import Any

import aiohttp
import pytest
from PIL import Image

from sdproxy.sim.config import SimConfig
from sdproxy.sim.server import run_pods

pytestmark = pytest.mark.timeout(30)

TXT2IMG = "/sdapi/v1/txt2img"


async def call(
    url: str, path: str, *, json: Any = None, method: str = "POST", raw: bytes | None = None
) -> tuple[int, Any, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            url + path,
            json=json if raw is None else None,
            data=None if raw is None else io.BytesIO(raw),  # aiohttp warns on big raw bytes
            headers=None if raw is None else {"Content-Type": "application/json"},
        ) as resp,
    ):
        return resp.status, await resp.json(), dict(resp.headers)


def decode_png(image_b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(image_b64)))
    image.load()  # decodes every pixel: a truncated or corrupt PNG raises here
    return image


@pytest.fixture
async def url() -> Any:
    config = SimConfig(step_ms=2.0, vram_pixels=2 * 512 * 512)
    async with run_pods(config) as urls:
        yield urls[0]


async def test_txt2img_answers_in_sd_webui_shape_with_real_pngs(url: str) -> None:
    body = {"prompt": "a cat", "steps": "3", "width": 320, "height": 192, "n_iter": 2, "x": [1]}
    status, data, headers = await call(url, TXT2IMG, json=body)
    assert status == 200
    assert float(headers["X-Process-Time"]) >= 0
    assert [decode_png(img).size for img in data["images"]] == [(320, 192)] * 2
    params = data["parameters"]
    assert params["steps"] == 3 and params["prompt"] == "a cat"  # coerced and echoed
    assert params["cfg_scale"] == 7.0 and "x" not in params  # defaults filled, unknown ignored
    info = jsonlib.loads(data["info"])
    assert info["all_seeds"] == [info["seed"], info["seed"] + 1]
    assert "Steps: 3" in info["infotexts"][0]
    assert decode_png(data["images"][0]).info["parameters"].startswith("a cat\nSteps: 3")


async def test_image_weighs_like_a_real_one_and_hires_upscales(url: str) -> None:
    _, data, _ = await call(url, TXT2IMG, json={"steps": 1})
    assert 400_000 <= len(data["images"][0]) <= 800_000  # base64 bytes of one 512² image
    hires = {"steps": 2, "width": 256, "height": 256, "enable_hr": True, "hr_scale": 2}
    _, data, _ = await call(url, TXT2IMG, json=hires)
    assert decode_png(data["images"][0]).size == (512, 512)


async def test_send_images_false_returns_no_images(url: str) -> None:
    _, data, _ = await call(url, TXT2IMG, json={"steps": 1, "send_images": False})
    assert data["images"] == []


@pytest.mark.parametrize(
    ("body", "loc", "kind"),
    [
        pytest.param({"steps": "many"}, ["body", "steps"], "type_error.integer", id="int"),
        pytest.param({"cfg_scale": "hot"}, ["body", "cfg_scale"], "type_error.float", id="float"),
        pytest.param({"enable_hr": "maybe"}, ["body", "enable_hr"], "type_error.bool", id="bool"),
        pytest.param({"prompt": {"a": 1}}, ["body", "prompt"], "type_error.str", id="str"),
        pytest.param({"override_settings": []}, ["body", "override_settings"], "type_error.dict"),
        pytest.param([1, 2], ["body"], "type_error.dict", id="not-an-object"),
    ],
)
async def test_wrong_types_answer_fastapis_plain_422(
    url: str, body: Any, loc: list[Any], kind: str
) -> None:
    status, data, headers = await call(url, TXT2IMG, json=body)
    assert status == 422
    assert list(data) == ["detail"]  # FastAPI's own handler, not sd-webui's envelope
    assert [(d["loc"], d["type"]) for d in data["detail"]] == [(loc, kind)]
    assert "X-Process-Time" in headers


async def test_malformed_json_and_missing_fields(url: str) -> None:
    status, data, _ = await call(url, TXT2IMG, raw=b"{not json")
    assert status == 422 and data["detail"][0]["type"] == "value_error.jsondecode"
    assert data["detail"][0]["ctx"]["pos"] == 1
    status, data, _ = await call(url, TXT2IMG, raw=b"")
    assert (status, data["detail"][0]["loc"], data["detail"][0]["type"]) == (
        422,
        ["body"],
        "value_error.missing",
    )
    status, data, _ = await call(url, TXT2IMG, raw=b'{"prompt": "\xff"}')  # not UTF-8
    assert (status, data["error"], data["detail"]) == (
        400,
        "HTTPException",
        "There was an error parsing the body",
    )
    for deep in (b"[" * 1500, b'{"a":' * 1500):  # json.loads raises RecursionError
        status, data, _ = await call(url, TXT2IMG, raw=deep)
        assert (status, data["detail"]) == (400, "There was an error parsing the body")
    status, data, _ = await call(url, "/sdapi/v1/png-info", json={})
    assert status == 422 and data["detail"][0]["msg"] == "field required"
    status, data, _ = await call(url, "/sdapi/v1/img2img", json={"steps": 1})
    assert status == 404 and data["detail"] == "Init image not found"
    status, data, headers = await call(url, "/sdapi/v1/nothing-here", method="GET")
    assert (status, data) == (404, {"detail": "Not Found"}) and "X-Process-Time" in headers


async def test_img2img_accepts_a_10_mib_upload_and_does_not_echo_it(url: str) -> None:
    _, generated, _ = await call(url, TXT2IMG, json={"steps": 1, "width": 64, "height": 64})
    big = generated["images"][0] + "A" * (10 * 1024 * 1024)
    body = {"init_images": [big], "steps": 4, "width": 128, "height": 96}
    status, data, _ = await call(url, "/sdapi/v1/img2img", raw=jsonlib.dumps(body).encode())
    assert status == 200
    assert decode_png(data["images"][0]).size == (128, 96)
    assert data["parameters"]["init_images"] is None


async def test_extras_interrogate_and_png_info(url: str) -> None:
    _, generated, _ = await call(
        url, TXT2IMG, json={"prompt": "dog", "steps": 5, "width": 64, "height": 64}
    )
    image = generated["images"][0]
    status, data, _ = await call(url, "/sdapi/v1/extra-single-image", json={"image": image})
    assert status == 200 and decode_png(data["image"]).size == (128, 128)  # upscaling_resize 2
    status, data, _ = await call(url, "/sdapi/v1/interrogate", json={"image": image})
    assert status == 200 and isinstance(data["caption"], str)
    status, data, _ = await call(url, "/sdapi/v1/png-info", json={"image": image})
    assert status == 200
    assert data["info"].startswith("dog\n")
    assert data["parameters"]["Prompt"] == "dog" and data["parameters"]["Steps"] == "5"
    status, data, _ = await call(url, "/sim/stats", method="GET")
    assert data["completed"] == 3 and data["heavy_inflight_max"] == 1


async def test_light_reads(url: str) -> None:
    for path in ("samplers", "memory", "sd-models", "options", "progress"):
        status, _, headers = await call(url, f"/sdapi/v1/{path}", method="GET")
        assert status == 200 and "X-Process-Time" in headers
    _, models, _ = await call(url, "/sdapi/v1/sd-models", method="GET")
    assert set(models[0]) >= {"title", "model_name", "hash", "filename"}
    _, options, _ = await call(url, "/sdapi/v1/options", method="GET")
    assert options["sd_model_checkpoint"] == models[0]["title"]
    assert (await call(url, "/internal/ping", method="GET"))[:2] == (200, {})


async def test_out_of_memory_is_a_500_with_cuda_text(url: str) -> None:
    # vram_pixels is 2 × 512²: a batch of 4 does not fit, nor does a 2× hires pass
    for body in ({"batch_size": 4, "steps": 1}, {"steps": 1, "enable_hr": True}):
        status, data, _ = await call(url, TXT2IMG, json=body)
        assert status == 500
        assert data["error"] == "OutOfMemoryError"
        assert data["errors"].startswith("CUDA out of memory.")
    _, memory, _ = await call(url, "/sdapi/v1/memory", method="GET")
    assert memory["cuda"]["events"]["oom"] == 2
    _, st, _ = await call(url, "/sim/stats", method="GET")
    assert (st["oom"], st["failed"], st["completed"]) == (2, 2, 0)
    assert (await call(url, TXT2IMG, json={"batch_size": 2, "steps": 1}))[0] == 200  # fits exactly


async def _failure_pattern(seed: int) -> list[int]:
    config = SimConfig(step_ms=1.0, fail_rate=0.5, seed=seed)
    async with run_pods(config) as urls, aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(16):
            body = {"steps": 1, "send_images": False}
            async with session.post(urls[0] + TXT2IMG, json=body) as resp:
                statuses.append(resp.status)
                if resp.status == 500:
                    assert (await resp.json())["error"] == "NansException"
        return statuses


async def test_random_failures_follow_fail_rate_and_seed() -> None:
    first = await _failure_pattern(seed=11)
    assert set(first) == {200, 500}  # 16 draws at 0.5: both outcomes (seeded, so fixed)
    assert await _failure_pattern(seed=11) == first


async def test_start_up_blocks_heavy_but_not_light() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with run_pods(SimConfig(step_ms=1.0, startup_s=0.5)) as urls:
        url = urls[0]
        for path in ("/sdapi/v1/options", "/sdapi/v1/progress", "/internal/ping"):
            assert (await call(url, path, method="GET"))[0] == 200
        _, st, _ = await call(url, "/sim/stats", method="GET")
        assert st["model_loaded"] is False and st["loaded_checkpoint"] is None
        status, _, _ = await call(url, TXT2IMG, json={"steps": 1, "send_images": False})
        assert status == 200
        assert loop.time() - started >= 0.5 * 0.9  # waited for the model
        _, st, _ = await call(url, "/sim/stats", method="GET")
        assert st["model_loaded"] is True and st["loaded_checkpoint"] is not None


async def test_reset_zeroes_the_counters(url: str) -> None:
    await call(url, TXT2IMG, json={"steps": 1, "send_images": False})
    await call(url, "/sdapi/v1/interrupt", json={})
    status, _, _ = await call(url, "/sim/reset", json={})
    assert status == 200
    _, st, _ = await call(url, "/sim/stats", method="GET")
    assert st["completed"] == st["interrupts_received"] == st["heavy_inflight_max"] == 0
    assert st["busy_s"] == 0

"""Integration: the simulator against what a real sd-webui v1.10.1 does (docs/sd-webui.md,
"Observed on a real v1.10.1"), one test per fact the proxy's behaviour depends on.

Real HTTP on 127.0.0.1; raw bodies are read with ``auto_decompress=False`` so the test
sees the bytes a proxy sees.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import io
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from sdproxy.sim.config import SimConfig
from sdproxy.sim.server import run_pods
from sdproxy.sim.wire import gzip_answers

pytestmark = pytest.mark.timeout(30)

TXT2IMG = "/sdapi/v1/txt2img"
PROGRESS = "/sdapi/v1/progress"
CKPT_A, CKPT_B = "a.safetensors", "b.safetensors"
NO_ENCODING = ("Accept-Encoding",)


@contextlib.asynccontextmanager
async def pods(count: int = 1, **overrides: Any) -> AsyncIterator[list[aiohttp.ClientSession]]:
    """``count`` simulated pods and one raw session (no decompression) bound to each."""
    config = SimConfig(**{"step_ms": 10.0, "switch_s": 0.2, "seed": 5, **overrides})
    async with run_pods(config, count=count) as urls, contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(aiohttp.ClientSession(url, auto_decompress=False))
            for url in urls
        ]


async def fetch(
    s: aiohttp.ClientSession, path: str, *, json_body: Any = None, method: str = "GET", **kw: Any
) -> tuple[int, bytes, dict[str, str]]:
    """Status, raw body and headers (aiohttp's default Accept-Encoding asks for gzip)."""
    async with s.request(method, path, json=json_body, **kw) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


def decoded(body: bytes, headers: dict[str, str]) -> Any:
    raw = gzip.decompress(body) if headers.get("Content-Encoding") == "gzip" else body
    return json.loads(raw)


async def get(s: aiohttp.ClientSession, path: str) -> Any:
    status, body, headers = await fetch(s, path)
    assert status == 200, body
    return decoded(body, headers)


async def post(s: aiohttp.ClientSession, path: str, body: Any) -> tuple[int, Any]:
    status, raw, headers = await fetch(s, path, json_body=body, method="POST")
    return status, decoded(raw, headers)


async def until(
    s: aiohttp.ClientSession, check: Callable[[dict[str, Any]], bool], *, path: str = PROGRESS
) -> dict[str, Any]:
    """Poll ``path`` until ``check`` holds on its JSON; return that JSON."""
    async with asyncio.timeout(10):
        while True:
            data: dict[str, Any] = await get(s, path)
            if check(data):
                return data
            await asyncio.sleep(0.005)  # polling another server's HTTP surface: no event


def started(min_step: int = 1) -> Callable[[dict[str, Any]], bool]:
    return lambda prog: bool(prog["state"]["sampling_step"] >= min_step)


def png_size(image_b64: str) -> tuple[int, int]:
    image = Image.open(io.BytesIO(base64.b64decode(image_b64)))
    image.load()
    return image.size


# ---- compression (modules/initialize_util.py: GZipMiddleware, minimum_size=1000) -------


async def test_answers_of_1000_bytes_or_more_are_gzipped_for_a_client_that_asks() -> None:
    async with pods() as (s,):
        for path, body in (("/sdapi/v1/options", None), (TXT2IMG, {"steps": 1})):
            method = "GET" if body is None else "POST"
            status, raw, headers = await fetch(s, path, json_body=body, method=method)
            assert status == 200
            assert headers["Content-Encoding"] == "gzip"
            assert headers["Vary"] == "Accept-Encoding"
            assert int(headers["Content-Length"]) == len(raw)
            assert "X-Process-Time" in headers
            plain = gzip.decompress(raw)
            assert len(plain) >= 1000 and json.loads(plain)


@pytest.mark.parametrize(
    "accept",
    [
        pytest.param(None, id="no-accept-encoding"),
        pytest.param("deflate, br", id="no-gzip-in-it"),
        pytest.param("identity", id="identity"),
    ],
)
async def test_nothing_is_compressed_for_a_client_that_does_not_ask(accept: str | None) -> None:
    async with pods() as (s,):
        headers = {} if accept is None else {"Accept-Encoding": accept}
        body = {"steps": 1, "width": 64, "height": 64}
        status, raw, answer = await fetch(
            s, TXT2IMG, json_body=body, method="POST", headers=headers,
            skip_auto_headers=NO_ENCODING,
        )  # fmt: skip
        assert status == 200 and len(raw) > 1000
        assert "Content-Encoding" not in answer and "Vary" not in answer
        assert int(answer["Content-Length"]) == len(raw)
        assert png_size(json.loads(raw)["images"][0]) == (64, 64)


async def test_an_answer_under_1000_bytes_is_never_compressed() -> None:
    async with pods() as (s,):
        for path in ("/internal/ping", PROGRESS):
            status, raw, headers = await fetch(s, path, headers={"Accept-Encoding": "gzip"})
            assert status == 200 and len(raw) < 1000
            assert "Content-Encoding" not in headers and "Vary" not in headers
            json.loads(raw)


@pytest.mark.parametrize(("size", "compressed"), [(999, False), (1000, True)])
async def test_the_gzip_threshold_is_1000_bytes(size: int, compressed: bool) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * size, content_type="application/json")

    app = web.Application(middlewares=[gzip_answers])
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            _, raw, headers = await fetch(s, url, headers={"Accept-Encoding": "gzip"})
    finally:
        await runner.cleanup()
    assert (headers.get("Content-Encoding") == "gzip") is compressed
    assert ("Vary" in headers) is compressed
    assert (gzip.decompress(raw) if compressed else raw) == b"x" * size


# ---- light answers of real size and shape ---------------------------------------------


async def test_samplers_list_v1_10_1s_samplers() -> None:
    async with pods() as (s,):
        status, raw, headers = await fetch(s, "/sdapi/v1/samplers")
        assert status == 200 and headers["Content-Encoding"] == "gzip"
        samplers = json.loads(gzip.decompress(raw))
        names = [item["name"] for item in samplers]
        assert len(names) == 20
        assert {"DPM++ 2M", "DPM++ SDE", "Euler a", "Euler", "DDIM", "UniPC", "LCM"} <= set(names)
        for item in samplers:
            assert set(item) == {"name", "aliases", "options"}
            assert item["aliases"] and all(isinstance(a, str) for a in item["aliases"])
            assert all(isinstance(v, str) for v in item["options"].values())  # dict[str, str]
        dpmpp = samplers[names.index("DPM++ 2M")]
        assert dpmpp == {
            "name": "DPM++ 2M",
            "aliases": ["k_dpmpp_2m"],
            "options": {"scheduler": "karras"},
        }


async def test_options_is_the_whole_settings_document() -> None:
    async with pods() as (s,):
        status, raw, headers = await fetch(s, "/sdapi/v1/options", skip_auto_headers=NO_ENCODING)
        assert status == 200 and "Content-Encoding" not in headers
        options = json.loads(raw)
        assert 300 <= len(options) <= 330  # ~312 on a fresh v1.10.1
        assert len(raw) >= 8000
        assert options["sd_model_checkpoint"].startswith("v1-5-pruned-emaonly.safetensors [")
        assert options["samples_format"] == "png"
        assert options["show_progress_every_n_steps"] == 10
        assert options["live_previews_enable"] is True
        assert options["sd_checkpoints_limit"] == 1
        assert len(options["sd_checkpoint_hash"]) == 64


# ---- errors: FastAPI's plain 422 and 404, sd-webui's envelope for exceptions -----------


async def test_a_body_that_fails_validation_is_fastapis_plain_422() -> None:
    async with pods() as (s,):
        assert await post(s, TXT2IMG, {"steps": "abc"}) == (
            422,
            {
                "detail": [
                    {
                        "loc": ["body", "steps"],
                        "msg": "value is not a valid integer",
                        "type": "type_error.integer",
                    }
                ]
            },
        )
        status, raw, _ = await fetch(s, TXT2IMG, method="POST", data=b"{not json")
        detail = json.loads(raw)["detail"]
        assert status == 422 and list(json.loads(raw)) == ["detail"]
        assert detail[0]["type"] == "value_error.jsondecode" and detail[0]["loc"] == ["body", 1]


async def test_an_unknown_route_is_a_plain_404() -> None:
    async with pods() as (s,):
        status, raw, headers = await fetch(s, "/sdapi/v1/nothing-here")
        assert (status, json.loads(raw)) == (404, {"detail": "Not Found"})
        assert "X-Process-Time" in headers


async def test_exceptions_keep_sd_webuis_envelope() -> None:
    async with pods() as (s,):
        assert await post(s, "/sdapi/v1/img2img", {"steps": 1}) == (
            404,
            {
                "error": "HTTPException",
                "detail": "Init image not found",
                "body": "",
                "errors": "404: Init image not found",
            },
        )
        status, error = await post(s, "/sdapi/v1/options", {"sd_model_checkpoint": "zzz"})
        assert status == 500
        assert error == {
            "error": "RuntimeError",
            "detail": "",
            "body": "",
            "errors": "model 'zzz' not found",
        }


# ---- checkpoint titles: no hash until the checkpoint's first load on that pod ---------


def _titles(models: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["filename"].rsplit("/", 1)[-1]: m for m in models}


async def test_sd_models_titles_carry_a_hash_only_after_a_first_load() -> None:
    async with pods(checkpoints=(CKPT_A, CKPT_B)) as (s,):
        models = _titles(await get(s, "/sdapi/v1/sd-models"))
        assert models[CKPT_B] | {"filename": None} == {
            "title": CKPT_B,
            "model_name": "b",
            "hash": None,
            "sha256": None,
            "filename": None,
            "config": None,
        }
        loaded = models[CKPT_A]  # the default, loaded at start
        assert re.fullmatch(r"[0-9a-f]{10}", loaded["hash"])
        assert loaded["title"] == f"{CKPT_A} [{loaded['hash']}]"
        assert loaded["sha256"].startswith(loaded["hash"])

        body = {"steps": 1, "send_images": False, "override_settings": {"sd_model_checkpoint": "b"}}
        assert (await post(s, TXT2IMG, body))[0] == 200
        after = _titles(await get(s, "/sdapi/v1/sd-models"))[CKPT_B]
        assert re.fullmatch(r"[0-9a-f]{10}", after["hash"])
        assert after["title"] == f"{CKPT_B} [{after['hash']}]"


async def test_a_hashed_title_means_nothing_to_a_pod_that_never_loaded_it() -> None:
    async with pods(2, checkpoints=(CKPT_A, CKPT_B)) as (first, second):
        assert await post(first, "/sdapi/v1/options", {"sd_model_checkpoint": CKPT_B}) == (
            200,
            None,
        )
        title = _titles(await get(first, "/sdapi/v1/sd-models"))[CKPT_B]["title"]
        assert title.startswith(f"{CKPT_B} [")
        status, error = await post(second, "/sdapi/v1/options", {"sd_model_checkpoint": title})
        assert status == 500 and error["errors"] == f"model {title!r} not found"
        # an override naming it is dropped: the pod generates with its default
        body = {
            "steps": 1,
            "send_images": False,
            "override_settings": {"sd_model_checkpoint": title},
        }
        _, data = await post(second, TXT2IMG, body)
        assert "Model: a," in data["info"]
        # the file name works everywhere
        assert await post(second, "/sdapi/v1/options", {"sd_model_checkpoint": CKPT_B}) == (
            200,
            None,
        )


# ---- progress --------------------------------------------------------------------------


@pytest.mark.parametrize(("n_iter", "label"), [(1, "scripts_txt2img"), (2, "Batch 1 out of 2")])
async def test_progress_while_running_follows_sd_webuis_formula(n_iter: int, label: str) -> None:
    async with pods() as (s,):
        body = {"steps": 100, "n_iter": n_iter, "send_images": False}
        job = asyncio.create_task(post(s, TXT2IMG, body))
        prog = await until(s, started())
        state = prog["state"]
        assert (state["job"], state["job_count"], state["job_no"]) == (label, n_iter, 0)
        assert state["sampling_steps"] == 100
        expected = 0.01 + state["sampling_step"] / 100 / n_iter
        assert prog["progress"] == pytest.approx(expected, rel=1e-9)
        assert prog["eta_relative"] > 0
        assert prog["current_task"] is None  # an import-time copy in v1.10.1's api.py
        await post(s, "/sdapi/v1/interrupt", {})
        assert (await job)[0] == 200


async def test_idle_progress_keeps_the_last_jobs_values() -> None:
    async with pods() as (s,):
        fresh = await get(s, PROGRESS)
        assert (fresh["progress"], fresh["eta_relative"], fresh["current_task"]) == (0, 0, None)
        assert fresh["state"] | {"job_timestamp": None} == {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": "",
            "job_count": 0,
            "job_timestamp": None,
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": 0,
        }
        _, data = await post(s, TXT2IMG, {"steps": 7, "send_images": False})
        idle = await get(s, PROGRESS)
        assert (idle["progress"], idle["eta_relative"], idle["current_image"]) == (0, 0, None)
        state = idle["state"]
        assert (state["job"], state["job_count"]) == ("", 0)
        assert state["job_timestamp"] == json.loads(data["info"])["job_timestamp"]
        assert (state["job_no"], state["sampling_steps"]) == (1, 7)


async def test_live_preview_comes_from_step_10_small_unless_skipped() -> None:
    async with pods(step_ms=40.0) as (s,):
        body = {"steps": 30, "width": 512, "height": 512, "send_images": False}
        job = asyncio.create_task(post(s, TXT2IMG, body))
        early = await until(s, started())
        assert early["state"]["sampling_step"] < 10  # 40 ms a step: polled well before 10
        assert early["current_image"] is None
        later = await until(s, started(10))
        assert png_size(later["current_image"]) == (128, 128)  # Approx NN: a quarter
        skipped = await get(s, PROGRESS + "?skip_current_image=true")
        assert skipped["state"]["sampling_step"] >= 10 and skipped["current_image"] is None
        assert (await job)[0] == 200


# ---- interrupt ---------------------------------------------------------------------------


async def test_an_interrupted_generation_answers_200_with_its_partial_image() -> None:
    async with pods() as (s,):
        job = asyncio.create_task(post(s, TXT2IMG, {"steps": 100, "width": 256, "height": 256}))
        await until(s, started())
        assert await post(s, "/sdapi/v1/interrupt", {}) == (200, {})
        status, data = await job
        assert status == 200
        assert [png_size(image) for image in data["images"]] == [(256, 256)]
        assert "Steps: 100," in json.loads(data["info"])["infotexts"][0]
        assert (await get(s, PROGRESS))["state"]["interrupted"] is True  # until the next job
        _, after = await post(s, TXT2IMG, {"steps": 2, "n_iter": 2, "width": 64, "height": 64})
        assert len(after["images"]) == 2  # the next job cleared the flag
        assert (await get(s, PROGRESS))["state"]["interrupted"] is False


# ---- POST /options ------------------------------------------------------------------------


async def test_post_options_answers_null_once_the_weights_are_reloaded() -> None:
    async with pods(checkpoints=(CKPT_A, CKPT_B), switch_s=0.3) as (s,):
        loop = asyncio.get_running_loop()
        start = loop.time()
        status, raw, _ = await fetch(
            s, "/sdapi/v1/options", json_body={"sd_model_checkpoint": CKPT_B}, method="POST"
        )
        assert (status, raw) == (200, b"null")
        assert loop.time() - start >= 0.3 * 0.9  # answered after the reload
        stats = await get(s, "/sim/stats")
        assert stats["checkpoint_switches"] == 1
        current = (await get(s, "/sdapi/v1/options"))["sd_model_checkpoint"]
        assert current.startswith(f"{CKPT_B} [")  # retitled by its first load
        status, raw, _ = await fetch(
            s, "/sdapi/v1/options", json_body={"sd_model_checkpoint": current}, method="POST"
        )
        assert (status, raw) == (200, b"null")
        assert (await get(s, "/sim/stats"))["checkpoint_switches"] == 1  # cost nothing


# ---- start-up -------------------------------------------------------------------------------


async def test_http_answers_before_the_model_is_loaded() -> None:
    async with pods(startup_s=0.5) as (s,):
        (model,) = await get(s, "/sdapi/v1/sd-models")
        assert (model["title"], model["hash"]) == ("v1-5-pruned-emaonly.safetensors", None)
        assert (await get(s, "/sdapi/v1/options"))["sd_model_checkpoint"] is None
        job = asyncio.create_task(post(s, TXT2IMG, {"steps": 1, "send_images": False}))
        waiting = await until(s, lambda st: bool(st["heavy_inflight"] == 1), path="/sim/stats")
        assert waiting["model_loaded"] is False
        assert (await get(s, PROGRESS))["state"]["job"] == ""  # a waiting request is invisible
        assert (await job)[0] == 200
        (model,) = await get(s, "/sdapi/v1/sd-models")
        assert model["title"] == f"v1-5-pruned-emaonly.safetensors [{model['hash']}]"
        assert (await get(s, "/sdapi/v1/options"))["sd_model_checkpoint"] == model["title"]

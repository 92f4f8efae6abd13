"""Sim: the sd-webui browser UI of one simulated pod — a real Gradio 3.41 app (``--ui``).

sd-webui 1.10 pins gradio==3.41.2 (requirements_versions.txt); its txt2img tab is a
Gradio Blocks app whose Generate button runs under ``queue_lock``
(modules/call_queue.py ``wrap_gradio_gpu_call``) with Gradio's queue enabled
(webui.py: ``shared.demo.queue(64)``). This module builds a small app of the same shape:
a prompt, a steps slider, Generate, an image and an info box. Generate runs the
simulated txt2img on the pod's GPU lock (sdproxy.sim.gpu), so UI and API generations
serialise on one pod exactly as in sd-webui, and its image is served by Gradio's own
``/file=`` route. While it runs, the page polls ``POST /internal/progress`` as
sd-webui's progressbar.js does. Gradio is imported lazily: it is an optional extra
(``pip install sdproxy[ui]``), needed only by ``sdproxy sim --ui`` and the UI tests.

Gradio's queue calls its own ``/api/predict`` over HTTP at ``server_path``; ``launch``
sets that to the local URL, and so does ``mount`` here (with the pod's own URL).
"""

from __future__ import annotations

import base64
import collections
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from sdproxy.core.cost import plan_txt2img
from sdproxy.errors import ConfigError
from sdproxy.sim import gpu, schema
from sdproxy.sim.asgi import AsgiApp, serve
from sdproxy.sim.images import png_b64
from sdproxy.sim.state import SimPod

UI_APP = web.AppKey("sim_ui", object)

#: runs in the browser before Generate's call: poll /internal/progress until it ends
#: (sd-webui's javascript/progressbar.js requestProgress, in short)
PROGRESS_JS = """
(id_task, prompt, steps) => {
  const id = "task(" + Math.random().toString(36).slice(2, 9) + ")";
  window.sdproxyProgressPolls = window.sdproxyProgressPolls || 0;
  const poll = () => fetch("./internal/progress", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({id_task: id, id_live_preview: -1, live_preview: false})})
    .then(r => r.json()).then(p => {
      window.sdproxyProgressPolls += 1;
      if (!p.completed && window.sdproxyProgressPolls < 600) setTimeout(poll, 500);
    }).catch(() => {});
  setTimeout(poll, 100);
  return [id, prompt, steps];
}
"""


@dataclass(frozen=True, kw_only=True)
class MountedUi:
    asgi: AsgiApp
    blocks: Any


@dataclass
class Tasks:
    """Task ids of finished UI generations (modules/progress.py ``finished_tasks``)."""

    finished: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=16))
    #: submitted, not finished (``pending_tasks``): waiting for the lock, or running
    pending: list[str] = field(default_factory=list)


def _build(pod: SimPod, outdir: Path, tasks: Tasks) -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr  # lazily: the optional extra
    except ImportError as exc:
        raise ConfigError(
            "sim --ui needs Gradio 3.41 (the ui extra): pip install 'sdproxy[ui]'"
        ) from exc

    async def generate(id_task: str, prompt: str, steps: float) -> tuple[list[str], str]:
        model = schema.validate({"prompt": prompt, "steps": int(steps)}, schema.TXT2IMG)
        plan = plan_txt2img(model)
        task_id = id_task or pod.new_task_id("txt2img")
        tasks.pending.append(task_id)
        pod.enter_heavy()
        try:
            await gpu.generate(pod, name="scripts_txt2img", task_id=task_id, model=model, plan=plan)
        finally:
            pod.leave_heavy()
            tasks.pending.remove(task_id)
            tasks.finished.append(task_id)
        path = outdir / f"{len(tasks.finished)}.png"
        path.write_bytes(base64.b64decode(png_b64(plan.out_width, plan.out_height)))
        return [str(path)], f"<p class='sim-done'>{task_id}: {model['steps']} steps</p>"

    with gr.Blocks(title="Stable Diffusion (sdproxy sim)", analytics_enabled=False) as blocks:
        id_task = gr.Textbox(visible=False)
        prompt = gr.Textbox(label="Prompt", elem_id="txt2img_prompt")
        steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps")
        button = gr.Button("Generate", elem_id="txt2img_generate", variant="primary")
        image = gr.Gallery(label="Output", elem_id="txt2img_gallery")
        info = gr.HTML(elem_id="html_info_txt2img")
        button.click(
            fn=generate, inputs=[id_task, prompt, steps], outputs=[image, info], _js=PROGRESS_JS
        )
    blocks.queue(concurrency_count=1, max_size=64)
    return blocks


def mount(app: web.Application, pod: SimPod) -> None:
    """Serve the Gradio app for every path the sd-webui API does not own."""
    outdir = Path(tempfile.mkdtemp(prefix="sdproxy-sim-ui-"))
    tasks = Tasks()
    blocks = _build(pod, outdir, tasks)
    from gradio.routes import App

    blocks.dev_mode = False  # as launch() sets it: else the page polls /app_id (reload)
    blocks.config = blocks.get_config_file()
    asgi = App.create_app(blocks)
    app[UI_APP] = MountedUi(asgi=asgi, blocks=blocks)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await serve(asgi, request)

    async def progress(request: web.Request) -> web.Response:
        """modules/progress.py progressapi, in short: active, queued ("In queue: i/n",
        as measured on v1.10.1), completed, or waiting."""
        try:
            wanted = json.loads(await request.read()).get("id_task")
        except (ValueError, AttributeError):
            wanted = None
        running = pod.job.task_id if pod.job is not None else None
        waiting = [t for t in tasks.pending if t != running]
        active, queued = running == wanted, wanted in waiting
        done = wanted in tasks.finished
        text = f"In queue: {waiting.index(wanted) + 1}/{len(waiting)}" if queued else None
        text = text or (None if active else "Waiting...")
        return web.json_response(
            {"active": active, "queued": queued, "completed": done, "progress": None,
             "eta": None, "live_preview": None, "id_live_preview": -1, "textinfo": text}
        )  # fmt: skip

    app.router.add_post("/internal/progress", progress)
    app.router.add_route("*", "/{tail:.*}", handler, name="ui")
    app.on_cleanup.append(_stop)


def started(app: web.Application, url: str) -> None:
    """What ``Blocks.launch`` does once the server listens (called with the pod's URL):
    the queue's own URL, then the start-up events (the queue's workers)."""
    ui = app.get(UI_APP)
    if isinstance(ui, MountedUi):
        ui.blocks._queue.set_url(url + "/")
        ui.blocks.startup_events()


async def _stop(app: web.Application) -> None:
    ui = app[UI_APP]
    assert isinstance(ui, MountedUi)
    ui.blocks._queue.close()
    client = ui.blocks._queue.queue_client
    if client is not None:
        await client.aclose()


def is_ui_request(request: web.Request) -> bool:
    """A request the Gradio app answers (the simulated API's middlewares skip it)."""
    return request.match_info.route.name == "ui"

"""Deploy: the sd-webui probe scripts (docker/probes) against a stand-in sd-webui.

sd-ready is the startupProbe (a 1-step generation = the model is loaded), sd-drain the
preStop hook (wait until no generation runs). Each runs as a process, as kubelet runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.deploy.conftest import REPO

PROBES = REPO / "docker" / "probes"


@dataclass
class FakePod:
    """What the stand-in answers: checkpoints, txt2img status, progress job counts."""

    models: list[dict[str, str]] = field(default_factory=lambda: [{"title": "v1-5"}])
    txt2img_status: int = 200
    busy_polls: int = 0
    posts: list[dict[str, Any]] = field(default_factory=list)


def _handler(pod: FakePod) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _json(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/sdapi/v1/sd-models":
                self._json(200, pod.models)
            elif self.path.startswith("/sdapi/v1/progress"):
                busy = pod.busy_polls > 0
                pod.busy_polls -= 1
                self._json(
                    200, {"state": {"job": "txt2img" if busy else "", "job_count": int(busy)}}
                )
            else:
                self._json(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            pod.posts.append(json.loads(body))
            self._json(pod.txt2img_status, {"images": []})

    return Handler


@pytest.fixture
def pod() -> Iterator[tuple[FakePod, int]]:
    state = FakePod()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PROBES / script), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_sd_ready_passes_after_a_tiny_generation(pod: tuple[FakePod, int]) -> None:
    state, port = pod
    assert run("sd-ready", "--port", str(port)).returncode == 0
    (body,) = state.posts
    assert (body["steps"], body["width"], body["height"]) == (1, 64, 64)
    assert body["send_images"] is False


@pytest.mark.parametrize(
    ("models", "status", "message"),
    [
        pytest.param([], 200, "no checkpoint", id="empty-models-volume"),
        pytest.param([{"title": "x"}], 500, "txt2img failed", id="generation-fails"),
    ],
)
def test_sd_ready_fails_with_a_reason(
    pod: tuple[FakePod, int], models: list[dict[str, str]], status: int, message: str
) -> None:
    state, port = pod
    state.models, state.txt2img_status = models, status
    proc = run("sd-ready", "--port", str(port))
    assert proc.returncode == 1
    assert message in proc.stderr


def test_sd_ready_fails_when_nothing_listens() -> None:
    assert run("sd-ready", "--port", "1", "--timeout", "2").returncode == 1


def test_sd_drain_waits_until_the_pod_is_idle(pod: tuple[FakePod, int]) -> None:
    state, port = pod
    state.busy_polls = 3
    proc = run("sd-drain", "--port", str(port), "--settle", "0", "--max-wait", "20")
    assert proc.returncode == 0
    assert state.busy_polls < 0, "returned while the pod was still busy"

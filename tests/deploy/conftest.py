"""Deploy tests: render the kustomize overlays once per session, find the sdproxy CLIs."""

from __future__ import annotations

import contextlib
import io
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from sdproxy.cli import build_parser
from tests.conftest import require_binary

REPO = Path(__file__).resolve().parents[2]
OVERLAYS_DIR = REPO / "deploy" / "overlays"
OVERLAYS = sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())
KUBECTL_INSTALL = (
    "apt-get install kubectl (or kubernetes-client), or see kubernetes.io/docs/tasks/tools"
)

Obj = dict[str, Any]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Obj]]:
    """overlay name -> the objects `kubectl kustomize deploy/overlays/<name>` renders."""
    kubectl = require_binary("kubectl", install=KUBECTL_INSTALL)
    out: dict[str, list[Obj]] = {}
    for name in OVERLAYS:
        proc = subprocess.run(
            [kubectl, "kustomize", str(OVERLAYS_DIR / name)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, f"kubectl kustomize {name} failed:\n{proc.stderr}"
        out[name] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return out


def find(objs: Sequence[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: Sequence[Obj], kind: str, name: str) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def containers(workload: Obj) -> list[Obj]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def iter_containers(objs: Sequence[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for o in find(objs, "Deployment"):
        for c in containers(o):
            yield o, c


def image_name(image: str) -> str:
    """Repository without registry host or tag: 'reg.io/x/sdproxy:1' -> 'sdproxy'."""
    return image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]


def argv_of(container: Obj) -> list[str]:
    """What runs after the image's `sdproxy` entry point ('serve ...' or sim flags)."""
    return [*container.get("command", [])[1:], *container.get("args", [])]


def flags_in(argv: Sequence[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]


def parse(argv: Sequence[str]) -> Any:
    """build_parser().parse_args(argv), turning argparse's exit into a readable failure."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            return build_parser().parse_args(list(argv))
        except SystemExit:
            pytest.fail(f"sdproxy {' '.join(argv)!r} does not parse: {stderr.getvalue()}")

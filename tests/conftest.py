"""Shared test helpers: binaries that must exist in CI, free loopback ports."""

from __future__ import annotations

import os
import shutil
import socket
from typing import NoReturn

import pytest


def require_binary(name: str, *, install: str) -> str:
    """Path of a system binary; skip with a reason locally, FAIL in CI (CI=true)."""
    path = shutil.which(name)
    if path:
        return path
    unavailable(f"{name} not found; install it with: {install}")


def unavailable(message: str) -> NoReturn:
    """Skip with ``message`` locally; fail in CI (CI=true), where everything must work."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (bind to 0, read, close)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port

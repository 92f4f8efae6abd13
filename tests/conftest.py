"""Shared test helpers: binaries that must exist in CI, free loopback ports."""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def require_binary(name: str, *, install: str) -> str:
    """Path of a system binary; skip with a reason locally, FAIL in CI (CI=true)."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} not found; install it with: {install}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (bind to 0, read, close)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port

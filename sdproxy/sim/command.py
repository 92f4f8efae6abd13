"""Sim: the ``sdproxy sim`` sub-command (being written; see issue 2)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("sim", help="run simulated sd-webui pods")
    parser.set_defaults(handler=None)

"""Runtime: the ``sdproxy demo`` sub-command (being written; see issue 4)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("demo", help="run the one-command demo")
    parser.set_defaults(handler=None)

"""The README documents every user-facing flag, error code and required metric."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from sdproxy import errors, settings
from sdproxy.cli import build_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub: argparse.ArgumentParser = action.choices[name]
            return sub
    raise AssertionError("no sub-commands")


@pytest.mark.parametrize("command", ["serve", "gate", "sim", "demo"])
def test_every_flag_is_in_the_readme(command: str) -> None:
    flags = [
        opt
        for action in _subparser(command)._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help" and not opt.startswith("--no-")
    ]
    assert flags, command
    missing = [f for f in flags if f"`{f}`" not in README and f"`{f} " not in README]
    assert not missing, f"sdproxy {command} flags missing from README: {missing}"


def _client_errors() -> list[type[errors.ClientFacingError]]:
    return [
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type)
        and issubclass(cls, errors.ClientFacingError)
        and cls is not errors.ClientFacingError
    ]


@pytest.mark.parametrize("cls", _client_errors(), ids=lambda c: c.code)
def test_every_error_code_is_in_the_readme(cls: type[errors.ClientFacingError]) -> None:
    row = re.search(rf"\|\s*{cls.status}\s*\|\s*`{cls.code}`\s*\|", README)
    assert row, f"README error table lacks {cls.status} {cls.code}"


@pytest.mark.parametrize(
    "name",
    [
        "requests_total",
        "request_duration_seconds",
        "queue_depth",
        "queue_wait_seconds",
        "rejected_total",
        "pod_inflight",
        "pod_limit",
        "pods{state}",
        "desired_pods",
        "scale_events_total",
        "backend_errors_total",
        "interrupts_total",
    ],
)
def test_required_metrics_are_documented(name: str) -> None:
    assert f"`{name}" in README


def _table_defaults(heading: str) -> dict[str, str]:
    """{flag: default cell without backticks} of the flag table under ``heading``."""
    section = re.split(r"\n##+ ", README.split(heading, 1)[1], maxsplit=1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        found = re.match(r"`(--[a-z-]+)`", cells[0]) if cells else None
        if found:
            rows[found.group(1)] = cells[1].replace("`", "")
    return rows


def test_the_serve_table_shows_the_defaults_serve_uses() -> None:
    rows = _table_defaults("### `sdproxy serve`")
    assert {opt.flag: opt.shown_default for opt in settings.OPTIONS} == {
        flag: cell for flag, cell in rows.items() if flag != "--config"
    }


def test_the_demo_table_shows_the_defaults_demo_uses() -> None:
    defaults = {
        opt: f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
        for action in _subparser("demo")._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    }
    assert _table_defaults("## The demo: `sdproxy demo`") == defaults

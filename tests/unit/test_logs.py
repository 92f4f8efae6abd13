"""Unit: log set-up, JSON and text lines, the access log and structured events."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import FrozenInstanceError
from typing import Any

import pytest
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from sdproxy.errors import ConfigError
from sdproxy.runtime.logs import (
    SERVER_LOGGER,
    AccessRecord,
    BadRequestFilter,
    log_access,
    log_event,
    setup_logging,
)
from sdproxy.settings import LogSettings


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide state; put it back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("sdproxy.access", "aiohttp.access")
    saved = {n: (logging.getLogger(n).level, logging.getLogger(n).disabled) for n in names}
    server_filters = list(logging.getLogger(SERVER_LOGGER).filters)
    yield
    logging.getLogger(SERVER_LOGGER).filters[:] = server_filters
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    for name, (lvl, disabled) in saved.items():
        logging.getLogger(name).setLevel(lvl)
        logging.getLogger(name).disabled = disabled


def configure(*, fmt: str = "json", level: str = "info", access_log: bool = True) -> io.StringIO:
    stream = io.StringIO()
    log = LogSettings(log_level=level, log_format=fmt, access_log=access_log)
    setup_logging(log, stream=stream)
    return stream


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def access_record(**overrides: Any) -> AccessRecord:
    fields: dict[str, Any] = {
        "request_id": "r-1",
        "client_id": "tenant-a",
        "method": "POST",
        "path": "/sdapi/v1/txt2img",
        "route_class": "heavy",
        "pod": "10.0.0.7:7860",
        "queue_ms": 1250.0,
        "duration_ms": 5320.5,
        "status": 200,
        "bytes_in": 512,
        "bytes_out": 1_048_576,
        "error": None,
    }
    return AccessRecord(**(fields | overrides))


def test_access_record_is_one_json_line_with_every_field() -> None:
    stream = configure()
    log_access(access_record())
    [line] = json_lines(stream)
    assert line["logger"] == "sdproxy.access"
    assert line["level"] == "info"
    assert line["msg"] == "POST /sdapi/v1/txt2img 200 5320ms"
    assert line["ts"].endswith("Z")
    expected = {"request_id": "r-1", "client_id": "tenant-a", "route_class": "heavy"}
    expected |= {"pod": "10.0.0.7:7860", "queue_ms": 1250.0, "duration_ms": 5320.5}
    expected |= {"status": 200, "bytes_in": 512, "bytes_out": 1_048_576, "error": None}
    expected |= {"method": "POST", "path": "/sdapi/v1/txt2img"}
    assert {k: line[k] for k in expected} == expected


def test_rejected_request_has_no_pod_and_an_error_code() -> None:
    stream = configure()
    log_access(access_record(pod=None, status=503, error="queue_full"))
    [line] = json_lines(stream)
    assert (line["pod"], line["status"], line["error"]) == (None, 503, "queue_full")


def test_access_log_can_be_turned_off_without_silencing_events() -> None:
    stream = configure(access_log=False)
    log_access(access_record())
    log_event("scale", **{"from": 1, "to": 2, "reason": "queue 3 > 1"})
    [line] = json_lines(stream)
    assert line["logger"] == "sdproxy.events"


def test_events_carry_their_kind_and_any_field_names() -> None:
    stream = configure()
    log_event("pod_state", pod="10.0.0.7:7860", **{"from": "starting", "to": "ready"})
    log_event("discovery", connected=False, msg="boom", name="x", log_level=logging.WARNING)
    first, second = json_lines(stream)
    assert first["logger"] == "sdproxy.events"
    assert first["msg"] == "pod_state"
    assert (first["event"], first["from"], first["to"]) == ("pod_state", "starting", "ready")
    assert second["level"] == "warning"
    assert (second["msg"], second["field_msg"], second["name"]) == ("discovery", "boom", "x")


def test_level_filters_records() -> None:
    stream = configure(level="warning")
    logging.getLogger("sdproxy.runtime.test").info("hidden")
    logging.getLogger("sdproxy.runtime.test").warning("shown", extra={"pod": "p1"})
    log_access(access_record())  # the access log stays on at warning level
    lines = json_lines(stream)
    assert [line["logger"] for line in lines] == ["sdproxy.runtime.test", "sdproxy.access"]
    assert (lines[0]["msg"], lines[0]["pod"]) == ("shown", "p1")


def test_exceptions_stay_on_one_json_line() -> None:
    stream = configure()
    try:
        raise RuntimeError("line one\nline two")
    except RuntimeError:
        logging.getLogger("sdproxy").exception("failed")
    [line] = json_lines(stream)
    assert "RuntimeError: line one\nline two" in line["exc"]


def test_text_format_is_readable() -> None:
    stream = configure(fmt="text")
    log_access(access_record(path="/sdapi/v1/txt2img"))
    log_event("scale", reason="queue 3 > capacity")
    access, event = stream.getvalue().splitlines()
    assert " INFO    sdproxy.access POST /sdapi/v1/txt2img 200 5320ms " in access
    assert "pod=10.0.0.7:7860" in access
    assert "error=" not in access  # None fields are left out of text lines
    assert event.endswith('event=scale reason="queue 3 > capacity"')


def test_setup_is_idempotent() -> None:
    configure()
    stream = configure()
    log_event("scale")
    assert len(json_lines(stream)) == 1
    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == "_SdproxyHandler"]
    assert len(ours) == 1


@pytest.mark.parametrize(
    ("level", "fmt"),
    [pytest.param("loud", "json", id="bad-level"), pytest.param("info", "xml", id="bad-format")],
)
def test_bad_settings_are_config_errors(level: str, fmt: str) -> None:
    with pytest.raises(ConfigError):
        configure(level=level, fmt=fmt)


def test_access_record_is_frozen() -> None:
    record = access_record()
    with pytest.raises(FrozenInstanceError):
        # mypy rightly refuses this assignment; the test proves it fails at run time too
        record.status = 500  # type: ignore[misc]


# ---- what clients control: control characters, unparseable requests ----------------------

#: CR, ESC (a colour), NUL, DEL, a C1 CSI, a line separator, a right-to-left override
HOSTILE = "/a\rb\x1b[31m\x00\x7f\x9b\u2028\u202e"
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def test_text_lines_escape_control_characters() -> None:
    stream = configure(fmt="text")
    log_access(access_record(path=HOSTILE, client_id="x\x1bq"))
    try:
        raise RuntimeError("in a traceback too: \x1b[2J")
    except RuntimeError:
        logging.getLogger("sdproxy").exception("failed on %s", HOSTILE)
    text = stream.getvalue()
    assert not RAW.search(text), repr(text)
    escaped = "/a\\rb\\x1b[31m\\x00\\x7f\\x9b\\u2028\\u202e"
    assert f"sdproxy.access GET {escaped} 200 " in text.replace("POST", "GET")
    assert 'client_id="x\\u001bq"' in text  # a value with a control char is quoted
    assert f"failed on {escaped}" in text
    assert "RuntimeError: in a traceback too: \\x1b[2J" in text
    access, failed, traceback = text.splitlines()[:3]  # no line split by a client's CR
    assert "sdproxy.access" in access and "bytes_out=" in access
    assert "failed on" in failed and traceback == "Traceback (most recent call last):"


def test_json_lines_escape_what_json_leaves_raw() -> None:
    stream = configure()
    log_access(access_record(path=HOSTILE))
    text = stream.getvalue()
    assert not RAW.search(text.rstrip("\n")), repr(text)
    [line] = json_lines(stream)
    assert line["path"] == line["msg"].split(" ")[1] == HOSTILE  # the same string, escaped


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def log_bad_request(exc: Exception, *, level: int = logging.ERROR) -> None:
    """What aiohttp's RequestHandler.handle_error logs for a request it could not parse."""
    server = logging.getLogger(SERVER_LOGGER)
    server.log(level, "Error handling request from %s", "10.1.2.3", exc_info=exc)


def test_a_bad_request_is_one_warning_line_rate_limited() -> None:
    stream = configure()
    clock = FakeClock()
    server = logging.getLogger(SERVER_LOGGER)
    server.filters[:] = [BadRequestFilter(per_second=3, clock=clock)]
    for _ in range(5):  # 3 written, 2 left out
        log_bad_request(BadHttpMessage("Invalid character in Content-Length:\n\n  b'zz'\n  ^"))
        clock.now += 0.1
    clock.now = 101.0  # the next second: written again, counting what was left out
    log_bad_request(LineTooLong(b"x" * 10_000, 8190))
    lines = json_lines(stream)
    assert [(d["level"], d["logger"]) for d in lines] == [("warning", SERVER_LOGGER)] * 4
    assert all("exc" not in d for d in lines)  # no traceback
    first = lines[0]
    assert first["msg"] == "bad request: Invalid character in Content-Length: b'zz'"
    assert (first["client"], first["status"], "suppressed" in first) == ("10.1.2.3", 400, False)
    assert lines[3]["suppressed"] == 2
    assert lines[3]["msg"].startswith("bad request: Got more than 8190 bytes when reading")
    assert len(lines[3]["msg"]) <= len("bad request: ") + 160


def test_the_rate_limit_leaves_other_records_alone() -> None:
    stream = configure(level="debug")
    server = logging.getLogger(SERVER_LOGGER)
    server.filters[:] = [BadRequestFilter(per_second=1, clock=FakeClock())]
    log_bad_request(BadHttpMessage("bad"))
    log_bad_request(BadHttpMessage("left out"))
    try:
        raise RuntimeError("a bug in a handler")
    except RuntimeError:  # not a bad request: an error with its traceback, never limited
        server.exception("Error handling request from %s", "10.1.2.3")
    log_bad_request(BadHttpMessage("non-HTTP traffic"), level=logging.DEBUG)  # limited
    lines = json_lines(stream)
    assert [(d["level"], "exc" in d) for d in lines] == [("warning", False), ("error", True)]
    assert "RuntimeError: a bug in a handler" in lines[1]["exc"]


def test_setup_installs_the_bad_request_filter_once() -> None:
    configure()
    configure()
    server = logging.getLogger(SERVER_LOGGER)
    assert [type(f) for f in server.filters].count(BadRequestFilter) == 1

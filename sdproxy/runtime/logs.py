"""Runtime: logging set-up, the per-request access log and structured events.

``setup_logging`` installs ONE handler on the root logger (so aiohttp's and the
Kubernetes client's records share the format): ``json`` writes one object per line,
``{"ts", "level", "logger", "msg", ...fields}``, for log pipelines; ``text`` writes
``ts LEVEL logger msg key=value ...`` for terminals. Fields come from ``extra=`` or
from ``log_access``/``log_event``, which carry them under one attribute so that a
field may be called anything (``extra={"name": ...}`` would clash with LogRecord).

Loggers: ``sdproxy.access`` (one line per request, disabled by ``access_log=false``)
and ``sdproxy.events`` (scale decisions, pod state changes, discovery).
The proxy should run aiohttp with ``access_log=None``: ``log_access`` replaces it.

Clients choose much of what is logged (paths arrive percent-decoded: ``%0D``, ``%1B``,
``%00`` are raw control bytes by then), so a text line shows every control character as
an escape (``\r``, ``\x1b``, ``\u202e``) and a JSON line escapes those ``json`` leaves raw
(DEL, C1, line separators, bidi overrides): a request cannot forge a line or drive the
reader's terminal. A request aiohttp cannot parse is the client's fault: aiohttp logs
each at ERROR with a traceback (~570 B); ``BadRequestFilter`` makes it one WARNING line,
at most ``BAD_REQUEST_LINES_PER_S`` a second, the next line counting those left out.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from aiohttp.http_exceptions import HttpProcessingError

from sdproxy.errors import ConfigError
from sdproxy.settings import LogSettings

ACCESS_LOGGER = "sdproxy.access"
EVENTS_LOGGER = "sdproxy.events"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: the attribute log_access/log_event put their fields under
FIELDS_ATTR = "sdproxy_fields"
_CORE_KEYS = ("ts", "level", "logger", "msg")
#: attributes every LogRecord has; anything else on a record came from ``extra=``
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
#: what a log line may not carry raw: C0 controls (CR, ESC, NUL… rewrite a terminal line or
#: forge a new one), DEL, C1 controls, the Unicode line and paragraph separators, and the
#: bidi embeddings, overrides and isolates (they reorder what a reader sees)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
#: the subset ``json.dumps(..., ensure_ascii=False)`` leaves unescaped
_JSON_RAW = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: the aiohttp logger that reports requests it could not parse (aiohttp.log.server_logger)
SERVER_LOGGER = "aiohttp.server"
#: lines a second for requests aiohttp could not parse (a flood must not fill the disk)
BAD_REQUEST_LINES_PER_S = 10
#: characters of aiohttp's description of a bad request kept on its line
_BAD_REQUEST_CHARS = 160


def escape_controls(text: str) -> str:
    """``text`` with every control character shown as an escape: ``\\r``, ``\\x1b``,
    ``\\u202e``."""
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


@dataclass(frozen=True, kw_only=True)
class AccessRecord:
    """One answered request, as the access log writes it."""

    request_id: str
    #: who sent it (X-Client-Id / API key id / peer address), for fairness and support
    client_id: str
    method: str
    path: str
    #: heavy | light | job | admin | proxy
    route_class: str
    #: the pod that served it; None when it never reached one (rejected, light cache…)
    pod: str | None
    queue_ms: float
    duration_ms: float
    status: int
    bytes_in: int
    bytes_out: int
    #: stable error code (queue_full, backend_error…) or None
    error: str | None
    #: the request's tenant (X-Sdproxy-Tenant or its API key's), None: anonymous
    tenant: str | None = None
    #: a heavy job's estimated GPU-seconds on its pod (X-Sdproxy-Cost-S)
    cost_s: float | None = None


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record: ``extra=`` attributes, then ours."""
    fields = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}
    fields.update(fields.pop(FIELDS_ATTR, None) or {})
    # a field may not overwrite ts/level/logger/msg; keep it under another name
    for key in _CORE_KEYS:
        if key in fields:
            fields[f"field_{key}"] = fields.pop(key)
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line (never a raw newline inside: json.dumps escapes it)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(record_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        line = json.dumps(doc, default=str, ensure_ascii=False)
        return _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger msg key=value ...``: readable in a terminal, still greppable."""

    def format(self, record: logging.LogRecord) -> str:
        message = escape_controls(record.getMessage())
        parts = [_timestamp(record), f"{record.levelname:<7}", record.name, message]
        for key, val in record_fields(record).items():
            if val is not None:
                text = str(val)
                # json.dumps escapes C0 and non-ASCII; DEL is left to escape_controls
                value = escape_controls(json.dumps(text)) if _needs_quotes(text) else text
                parts.append(f"{key}={value}")
        line = " ".join(parts)
        if record.exc_info:  # a traceback keeps its lines, each escaped
            trace = self.formatException(record.exc_info).split("\n")
            line += "\n" + "\n".join(escape_controls(part) for part in trace)
        return line


def _needs_quotes(text: str) -> bool:
    return (
        not text
        or _CONTROL.search(text) is not None
        or any(c.isspace() or c in "\"='" for c in text)
    )


class BadRequestFilter(logging.Filter):
    """On ``aiohttp.server``: a request aiohttp could not parse — an invalid request line,
    header or chunk (``HttpProcessingError``: BadHttpMessage, LineTooLong, …) — is logged
    by aiohttp at ERROR with a traceback (web_protocol ``RequestHandler.handle_error``).
    It is the client's fault, so here it becomes one line without a traceback, at WARNING
    (aiohttp's DEBUG for non-HTTP traffic stays DEBUG), and at most ``per_second`` of them
    in each one-second window; the first line written after some were left out carries
    ``suppressed=N`` (as the kernel's printk_ratelimit prints "N callbacks suppressed").
    Every other record passes unchanged: a handler's own exception is still an error."""

    def __init__(
        self,
        *,
        per_second: int = BAD_REQUEST_LINES_PER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.per_second = per_second
        self.clock = clock
        self._window_start = -math.inf
        self._written = 0
        #: lines left out since the last one written
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if isinstance(record.exc_info, tuple) else None
        if not isinstance(exc, HttpProcessingError):
            return True
        level = min(record.levelno, logging.WARNING)
        if not logging.getLogger(record.name).isEnabledFor(level):
            return False
        now = self.clock()
        if now - self._window_start >= 1.0:
            self._window_start, self._written = now, 0
        if self._written >= self.per_second:
            self.suppressed += 1
            return False
        self._written += 1
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        what = " ".join(exc.message.split()).rstrip(" ^")  # one line, no caret under it
        if len(what) > _BAD_REQUEST_CHARS:
            what = what[: _BAD_REQUEST_CHARS - 1] + "…"
        record.msg, record.args = "bad request: %s", (what,)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.levelno, record.levelname = level, logging.getLevelName(level)
        fields: dict[str, Any] = {"client": remote, "status": exc.code}
        if self.suppressed:
            fields["suppressed"], self.suppressed = self.suppressed, 0
        setattr(record, FIELDS_ATTR, fields)
        return True


class _SdproxyHandler(logging.StreamHandler[TextIO]):
    """Marks the handler we installed, so a second setup replaces it."""


def setup_logging(settings: LogSettings, *, stream: TextIO | None = None) -> None:
    """Configure the root logger from settings (idempotent); ``stream`` defaults to stderr."""
    level = LEVELS.get(settings.log_level.lower())
    if level is None:
        raise ConfigError(
            f"log level must be one of {', '.join(LEVELS)}, got {settings.log_level!r}"
        )
    formatters = {"json": JsonFormatter, "text": TextFormatter}
    if settings.log_format not in formatters:
        raise ConfigError(f"log format must be json or text, got {settings.log_format!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _SdproxyHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _SdproxyHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatters[settings.log_format]())
    root.addHandler(handler)
    root.setLevel(level)
    # the access log is an INFO stream: keep it at INFO even when the level is warning
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.INFO)
    access.disabled = not settings.access_log
    logging.getLogger("aiohttp.access").disabled = True  # replaced by log_access
    server = logging.getLogger(SERVER_LOGGER)
    for old_filter in [f for f in server.filters if isinstance(f, BadRequestFilter)]:
        server.removeFilter(old_filter)
    server.addFilter(BadRequestFilter())


_ACCESS = logging.getLogger(ACCESS_LOGGER)


def access_log_enabled() -> bool:
    """Whether ``log_access`` would write: the caller can skip building the record."""
    return not _ACCESS.disabled and _ACCESS.isEnabledFor(logging.INFO)


def log_access(record: AccessRecord) -> None:
    """One line for one answered request on ``sdproxy.access``."""
    logger = _ACCESS
    if not access_log_enabled():
        return
    msg = f"{record.method} {record.path} {record.status} {record.duration_ms:.0f}ms"
    logger.info(msg, extra={FIELDS_ATTR: asdict(record)})


def log_event(kind: str, *, log_level: int = logging.INFO, **fields: Any) -> None:
    """A structured event on ``sdproxy.events``: ``kind`` is scale, pod_state, discovery…"""
    logger = logging.getLogger(EVENTS_LOGGER)
    if not logger.isEnabledFor(log_level):
        return
    logger.log(log_level, kind, extra={FIELDS_ATTR: {"event": kind, **fields}})

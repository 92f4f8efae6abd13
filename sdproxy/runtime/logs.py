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
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

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
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger msg key=value ...``: readable in a terminal, still greppable."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), f"{record.levelname:<7}", record.name, record.getMessage()]
        for key, val in record_fields(record).items():
            if val is not None:
                text = str(val)
                parts.append(f"{key}={json.dumps(text) if _needs_quotes(text) else text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _needs_quotes(text: str) -> bool:
    return not text or any(c.isspace() or c in "\"='" for c in text)


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

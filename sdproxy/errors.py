"""One exception tree for sdproxy; each error that can reach a client knows its answer.

    SdproxyError
    ├── ConfigError                 bad settings (CLI, env, TOML); never reaches a client
    ├── KubernetesError             a Kubernetes API call failed (logged; discovery keeps
    │                               the last known pods, the scaler retries next tick)
    └── ClientFacingError           has .status and a stable .code for the JSON body
        ├── QueueFull               503 queue_full (with Retry-After)
        ├── QueueTimeout            503 queue_timeout
        ├── NoBackends              503 no_backends
        ├── JobCancelled            409 job_cancelled (interrupted while queued)
        ├── ShuttingDown            503 shutting_down
        ├── BackendError            502 backend_error (failure after the request was sent)
        ├── BodyTooLarge            413 body_too_large
        ├── Forbidden               403 forbidden_route
        ├── BadRequest              400 bad_request
        ├── NotFound                404 not_found (unknown /-/ endpoint)
        └── InternalError           500 internal_error (a bug; logged with its traceback)

Kubernetes and aiohttp client errors are translated at the runtime boundary with
``raise X(...) from exc`` so handlers only ever catch ``ClientFacingError``.
"""

from __future__ import annotations

from typing import ClassVar


class SdproxyError(Exception):
    """Root of every error sdproxy raises on purpose."""


class ConfigError(SdproxyError):
    """Invalid configuration; reported on the command line, never to HTTP clients."""


class KubernetesError(SdproxyError):
    """A Kubernetes API call failed; ``status`` is None when no HTTP answer came back."""

    def __init__(self, what: str, *, status: int | None, reason: str) -> None:
        super().__init__(f"{what}: {status if status is not None else 'unreachable'} {reason}")
        self.what = what
        self.status = status
        self.reason = reason


class ClientFacingError(SdproxyError):
    """An error answered to the HTTP client as ``{"error": code, "detail": detail}``."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, detail: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, str]:
        """The JSON body sent to the client."""
        return {"error": self.code, "detail": self.detail}


class QueueFull(ClientFacingError):
    status = 503
    code = "queue_full"


class QueueTimeout(ClientFacingError):
    status = 503
    code = "queue_timeout"


class NoBackends(ClientFacingError):
    status = 503
    code = "no_backends"


class JobCancelled(ClientFacingError):
    status = 409
    code = "job_cancelled"


class ShuttingDown(ClientFacingError):
    status = 503
    code = "shutting_down"


class BackendError(ClientFacingError):
    status = 502
    code = "backend_error"


class BodyTooLarge(ClientFacingError):
    status = 413
    code = "body_too_large"


class Forbidden(ClientFacingError):
    status = 403
    code = "forbidden_route"


class BadRequest(ClientFacingError):
    status = 400
    code = "bad_request"


class NotFound(ClientFacingError):
    status = 404
    code = "not_found"


class InternalError(ClientFacingError):
    status = 500
    code = "internal_error"

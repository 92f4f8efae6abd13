"""One exception tree for sdproxy; each error that can reach a client knows its answer.

    SdproxyError
    ├── ConfigError                 bad settings (CLI, env, TOML); never reaches a client
    ├── KubernetesError             a Kubernetes API call failed (logged; discovery keeps
    │                               the last known pods, the scaler retries next tick)
    ├── StateError                  an event the core's state does not allow (a bug in the
    │   │                           caller: releasing a ticket that does not run, …)
    │   └── IllegalTransition       a pod state change not in the transition table
    ├── UpstreamError               one exchange with a pod failed; .kind, .sent
    │   ├── ConnectFailed           refused / connect timed out: nothing reached the pod
    │   ├── UpstreamTimeout         sent, and the pod did not answer in time
    │   ├── UpstreamReset           sent, and the pod closed or reset the connection
    │   └── ResponseBrokeOff        the answer broke off after its head went to the client
    └── ClientFacingError           has .status and a stable .code for the JSON body
        ├── QueueFull               503 queue_full (with Retry-After)
        ├── QueueTimeout            503 queue_timeout
        ├── NoBackends              503 no_backends
        ├── JobCancelled            409 job_cancelled (interrupted while queued)
        ├── ClientQuota             429 client_quota (the caller's queued jobs are at
        │                           --max-queued-per-client, or its tenant's at
        │                           max_queued; with Retry-After)
        ├── DeadlineUnmeetable      503 deadline_unmeetable (X-Sdproxy-Deadline-S is
        │                           before the job's ETA; the body has eta_s)
        ├── RequestTooLarge         422 request_too_large (a field over --max-steps,
        │                           --max-pixels or --max-batch; names field and bound)
        ├── ShuttingDown            503 shutting_down
        ├── PodBusy                 503 pod_busy (sdproxy gate: the pod runs its limit)
        ├── PodDown                 503 pod_down (sdproxy gate: its sd-webui is unreachable)
        ├── BackendError            502 backend_error (failure after the request was sent)
        ├── BodyTooLarge            413 body_too_large
        ├── BodyTimeout             408 body_timeout (the upload took over
        │                           --client-body-timeout-s)
        ├── SpoolFull               503 spool_full (spooled bodies at --spool-max-mb;
        │                           with Retry-After)
        ├── Forbidden               403 forbidden_route
        ├── BadRequest              400 bad_request
        │   └── MalformedBody       400 bad_request (the body's framing broke mid-upload)
        ├── NotFound                404 not_found (unknown /-/ endpoint)
        ├── NotAJob                 400 not_a_job (a light or admin route sent as a job)
        ├── JobNotFound             404 job_not_found (no job has that id)
        ├── JobNotFinished          409 job_not_finished (its result is not there yet)
        ├── JobExpired              410 job_expired (its retention ended)
        ├── InterruptedByRestart    502 interrupted_by_restart (it ran when the proxy died)
        ├── JobsFull                503 jobs_full (the job store is at --jobs-max-mb with
        │                           unfinished jobs; with Retry-After)
        ├── Unauthorized            401 unauthorized (an ops endpoint without --ops-token;
        │                           with [tenants], a request without a known API key)
        ├── UiSessionEnded          410 ui_session_ended (--ui: the browser's session
        │                           idled out, was left or lost its pod)
        ├── UiNoSession             409 ui_no_session (--ui: a UI call from a browser
        │                           that has no session yet; the page opens one)
        └── InternalError           500 internal_error (a bug; logged with its traceback)

Kubernetes and aiohttp client errors are translated at the runtime boundary with
``raise X(...) from exc`` so handlers only ever catch ``ClientFacingError`` (and
``UpstreamError`` where a pod failure needs its own handling). ``for_reject`` is the one
table from a core rejection reason (whose values are the client error codes) to the error
the client gets. This module imports nothing of ours: every layer may use it.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any, ClassVar


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


class StateError(SdproxyError):
    """The admission core was told something its state rules out (a caller's bug)."""


class IllegalTransition(StateError):
    """A pod state change that the transition table in ``sdproxy.core.pods`` forbids."""


class UpstreamKind(StrEnum):
    """How an exchange with a pod failed (the ``kind`` label of backend error metrics)."""

    CONNECT = "connect"
    TIMEOUT = "timeout"
    RESET = "reset"
    BROKE_OFF = "broke_off"


class UpstreamError(SdproxyError):
    """An exchange with a pod failed. ``sent`` is False when nothing reached the pod (a
    retry on another pod is safe: generations are not idempotent)."""

    kind: ClassVar[UpstreamKind] = UpstreamKind.RESET

    def __init__(self, detail: str, *, sent: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.sent = sent


class ConnectFailed(UpstreamError):
    kind = UpstreamKind.CONNECT

    def __init__(self, detail: str) -> None:
        super().__init__(detail, sent=False)


class UpstreamTimeout(UpstreamError):
    kind = UpstreamKind.TIMEOUT


class UpstreamReset(UpstreamError):
    kind = UpstreamKind.RESET


class ResponseBrokeOff(UpstreamError):
    """The pod's answer broke off after its head went to the client: the client's
    connection must be cut so it sees a truncated answer, not a complete one.
    ``response`` is the runtime's half-sent response object."""

    kind = UpstreamKind.BROKE_OFF

    def __init__(self, detail: str, *, response: Any) -> None:
        super().__init__(detail, sent=True)
        self.response = response


class ClientFacingError(SdproxyError):
    """An error answered to the HTTP client as ``{"error": code, "detail": detail}``."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, detail: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
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


class ClientQuota(ClientFacingError):
    status = 429
    code = "client_quota"


class DeadlineUnmeetable(ClientFacingError):
    """The job could not finish by its own deadline; the body says when it would."""

    status = 503
    code = "deadline_unmeetable"

    def __init__(self, detail: str, *, eta_s: float) -> None:
        super().__init__(detail)
        self.eta_s = eta_s

    def body(self) -> dict[str, Any]:
        return {**super().body(), "eta_s": round(self.eta_s, 2)}


class RequestTooLarge(ClientFacingError):
    """A request over the proxy's bounds; the body names the field and the bound too."""

    status = 422
    code = "request_too_large"

    def __init__(self, detail: str, *, field: str, limit: int) -> None:
        super().__init__(detail)
        self.field = field
        self.limit = limit

    def body(self) -> dict[str, Any]:
        return {**super().body(), "field": self.field, "limit": self.limit}


class ShuttingDown(ClientFacingError):
    status = 503
    code = "shutting_down"


class PodBusy(ClientFacingError):
    status = 503
    code = "pod_busy"


class PodDown(ClientFacingError):
    status = 503
    code = "pod_down"


class BackendError(ClientFacingError):
    status = 502
    code = "backend_error"


class BodyTooLarge(ClientFacingError):
    status = 413
    code = "body_too_large"


class SpoolFull(ClientFacingError):
    status = 503
    code = "spool_full"


class BodyTimeout(ClientFacingError):
    status = 408
    code = "body_timeout"


class Forbidden(ClientFacingError):
    status = 403
    code = "forbidden_route"


class BadRequest(ClientFacingError):
    status = 400
    code = "bad_request"


class MalformedBody(BadRequest):
    """The client's body broke off or its chunked framing is malformed: the connection
    cannot carry another request."""


class NotFound(ClientFacingError):
    status = 404
    code = "not_found"


class NotAJob(ClientFacingError):
    status = 400
    code = "not_a_job"


class JobNotFound(ClientFacingError):
    status = 404
    code = "job_not_found"


class JobNotFinished(ClientFacingError):
    status = 409
    code = "job_not_finished"


class JobExpired(ClientFacingError):
    status = 410
    code = "job_expired"


class InterruptedByRestart(ClientFacingError):
    status = 502
    code = "interrupted_by_restart"


class JobsFull(ClientFacingError):
    status = 503
    code = "jobs_full"


class Unauthorized(ClientFacingError):
    status = 401
    code = "unauthorized"


class UiSessionEnded(ClientFacingError):
    status = 410
    code = "ui_session_ended"


class UiNoSession(ClientFacingError):
    status = 409
    code = "ui_no_session"


class InternalError(ClientFacingError):
    status = 500
    code = "internal_error"


#: core rejection reason (its value) -> the error its client gets
_REJECTS: dict[str, Callable[[float | None], ClientFacingError]] = {
    "queue_full": lambda _: QueueFull("the proxy's queue is full; retry later", retry_after_s=5),
    "queue_timeout": lambda _: QueueTimeout(
        "waited too long in the proxy's queue for a free pod (or past its own deadline)"
    ),
    "no_backends": lambda _: NoBackends(
        "no ready sd-webui pod and none is starting", retry_after_s=10
    ),
    "job_cancelled": lambda _: JobCancelled("the job was interrupted while it waited in the queue"),
    "shutting_down": lambda _: ShuttingDown("the proxy is shutting down", retry_after_s=1),
    "client_quota": lambda _: ClientQuota(
        "the tenant has its max_queued jobs waiting; retry later", retry_after_s=5
    ),
    "deadline_unmeetable": lambda eta: DeadlineUnmeetable(
        f"the job would finish in about {eta or 0.0:.1f} s, after its X-Sdproxy-Deadline-S",
        eta_s=eta or 0.0,
    ),
}

#: reasons no client hears about (it is gone)
SILENT_REJECTS = frozenset({"client_gone"})


def for_reject(reason: str, eta_s: float | None = None) -> ClientFacingError:
    """The client-facing error for a core rejection reason (``RejectReason`` value);
    ``eta_s``: the job's ETA (deadline_unmeetable says it)."""
    return _REJECTS[reason](eta_s)


def answered_rejects() -> frozenset[str]:
    """Every rejection reason that has a client error (tests check the core's enum)."""
    return frozenset(_REJECTS)

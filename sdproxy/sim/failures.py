"""Sim: sd-webui's error answers — its envelope, and FastAPI's own plain ones.

modules/api/api.py ``api_middleware.handle_exception`` turns an exception into
``{"error": type(e).__name__, "detail": e.detail or "", "body": e.body or "",
"errors": str(e)}`` with ``e.status_code`` or 500: for any exception a route raises
(``WebuiError``; a 500, e.g. out of memory) and for the ``fastapi.HTTPException`` a route
raises (``HTTPError``, e.g. 404 "Init image not found"). What FastAPI answers itself keeps
its plain shape: a body that fails validation is ``422 {"detail": [...]}``
(``ValidationFailed``), an unknown route ``404 {"detail": "Not Found"}``
(docs/sd-webui.md, "Observed on a real v1.10.1").
"""

from __future__ import annotations

from typing import Final

#: torch's message for a CUDA allocation failure, as seen in sd-webui bug reports
OOM_TEXT: Final = (
    "CUDA out of memory. Tried to allocate {gib:.2f} GiB (GPU 0; 23.69 GiB total capacity; "
    "4.12 GiB already allocated; 17.50 GiB free; 4.31 GiB reserved in total by PyTorch) "
    "If reserved memory is >> allocated memory try setting max_split_size_mb to avoid "
    "fragmentation.  See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF"
)
#: modules/devices.py NansException, sd-webui's common "random" generation failure
NAN_TEXT: Final = (
    "A tensor with all NaNs was produced in Unet. This could be either because there's not "
    "enough precision to represent the picture, or because your video card does not support "
    'half type. Try setting the "Upcast cross attention layer to float32" option in '
    "Settings > Stable Diffusion or using the --no-half commandline argument to fix this. "
    "Use --disable-nan-check commandline argument to disable this check."
)


class WebuiError(Exception):
    """An error sd-webui would answer; ``name`` is the Python exception it would raise."""

    def __init__(
        self,
        *,
        status: int,
        name: str,
        errors: str,
        detail: object = "",
        body: object = "",
    ) -> None:
        super().__init__(errors)
        self.status = status
        self.name = name
        self.errors = errors
        self.detail = detail
        self.body = body

    def as_json(self) -> dict[str, object]:
        return {"error": self.name, "detail": self.detail, "body": self.body, "errors": self.errors}


class HTTPError(WebuiError):
    """A fastapi.HTTPException a route raised: sd-webui's envelope, from the handler
    Starlette's ExceptionMiddleware calls (inside GZipMiddleware, so it may be compressed)."""


class ValidationFailed(Exception):
    """FastAPI's RequestValidationError: answered by FastAPI's own handler, 422."""

    status = 422

    def __init__(self, detail: list[dict[str, object]]) -> None:
        super().__init__(f"{len(detail)} validation error(s)")
        self.detail = detail

    def as_json(self) -> dict[str, object]:
        return {"detail": self.detail}


def http_exception(status: int, detail: str) -> HTTPError:
    """fastapi.HTTPException as sd-webui renders it (str(e) is "status: detail")."""
    return HTTPError(
        status=status, name="HTTPException", detail=detail, errors=f"{status}: {detail}"
    )


def out_of_memory(batch_pixels: int) -> WebuiError:
    # fp16 latents and attention scale with pixels; the number only needs to look plausible
    gib = batch_pixels * 4 * 1024 / 2**30
    return WebuiError(status=500, name="OutOfMemoryError", errors=OOM_TEXT.format(gib=gib))


def nans() -> WebuiError:
    return WebuiError(status=500, name="NansException", errors=NAN_TEXT)

"""Core: request bounds — what one heavy request may ask of a GPU (pure).

sd-webui's API validates types, not sizes: ``steps`` 1e9, ``width`` 1e6 or ``batch_size``
1e9 reach the GPU as they are and hold a slot until the pod gives up (or the proxy's
``--backend-timeout-s``). ``check_request`` compares a body's fields with the bounds
(``--max-steps``, ``--max-pixels``, ``--max-batch``; 0 = no bound, the default) and names
the first field over one, so the proxy answers ``422 request_too_large`` before the job
takes a queue place.

- **steps**: ``steps``, and the hires pass's own ``hr_second_pass_steps`` when hires fix
  is on (sd-webui runs that many, modules/processing.py StableDiffusionProcessingTxt2Img).
- **pixels**: width × height of the OUTPUT: the request's size, or with hires fix the
  upscaled size (``hr_scale``, or ``hr_resize_x``/``hr_resize_y``, as
  ``sdproxy.core.cost.hires_size`` computes it); for extras the upscaled image.
- **batch**: images per request, ``batch_size × n_iter``: the GPU time a request holds
  grows with both (n_iter runs the batch again), VRAM with ``batch_size``.

Only fields the body gives are checked (an absent one takes sd-webui's default, which is
within any sane bound); a size with one side given counts the default for the other.
Values are read the way pydantic v1 coerces them (``sdproxy.core.cost``), but unclamped:
the cost model clamps absurd values to keep its plans finite, a bound must see them.
A value that is not a number is left to the pod (its 422 names it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from sdproxy.core.cost import DEFAULT_HR_SCALE, DEFAULT_SIZE, png_size, read_bool

#: the extras routes, whose output is the upscaled input image
EXTRAS_ROUTES = frozenset({"extra-single-image", "extra-batch-images"})
#: routes whose body is no generation (nothing to bound)
UNBOUNDED_ROUTES = frozenset({"interrogate", "options"})


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """The request bounds; 0 turns one off. Each field is the ``sdproxy serve`` option of
    the same name (``--max-steps``), as with ``AdmissionConfig``."""

    max_steps: int = field(
        default=0,
        metadata={
            "help": "most sampling steps per pass (then 422 request_too_large; 0 = off)",
            "min": 0,
        },
    )
    max_pixels: int = field(
        default=0,
        metadata={
            "help": "most output pixels, width x height after hires fix (then 422; 0 = off)",
            "min": 0,
        },
    )
    max_batch: int = field(
        default=0,
        metadata={
            "help": "most images per request, batch_size x n_iter (then 422; 0 = off)",
            "min": 0,
        },
    )


@dataclass(frozen=True, kw_only=True)
class Excess:
    """The first field of a request over its bound."""

    #: the body field(s): "steps", "width × height", "hr_scale", "batch_size × n_iter", …
    field: str
    value: int
    limit: int
    #: the option that sets the bound, as a flag
    option: str

    @property
    def detail(self) -> str:
        return (
            f"{self.field} is {self.value}; this proxy allows at most {self.limit} ({self.option})"
        )


def number(params: Mapping[str, object], key: str) -> float | None:
    """A numeric field as pydantic v1 would read it (bool, non-finite, text: None)."""
    value = params.get(key)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return float(value) if abs(value) < 2**1000 else math.inf
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            return float(int(value.strip()))
        except (ValueError, OverflowError):
            return None
    return None


def _count(value: float) -> int:
    """An exact count for the message (a float of any size, capped where ints stop
    being readable)."""
    return int(min(value, 1e30))


def _over(name: str, value: float, limit: int, option: str) -> Excess | None:
    if limit and value > limit:
        return Excess(field=name, value=_count(value), limit=limit, option=option)
    return None


def _steps(params: Mapping[str, object], limits: RequestLimits, *, hires: bool) -> Excess | None:
    keys = ("steps", "hr_second_pass_steps") if hires else ("steps",)
    for key in keys:
        value = number(params, key)
        if value is not None and (found := _over(key, value, limits.max_steps, "--max-steps")):
            return found
    return None


def _hires_pixels(params: Mapping[str, object], width: float, height: float) -> tuple[str, float]:
    """(the fields that set it, pixels) of the hires pass's output (cost.hires_size)."""
    resize_x = number(params, "hr_resize_x") or 0.0
    resize_y = number(params, "hr_resize_y") or 0.0
    if resize_x <= 0 and resize_y <= 0:
        scale = number(params, "hr_scale")
        scale = DEFAULT_HR_SCALE if scale is None else scale
        return "hr_scale", (width * scale) * (height * scale)
    if resize_x <= 0:  # one side given: sd-webui keeps the aspect ratio
        resize_x = resize_y * width / max(height, 1.0)
    if resize_y <= 0:
        resize_y = resize_x * height / max(width, 1.0)
    return "hr_resize_x × hr_resize_y", resize_x * resize_y


def _pixels(params: Mapping[str, object], limit: int, *, hires: bool) -> Excess | None:
    width, height = number(params, "width"), number(params, "height")
    w = DEFAULT_SIZE if width is None else width
    h = DEFAULT_SIZE if height is None else height
    if width is not None or height is not None:
        found = _over("width × height", w * h, limit, "--max-pixels")
        if found:
            return found
    if hires:
        name, pixels = _hires_pixels(params, w, h)
        return _over(name, pixels, limit, "--max-pixels")
    return None


def _extras_pixels(params: Mapping[str, object], limit: int) -> Excess | None:
    """Extras: the upscaled image (cost.extras_output_size, unclamped)."""
    if number(params, "resize_mode") == 1:
        width = number(params, "upscaling_resize_w") or DEFAULT_SIZE
        height = number(params, "upscaling_resize_h") or DEFAULT_SIZE
        return _over(
            "upscaling_resize_w × upscaling_resize_h", width * height, limit, "--max-pixels"
        )
    scale = number(params, "upscaling_resize")
    if scale is None:
        return None
    width, height = png_size(params.get("image")) or (DEFAULT_SIZE, DEFAULT_SIZE)
    return _over("upscaling_resize", width * scale * height * scale, limit, "--max-pixels")


def _batch(params: Mapping[str, object], limit: int) -> Excess | None:
    batch, n_iter = number(params, "batch_size"), number(params, "n_iter")
    if batch is None and n_iter is None:
        return None
    if batch is not None and (found := _over("batch_size", batch, limit, "--max-batch")):
        return found
    images = (1.0 if batch is None else batch) * (1.0 if n_iter is None else n_iter)
    return _over("batch_size × n_iter", images, limit, "--max-batch")


def check_request(
    params: Mapping[str, object], *, route: str, limits: RequestLimits
) -> Excess | None:
    """The first field of a heavy request's body over its bound, or None.

    ``route`` is the last path segment (``txt2img``, ``img2img``, …); any other heavy
    route (an extension's) is checked like txt2img, as it is costed (``sdproxy.core.cost``).
    """
    if route in UNBOUNDED_ROUTES:
        return None
    if route in EXTRAS_ROUTES:
        return _extras_pixels(params, limits.max_pixels)
    hires = route != "img2img" and read_bool(params, "enable_hr", default=False)
    return (
        _steps(params, limits, hires=hires)
        or _pixels(params, limits.max_pixels, hires=hires)
        or _batch(params, limits.max_batch)
    )

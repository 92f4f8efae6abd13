"""Core: what a Stable Diffusion request costs, in 512×512 sampling-step units (pure).

One unit is one sampling step of one 512×512 image. A request's cost is the sum over its
sampling passes of ``steps × (width × height / 512²) × batch_size``, times ``n_iter``
(sequential iterations), with a factor for samplers that evaluate the model twice per step.
Multiply units by a pod's seconds per unit (the simulator's ``--step-ms``, or a measured
rate) to get GPU-seconds; the proxy uses the same numbers for queue ETAs and fairness.
``switches`` counts the checkpoint loads a job adds (each costs seconds of GPU time for
nothing, sdproxy.core.eta learns how many).

The readers are tolerant: a field of the wrong type or out of range falls back to
sd-webui's default, because the proxy costs raw, unvalidated bodies (the pod validates).
Defaults and formulas follow sd-webui v1.10 ``modules/processing.py`` (class
``StableDiffusionProcessing`` and its txt2img/img2img subclasses) and
``modules/sd_samplers_common.py`` (``setup_img2img_steps``).
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Mapping
from dataclasses import dataclass

#: pixels of the unit image (one 512×512 step is one unit)
BASE_PIXELS = 512 * 512
#: sd-webui defaults (modules/processing.py StableDiffusionProcessing.__init__)
DEFAULT_STEPS = 50
DEFAULT_SIZE = 512
#: txt2img hires fix: hr_scale default (StableDiffusionProcessingTxt2Img)
DEFAULT_HR_SCALE = 2.0
#: denoising strength when the request gives none: img2img's API default is 0.75; the
#: hires pass of txt2img uses the UI default 0.7
DEFAULT_IMG2IMG_DENOISING = 0.75
DEFAULT_HR_DENOISING = 0.7
#: samplers that call the model twice per step (sd_samplers_kdiffusion.py "second_order")
SECOND_ORDER_SAMPLERS = frozenset({"dpm2", "dpm2 a", "dpm++ 2s a", "dpm++ sde", "heun"})
#: extras (upscaling): units per output 512×512 tile; interrogation: fixed units.
#: Rough: ESRGAN 512→1024 on an A10 takes about a second (≈ 8 units at 100 ms/unit)
EXTRAS_UNITS_PER_TILE = 2.0
INTERROGATE_UNITS = {"clip": 10.0, "deepdanbooru": 3.0}
#: keep absurd inputs from producing absurd plans (sd-webui itself caps sizes at 2048 in
#: the UI; the API does not, the GPU does)
MAX_SIDE = 16384
MAX_COUNT = 10_000


@dataclass(frozen=True, kw_only=True)
class SamplingPass:
    """One sampler run over a batch: ``steps`` steps at ``width × height``."""

    steps: int
    width: int
    height: int
    #: units one step of this pass costs for the whole batch
    units_per_step: float

    @property
    def units(self) -> float:
        return self.steps * self.units_per_step


@dataclass(frozen=True, kw_only=True)
class GenerationPlan:
    """How a generation unfolds: ``iterations`` times the same passes over one batch."""

    iterations: int
    batch_size: int
    passes: tuple[SamplingPass, ...]

    @property
    def units(self) -> float:
        """Total cost in 512×512-step units."""
        return self.iterations * sum(p.units for p in self.passes)

    @property
    def job_count(self) -> int:
        """sd-webui's ``state.job_count``: one job per pass per iteration (hires doubles)."""
        return self.iterations * len(self.passes)

    @property
    def out_width(self) -> int:
        return self.passes[-1].width

    @property
    def out_height(self) -> int:
        return self.passes[-1].height

    @property
    def peak_batch_pixels(self) -> int:
        """Largest ``batch_size × width × height`` of any pass (what drives VRAM)."""
        return self.batch_size * max(p.width * p.height for p in self.passes)

    @property
    def images(self) -> int:
        return self.iterations * self.batch_size


def read_int(params: Mapping[str, object], key: str, *, default: int) -> int:
    """An integer field the way pydantic v1 coerces it; ``default`` if absent or invalid."""
    value = params.get(key)
    if isinstance(value, bool) or value is None:
        return default
    if isinstance(value, int | float):
        return int(value) if value == value and abs(value) < 2**62 else default
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return default
    return default


def read_float(params: Mapping[str, object], key: str, *, default: float) -> float:
    """A float field; ``default`` if absent, invalid or not finite."""
    value = params.get(key)
    if isinstance(value, bool) or value is None:
        return default
    if isinstance(value, int | float | str):
        try:
            result = float(value)
        except ValueError:
            return default
        return result if abs(result) < float("inf") else default
    return default


def read_bool(params: Mapping[str, object], key: str, *, default: bool) -> bool:
    value = params.get(key)
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in {"1", "true", "yes", "on", "t", "y"}:
            return True
        if low in {"0", "false", "no", "off", "f", "n"}:
            return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return default


def _side(pixels: int) -> int:
    """An image side clamped to 8..MAX_SIDE."""
    return max(8, min(MAX_SIDE, pixels))


def _count(value: int) -> int:
    """A step or image count clamped to 1..MAX_COUNT."""
    return max(1, min(MAX_COUNT, value))


def sampler_factor(params: Mapping[str, object]) -> float:
    """2.0 for samplers that evaluate the model twice per step, else 1.0."""
    name = params.get("sampler_name") or params.get("sampler_index") or ""
    if not isinstance(name, str):
        return 1.0
    # pre-1.9 names carry the schedule as a suffix ("DPM++ SDE Karras")
    base = name.lower().removesuffix(" karras").removesuffix(" exponential").strip()
    return 2.0 if base in SECOND_ORDER_SAMPLERS else 1.0


def _pass(*, steps: int, width: int, height: int, batch: int, factor: float) -> SamplingPass:
    units = width * height / BASE_PIXELS * batch * factor
    return SamplingPass(steps=steps, width=width, height=height, units_per_step=units)


def _denoised_steps(steps: int, strength: float) -> int:
    # modules/sd_samplers_common.py setup_img2img_steps: t_enc = int(min(strength, .999) * steps)
    return max(1, int(min(max(strength, 0.0), 0.999) * steps))


def _base(params: Mapping[str, object]) -> tuple[int, int, int, int, int]:
    """(steps, width, height, batch_size, n_iter), clamped to sane ranges."""
    steps = _count(read_int(params, "steps", default=DEFAULT_STEPS))
    width = _side(read_int(params, "width", default=DEFAULT_SIZE))
    height = _side(read_int(params, "height", default=DEFAULT_SIZE))
    batch = _count(read_int(params, "batch_size", default=1))
    n_iter = _count(read_int(params, "n_iter", default=1))
    return steps, width, height, batch, n_iter


def hires_size(params: Mapping[str, object], *, width: int, height: int) -> tuple[int, int]:
    """Target size of txt2img's hires pass (StableDiffusionProcessingTxt2Img.init)."""
    resize_x = read_int(params, "hr_resize_x", default=0)
    resize_y = read_int(params, "hr_resize_y", default=0)
    if resize_x <= 0 and resize_y <= 0:
        scale = min(max(read_float(params, "hr_scale", default=DEFAULT_HR_SCALE), 0.01), 16.0)
        return _side(int(width * scale)), _side(int(height * scale))
    # one side given: keep the aspect ratio (sd-webui does the same)
    if resize_x <= 0:
        resize_x = resize_y * width // height
    if resize_y <= 0:
        resize_y = resize_x * height // width
    return _side(resize_x), _side(resize_y)


def plan_txt2img(params: Mapping[str, object]) -> GenerationPlan:
    """txt2img: one pass, plus the hires pass when ``enable_hr`` is set."""
    steps, width, height, batch, n_iter = _base(params)
    factor = sampler_factor(params)
    passes = [_pass(steps=steps, width=width, height=height, batch=batch, factor=factor)]
    if read_bool(params, "enable_hr", default=False):
        hr_steps = read_int(params, "hr_second_pass_steps", default=0)
        hr_steps = _count(hr_steps) if hr_steps > 0 else steps
        strength = read_float(params, "denoising_strength", default=DEFAULT_HR_DENOISING)
        hr_w, hr_h = hires_size(params, width=width, height=height)
        passes.append(
            _pass(
                steps=_denoised_steps(hr_steps, strength),
                width=hr_w,
                height=hr_h,
                batch=batch,
                factor=factor,
            )
        )
    return GenerationPlan(iterations=n_iter, batch_size=batch, passes=tuple(passes))


def plan_img2img(params: Mapping[str, object]) -> GenerationPlan:
    """img2img: one pass of ``steps × denoising_strength`` steps at the requested size."""
    steps, width, height, batch, n_iter = _base(params)
    strength = read_float(params, "denoising_strength", default=DEFAULT_IMG2IMG_DENOISING)
    one = _pass(
        steps=_denoised_steps(steps, strength),
        width=width,
        height=height,
        batch=batch,
        factor=sampler_factor(params),
    )
    return GenerationPlan(iterations=n_iter, batch_size=batch, passes=(one,))


def png_size(image_b64: object) -> tuple[int, int] | None:
    """Width and height of a base64 PNG (data URL prefix allowed), from its IHDR header.

    Decodes only the first 33 bytes, so it is cheap even for a 10 MiB upload.
    """
    if not isinstance(image_b64, str):
        return None
    text = image_b64.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        head = base64.b64decode(text[:44] + "=" * (-len(text[:44]) % 4), validate=False)
    except (binascii.Error, ValueError):
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def extras_output_size(params: Mapping[str, object]) -> tuple[int, int]:
    """Output size of extra-single-image (modules/postprocessing.py, upscale scripts).

    ``resize_mode`` 0 scales by ``upscaling_resize``; 1 resizes to
    ``upscaling_resize_w × upscaling_resize_h``. An unreadable input counts as 512×512.
    """
    if read_int(params, "resize_mode", default=0) == 1:
        width = read_int(params, "upscaling_resize_w", default=DEFAULT_SIZE)
        height = read_int(params, "upscaling_resize_h", default=DEFAULT_SIZE)
        return _side(width), _side(height)
    width, height = png_size(params.get("image")) or (DEFAULT_SIZE, DEFAULT_SIZE)
    scale = min(max(read_float(params, "upscaling_resize", default=2.0), 0.01), 16.0)
    return _side(int(width * scale)), _side(int(height * scale))


def extras_steps(params: Mapping[str, object]) -> float:
    width, height = extras_output_size(params)
    return EXTRAS_UNITS_PER_TILE * width * height / BASE_PIXELS


def interrogate_steps(params: Mapping[str, object]) -> float:
    model = params.get("model", "clip")
    return INTERROGATE_UNITS.get(model if isinstance(model, str) else "", INTERROGATE_UNITS["clip"])


def estimate_steps(params: Mapping[str, object], *, route: str = "txt2img") -> float:
    """Cost of one request in 512×512-step units.

    ``route`` is the last path segment under /sdapi/v1/: ``txt2img``, ``img2img``,
    ``extra-single-image`` or ``interrogate``; anything else is costed like txt2img
    (an unknown POST is heavy, docs/sd-webui.md).
    """
    if route == "img2img":
        return plan_img2img(params).units
    if route == "extra-single-image":
        return extras_steps(params)
    if route == "interrogate":
        return interrogate_steps(params)
    return plan_txt2img(params).units


def switches(wanted: str | None, *, restore: bool, loaded: str | None) -> int:
    """Checkpoint loads a job naming ``wanted`` causes on a pod whose default (loaded)
    checkpoint is ``loaded`` (None: not known yet, counted as another one).

    sd-webui ``process_images`` (modules/processing.py) applies ``override_settings``
    (loading the named checkpoint) and, with ``override_settings_restore_afterwards``
    (true by default), restores the options afterwards — reloading the default checkpoint
    before it answers: a job naming another checkpoint costs TWO loads, there and back,
    and leaves the pod as it was. Without restore it costs one and the checkpoint stays
    (it becomes the pod's default). A job naming none runs on the default: no load.
    """
    if wanted is None or wanted == loaded:
        return 0
    return 2 if restore else 1

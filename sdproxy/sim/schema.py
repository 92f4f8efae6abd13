"""Sim: request validation the way sd-webui's pydantic v1 models do it.

sd-webui builds its request models from the processing classes' signatures
(modules/api/models.py ``PydanticModelGenerator``): every field is Optional with the
class default, unknown fields are ignored, and values are coerced (``"20"`` → 20,
``20.7`` → 20, ``"yes"`` → True). A value that cannot be coerced answers 422 with a
FastAPI-style ``detail`` list inside sd-webui's error shape. The validated model, defaults
filled in, is what the API echoes back as ``parameters``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Final

from sdproxy.sim.failures import ValidationFailed, http_exception

#: field name -> (type, default); the type is one of int, float, str, bool, dict, list
Spec = Mapping[str, tuple[str, object]]
REQUIRED: Final = object()

_COMMON: Final[dict[str, tuple[str, object]]] = {
    "prompt": ("str", ""),
    "negative_prompt": ("str", ""),
    "styles": ("list", None),
    "seed": ("int", -1),
    "subseed": ("int", -1),
    "subseed_strength": ("float", 0),
    "seed_resize_from_h": ("int", -1),
    "seed_resize_from_w": ("int", -1),
    "sampler_name": ("str", None),
    "scheduler": ("str", None),
    "batch_size": ("int", 1),
    "n_iter": ("int", 1),
    "steps": ("int", 50),
    "cfg_scale": ("float", 7.0),
    "width": ("int", 512),
    "height": ("int", 512),
    "restore_faces": ("bool", None),
    "tiling": ("bool", None),
    "do_not_save_samples": ("bool", False),
    "do_not_save_grid": ("bool", False),
    "eta": ("float", None),
    "denoising_strength": ("float", None),
    "s_min_uncond": ("float", None),
    "s_churn": ("float", None),
    "s_tmax": ("float", None),
    "s_tmin": ("float", None),
    "s_noise": ("float", None),
    "override_settings": ("dict", None),
    "override_settings_restore_afterwards": ("bool", True),
    "refiner_checkpoint": ("str", None),
    "refiner_switch_at": ("float", None),
    "disable_extra_networks": ("bool", False),
    "firstpass_image": ("str", None),
    "comments": ("dict", None),
    "sampler_index": ("str", "Euler"),
    "script_name": ("str", None),
    "script_args": ("list", []),
    "send_images": ("bool", True),
    "save_images": ("bool", False),
    "alwayson_scripts": ("dict", {}),
    "infotext": ("str", None),
    "force_task_id": ("str", None),
}

TXT2IMG: Final[Spec] = _COMMON | {
    "enable_hr": ("bool", False),
    "hr_scale": ("float", 2.0),
    "hr_upscaler": ("str", None),
    "hr_second_pass_steps": ("int", 0),
    "hr_resize_x": ("int", 0),
    "hr_resize_y": ("int", 0),
    "hr_checkpoint_name": ("str", None),
    "hr_sampler_name": ("str", None),
    "hr_scheduler": ("str", None),
    "hr_prompt": ("str", ""),
    "hr_negative_prompt": ("str", ""),
    "firstphase_width": ("int", 0),
    "firstphase_height": ("int", 0),
}

IMG2IMG: Final[Spec] = _COMMON | {
    "init_images": ("list[str]", None),
    "resize_mode": ("int", 0),
    "image_cfg_scale": ("float", None),
    "mask": ("str", None),
    "mask_blur_x": ("int", 4),
    "mask_blur_y": ("int", 4),
    "mask_blur": ("int", None),
    "mask_round": ("bool", True),
    "inpainting_fill": ("int", 0),
    "inpaint_full_res": ("bool", True),
    "inpaint_full_res_padding": ("int", 0),
    "inpainting_mask_invert": ("int", 0),
    "initial_noise_multiplier": ("float", None),
    "latent_mask": ("str", None),
    "include_init_images": ("bool", False),
    "denoising_strength": ("float", 0.75),
}

EXTRAS_SINGLE: Final[Spec] = {
    "resize_mode": ("int", 0),
    "show_extras_results": ("bool", True),
    "gfpgan_visibility": ("float", 0),
    "codeformer_visibility": ("float", 0),
    "codeformer_weight": ("float", 0),
    "upscaling_resize": ("float", 2),
    "upscaling_resize_w": ("int", 512),
    "upscaling_resize_h": ("int", 512),
    "upscaling_crop": ("bool", True),
    "upscaler_1": ("str", "None"),
    "upscaler_2": ("str", "None"),
    "extras_upscaler_2_visibility": ("float", 0),
    "upscale_first": ("bool", False),
    "image": ("str", ""),
}

INTERROGATE: Final[Spec] = {"image": ("str", ""), "model": ("str", "clip")}
PNG_INFO: Final[Spec] = {"image": ("str", REQUIRED)}
#: (pydantic v1 message, error type) per field type
_MESSAGES: Final = {
    "int": ("value is not a valid integer", "type_error.integer"),
    "float": ("value is not a valid float", "type_error.float"),
    "str": ("str type expected", "type_error.str"),
    "bool": ("value could not be parsed to a boolean", "type_error.bool"),
    "dict": ("value is not a valid dict", "type_error.dict"),
    "list": ("value is not a valid list", "type_error.list"),
    "list[str]": ("value is not a valid list", "type_error.list"),
}
MISSING: Final = "value_error.missing"
_TRUE: Final = {"1", "on", "t", "true", "y", "yes"}
_FALSE: Final = {"0", "off", "f", "false", "n", "no"}


class Invalid(ValueError):
    """A value that pydantic v1 would not coerce."""


def _coerce_number(kind: str, value: object) -> object:
    if kind == "int":
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float) and math.isfinite(value):
            return int(value)  # pydantic v1 truncates floats
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise Invalid(kind) from None
        raise Invalid(kind)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise Invalid(kind) from None
    raise Invalid(kind)


def coerce(kind: str, value: object) -> object:
    """``value`` as pydantic v1 would store it in a field of ``kind``; Invalid if it can't."""
    if value is None:
        return None  # every sd-webui field is Optional
    if kind in ("int", "float"):
        return _coerce_number(kind, value)
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, int | float):
            return str(value)
        raise Invalid(kind)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise Invalid(kind)
    if kind == "dict" and isinstance(value, dict):
        return value
    if kind.startswith("list") and isinstance(value, list):
        return value
    raise Invalid(kind)


def error_item(loc: list[object], kind: str) -> dict[str, object]:
    msg, typ = _MESSAGES[kind]
    return {"loc": loc, "msg": msg, "type": typ}


def _field_errors(name: str, *, kind: str, value: object) -> list[dict[str, object]]:
    if kind != "list[str]" or not isinstance(value, list):
        return []
    return [
        error_item(["body", name, index], "str")
        for index, item in enumerate(value)
        if not isinstance(item, str)
    ]


def require_object(body: object) -> dict[str, object]:
    """The body as a JSON object: FastAPI's 422 for a missing (empty) body or another type."""
    if body is None:
        raise unprocessable([{"loc": ["body"], "msg": "field required", "type": MISSING}])
    if not isinstance(body, dict):
        raise unprocessable([error_item(["body"], "dict")])
    return body


def validate(raw_body: object, spec: Spec) -> dict[str, object]:
    """The validated model (all fields of ``spec``), or ``ValidationFailed``."""
    body = require_object(raw_body)
    model: dict[str, object] = {}
    errors: list[dict[str, object]] = []
    for name, (kind, default) in spec.items():
        if name not in body:
            if default is REQUIRED:
                errors.append({"loc": ["body", name], "msg": "field required", "type": MISSING})
            model[name] = default
            continue
        try:
            model[name] = coerce(kind, body[name])
        except Invalid:
            errors.append(error_item(["body", name], kind))
            continue
        errors.extend(_field_errors(name, kind=kind, value=body[name]))
    if errors:
        raise unprocessable(errors)
    return model


def parse_json(raw: bytes) -> object:
    """The request body as JSON, or a 422 like FastAPI's ``value_error.jsondecode``
    (pydantic v1 adds the JSONDecodeError's attributes as ``ctx``); a body that is not
    text, or nested too deep for ``json`` (RecursionError), is FastAPI's HTTPException 400
    (fastapi/routing.py get_request_handler turns any other error of ``request.json()``
    into it); an empty body is no body (None)."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        ctx = {"msg": exc.msg, "doc": exc.doc, "pos": exc.pos, "lineno": exc.lineno,
               "colno": exc.colno}  # fmt: skip
        item = {"loc": ["body", exc.pos], "msg": str(exc), "type": "value_error.jsondecode"}
        raise unprocessable([{**item, "ctx": ctx}]) from exc
    except (UnicodeDecodeError, RecursionError) as exc:
        raise http_exception(400, "There was an error parsing the body") from exc


def unprocessable(detail: list[dict[str, object]]) -> ValidationFailed:
    """RequestValidationError as FastAPI renders it: 422 ``{"detail": detail}``."""
    return ValidationFailed(detail)

"""Unit: the request bounds (sdproxy.core.limits) — which field of a body is over which."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest

from sdproxy.core.limits import RequestLimits, check_request

LIMITS = RequestLimits(max_steps=150, max_pixels=4_194_304, max_batch=8)
#: the head of a 4x1 PNG (its IHDR is all that is read)
PNG_4x1 = base64.b64encode(
    b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", 4, 1) + bytes(5)
).decode()


@pytest.mark.parametrize(
    ("route", "body", "expected"),
    [
        pytest.param("txt2img", {}, None, id="defaults-are-within"),
        pytest.param("txt2img", {"steps": 150, "batch_size": 8}, None, id="at-the-bounds"),
        pytest.param("txt2img", {"steps": 151}, ("steps", 151, 150), id="steps"),
        pytest.param("txt2img", {"steps": 1e9}, ("steps", 10**9, 150), id="steps-float"),
        pytest.param("txt2img", {"steps": "200"}, ("steps", 200, 150), id="steps-text"),
        pytest.param("txt2img", {"steps": 10**40}, ("steps", int(1e30), 150), id="steps-huge"),
        pytest.param("txt2img", {"steps": "lots"}, None, id="not-a-number-is-the-pods"),
        pytest.param("txt2img", {"steps": True}, None, id="bool-is-not-a-count"),
        pytest.param(
            "txt2img",
            {"width": 10**6, "height": 10**6},
            ("width × height", 10**12, 4_194_304),
            id="size",
        ),
        pytest.param(
            "txt2img",
            {"width": 2048, "height": 2049},
            ("width × height", 2048 * 2049, 4_194_304),
            id="just-over",
        ),
        pytest.param(
            "txt2img",
            {"width": 10**5},
            ("width × height", 10**5 * 512, 4_194_304),
            id="one-side-with-the-default",
        ),
        pytest.param(
            "txt2img",
            {"width": 1024, "height": 1024, "enable_hr": True},
            None,
            id="hires-default-scale-2-within",
        ),
        pytest.param(
            "txt2img",
            {"width": 1024, "height": 1024, "enable_hr": True, "hr_scale": 2.5},
            ("hr_scale", 2560 * 2560, 4_194_304),
            id="hires-scale",
        ),
        pytest.param(
            "txt2img",
            {"width": 1024, "height": 512, "enable_hr": True, "hr_resize_x": 4096},
            ("hr_resize_x × hr_resize_y", 4096 * 2048, 4_194_304),
            id="hires-one-side-keeps-aspect",
        ),
        pytest.param(
            "txt2img",
            {"width": 1024, "height": 1024, "enable_hr": False, "hr_scale": 16},
            None,
            id="hires-off-ignores-its-fields",
        ),
        pytest.param(
            "txt2img",
            {"enable_hr": True, "hr_second_pass_steps": 400},
            ("hr_second_pass_steps", 400, 150),
            id="hires-steps",
        ),
        pytest.param(
            "img2img", {"enable_hr": True, "hr_scale": 16}, None, id="img2img-has-no-hires"
        ),
        pytest.param("img2img", {"steps": 999}, ("steps", 999, 150), id="img2img-steps"),
        pytest.param("txt2img", {"batch_size": 10**9}, ("batch_size", 10**9, 8), id="batch"),
        pytest.param(
            "txt2img", {"batch_size": 2, "n_iter": 5}, ("batch_size × n_iter", 10, 8), id="images"
        ),
        pytest.param("txt2img", {"n_iter": 9}, ("batch_size × n_iter", 9, 8), id="n-iter"),
        pytest.param(
            "extra-single-image",
            {"resize_mode": 1, "upscaling_resize_w": 4096, "upscaling_resize_h": 4096},
            ("upscaling_resize_w × upscaling_resize_h", 4096 * 4096, 4_194_304),
            id="extras-to-size",
        ),
        pytest.param(
            "extra-single-image",
            {"image": PNG_4x1, "upscaling_resize": 1024},
            None,
            id="extras-scale-of-a-small-image",
        ),
        pytest.param(
            "extra-single-image",
            {"upscaling_resize": 8},
            ("upscaling_resize", 4096 * 4096, 4_194_304),
            id="extras-scale-of-an-unread-image",
        ),
        pytest.param("extra-single-image", {"steps": 10**9}, None, id="extras-have-no-steps"),
        pytest.param("interrogate", {"steps": 10**9}, None, id="interrogate"),
        pytest.param("my-extension", {"steps": 10**9}, ("steps", 10**9, 150), id="extension"),
    ],
)
def test_the_first_field_over_its_bound_is_named(
    route: str, body: dict[str, Any], expected: tuple[str, int, int] | None
) -> None:
    excess = check_request(body, route=route, limits=LIMITS)
    found = None if excess is None else (excess.field, excess.value, excess.limit)
    assert found == expected


def test_bounds_are_off_by_default() -> None:
    absurd = {"steps": 10**9, "width": 10**6, "height": 10**6, "batch_size": 10**9}
    assert check_request(absurd, route="txt2img", limits=RequestLimits()) is None


def test_the_detail_names_the_field_the_value_and_the_flag() -> None:
    excess = check_request({"steps": 1000}, route="txt2img", limits=LIMITS)
    assert excess is not None
    assert excess.detail == "steps is 1000; this proxy allows at most 150 (--max-steps)"

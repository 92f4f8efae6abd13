"""Unit: the pure cost model (sdproxy.core.cost)."""

from __future__ import annotations

import base64
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdproxy.core import cost


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        pytest.param({}, 50.0, id="sd-webui-defaults-50-steps-512"),
        pytest.param({"steps": 20}, 20.0, id="steps"),
        pytest.param({"steps": 20, "width": 1024, "height": 1024}, 80.0, id="pixels-scale"),
        pytest.param({"steps": 20, "batch_size": 4}, 80.0, id="batch-parallel"),
        pytest.param({"steps": 20, "n_iter": 3}, 60.0, id="n-iter-sequential"),
        pytest.param({"steps": 20, "width": 256, "height": 256}, 5.0, id="small"),
        pytest.param({"steps": 10, "sampler_name": "DPM++ SDE"}, 20.0, id="second-order"),
        pytest.param({"steps": 10, "sampler_name": "DPM2 a Karras"}, 20.0, id="old-name"),
        pytest.param({"steps": 10, "sampler_name": "Euler a"}, 10.0, id="first-order"),
        pytest.param({"steps": "20"}, 20.0, id="numeric-string-coerced"),
        pytest.param({"steps": 20.9}, 20.0, id="float-truncated"),
        pytest.param({"steps": "x", "width": None}, 50.0, id="garbage-falls-back"),
        pytest.param({"steps": -5}, 1.0, id="clamped-to-one-step"),
        pytest.param({"steps": True}, 50.0, id="bool-is-not-a-number"),
    ],
)
def test_txt2img_units(params: dict[str, object], expected: float) -> None:
    assert cost.estimate_steps(params) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # hires: 20 steps at 512², then 20 × 0.7 = 14 steps at 1024² (4 units each)
        pytest.param({"steps": 20, "enable_hr": True}, 20 + 14 * 4, id="default-hr-scale-2"),
        pytest.param(
            {"steps": 20, "enable_hr": True, "hr_second_pass_steps": 10, "denoising_strength": 0.5},
            20 + 5 * 4,
            id="second-pass-steps-and-strength",
        ),
        pytest.param(
            {"steps": 20, "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 1.0},
            20 + 19 * 2.25,
            id="strength-capped-at-0.999",
        ),
        pytest.param(
            {"steps": 20, "enable_hr": True, "hr_resize_x": 1024, "denoising_strength": 0.5},
            20 + 10 * 4,
            id="resize-x-keeps-aspect",
        ),
        pytest.param({"steps": 20, "enable_hr": "false"}, 20, id="hr-off-as-string"),
    ],
)
def test_hires_multiplier(params: dict[str, object], expected: float) -> None:
    assert cost.estimate_steps(params) == pytest.approx(expected)


def test_hires_plan_has_two_jobs_per_iteration_and_upscaled_output() -> None:
    plan = cost.plan_txt2img({"steps": 20, "enable_hr": True, "n_iter": 2, "batch_size": 3})
    assert plan.job_count == 4
    assert (plan.out_width, plan.out_height) == (1024, 1024)
    assert plan.peak_batch_pixels == 3 * 1024 * 1024
    assert plan.images == 6


def test_img2img_runs_steps_times_denoising_strength() -> None:
    assert cost.estimate_steps({"steps": 40}, route="img2img") == pytest.approx(30)  # × 0.75
    assert cost.estimate_steps(
        {"steps": 40, "denoising_strength": 0.5}, route="img2img"
    ) == pytest.approx(20)


def _png_b64(width: int, height: int) -> str:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk + b"rest of file").decode()


def test_png_size_reads_only_the_header() -> None:
    assert cost.png_size(_png_b64(640, 480)) == (640, 480)
    assert cost.png_size("data:image/png;base64," + _png_b64(64, 32)) == (64, 32)
    assert cost.png_size("not base64 at all") is None
    assert cost.png_size(12) is None


def test_extras_scale_with_output_pixels() -> None:
    image = _png_b64(512, 512)
    assert cost.extras_output_size({"image": image}) == (1024, 1024)
    assert cost.estimate_steps({"image": image}, route="extra-single-image") == pytest.approx(8)
    resized = {"resize_mode": 1, "upscaling_resize_w": 256, "upscaling_resize_h": 256}
    assert cost.extras_output_size(resized) == (256, 256)


def test_interrogate_is_a_fixed_cost() -> None:
    assert cost.estimate_steps({}, route="interrogate") == cost.INTERROGATE_UNITS["clip"]
    deepbooru = {"model": "deepdanbooru"}
    assert (
        cost.estimate_steps(deepbooru, route="interrogate")
        == cost.INTERROGATE_UNITS["deepdanbooru"]
    )


def test_unknown_route_is_costed_like_txt2img() -> None:
    assert cost.estimate_steps({"steps": 7}, route="controlnet/detect") == pytest.approx(7)


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
)
_keys = st.sampled_from(
    ["steps", "width", "height", "batch_size", "n_iter", "enable_hr", "hr_scale",
     "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "denoising_strength",
     "sampler_name", "image", "model", "resize_mode", "upscaling_resize"]
)  # fmt: skip


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    params=st.dictionaries(_keys, _values, max_size=8),
    route=st.sampled_from(["txt2img", "img2img", "extra-single-image", "interrogate", "x"]),
)
def test_any_body_gets_a_positive_finite_cost(params: dict[str, object], route: str) -> None:
    units = cost.estimate_steps(params, route=route)
    assert 0 < units < float("inf")

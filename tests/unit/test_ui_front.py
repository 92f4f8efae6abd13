"""Runtime helpers of the browser UI (sdproxy.runtime.ui): the cookie, page loads, classes."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from sdproxy.core.pods import PodId
from sdproxy.core.routing import RouteClass
from sdproxy.runtime.ui import classify, cookie_value, navigation, parse_cookie, session_key


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(cookie_value("tok_en-1", PodId("10.0.0.5:7860")),
                     ("tok_en-1", "10.0.0.5:7860"), id="token-and-pod"),
        pytest.param(cookie_value("tok", None), ("tok", None), id="lobby-cookie"),
        pytest.param(None, (None, None), id="absent"),
        pytest.param("", (None, None), id="empty"),
        pytest.param("to$ken.x", (None, None), id="bad-token"),
        pytest.param("a" * 65 + ".", (None, None), id="token-too-long"),
        pytest.param("tok.!!!", ("tok", None), id="pod-not-base64"),
        pytest.param("tok." + "_w", ("tok", None), id="pod-not-utf8"),
    ],
)  # fmt: skip
def test_the_cookie_reads_back_or_as_nothing(
    value: str | None, expected: tuple[str | None, str | None]
) -> None:
    assert parse_cookie(value) == expected


@pytest.mark.parametrize(
    ("method", "headers", "page_load"),
    [
        pytest.param("GET", {"Sec-Fetch-Mode": "navigate"}, True, id="browser-navigation"),
        pytest.param("GET", {"Sec-Fetch-Mode": "cors", "Accept": "text/html"}, False,
                     id="script-fetch-asking-html"),
        pytest.param("GET", {"Accept": "text/html,*/*"}, True, id="old-browser-page"),
        pytest.param("GET", {"Accept": "application/json"}, False, id="xhr"),
        pytest.param("POST", {"Sec-Fetch-Mode": "navigate"}, False, id="form-post"),
    ],
)  # fmt: skip
def test_only_a_page_load_opens_a_session(
    method: str, headers: dict[str, str], page_load: bool
) -> None:
    assert navigation(make_mocked_request(method, "/", headers=headers)) is page_load


@pytest.mark.parametrize(
    ("method", "path", "route_class"),
    [
        ("GET", "/queue/join", RouteClass.HEAVY),
        ("POST", "/internal/progress", RouteClass.LIGHT),
        ("GET", "/internal/ping", RouteClass.LIGHT),
        ("GET", "/queue/status", RouteClass.LIGHT),
        ("GET", "/file=/tmp/gradio/x.png", RouteClass.LIGHT),
        ("POST", "/run/predict", RouteClass.LIGHT),
        ("GET", "/assets/index.js", RouteClass.LIGHT),
    ],
)
def test_ui_calls_are_classified_for_what_they_are(
    method: str, path: str, route_class: RouteClass
) -> None:
    assert classify(method, path) is route_class


def test_replicas_never_see_the_token() -> None:
    key = session_key("secret-token")
    assert "secret" not in key and len(key) == 24 and key == session_key("secret-token")

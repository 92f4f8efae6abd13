"""Unit: settings from flags > SDPROXY_* environment > TOML (--config) > defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdproxy import settings
from sdproxy.cli import build_parser
from sdproxy.errors import ConfigError
from sdproxy.settings import HostPort, Settings

BACKEND = ("--backend", "http://a:7860")


def load(*argv: str, env: dict[str, str] | None = None, toml: str | None = None,
         tmp_path: Path | None = None) -> Settings:  # fmt: skip
    args = list(argv)
    if toml is not None:
        assert tmp_path is not None
        path = tmp_path / "sdproxy.toml"
        path.write_text(toml)
        args += ["--config", str(path)]
    ns = build_parser().parse_args(["serve", *args])
    return settings.load(ns, {} if env is None else env)


def test_defaults() -> None:
    s = load(*BACKEND, env={})
    assert s.proxy.listen == HostPort(host="127.0.0.1", port=8000)
    assert s.proxy.metrics_listen == HostPort(host="127.0.0.1", port=9100)
    assert (s.proxy.max_inflight, s.proxy.max_queue, s.proxy.queue_timeout_s) == (1, 1000, 600.0)
    assert (s.proxy.allow_admin, s.proxy.routes) == (False, ())
    assert (s.discovery.kind, s.discovery.backends, s.discovery.warmup) == (
        "static",
        ("http://a:7860",),
        False,
    )
    assert (s.scaler.kind, s.scaler.min_pods, s.scaler.max_pods, s.scaler.max_step) == (
        "none",
        0,
        4,
        4,
    )
    assert (s.log.level, s.log.format, s.log.access_log) == ("info", "text", True)


@pytest.mark.parametrize(
    ("flag", "env", "toml", "expected"),
    [
        pytest.param(None, None, None, 1, id="default"),
        pytest.param(None, None, 4, 4, id="toml"),
        pytest.param(None, "3", 4, 3, id="env-beats-toml"),
        pytest.param("2", "3", 4, 2, id="flag-beats-env"),
        pytest.param("2", None, 4, 2, id="flag-beats-toml"),
    ],
)
def test_precedence(
    tmp_path: Path, flag: str | None, env: str | None, toml: int | None, expected: int
) -> None:
    argv = [*BACKEND, *(["--max-inflight", flag] if flag else [])]
    environ = {"SDPROXY_MAX_INFLIGHT": env} if env else {}
    text = f"max_inflight = {toml}\n" if toml is not None else ""
    assert load(*argv, env=environ, toml=text, tmp_path=tmp_path).proxy.max_inflight == expected


@pytest.mark.parametrize(
    ("argv", "env", "toml", "expected"),
    [
        pytest.param([], {}, "warmup = true", True, id="toml"),
        pytest.param([], {"SDPROXY_WARMUP": "off"}, "warmup = true", False, id="env-beats-toml"),
        pytest.param(["--no-warmup"], {"SDPROXY_WARMUP": "yes"}, "", False, id="no-flag-wins"),
        pytest.param(["--warmup"], {"SDPROXY_WARMUP": "0"}, "", True, id="flag-wins"),
    ],
)
def test_boolean_flags(
    tmp_path: Path, argv: list[str], env: dict[str, str], toml: str, expected: bool
) -> None:
    s = load(*BACKEND, *argv, env=env, toml=toml, tmp_path=tmp_path)
    assert s.discovery.warmup is expected


def test_config_path_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('max_queue = 7\nbackends = ["http://b"]\n')
    ns = build_parser().parse_args(["serve"])
    s = settings.load(ns, {"SDPROXY_CONFIG": str(path)})
    assert (s.proxy.max_queue, s.discovery.backends) == (7, ("http://b",))


def test_toml_sections_are_for_reading_only(tmp_path: Path) -> None:
    toml = '[proxy]\nmax_queue = 5\nlisten = "0.0.0.0:80"\n[scaler]\nscaler = "local"\n'
    s = load(toml=toml, tmp_path=tmp_path, env={})
    assert s.proxy.max_queue == 5
    assert s.proxy.listen == HostPort(host="0.0.0.0", port=80)
    assert s.scaler.kind == "local"


@pytest.mark.parametrize(
    ("argv", "env", "toml", "backends", "routes"),
    [
        pytest.param(
            [], {"SDPROXY_BACKEND": "http://a/, http://b,,"}, "", ("http://a", "http://b"), (),
            id="env-commas",
        ),
        pytest.param(
            [], {}, 'backends = ["http://a", "http://b/"]\nroutes = ["POST /x=light"]',
            ("http://a", "http://b"), ("POST /x=light",), id="toml-plural-arrays",
        ),
        pytest.param(
            [], {}, 'backend = "http://a"\nroute = "GET /y=job"', ("http://a",), ("GET /y=job",),
            id="toml-singular-string",
        ),
        pytest.param(
            ["--backend", "http://c", "--backend", "http://d", "--route", "POST /z=heavy"],
            {"SDPROXY_BACKEND": "http://a", "SDPROXY_ROUTE": "POST /q=light"}, "",
            ("http://c", "http://d"), ("POST /z=heavy",), id="repeated-flags-replace-env",
        ),
        pytest.param(
            [], {"SDPROXY_ROUTE": "POST /a=light,POST /b=job", "SDPROXY_BACKEND": "http://a"},
            'backends = ["http://t"]', ("http://a",), ("POST /a=light", "POST /b=job"),
            id="env-replaces-toml",
        ),
    ],
)  # fmt: skip
def test_list_options(
    tmp_path: Path,
    argv: list[str],
    env: dict[str, str],
    toml: str,
    backends: tuple[str, ...],
    routes: tuple[str, ...],
) -> None:
    s = load(*argv, env=env, toml=toml, tmp_path=tmp_path)
    assert (s.discovery.backends, s.proxy.routes) == (backends, routes)


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        pytest.param("max_inflite = 2", "unknown keys.*max_inflite", id="typo"),
        pytest.param("[proxy]\nbogus = 1\nzeta = 2", "bogus, zeta", id="unknown-in-section"),
        pytest.param("max_inflight = ", "cannot read config", id="syntax"),
        pytest.param('max_inflight = "two"', "--max-inflight: invalid value", id="not-a-number"),
        pytest.param("max_inflight = 2.5", "--max-inflight: invalid value", id="float-for-int"),
        pytest.param("max_inflight = true", "--max-inflight: invalid value", id="bool-for-int"),
        pytest.param("queue_timeout_s = false", "--queue-timeout-s: invalid", id="bool-for-float"),
        pytest.param("warmup = 1", "--warmup: invalid value", id="int-for-bool"),
        pytest.param('warmup = "perhaps"', "expected a boolean", id="bad-bool-string"),
        pytest.param("namespace = 5", "--namespace: invalid value", id="int-for-string"),
        pytest.param("backends = 5", "--backend: invalid value", id="number-for-list"),
        pytest.param("backends = [1]", "--backend: invalid value", id="number-in-list"),
        pytest.param('discovery = "consul"', "--discovery: expected one of", id="bad-choice"),
        pytest.param("listen = 8000", "--listen: invalid value", id="listen-not-a-string"),
    ],
)
def test_bad_toml_raises_config_error(tmp_path: Path, toml: str, match: str) -> None:
    # no flags: a flag would override (and so never read) the TOML value
    with pytest.raises(ConfigError, match=match):
        load(env={"SDPROXY_SCALER": "local"}, toml=toml, tmp_path=tmp_path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load(*BACKEND, "--config", str(tmp_path / "nope.toml"), env={})


def test_toml_numbers_convert_where_exact(tmp_path: Path) -> None:
    s = load(*BACKEND, env={}, toml="queue_timeout_s = 30\nmax_body_mb = 0.5", tmp_path=tmp_path)
    assert (s.proxy.queue_timeout_s, s.proxy.max_body_mb) == (30.0, 0.5)
    assert isinstance(s.proxy.queue_timeout_s, float)


@pytest.mark.parametrize(
    ("argv", "env", "match"),
    [
        pytest.param(["--max-inflight", "0"], {}, "--max-inflight must be > 0", id="inflight-0"),
        pytest.param(["--max-inflight", "1.5"], {}, "--max-inflight: invalid", id="inflight-1.5"),
        pytest.param([], {"SDPROXY_QUEUE_TIMEOUT_S": "0"}, "--queue-timeout-s must be > 0",
                     id="timeout-0"),
        pytest.param(["--max-body-mb", "-1"], {}, "--max-body-mb must be > 0", id="body-neg"),
        pytest.param(["--scale-interval-s", "0"], {}, "--scale-interval-s", id="interval-0"),
        pytest.param(["--max-queue", "-1"], {}, "--max-queue", id="queue-neg"),
        pytest.param(["--min-pods", "-1"], {}, "--min-pods", id="min-neg"),
        pytest.param(["--max-pods", "0"], {}, "--max-pods", id="max-0"),
        pytest.param(["--min-pods", "3", "--max-pods", "2"], {}, "--max-pods", id="max-lt-min"),
        pytest.param(["--listen", "nope"], {}, "HOST:PORT", id="listen"),
        pytest.param(["--listen", "x:99999"], {}, "HOST:PORT", id="port-range"),
        pytest.param([], {"SDPROXY_MAX_INFLIGHT": "two"}, "--max-inflight", id="env-not-int"),
        pytest.param([], {"SDPROXY_ALLOW_ADMIN": "maybe"}, "boolean", id="env-not-bool"),
        pytest.param([], {"SDPROXY_LOG_FORMAT": "xml"}, "--log-format", id="env-bad-choice"),
    ],
)  # fmt: skip
def test_validation_errors(argv: list[str], env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load(*BACKEND, *argv, env=env)


@pytest.mark.parametrize(
    ("argv", "ok"),
    [
        pytest.param([], False, id="static-needs-a-backend"),
        pytest.param(["--scaler", "local"], True, id="local-scaler-makes-its-own"),
        pytest.param(["--discovery", "kubernetes"], True, id="kubernetes"),
    ],
)
def test_static_discovery_needs_backends(argv: list[str], ok: bool) -> None:
    if ok:
        load(*argv, env={})
    else:
        with pytest.raises(ConfigError, match="--backend"):
            load(*argv, env={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("127.0.0.1:8000", HostPort(host="127.0.0.1", port=8000), id="v4"),
        pytest.param(":8000", HostPort(host="0.0.0.0", port=8000), id="any"),
        pytest.param("[::1]:9100", HostPort(host="::1", port=9100), id="v6"),
    ],
)
def test_listen_addresses(text: str, expected: HostPort) -> None:
    assert load(*BACKEND, "--listen", text, env={}).proxy.listen == expected
    assert str(expected).endswith(f":{expected.port}")


def test_empty_metrics_listen_disables_it() -> None:
    assert load(*BACKEND, env={"SDPROXY_METRICS_LISTEN": ""}).proxy.metrics_listen is None


def test_every_option_has_a_flag_an_env_name_and_a_toml_key() -> None:
    parser = build_parser()
    ns = parser.parse_args(["serve"])
    values: dict[str, Any] = vars(ns)
    for opt in settings.OPTIONS:
        assert opt.name in values
        assert opt.env == "SDPROXY_" + opt.name.upper()
        assert opt.flag == "--" + opt.name.replace("_", "-")
    assert "--no-warmup" in settings.flag_names()

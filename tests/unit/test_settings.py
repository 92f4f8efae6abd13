"""Unit: settings from flags > SDPROXY_* environment > TOML (--config) > defaults."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from sdproxy import settings
from sdproxy.cli import build_parser
from sdproxy.core.admission import AdmissionConfig
from sdproxy.core.autoscale import AutoscaleConfig
from sdproxy.core.limits import RequestLimits
from sdproxy.errors import ConfigError
from sdproxy.options import from_values, options
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
    assert (
        s.proxy.admission.max_inflight,
        s.proxy.admission.max_queue,
        s.proxy.admission.queue_timeout_s,
    ) == (1, 1000, 600.0)
    assert (s.proxy.allow_admin, s.proxy.route) == (False, ())
    assert (s.discovery.discovery, s.discovery.backend, s.proxy.admission.warmup) == (
        "static",
        ("http://a:7860",),
        False,
    )
    assert s.proxy.admission.hold_when_empty is False  # static, no scaler: no pod can come
    assert (s.scaler.scaler, s.scaler.scale_interval_s) == ("none", 1.0)
    assert s.scaler.autoscale == AutoscaleConfig(
        min_pods=0, max_pods=4, idle_to_zero_s=300.0, scale_down_delay_s=60.0, max_scale_step=4
    )
    assert (s.log.log_level, s.log.log_format, s.log.access_log) == ("info", "text", True)


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
    assert (
        load(*argv, env=environ, toml=text, tmp_path=tmp_path).proxy.admission.max_inflight
        == expected
    )


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
    assert s.proxy.admission.warmup is expected


def test_config_path_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('max_queue = 7\nbackends = ["http://b"]\n')
    ns = build_parser().parse_args(["serve"])
    s = settings.load(ns, {"SDPROXY_CONFIG": str(path)})
    assert (s.proxy.admission.max_queue, s.discovery.backend) == (7, ("http://b",))


def test_toml_sections_are_for_reading_only(tmp_path: Path) -> None:
    toml = '[proxy]\nmax_queue = 5\nlisten = "0.0.0.0:80"\n[scaler]\nscaler = "local"\n'
    s = load(toml=toml, tmp_path=tmp_path, env={})
    assert s.proxy.admission.max_queue == 5
    assert s.proxy.listen == HostPort(host="0.0.0.0", port=80)
    assert s.scaler.scaler == "local"


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
    assert (s.discovery.backend, s.proxy.route) == (backends, routes)


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
    assert (s.proxy.admission.queue_timeout_s, s.proxy.max_body_mb) == (30.0, 0.5)
    assert isinstance(s.proxy.admission.queue_timeout_s, float)


@pytest.mark.parametrize(
    ("argv", "env", "match"),
    [
        pytest.param(["--max-inflight", "0"], {}, "--max-inflight must be >= 1, got 0$",
                     id="inflight-0"),
        pytest.param(["--max-inflight", "1.5"], {}, "--max-inflight: invalid", id="inflight-1.5"),
        pytest.param([], {"SDPROXY_QUEUE_TIMEOUT_S": "0"}, "--queue-timeout-s must be > 0",
                     id="timeout-0"),
        pytest.param(["--max-body-mb", "-1"], {}, "--max-body-mb must be > 0", id="body-neg"),
        pytest.param(["--scale-interval-s", "0"], {}, "--scale-interval-s must be > 0",
                     id="interval-0"),
        pytest.param(["--max-queue", "-1"], {}, "--max-queue must be >= 0", id="queue-neg"),
        pytest.param(["--min-pods", "-1"], {}, "--min-pods must be >= 0", id="min-neg"),
        pytest.param(["--max-pods", "0"], {}, "--max-pods must be >= 1", id="max-0"),
        pytest.param(["--min-pods", "3", "--max-pods", "2"], {}, "--max-pods must be >= --min-pods",
                     id="max-lt-min"),
        pytest.param(["--max-scale-step", "0"], {}, "--max-scale-step must be >= 1", id="step-0"),
        pytest.param([], {"SDPROXY_IDLE_TO_ZERO_S": "-1"}, "--idle-to-zero-s must be >= 0",
                     id="idle-neg"),
        pytest.param([], {"SDPROXY_MAX_INFLIGHT": "two"}, "--max-inflight", id="env-not-int"),
        pytest.param([], {"SDPROXY_ALLOW_ADMIN": "maybe"}, "--allow-admin: expected a boolean",
                     id="env-not-bool"),
        pytest.param([], {"SDPROXY_LOG_FORMAT": "xml"}, "--log-format", id="env-bad-choice"),
    ],
)  # fmt: skip
def test_validation_errors(argv: list[str], env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match="^" + match):
        load(*BACKEND, *argv, env=env)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        pytest.param("--listen", "nope", "--listen: expected HOST:PORT, got 'nope'", id="no-port"),
        pytest.param("--listen", "127.0.0.1:", "--listen: expected HOST:PORT", id="empty-port"),
        pytest.param("--listen", "127.0.0.1:99999", "--listen: port 99999 out of range (0-65535)",
                     id="listen-port-range"),
        pytest.param("--listen", "http://h:80", "--listen: bad host 'http://h'", id="listen-url"),
        pytest.param("--listen", "::1:80", "--listen: bad host '::1'", id="v6-no-brackets"),
        pytest.param("--listen", "[::g]:80", "--listen: bad IPv6 address '[::g]'", id="bad-v6"),
        pytest.param("--metrics-listen", "127.0.0.1:70000",
                     "--metrics-listen: port 70000 out of range (0-65535)", id="metrics-range"),
        pytest.param("--metrics-listen", "9100", "--metrics-listen: expected HOST:PORT",
                     id="metrics-port-only"),
        pytest.param("--backend", "notaurl",
                     "--backend: expected an http:// or https:// URL, got 'notaurl'", id="not-url"),
        pytest.param("--backend", "127.0.0.1:7860", "--backend: expected an http:// or https://",
                     id="no-scheme"),
        pytest.param("--backend", "localhost:7860", "--backend: expected an http:// or https://",
                     id="host-as-scheme"),
        pytest.param("--backend", "ftp://h", "--backend: expected an http:// or https://",
                     id="ftp"),
        pytest.param("--backend", "http://h:99999",
                     "--backend: port 99999 out of range (1-65535) in 'http://h:99999'",
                     id="url-port-range"),
        pytest.param("--backend", "http://h:0", "--backend: port 0 out of range", id="url-port-0"),
        pytest.param("--backend", "http://h:x", "--backend: port x is not a number",
                     id="url-port-x"),
        pytest.param("--backend", "http://[::1", "--backend: not a URL", id="open-bracket"),
        pytest.param("--backend", "http://:7860", "--backend: no valid host", id="no-host"),
        pytest.param("--backend", "http://a b", "--backend: no valid host", id="space"),
        pytest.param("--backend", "http://h/?q=1", "--backend: a base URL takes no query",
                     id="query"),
    ],
)  # fmt: skip
def test_bad_urls_and_addresses_name_the_flag(flag: str, value: str, message: str) -> None:
    others = [] if flag == "--backend" else list(BACKEND)
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load(*others, flag, value, env={})


@pytest.mark.parametrize("source", ["flag", "env", "toml"])
def test_urls_are_checked_from_every_source(tmp_path: Path, source: str) -> None:
    good, bad = "http://ok:7860", "http://h:99999"
    argv = ["--backend", good, "--backend", bad] if source == "flag" else []
    env = {"SDPROXY_BACKEND": f"{good},{bad}"} if source == "env" else {}
    toml = f'backends = ["{good}", "{bad}"]' if source == "toml" else ""
    with pytest.raises(ConfigError, match=r"^--backend: port 99999 out of range"):
        load(*argv, env=env, toml=toml, tmp_path=tmp_path)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("http://127.0.0.1:7860/", "http://127.0.0.1:7860", id="trailing-slash"),
        pytest.param("https://pod.example", "https://pod.example", id="https-no-port"),
        pytest.param("http://[::1]:7860", "http://[::1]:7860", id="v6"),
        pytest.param("http://u:p@h:7860/sd/", "http://u:p@h:7860/sd", id="userinfo-and-path"),
    ],
)
def test_good_backend_urls(url: str, expected: str) -> None:
    assert load("--backend", url, env={}).discovery.backend == (expected,)


def test_identity_defaults_from_the_given_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "from-os-environ")  # never read: resolve gets env=
    assert load(*BACKEND, env={"POD_NAME": "sdproxy-7"}).scaler.identity == "sdproxy-7"
    assert load(*BACKEND, env={}).scaler.identity == os.uname().nodename
    assert load(*BACKEND, "--identity", "me", env={"POD_NAME": "x"}).scaler.identity == "me"


def test_the_core_autoscale_config_is_the_settings_group() -> None:
    s = load(*BACKEND, "--max-scale-step", "2", "--min-pods", "1",
             env={"SDPROXY_IDLE_TO_ZERO_S": "30"})  # fmt: skip
    assert s.scaler.autoscale == AutoscaleConfig(min_pods=1, idle_to_zero_s=30.0, max_scale_step=2)
    names = [opt.name for opt in options(AutoscaleConfig)]
    assert names == [f.name for f in dataclasses.fields(AutoscaleConfig)]
    assert set(names) <= {opt.name for opt in settings.OPTIONS}


@dataclass(frozen=True, kw_only=True)
class Knobs:
    """A core-style config: plain field metadata, nothing imported from settings."""

    ticks: int = field(default=3, metadata={"help": "ticks per beat", "min": 1})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "the mode"})
    peers: tuple[str, ...] = field(default=(), metadata={"help": "peer names"})
    #: computed by whoever builds it: no option
    fast: bool = field(default=False, metadata={"derived": "from mode"})


def test_any_frozen_dataclass_with_help_metadata_yields_options() -> None:
    found = {opt.name: opt for opt in options(Knobs)}
    assert list(found) == ["ticks", "mode", "peers"]
    ticks = found["ticks"]
    assert (ticks.flag, ticks.env, ticks.help, ticks.shown_default) == (
        "--ticks",
        "SDPROXY_TICKS",
        "ticks per beat",
        "3",
    )
    assert found["mode"].choices == ("a", "b")
    assert found["peers"].is_list
    built = from_values(Knobs, {"ticks": 5, "fast": True})
    assert built == Knobs(ticks=5, fast=True)


def test_a_field_that_is_neither_option_nor_derived_is_an_error() -> None:
    @dataclass(frozen=True)
    class Forgot:
        x: int = 1

    @dataclass
    class Mutable:
        y: int = field(default=1, metadata={"help": "y"})

    with pytest.raises(TypeError, match=r"Forgot\.x"):
        list(options(Forgot))
    with pytest.raises(TypeError, match="frozen"):
        list(options(Mutable))


def test_a_core_check_becomes_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_scale_step must be >= 1"):
        from_values(AutoscaleConfig, {"max_scale_step": 0})


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


def _help_entries(command: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """``sdproxy COMMAND --help`` as {first flag: its whole entry on one line}."""
    monkeypatch.setenv("COLUMNS", "1000")  # wide: the help text itself does not wrap
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    entries: dict[str, str] = {}
    flag = ""
    for line in str(sub.choices[command].format_help()).splitlines():
        if line.startswith("  --"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line.strip()
        elif flag and line.startswith("    "):  # the help put under a long flag
            entries[flag] += " " + line.strip()
        else:
            flag = ""
    return entries


def test_serve_help_shows_every_default_and_env_name(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = _help_entries("serve", monkeypatch)
    for opt in settings.OPTIONS:
        assert shown[opt.flag].endswith(f"(default: {opt.shown_default}) [env {opt.env}]")
    assert "(default: 127.0.0.1:8000)" in shown["--listen"]
    assert "(default: none)" in shown["--backend"]
    assert "(default: $POD_NAME or hostname)" in shown["--identity"]
    assert "(default: 4)" in shown["--max-scale-step"]
    assert "(default: off)" in shown["--warmup"]
    assert "(default: 600)" in shown["--queue-timeout-s"]


def test_demo_help_shows_every_default(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = _help_entries("demo", monkeypatch)
    assert len(shown) == 11
    assert all("(default: " in entry for entry in shown.values()), shown
    assert shown["--idle-to-zero-s"].endswith("(default: 60.0)")
    assert shown["--replicas"].endswith("(default: 1)")
    assert shown["--listen"].endswith("(default: 127.0.0.1:8000)")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--listen", "127.0.0.1:99999"], "--listen: port 99999 out of range",
                     id="listen"),
        pytest.param(["--metrics-listen", "nope"], "--metrics-listen: expected HOST:PORT",
                     id="metrics"),
    ],
)  # fmt: skip
def test_demo_checks_its_addresses_like_serve(argv: list[str], message: str) -> None:
    from sdproxy.runtime.demo import demo_settings

    args = build_parser().parse_args(["demo", *argv])
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        demo_settings(args)


@pytest.mark.parametrize(
    ("argv", "hold"),
    [
        pytest.param(["--scaler", "local"], True, id="our-own-scaler"),
        pytest.param(["--discovery", "kubernetes"], True, id="kubernetes-adds-pods"),
        pytest.param(["--backend", "http://a:7860"], False, id="static-only"),
    ],
)
def test_admission_holds_the_queue_only_when_pods_can_come(argv: list[str], hold: bool) -> None:
    assert load(*argv, env={}).proxy.admission.hold_when_empty is hold


def test_the_admission_knobs_are_the_cores_own_config() -> None:
    s = load(*BACKEND, "--max-inflight", "2", "--max-queue", "3", "--warmup", env={})
    assert s.proxy.admission == AdmissionConfig(
        max_inflight=2, max_queue=3, queue_timeout_s=600.0, warmup=True
    )


def test_request_bounds_quota_and_address_identity_are_settings() -> None:
    defaults = load(*BACKEND, env={}).proxy
    assert defaults.limits == RequestLimits(max_steps=0, max_pixels=0, max_batch=0), "off"
    assert (defaults.max_queued_per_client, defaults.address_identity) == (0, True)
    s = load(
        *BACKEND,
        *("--max-steps", "150", "--max-pixels", "4194304", "--max-batch", "8"),
        *("--max-queued-per-client", "3", "--address-identity", "false"),
        env={},
    ).proxy
    assert s.limits == RequestLimits(max_steps=150, max_pixels=4194304, max_batch=8)
    assert (s.max_queued_per_client, s.address_identity) == (3, False)
    with pytest.raises(ConfigError, match=r"^--max-pixels must be >= 0"):
        load(*BACKEND, "--max-pixels", "-1", env={})


def test_no_job_adds_more_to_an_eta_than_a_pod_may_stay_silent() -> None:
    assert load(*BACKEND, "--backend-timeout-s", "60", env={}).proxy.admission.max_job_s == 60.0


def test_gate_settings_have_their_own_flags_with_the_same_rules(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["gate", "--upstream", "http://127.0.0.1:7860/", "--max-inflight", "2"]
    )
    gate = settings.load_gate(args, env={})
    assert (gate.gate.upstream, gate.gate.max_inflight) == ("http://127.0.0.1:7860", 2)
    assert str(gate.gate.listen) == "127.0.0.1:7861"
    with pytest.raises(ConfigError, match="--upstream"):
        settings.load_gate(parser.parse_args(["gate", "--upstream", "notaurl"]), env={})
    with pytest.raises(ConfigError, match="--max-inflight"):
        settings.load_gate(parser.parse_args(["gate", "--max-inflight", "0"]), env={})


# ---- [tenants] ------------------------------------------------------------------------


def test_tenant_tables_are_parsed(tmp_path: Path) -> None:
    toml = (
        '[tenants.web]\nkeys = ["k1", "k2"]\nweight = 2\nmax_running = 3\n'
        '[tenants.batch]\nkeys = ["k3"]\nmax_priority = "low"\nmax_queued = 50\n'
    )
    tenants = {t.name: t for t in load(*BACKEND, toml=toml, tmp_path=tmp_path).proxy.tenants}
    assert tenants["web"].keys == ("k1", "k2") and tenants["web"].weight == 2.0
    assert tenants["web"].max_running == 3 and tenants["web"].max_queued == 1000
    assert (tenants["batch"].max_priority, tenants["batch"].max_queued) == (0, 50)
    assert load(*BACKEND).proxy.tenants == ()


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        pytest.param('[tenants.a]\nkeys = ["k"]\ncolour = 1\n', "unknown keys colour", id="key"),
        pytest.param("[tenants.a]\nweight = 0\n", "weight must be", id="weight"),
        # a weight of inf or a denormal one made finish tags inf, then NaN: order lost
        pytest.param("[tenants.a]\nweight = inf\n", "weight must be", id="weight-inf"),
        pytest.param("[tenants.a]\nweight = 1e-320\n", "weight must be", id="weight-tiny"),
        # the header's value comes stripped: such a key could never match
        pytest.param('[tenants.a]\nkeys = [" k"]\n', "spaces", id="key-spaces"),
        pytest.param('[tenants.a]\nweight = "x"\n', "wrong type", id="type"),
        pytest.param('[tenants.a]\nmax_priority = "top"\n', "max_priority", id="priority"),
        pytest.param('[tenants.a]\nkeys = [""]\n', "non-empty", id="empty-key"),
        pytest.param(
            '[tenants.a]\nkeys = ["k"]\n[tenants.b]\nkeys = ["k"]\n', "given again", id="shared"
        ),
        pytest.param("tenants = 3\n", "must be tables", id="not-tables"),
    ],
)
def test_bad_tenant_tables_stop_start_up(tmp_path: Path, toml: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load(*BACKEND, toml=toml, tmp_path=tmp_path)

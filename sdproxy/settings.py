"""Settings as data: frozen dataclasses grouped by concern, read in ONE place.

Sources, highest precedence first: command-line flags, ``SDPROXY_*`` environment variables,
a TOML file (``--config``), then the defaults below. Every option is declared once in
``OPTIONS``; the argparse flags, environment names and TOML keys are all derived from it:
flag ``--max-inflight`` <-> env ``SDPROXY_MAX_INFLIGHT`` <-> TOML ``max_inflight``.
List options take a comma-separated string in the environment and an array in TOML.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdproxy.errors import ConfigError

ENV_PREFIX = "SDPROXY_"


@dataclass(frozen=True, kw_only=True)
class HostPort:
    """A listen address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class ProxySettings:
    listen: HostPort
    #: where /metrics is served; None disables the separate metrics listener
    metrics_listen: HostPort | None
    #: heavy requests one pod runs at once (sd-webui: 1)
    max_inflight: int
    #: heavy requests waiting in the shared queue before 503 queue_full
    max_queue: int
    #: how long a heavy request may wait in the queue before 503 queue_timeout
    queue_timeout_s: float
    #: request bodies above this answer 413
    max_body_mb: float
    #: on SIGTERM, how long in-flight generations may take to finish
    drain_timeout_s: float
    #: forward admin/unsafe routes (train/*, server-*, unload/reload-checkpoint)
    allow_admin: bool
    #: TCP connect timeout towards a pod
    connect_timeout_s: float
    #: longest a pod may take to answer a heavy request
    backend_timeout_s: float
    #: extra classification rules, "METHOD /path/prefix=class" (class: heavy|light|job|admin)
    routes: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class DiscoverySettings:
    #: "static" (the --backend list) or "kubernetes" (EndpointSlice watch)
    kind: str
    #: static backends, base URLs such as http://127.0.0.1:7860
    backends: tuple[str, ...]
    namespace: str
    #: the Service whose EndpointSlices list the sd-webui pods
    service: str
    #: the EndpointSlice port name to use; empty takes the first port
    port_name: str
    #: path to a kubeconfig; empty: in-cluster service account, else $KUBECONFIG
    kubeconfig: str
    #: a new pod takes traffic only after a 1-step 64x64 txt2img succeeded
    warmup: bool
    #: how long one warm-up generation may take (model loading included)
    warmup_timeout_s: float


@dataclass(frozen=True, kw_only=True)
class ScalerSettings:
    #: "none" (export sdproxy_desired_pods only), "local" (simulated pods), "kubernetes"
    kind: str
    deployment: str
    min_pods: int
    max_pods: int
    #: no heavy traffic for this long scales to zero (if min_pods is 0)
    idle_to_zero_s: float
    #: demand must stay lower for this long before pods are removed
    scale_down_delay_s: float
    #: most pods added or removed in one decision
    max_step: int
    #: how often the policy runs
    interval_s: float
    #: coordination.k8s.io/v1 Lease used for leader election among proxy replicas
    lease_name: str
    lease_duration_s: float
    #: this replica's identity in the Lease (defaults to hostname)
    identity: str
    #: local scaler: first port for simulated pods, and their start-up time
    local_base_port: int
    local_startup_s: float
    local_step_ms: float


@dataclass(frozen=True, kw_only=True)
class LogSettings:
    #: debug | info | warning | error
    level: str
    #: json | text
    format: str
    #: one JSON line per request
    access_log: bool


@dataclass(frozen=True, kw_only=True)
class Settings:
    proxy: ProxySettings
    discovery: DiscoverySettings
    scaler: ScalerSettings
    log: LogSettings


def parse_hostport(text: str) -> HostPort:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return HostPort(host=host.strip("[]") or "0.0.0.0", port=int(port))


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = text.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"expected a boolean, got {text!r}")


@dataclass(frozen=True, kw_only=True)
class Option:
    """One setting: its flag, its type and its default."""

    name: str  # TOML key; flag and env name derive from it
    kind: Callable[[Any], Any]
    default: Any
    help: str
    is_list: bool = False
    is_flag: bool = False
    choices: tuple[str, ...] = field(default=())

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option(name="listen", kind=str, default="127.0.0.1:8000", help="proxy listen HOST:PORT"),
    Option(
        name="metrics_listen",
        kind=str,
        default="127.0.0.1:9100",
        help="HOST:PORT serving Prometheus /metrics ('' disables)",
    ),
    Option(name="max_inflight", kind=int, default=1, help="heavy requests per pod at once"),
    Option(name="max_queue", kind=int, default=1000, help="shared queue bound (then 503)"),
    Option(name="queue_timeout_s", kind=float, default=600.0, help="longest wait in queue"),
    Option(name="max_body_mb", kind=float, default=64.0, help="request body limit in MiB (413)"),
    Option(name="drain_timeout_s", kind=float, default=300.0, help="SIGTERM drain bound"),
    Option(
        name="allow_admin", kind=_bool, default=False, is_flag=True, help="forward admin routes"
    ),
    Option(name="connect_timeout_s", kind=float, default=5.0, help="pod TCP connect timeout"),
    Option(name="backend_timeout_s", kind=float, default=1800.0, help="pod answer timeout"),
    Option(
        name="route",
        kind=str,
        default=(),
        is_list=True,
        help="extra classification rule 'METHOD /path/prefix=heavy|light|job|admin' (repeatable)",
    ),
    Option(
        name="discovery",
        kind=str,
        default="static",
        choices=("static", "kubernetes"),
        help="where pods come from",
    ),
    Option(name="backend", kind=str, default=(), is_list=True, help="static pod URL (repeatable)"),
    Option(name="namespace", kind=str, default="default", help="Kubernetes namespace"),
    Option(name="service", kind=str, default="sd-webui", help="Service of the sd-webui pods"),
    Option(name="port_name", kind=str, default="", help="EndpointSlice port name ('' = first)"),
    Option(name="kubeconfig", kind=str, default="", help="kubeconfig path ('' = in-cluster/env)"),
    Option(name="warmup", kind=_bool, default=False, is_flag=True, help="gate pods on a warm-up"),
    Option(name="warmup_timeout_s", kind=float, default=600.0, help="one warm-up's time bound"),
    Option(
        name="scaler",
        kind=str,
        default="none",
        choices=("none", "local", "kubernetes"),
        help="who acts on the desired pod count",
    ),
    Option(name="deployment", kind=str, default="sd-webui", help="Deployment to scale"),
    Option(name="min_pods", kind=int, default=0, help="never fewer pods"),
    Option(name="max_pods", kind=int, default=4, help="never more pods"),
    Option(name="idle_to_zero_s", kind=float, default=300.0, help="idle time before zero pods"),
    Option(name="scale_down_delay_s", kind=float, default=60.0, help="stable window to scale in"),
    Option(name="max_scale_step", kind=int, default=4, help="most pods changed per decision"),
    Option(name="scale_interval_s", kind=float, default=1.0, help="autoscaler tick"),
    Option(name="lease_name", kind=str, default="sdproxy-leader", help="leader-election Lease"),
    Option(name="lease_duration_s", kind=float, default=15.0, help="Lease duration"),
    Option(name="identity", kind=str, default="", help="this replica's Lease identity"),
    Option(name="local_base_port", kind=int, default=7860, help="local scaler: first pod port"),
    Option(name="local_startup_s", kind=float, default=5.0, help="local scaler: pod start-up"),
    Option(name="local_step_ms", kind=float, default=20.0, help="local scaler: ms per step"),
    Option(name="log_level", kind=str, default="info", help="debug|info|warning|error"),
    Option(name="log_format", kind=str, default="text", choices=("json", "text"), help="logs"),
    Option(name="access_log", kind=_bool, default=True, help="one line per request (true|false)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register every option as a flag whose absence means 'not given' (None)."""
    parser.add_argument("--config", default=None, help="TOML file with settings (keys = flags)")
    for opt in OPTIONS:
        kwargs: dict[str, Any] = {"default": None, "help": f"{opt.help} [env {opt.env}]"}
        if opt.is_flag:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif opt.is_list:
            kwargs["action"] = "append"
        if opt.choices:
            kwargs["choices"] = opt.choices
        parser.add_argument(opt.flag, dest=opt.name, **kwargs)


def _from_env(opt: Option, env: Mapping[str, str]) -> Any:
    raw = env.get(opt.env)
    if raw is None:
        return None
    if opt.is_list:
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


def _read_toml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with Path(path).open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    flat: dict[str, Any] = {}
    for key, value in data.items():  # allow [sections] for readability; keys stay global
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    known = {opt.name for opt in OPTIONS} | {"backends", "routes"}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ConfigError(f"unknown keys in {path}: {', '.join(unknown)}")
    for plural, singular in (("backends", "backend"), ("routes", "route")):
        if plural in flat:
            flat[singular] = flat.pop(plural)
    return flat


def _typed(opt: Option, value: Any) -> Any:
    """Strings (flags, env, TOML) are parsed; other TOML values must have the option's type
    (int(2.5) would silently give 2, int(True) 1, and _bool(1) fail with AttributeError)."""
    if isinstance(value, str):
        return opt.kind(value)
    wanted: tuple[type, ...] = {int: (int,), float: (int, float), _bool: (bool,)}.get(opt.kind, ())
    if isinstance(value, bool) is not (opt.kind is _bool) or not isinstance(value, wanted):
        raise TypeError(f"expected {opt.kind.__name__}, got {type(value).__name__}")
    return opt.kind(value)


def _convert(opt: Option, value: Any) -> Any:
    try:
        if opt.is_list:
            if isinstance(value, str):
                value = [value]
            return tuple(_typed(opt, v) for v in value)
        converted = _typed(opt, value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{opt.flag}: invalid value {value!r}") from exc
    if opt.choices and converted not in opt.choices:
        raise ConfigError(f"{opt.flag}: expected one of {', '.join(opt.choices)}")
    return converted


def resolve(namespace: argparse.Namespace, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Merge flags > environment > TOML > defaults into one flat dict of typed values."""
    env = os.environ if env is None else env
    config_path = getattr(namespace, "config", None) or env.get(ENV_PREFIX + "CONFIG")
    toml = _read_toml(config_path)
    merged: dict[str, Any] = {}
    for opt in OPTIONS:
        value = getattr(namespace, opt.name, None)
        if value is None:
            value = _from_env(opt, env)
        if value is None:
            value = toml.get(opt.name)
        merged[opt.name] = opt.default if value is None else _convert(opt, value)
    return merged


def _positive(values: Mapping[str, Any], *names: str) -> None:
    for name in names:
        if values[name] <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {values[name]}")


def build(values: Mapping[str, Any]) -> Settings:
    """Validate the merged values and group them into frozen settings."""
    _positive(values, "max_inflight", "queue_timeout_s", "max_body_mb", "scale_interval_s")
    if values["max_queue"] < 0 or values["min_pods"] < 0:
        raise ConfigError("--max-queue and --min-pods must be >= 0")
    if values["max_pods"] < max(1, values["min_pods"]):
        raise ConfigError("--max-pods must be >= max(1, --min-pods)")
    if values["discovery"] == "static" and values["scaler"] != "local" and not values["backend"]:
        raise ConfigError("static discovery needs at least one --backend URL")
    metrics = values["metrics_listen"]
    return Settings(
        proxy=ProxySettings(
            listen=parse_hostport(values["listen"]),
            metrics_listen=parse_hostport(metrics) if metrics else None,
            max_inflight=values["max_inflight"],
            max_queue=values["max_queue"],
            queue_timeout_s=values["queue_timeout_s"],
            max_body_mb=values["max_body_mb"],
            drain_timeout_s=values["drain_timeout_s"],
            allow_admin=values["allow_admin"],
            connect_timeout_s=values["connect_timeout_s"],
            backend_timeout_s=values["backend_timeout_s"],
            routes=tuple(values["route"]),
        ),
        discovery=DiscoverySettings(
            kind=values["discovery"],
            backends=tuple(b.rstrip("/") for b in values["backend"]),
            namespace=values["namespace"],
            service=values["service"],
            port_name=values["port_name"],
            kubeconfig=values["kubeconfig"],
            warmup=values["warmup"],
            warmup_timeout_s=values["warmup_timeout_s"],
        ),
        scaler=_scaler_settings(values),
        log=LogSettings(
            level=values["log_level"], format=values["log_format"], access_log=values["access_log"]
        ),
    )


def _scaler_settings(values: Mapping[str, Any]) -> ScalerSettings:
    return ScalerSettings(
        kind=values["scaler"],
        deployment=values["deployment"],
        min_pods=values["min_pods"],
        max_pods=values["max_pods"],
        idle_to_zero_s=values["idle_to_zero_s"],
        scale_down_delay_s=values["scale_down_delay_s"],
        max_step=values["max_scale_step"],
        interval_s=values["scale_interval_s"],
        lease_name=values["lease_name"],
        lease_duration_s=values["lease_duration_s"],
        identity=values["identity"] or os.environ.get("POD_NAME", "") or os.uname().nodename,
        local_base_port=values["local_base_port"],
        local_startup_s=values["local_startup_s"],
        local_step_ms=values["local_step_ms"],
    )


def load(namespace: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Settings for ``sdproxy serve`` from parsed flags, the environment and --config."""
    return build(resolve(namespace, env))


def flag_names() -> Sequence[str]:
    """Every flag ``sdproxy serve`` accepts (used by the manifest tests)."""
    return ["--config", *(opt.flag for opt in OPTIONS)] + [
        "--no-" + opt.flag[2:] for opt in OPTIONS if opt.is_flag
    ]

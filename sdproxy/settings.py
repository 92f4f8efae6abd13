"""Settings as data: frozen dataclasses grouped by concern, read in ONE place.

Each setting is declared once, as a field of one of the groups below with its help text;
``sdproxy.options`` derives its flag, ``SDPROXY_*`` environment name, TOML key, parser,
bounds and ``--help`` line from that field (its docstring has the rules). Field names are
option names (``ScalerSettings.scale_interval_s`` is ``--scale-interval-s``) and are unique
across groups: flags, environment and TOML are one flat namespace. The autoscaling knobs
are the core's own ``AutoscaleConfig``, held as the group ``ScalerSettings.autoscale``.

Sources, highest precedence first: command-line flags, ``SDPROXY_*`` environment variables,
a TOML file (``--config``; ``[sections]`` only for reading), then the field defaults.
``resolve`` merges and parses them into one flat dict keyed by option name, filling the
values that default from the environment (``--identity``: ``POD_NAME``, then the host
name) from the ``env`` mapping it is given; ``build`` checks the bounds and the rules that
span options, then fills the groups. Every URL and HOST:PORT is checked here, so a bad one
stops start-up: a ``ConfigError`` (exit 2, one line naming the flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

from sdproxy.core.admission import AdmissionConfig
from sdproxy.core.autoscale import AutoscaleConfig
from sdproxy.core.limits import RequestLimits
from sdproxy.core.queue import Priority
from sdproxy.core.tenants import Tenant
from sdproxy.core.uisessions import UiConfig
from sdproxy.errors import ConfigError
from sdproxy.options import (
    ENV_PREFIX,
    HostPort,
    Option,
    add_option,
    check_bounds,
    convert,
    from_env,
    from_values,
    option,
    options,
    parse_backend_url,
    parse_url,
)

__all__ = [
    "OPTIONS",
    "DiscoverySettings",
    "HostPort",
    "JobSettings",
    "LogSettings",
    "ProxySettings",
    "ScalerSettings",
    "Settings",
    "add_arguments",
    "build",
    "flag_names",
    "load",
    "resolve",
]


def _pod_identity(env: Mapping[str, str]) -> str:
    # Kubernetes gives the pod name through the Downward API (deploy/: env POD_NAME)
    return env.get("POD_NAME") or os.uname().nodename


@dataclass(frozen=True, kw_only=True)
class ProxySettings:
    """How heavy requests are admitted and how requests are forwarded."""

    listen: HostPort = option(HostPort(host="127.0.0.1", port=8000), "where the proxy listens")
    metrics_listen: HostPort | None = option(
        HostPort(host="127.0.0.1", port=9100),
        "where Prometheus /metrics is served ('' disables)",
    )
    ops_listen: HostPort | None = option(
        None,
        "serve the operational endpoints (/-/status, /-/metrics, /-/peer*) here instead of "
        "on --listen; /-/healthz and /-/readyz answer on both ('' = on --listen)",
    )
    ops_token: str = option(
        "",
        "bearer token the operational endpoints require wherever served, /metrics on "
        "--metrics-listen too; /-/healthz and /-/readyz stay open (prefer the env variable)",
    )
    #: the admission knobs (max_inflight, max_queue, queue_timeout_s, warmup): the core's
    #: own config is the group
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    max_body_mb: float = option(64.0, "request body limit in MiB (then 413)", gt=0)
    spool_max_mb: float = option(
        2048.0,
        "request bodies over 1 MiB wait on disk; all of them together stay within this "
        "many MiB (then 503 spool_full; 0 = no bound)",
        min=0,
    )
    client_body_timeout_s: float = option(
        60.0, "a heavy request's whole body must arrive within this (then 408)", gt=0
    )
    client_idle_timeout_s: float = option(
        75.0,
        "a client connection with no request under way (idle between requests, or its "
        "request head still incomplete: slowloris) is closed after this",
        gt=0,
    )
    #: the request bounds (max_steps, max_pixels, max_batch): the core's own config
    limits: RequestLimits = field(default_factory=RequestLimits)
    max_queued_per_client: int = option(
        0, "most heavy requests one caller may have queued (then 429 client_quota; 0 = off)", min=0
    )
    address_identity: bool = option(
        True, "a job sent with no identity (header, cookie) is reachable from its address"
    )
    drain_timeout_s: float = option(300.0, "on SIGTERM, how long running generations may take")
    allow_admin: bool = option(
        False, "forward admin routes (train/*, server-*, unload/reload-checkpoint)", switch=True
    )
    connect_timeout_s: float = option(5.0, "TCP connect timeout towards a pod")
    backend_timeout_s: float = option(1800.0, "longest a pod may stay silent while answering")
    route: tuple[str, ...] = option(
        (),
        "extra classification rule 'METHOD /path/prefix=heavy|light|job|admin' (repeatable)",
        toml_alias="routes",
    )
    check_invariants: bool = option(
        False, "debug: check the admission core's invariants after every event", switch=True
    )
    peer: tuple[str, ...] = option(
        (),
        "another proxy replica's base URL (repeatable): global demand, job-bound calls",
        parse=parse_url,
        metavar="URL",
        toml_alias="peers",
    )
    peer_service: str = option(
        "", "with --discovery kubernetes: the proxy's own Service, whose endpoints are the peers"
    )
    #: the ``[tenants.<name>]`` tables of --config (API keys, weight, limits); empty: no
    #: keys needed, X-Sdproxy-Tenant names the tenant
    tenants: tuple[Tenant, ...] = field(
        default=(), metadata={"derived": "the [tenants.<name>] tables of --config"}
    )
    #: the browser UI (--ui, --ui-sessions-per-pod, --ui-idle-s): the core's own config
    ui: UiConfig = field(default_factory=UiConfig)


@dataclass(frozen=True, kw_only=True)
class DiscoverySettings:
    """Where the sd-webui pods come from and when a new one takes traffic."""

    discovery: Literal["static", "kubernetes"] = option(
        "static", "where pods come from: the --backend list or an EndpointSlice watch"
    )
    backend: tuple[str, ...] = option(
        (),
        "static pod base URL, http(s)://HOST[:PORT][#weight=N] (repeatable; N: relative GPU speed)",
        parse=parse_backend_url,
        metavar="URL",
        toml_alias="backends",
    )
    namespace: str = option("default", "Kubernetes namespace of the pods, Deployment and Lease")
    service: str = option("sd-webui", "Service whose EndpointSlices list the pods")
    port_name: str = option("", "EndpointSlice port name to use ('' = the first port)")
    kubeconfig: str = option("", "kubeconfig path ('' = in-cluster account, else $KUBECONFIG)")
    health_interval_s: float = option(
        2.0, "active health check of every pod this often (0 turns them off)", min=0
    )
    health_timeout_s: float = option(2.0, "a health check not answered within this fails", gt=0)
    light_timeout_s: float = option(
        30.0, "a light or job-bound call a pod has not begun to answer by then: eject, retry", gt=0
    )
    warmup_timeout_s: float = option(600.0, "how long one warm-up (model load included) may take")


@dataclass(frozen=True, kw_only=True)
class ScalerSettings:
    """Who acts on the desired pod count, the policy's knobs and leader election."""

    scaler: Literal["none", "local", "kubernetes"] = option(
        "none", "who acts on the desired pod count (none: only export sdproxy_desired_pods)"
    )
    deployment: str = option("sd-webui", "Deployment to scale")
    #: the policy's knobs (min_pods ... max_scale_step): the core's own config is the group
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    scale_interval_s: float = option(1.0, "how often the autoscaling policy runs", gt=0)
    predict_state: str = option(
        "", "--predict: JSON file the learned arrival forecast is kept in ('': memory only)"
    )
    lease_name: str = option("sdproxy-leader", "coordination.k8s.io/v1 Lease for leader election")
    lease_duration_s: float = option(15.0, "Lease duration (renewed every third of it)")
    identity: str = option(
        "",
        "this replica's identity in the Lease",
        default_from=_pod_identity,
        shown_default="$POD_NAME or hostname",
    )
    local_base_port: int = option(7860, "local scaler: first port for simulated pods")
    local_startup_s: float = option(5.0, "local scaler: simulated model-load time")
    local_step_ms: float = option(20.0, "local scaler: simulated ms per 512x512 step")
    local_gates: bool = option(
        False, "local scaler: an sdproxy gate in front of each simulated pod", switch=True
    )
    local_ui: bool = option(
        False,
        "local scaler: simulated pods serve the browser UI too (sim --ui; the ui extra)",
        switch=True,
    )


@dataclass(frozen=True, kw_only=True)
class JobSettings:
    """The asynchronous job API: where jobs are kept, for how long, and their callbacks."""

    jobs_dir: str = option(
        "",
        "directory of the job store (SQLite records, bodies, results; a volume in Kubernetes)",
        shown_default="$XDG_STATE_HOME/sdproxy/jobs/HOST-PORT (a temporary one on port 0)",
        metavar="PATH",
    )
    jobs_ttl_s: float = option(
        3600.0, "a finished job's result is kept this long (then 410 job_expired)", gt=0
    )
    jobs_max_mb: float = option(
        1024.0, "bound of the job store's files in MiB: the oldest finished results go first", gt=0
    )
    callback_secret: str = option(
        "", "HMAC-SHA256 key signing callbacks (X-Sdproxy-Signature); '' refuses callbacks"
    )
    callback_allow: tuple[str, ...] = option(
        (),
        "callback destination allowed, a host name or CIDR (repeatable; none: any public address)",
        metavar="HOST|CIDR",
    )
    callback_retry_s: float = option(
        300.0, "a failing callback is retried with backoff for this long", min=0
    )


@dataclass(frozen=True, kw_only=True)
class LogSettings:
    """Log lines: level, format, and the access log."""

    log_level: str = option("info", "debug | info | warning | error")
    log_format: Literal["json", "text"] = option("text", "text for terminals, json: one per line")
    access_log: bool = option(True, "one line per request (true|false)")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything ``sdproxy serve`` is configured with, one group per concern."""

    proxy: ProxySettings = field(default_factory=ProxySettings)
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
    scaler: ScalerSettings = field(default_factory=ScalerSettings)
    jobs: JobSettings = field(default_factory=JobSettings)
    log: LogSettings = field(default_factory=LogSettings)


@dataclass(frozen=True, kw_only=True)
class GateOptions:
    """``sdproxy gate``: the sidecar in front of one sd-webui pod."""

    listen: HostPort = option(
        HostPort(host="127.0.0.1", port=7861), "where the gate listens (the pod's port for sdproxy)"
    )
    upstream: str = option(
        "http://127.0.0.1:7860", "the pod's own sd-webui base URL", parse=parse_url, metavar="URL"
    )
    max_inflight: int = option(1, "heavy requests this pod runs at once (sd-webui: 1)", min=1)
    max_body_mb: float = option(64.0, "request body limit in MiB (then 413)", gt=0)
    connect_timeout_s: float = option(5.0, "TCP connect timeout towards sd-webui")
    backend_timeout_s: float = option(1800.0, "longest sd-webui may stay silent while answering")
    route: tuple[str, ...] = option(
        (),
        "extra classification rule 'METHOD /path/prefix=heavy|light|job|admin' (repeatable)",
        toml_alias="routes",
    )
    ui: bool = option(
        False,
        "pass sd-webui's browser UI through (websockets relayed); a UI generation claims "
        "the slot while it runs",
        switch=True,
    )
    ui_api_prefix: tuple[str, ...] = option(
        (), "with --ui: path prefix of an extension's API (repeatable; /sdapi/ always is)"
    )


@dataclass(frozen=True, kw_only=True)
class GateSettings:
    """Everything ``sdproxy gate`` is configured with."""

    gate: GateOptions = field(default_factory=GateOptions)
    log: LogSettings = field(default_factory=LogSettings)


_OPTIONS_OF: dict[type[Any], tuple[Option, ...]] = {}


def options_of(root: type[Any]) -> tuple[Option, ...]:
    """Every option of a command's settings root; a name declared twice is an error."""
    if root not in _OPTIONS_OF:
        found = tuple(options(root))
        names = [opt.name for opt in found]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise TypeError(f"options declared twice: {', '.join(doubled)}")
        _OPTIONS_OF[root] = found
    return _OPTIONS_OF[root]


OPTIONS: tuple[Option, ...] = options_of(Settings)


# --- command line, environment, TOML -----------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, root: type[Any] = Settings) -> None:
    """Register ``--config`` and every option, one argument group per settings group."""
    parser.add_argument(
        "--config", metavar="PATH", help=f"TOML file with settings [env {ENV_PREFIX}CONFIG]"
    )
    hints = get_type_hints(root)
    for group in dataclasses.fields(root):
        section = parser.add_argument_group(f"{group.name} settings")
        for opt in options(hints[group.name]):
            add_option(section, opt)


#: the range of a tenant's weight (its share against others: a ratio of 10^6 at most)
MIN_WEIGHT, MAX_WEIGHT = 0.001, 1000.0

#: the keys of one [tenants.<name>] table, with their types
_TENANT_KEYS: dict[str, type | tuple[type, ...]] = {
    "keys": list,
    "weight": (int, float),
    "max_queued": int,
    "max_running": int,
    "max_priority": str,
}


def parse_tenants(path: str, tables: object) -> tuple[Tenant, ...]:
    """``[tenants.<name>] keys = [...], weight = 1.0, max_queued = 1000, max_running = 0,
    max_priority = "high"``: every key checked, and no API key given to two tenants."""
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: [tenants] must be tables [tenants.<name>]")
    out: list[Tenant] = []
    owner: dict[str, str] = {}
    for name, table in tables.items():
        where = f"{path}: [tenants.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = sorted(set(table) - set(_TENANT_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown keys {', '.join(unknown)}")
        for key, kind in _TENANT_KEYS.items():
            value = table.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                raise ConfigError(f"{where}: {key} has the wrong type ({value!r})")
        keys = table.get("keys", [])
        if not all(isinstance(k, str) and k for k in keys):
            raise ConfigError(f"{where}: keys must be non-empty strings")
        if any(k != k.strip() for k in keys):  # a header's value arrives stripped
            raise ConfigError(f"{where}: a key starts or ends with spaces: it never matches")
        for key in keys:
            if key in owner:
                raise ConfigError(f"{where}: a key of tenant {owner[key]!r} is given again")
            owner[key] = name
        weight = float(table.get("weight", 1.0))
        max_queued = table.get("max_queued", 1000)
        max_running = table.get("max_running", 0)
        priority = table.get("max_priority", "high")
        # bounded: an infinite or denormal weight makes the fair queue's tags inf, then NaN
        if not MIN_WEIGHT <= weight <= MAX_WEIGHT or max_queued < 0 or max_running < 0:
            raise ConfigError(
                f"{where}: weight must be from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, "
                "max_queued and max_running >= 0"
            )
        if priority not in Priority.BY_NAME:
            raise ConfigError(f"{where}: max_priority must be high, normal or low")
        out.append(
            Tenant(
                name=name,
                keys=tuple(keys),
                weight=weight,
                max_queued=max_queued,
                max_running=max_running,
                max_priority=Priority.BY_NAME[priority],
            )
        )
    return tuple(out)


def _read_toml(path: str | None, known: tuple[Option, ...]) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with Path(path).open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    tenants = parse_tenants(path, data.pop("tenants")) if "tenants" in data else ()
    flat: dict[str, Any] = {}
    for key, value in data.items():  # allow [sections] for readability; keys stay global
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    aliases = {o.metadata["toml_alias"]: o.name for o in known if "toml_alias" in o.metadata}
    unknown = sorted(set(flat) - {opt.name for opt in known} - set(aliases))
    if unknown:
        raise ConfigError(f"unknown keys in {path}: {', '.join(unknown)}")
    out = {aliases.get(key, key): value for key, value in flat.items()}
    if tenants:
        out[_TENANTS] = tenants
    return out


#: where ``resolve`` carries the parsed [tenants] tables (not an option: no flag, no env)
_TENANTS = "tenants"


def resolve(
    namespace: argparse.Namespace,
    env: Mapping[str, str] | None = None,
    root: type[Any] = Settings,
) -> dict[str, Any]:
    """Merge flags > environment > TOML > defaults into one flat dict of typed values."""
    env = os.environ if env is None else env
    known = options_of(root)
    config_path = getattr(namespace, "config", None) or env.get(ENV_PREFIX + "CONFIG")
    toml = _read_toml(config_path, known)
    merged: dict[str, Any] = {}
    for opt in known:
        value = getattr(namespace, opt.name, None)
        if value is None:
            value = from_env(opt, env)
        if value is None:
            value = toml.get(opt.name)
        value = opt.default if value is None else convert(opt, value)
        default_from = opt.metadata.get("default_from")
        if default_from is not None and not value:
            value = default_from(env)
        merged[opt.name] = value
    if _TENANTS in toml:
        merged[_TENANTS] = toml[_TENANTS]
    return merged


def build(values: Mapping[str, Any]) -> Settings:
    """Check the merged values (bounds, rules spanning options) and group them."""
    for opt in OPTIONS:
        check_bounds(opt, values[opt.name])
    if values["max_pods"] < values["min_pods"]:
        raise ConfigError("--max-pods must be >= --min-pods")
    if values["discovery"] == "static" and values["scaler"] != "local" and not values["backend"]:
        raise ConfigError("static discovery needs at least one --backend URL")
    if values["peer_service"] and values["discovery"] != "kubernetes":
        raise ConfigError("--peer-service needs --discovery kubernetes")
    # hold requests while no pod is ready when pods can still come: an autoscaler of ours,
    # or Kubernetes (KEDA/HPA scale the Deployment from our sdproxy_desired_pods)
    hold = values["discovery"] == "kubernetes" or values["scaler"] != "none"
    # no job holds a slot longer than a pod may stay silent: the most one adds to an ETA
    derived = {
        "hold_when_empty": hold,
        "max_job_s": values["backend_timeout_s"],
        "tenants": values.get(_TENANTS, ()),
    }
    return from_values(Settings, {**values, **derived})


def load(namespace: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Settings for ``sdproxy serve`` from parsed flags, the environment and --config."""
    return build(resolve(namespace, env))


def load_gate(namespace: argparse.Namespace, env: Mapping[str, str] | None = None) -> GateSettings:
    """Settings for ``sdproxy gate`` (same sources and rules as ``serve``)."""
    values = resolve(namespace, env, GateSettings)
    for opt in options_of(GateSettings):
        check_bounds(opt, values[opt.name])
    return from_values(GateSettings, values)


def flag_names() -> Sequence[str]:
    """Every flag ``sdproxy serve`` accepts (used by the manifest tests)."""
    return ["--config", *(opt.flag for opt in OPTIONS)] + [
        "--no-" + opt.flag[2:] for opt in OPTIONS if opt.switch
    ]

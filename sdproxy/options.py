"""Options from dataclass fields: the mechanism behind ``sdproxy.settings``.

A setting is a field of a frozen dataclass whose ``metadata`` holds its help text
(``option()`` builds such a field; a core config writes ``field(metadata={"help": ...})``,
plain data, and never imports this module). ``options(cls)`` yields one ``Option`` per such
field, and everything about it is derived from the field, with no renames on the way:

- the field name is the option name: flag ``--max-inflight``, environment variable
  ``SDPROXY_MAX_INFLIGHT``, TOML key ``max_inflight``;
- the field type gives the parser: ``int``, ``float``, ``str``, ``bool``, ``HostPort``,
  ``Literal[...]`` (choices), ``X | None`` (``''`` means None) and ``tuple[X, ...]``
  (a repeatable flag, comma-separated in the environment, an array in TOML);
- the field default is the default, and ``--help`` shows it.

A field whose type is a dataclass and that has no help is a nested group: its fields are
options too. A field that is not an option says so, ``metadata={"derived": "from what"}``:
it gets no flag, and whoever builds the group supplies it (``from_values`` takes it from
the values under its name, else its default). A field with neither is an error, not a
silently missing flag. So any core config class becomes a settings group by adding
``help`` metadata to its fields, as ``AutoscaleConfig`` did.

Metadata keys: ``help`` (what makes a field an option), ``min`` / ``gt`` (inclusive /
exclusive lower bound), ``switch`` (a bool given as ``--x`` / ``--no-x`` instead of
``--x true|false``), ``parse`` (a str -> value check for str options, e.g. URLs),
``toml_alias`` (a second TOML key), ``metavar`` (the placeholder in ``--help``),
``default_from`` (a function of the environment giving the value when it is empty) and
``shown_default`` (the default as ``--help`` shows it).

Every error names the flag (``--listen: port 99999 out of range (0-65535)``): values are
parsed and checked here, whatever their source, so a bad one stops start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import re
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)
from urllib.parse import urlsplit

from sdproxy.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ENV_PREFIX = "SDPROXY_"
T = TypeVar("T")
G = TypeVar("G", bound="DataclassInstance")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


@dataclass(frozen=True, kw_only=True)
class HostPort:
    """A listen address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _listen_host(text: str) -> str:
    if text == "":
        return "0.0.0.0"
    if text.startswith("[") and text.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            raise ConfigError(f"bad IPv6 address {text!r}") from None
    if not _HOSTNAME.fullmatch(text):
        raise ConfigError(f"bad host {text!r} (expected a name, an IPv4 address or [IPv6])")
    return text


def parse_hostport(text: str) -> HostPort:
    """``HOST:PORT``; an empty host listens on every address, an IPv6 one is in brackets."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"port {port} out of range (0-65535)")
    return HostPort(host=_listen_host(host), port=int(port))


def parse_url(text: str) -> str:
    """A pod's base URL: http or https, a host, a port in range if given; the trailing
    slash is dropped (request paths are appended to it)."""
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. an unclosed [IPv6
        raise ConfigError(f"not a URL: {text!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"expected an http:// or https:// URL, got {text!r}")
    if not parts.hostname or any(c.isspace() for c in text):
        raise ConfigError(f"no valid host in {text!r}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raw = parts.netloc.rpartition(":")[2]
        why = "out of range (1-65535)" if raw.lstrip("-").isdigit() else "is not a number"
        raise ConfigError(f"port {raw} {why} in {text!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"a base URL takes no query or fragment, got {text!r}")
    return text.rstrip("/")


def split_weight(text: str) -> tuple[str, float]:
    """A backend URL with an optional ``#weight=N`` (the pod's relative GPU speed, the
    first guess of its rate: 2 = twice as fast as weight 1) -> (base URL, weight)."""
    base, sep, fragment = text.partition("#")
    if not sep:
        return text, 1.0
    name, eq, value = fragment.partition("=")
    try:
        weight = float(value) if name == "weight" and eq else -1.0
    except ValueError:
        weight = -1.0
    if not 0 < weight < float("inf"):
        raise ConfigError(f"expected #weight=N (N > 0) after a backend URL, got {text!r}")
    return base, weight


def parse_backend_url(text: str) -> str:
    """A pod's base URL (``parse_url``), optionally followed by ``#weight=N``."""
    base, weight = split_weight(text)
    url = parse_url(base)
    return url if weight == 1.0 and "#" not in text else f"{url}#weight={weight:g}"


def option(default: T, help: str, **meta: Any) -> T:
    """A settings field: an option with this default and help text (``meta``: the other
    metadata keys of the module docstring)."""
    return field(default=default, metadata={"help": help, **meta})


# --- parsing one value -------------------------------------------------------------------
# Strings (flags, environment, TOML) are parsed; other TOML values must already have the
# option's type: int(2.5) would silently give 2, int(True) 1.


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise TypeError(type(value).__name__)
    low = value.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"expected a boolean, got {value!r}")


def _int(value: Any) -> int:
    if isinstance(value, str):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(type(value).__name__)
    return value


def _float(value: Any) -> float:
    if isinstance(value, str):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(type(value).__name__)
    return float(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(type(value).__name__)
    return value


def _hostport(value: Any) -> HostPort:
    return parse_hostport(_text(value))


_METAVARS: dict[Any, str] = {bool: "BOOL", int: "N", float: "NUMBER", HostPort: "HOST:PORT"}
_PARSERS: dict[Any, Callable[[Any], Any]] = {
    bool: _bool,
    int: _int,
    float: _float,
    str: _text,
    HostPort: _hostport,
}


# --- options from dataclass fields -------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Option:
    """One setting, derived from its dataclass field."""

    name: str  # the field name = TOML key; flag and env name derive from it
    help: str
    default: Any
    parse: Callable[[Any], Any]  # one value (one element of a list option)
    is_list: bool = False
    optional: bool = False  # '' means None
    switch: bool = False
    choices: tuple[str, ...] = ()
    metavar: str | None = None  # None: argparse's (the choices, or the name upper-cased)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def shown_default(self) -> str:
        """The default as ``--help`` and the README show it."""
        value = self.default
        if "shown_default" in self.metadata:
            return str(self.metadata["shown_default"])
        if self.switch:
            return "on" if value else "off"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        if isinstance(value, tuple):
            return ",".join(value) or "none"
        return "''" if value == "" or value is None else str(value)


def _shape(hint: Any) -> tuple[Any, bool, bool]:
    """(element type, is a list, may be None) of a field type."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0], True, False
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None)), False, True
    return hint, False, False


def _option(f: dataclasses.Field[Any], hint: Any) -> Option:
    element, is_list, optional = _shape(hint)
    choices: tuple[str, ...] = ()
    parse: Callable[[Any], Any]
    if get_origin(element) is Literal:
        parse, choices = _text, tuple(get_args(element))
    elif element in _PARSERS:
        parse = _PARSERS[element]
    else:
        raise TypeError(f"option {f.name}: no parser for {hint!r}")
    check = f.metadata.get("parse")
    if check is not None:
        parse = _then(parse, check)
    if f.default is dataclasses.MISSING:
        raise TypeError(f"option {f.name} needs a default")
    return Option(
        name=f.name,
        help=f.metadata["help"],
        default=f.default,
        parse=parse,
        is_list=is_list,
        optional=optional,
        switch=bool(f.metadata.get("switch")) and element is bool,
        choices=choices,
        metavar=f.metadata.get("metavar", _METAVARS.get(element)),
        metadata=f.metadata,
    )


def _then(first: Callable[[Any], Any], second: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: second(first(value))


def _is_group(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def options(cls: type) -> Iterator[Option]:
    """The options of a frozen dataclass, in field order, nested groups included.

    A field with ``metadata["help"]`` is an option; one with ``metadata["derived"]`` is
    skipped; one whose type is a dataclass is a group whose options follow; anything else
    is an error.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if not _is_group(cls) or params is None or not params.frozen:
        raise TypeError(f"{cls!r} is not a frozen dataclass")
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            yield _option(f, hints[f.name])
        elif "derived" in f.metadata or not f.init:
            continue
        elif _is_group(hints[f.name]):
            yield from options(hints[f.name])
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: give it metadata help or mark it derived")


def from_values(cls: type[G], values: Mapping[str, Any]) -> G:
    """An instance of the group ``cls`` (nested groups recursively) from flat values keyed
    by option name; a field missing from ``values`` keeps its default. A ValueError from
    the group's own checks (a core config's ``__post_init__``) becomes a ConfigError."""
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if "help" in f.metadata or "derived" in f.metadata:
            if f.name in values:
                kwargs[f.name] = values[f.name]
        elif f.init and _is_group(hints[f.name]):
            kwargs[f.name] = from_values(hints[f.name], values)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc


# --- the command line, the environment, checks ------------------------------------------


def help_text(opt: Option) -> str:
    """The ``--help`` line: help, default and environment name."""
    text = f"{opt.help} (default: {opt.shown_default}) [env {opt.env}]"
    return text.replace("%", "%%")  # argparse %-formats help strings


def add_option(parser: argparse._ActionsContainer, opt: Option) -> None:
    """Register ``opt`` as a flag whose absence means 'not given' (None)."""
    kwargs: dict[str, Any] = {"default": None, "help": help_text(opt)}
    if opt.switch:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif opt.is_list:
        kwargs["action"] = "append"
    if opt.choices:
        kwargs["choices"] = opt.choices
    elif opt.metavar and not opt.switch:
        kwargs["metavar"] = opt.metavar
    parser.add_argument(opt.flag, dest=opt.name, **kwargs)


def from_env(opt: Option, env: Mapping[str, str]) -> Any:
    """The option's raw value in the environment (a list splits at commas), or None."""
    raw = env.get(opt.env)
    if raw is None:
        return None
    if opt.is_list:
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


def convert(opt: Option, value: Any) -> Any:
    """A given value parsed as the option's type; errors name the flag."""
    try:
        if opt.is_list:
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list | tuple):
                raise TypeError(type(value).__name__)
            converted: Any = tuple(opt.parse(v) for v in items)
        elif opt.optional and value == "":
            return None
        else:
            converted = opt.parse(value)
    except ConfigError as exc:
        raise ConfigError(f"{opt.flag}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{opt.flag}: invalid value {value!r}") from exc
    if opt.choices and converted not in opt.choices:
        raise ConfigError(f"{opt.flag}: expected one of {', '.join(opt.choices)}")
    return converted


def check_bounds(opt: Option, value: Any) -> None:
    """The ``min`` / ``gt`` metadata bound, checked with the flag named."""
    low, above = opt.metadata.get("min"), opt.metadata.get("gt")
    if low is not None and value < low:
        raise ConfigError(f"{opt.flag} must be >= {low}, got {value}")
    if above is not None and not value > above:
        raise ConfigError(f"{opt.flag} must be > {above}, got {value}")

"""Core: classify a request into a route class (see docs/sd-webui.md, "Routes").

The table is data: built-in rules plus user rules ("METHOD /path/prefix=class") from the
settings, checked first-match in order of decreasing prefix length, so a user rule can
override a built-in one for the same prefix. Classes:

- heavy: takes a GPU slot (txt2img, img2img, extras, interrogate, refresh-*, options that
  change sd_model_checkpoint, any unknown POST — sd-webui extensions such as ControlNet
  run on the GPU and default to heavy)
- light: forwarded at once to the least loaded ready pod (reads, png-info)
- job: bound to the pod that runs the caller's job (progress, interrupt, skip)
- admin: unsafe mid-generation (train/*, server-*, unload/reload-checkpoint): 403 unless
  explicitly enabled
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from sdproxy.errors import ConfigError


class RouteClass(StrEnum):
    HEAVY = "heavy"
    LIGHT = "light"
    JOB = "job"
    ADMIN = "admin"
    PROXY = "proxy"  # the proxy's own /-/ endpoints (for metrics labels)


@dataclass(frozen=True, kw_only=True)
class Rule:
    method: str  # "GET", "POST", … or "*"
    prefix: str  # path prefix; an exact path matches itself
    route_class: RouteClass


def _rules(method: str, route_class: RouteClass, names: Iterable[str]) -> list[Rule]:
    return [Rule(method=method, prefix=f"/sdapi/v1/{n}", route_class=route_class) for n in names]


# modules/api/api.py (sd-webui v1.10): add_api_route(...) calls.
BUILTIN_RULES: tuple[Rule, ...] = (
    *_rules(
        "POST",
        RouteClass.HEAVY,
        [
            "txt2img",
            "img2img",
            "extra-single-image",
            "extra-batch-images",
            "interrogate",
            "refresh-checkpoints",
            "refresh-vae",
            "refresh-embeddings",
        ],
    ),
    *_rules("POST", RouteClass.LIGHT, ["png-info", "refresh-loras"]),
    *_rules("GET", RouteClass.JOB, ["progress"]),
    *_rules("POST", RouteClass.JOB, ["interrupt", "skip"]),
    *_rules(
        "POST",
        RouteClass.ADMIN,
        ["train/", "create/", "unload-checkpoint", "reload-checkpoint", "server-"],
    ),
    Rule(method="GET", prefix="/", route_class=RouteClass.LIGHT),
    Rule(method="HEAD", prefix="/", route_class=RouteClass.LIGHT),
    Rule(method="OPTIONS", prefix="/", route_class=RouteClass.LIGHT),
    Rule(method="*", prefix="/", route_class=RouteClass.HEAVY),
)

OPTIONS_PATH = "/sdapi/v1/options"
#: distinct (method, path) pairs whose class is remembered; emptied when full
CACHE_SIZE = 1024


def parse_rule(text: str) -> Rule:
    """Parse a user rule 'METHOD /path/prefix=class' (e.g. 'POST /controlnet/detect=light')."""
    head, sep, cls = text.rpartition("=")
    parts = head.split()
    if not sep or len(parts) != 2 or not parts[1].startswith("/"):
        raise ConfigError(f"route rule {text!r}: expected 'METHOD /path/prefix=class'")
    try:
        route_class = RouteClass(cls.strip().lower())
    except ValueError as exc:
        raise ConfigError(f"route rule {text!r}: class must be heavy|light|job|admin") from exc
    if route_class is RouteClass.PROXY:
        raise ConfigError(f"route rule {text!r}: class must be heavy|light|job|admin")
    return Rule(method=parts[0].upper(), prefix=parts[1], route_class=route_class)


class RouteTable:
    """First match wins, longest prefix first; user rules beat built-ins on equal prefix."""

    def __init__(self, user_rules: Sequence[Rule] = ()) -> None:
        ordered = [*user_rules, *BUILTIN_RULES]
        # stable sort keeps user rules ahead of built-ins with the same prefix length
        self._rules = sorted(ordered, key=lambda r: -len(r.prefix))
        #: (method, path) -> class; a client polls the same few paths over and over, and
        #: the linear scan over ~25 rules showed in the proxy's profile (bench overhead)
        self._cache: dict[tuple[str, str], RouteClass] = {}
        #: a user rule covering POST options decides it without reading the body
        self._options_by_body = not any(
            r.method in ("*", "POST") and OPTIONS_PATH.startswith(r.prefix) and r.prefix != "/"
            for r in user_rules
        )

    @classmethod
    def from_strings(cls, texts: Iterable[str]) -> RouteTable:
        return cls([parse_rule(t) for t in texts])

    def classify(self, method: str, path: str) -> RouteClass:
        """The class of a request by method and path (checkpoint options are separate)."""
        key = (method, path)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        route_class = self._match(method.upper(), path)
        if len(self._cache) >= CACHE_SIZE:  # bounded: paths come from clients
            self._cache.clear()
        self._cache[key] = route_class
        return route_class

    def _match(self, method: str, path: str) -> RouteClass:
        for rule in self._rules:
            if rule.method not in ("*", method):
                continue
            if path == rule.prefix or path.startswith(rule.prefix):
                return rule.route_class
        return RouteClass.HEAVY  # unreachable: the "*" catch-all matches every path

    def needs_body_to_classify(self, method: str, path: str) -> bool:
        """POST /sdapi/v1/options is heavy only if it changes sd_model_checkpoint (unless
        a user rule classifies it)."""
        return self._options_by_body and method.upper() == "POST" and path == OPTIONS_PATH


def classify_options(body_keys: Iterable[str], *, complete: bool = True) -> RouteClass:
    """POST options reloads weights (takes sd-webui's queue_lock) when it sets a checkpoint;
    a body too large to read whole is treated as heavy (the safe side)."""
    if not complete:
        return RouteClass.HEAVY
    return RouteClass.HEAVY if "sd_model_checkpoint" in set(body_keys) else RouteClass.LIGHT

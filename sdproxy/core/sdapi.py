"""Core: read what the scheduler needs from an sd-webui API request body, within a bound.

Heavy bodies can be many MB (img2img ``init_images`` are base64). The runtime reads at most
a bounded prefix before queueing; ``inspect_body`` extracts the top-level scalar fields
that drive cost (steps, width, height, batch_size, n_iter, enable_hr, …) and the requested
checkpoint (``override_settings.sd_model_checkpoint``, or ``sd_model_checkpoint`` for POST
options), keyed by file name (``checkpoint_key``). A complete body is parsed with ``json``;
a truncated one with a tokenizer that skips long strings in C (the regex engine) and tracks
nesting, so a 10 MB base64 value costs one regex match, and keys nested in scripts' args are
never mistaken for top-level ones.

Bounded, never recursive: Python's ``json`` parser recurses once per level of nesting and
raises RecursionError near a thousand (``[`` × 1500 is a 1.5 KB body), so a complete body
nested deeper than ``MAX_DEPTH`` (no sd-webui request comes near it: alwayson_scripts →
script → args → a unit is four) is not handed to it: the tokenizer reads it instead, in
constant state whatever the depth, and the body is forwarded unchanged — sd-webui answers
such a body with its own error (FastAPI's 400); the proxy only schedules it with what it
could read. A checkpoint name over ``MAX_CHECKPOINT_CHARS`` is no checkpoint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from sdproxy.core.cost import read_bool

# Strings (with escapes), punctuation, bare literals (numbers, true/false/null), and a lone
# quote: the opening of a string the prefix cut off (the string alternative failed on it).
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+|"', re.DOTALL)
_NESTED_OF_INTEREST = "override_settings"
#: deepest nesting of arrays and objects a complete body may have to be parsed by ``json``
MAX_DEPTH = 64
#: longest checkpoint name (title, file name, model_name) the proxy tracks: a file name is
#: at most 255 bytes on Linux, a title adds " [shorthash]"; a longer one is no checkpoint
#: (it comes from the client and would end up in /-/status and a metric label)
MAX_CHECKPOINT_CHARS = 256
#: a string (a cut one runs to the end) and anything but brackets: what ``_too_deep`` drops
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
#: modules/sd_models.py re_strip_checksum: a title's trailing " [hash]"
_CHECKSUM = re.compile(r"\s*\[[^]]+]\s*$")
#: the checkpoint files sd-webui lists (modules/sd_models.py list_models ext_filter)
_CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt")


@dataclass(frozen=True, kw_only=True)
class BodyInfo:
    """What the proxy learned from a body (fields may be partial for a truncated body)."""

    #: top-level scalar fields (str, int, float, bool, None)
    fields: Mapping[str, Any]
    #: checkpoint the request needs, if it names one, as ``checkpoint_key`` of its name
    checkpoint: str | None
    #: whether the body was seen whole and was a JSON object
    complete: bool
    #: whether the pod goes back to its default checkpoint after the job: sd-webui's
    #: ``override_settings_restore_afterwards`` (default true); False for a checkpoint set
    #: through POST options (``sd_model_checkpoint`` at the top level), which stays
    restore: bool = True


def _scalar(token: str) -> tuple[bool, Any]:
    if len(token) > 256:  # a scalar the scheduler cares about is short; skip blobs
        return False, None
    try:
        return True, json.loads(token)
    except ValueError:
        return False, None


def _key(token: str) -> str | None:
    if "\\" not in token:
        return token[1:-1]
    try:  # an invalid escape is the client's problem, not a reason to fail here
        key: str = json.loads(token)
    except ValueError:
        return None
    return key


@dataclass(kw_only=True)
class _Scanned:
    #: top-level scalars, and override_settings' scalars
    top: dict[str, Any] = field(default_factory=dict)
    nested: dict[str, Any] = field(default_factory=dict)
    #: every top-level key, whatever its value
    keys: set[str] = field(default_factory=set)


def _scan(text: str) -> _Scanned:
    """What a JSON text (whole or a prefix) says at the top level and in override_settings,
    one token at a time in constant state: nesting is a counter, not a stack, so no depth
    costs more than its bytes."""
    out = _Scanned()
    depth = 0
    inner: str | None = None  # the key whose value is the depth-2 container being read
    key: str | None = None
    expect_value = False
    for match in _TOKEN.finditer(text):
        tok = match.group()
        if tok == '"' or (match.end() == len(text) and tok[0] not in '"{}[]:,'):
            break  # the rest is inside a cut string, or a literal the cut shortened (12 of 120)
        if tok in "{[":
            depth += 1
            if depth == 2:
                inner = key if expect_value else None
            key, expect_value = None, False
        elif tok in "}]":
            depth -= 1
            key, expect_value = None, False
        elif tok == ":":
            expect_value = key is not None
            if key is not None and depth == 1:
                out.keys.add(key)
        elif tok == ",":
            key, expect_value = None, False
        elif expect_value and key is not None:
            ok, value = _scalar(tok)
            in_override = depth == 2 and inner == _NESTED_OF_INTEREST
            target = out.top if depth == 1 else out.nested if in_override else None
            if ok and target is not None:
                target.setdefault(key, value)
            key, expect_value = None, False
        elif tok.startswith('"') and depth in (1, 2):
            key = _key(tok)
    return out


def _too_deep(text: str) -> bool:
    """Whether a JSON text nests arrays and objects deeper than ``MAX_DEPTH`` (outside
    strings), found without recursion: the brackets left once strings are cut out, summed
    as +1/-1 (the loops run in C; most bodies need only the two counts)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0) > MAX_DEPTH


def checkpoint_key(name: str) -> str | None:
    """One key for every way a request names the same checkpoint file.

    sd-webui titles a checkpoint "name.safetensors" until the pod has hashed it (its first
    load there) and "name.safetensors [shorthash]" after, so titles differ between pods and
    over time; requests may also give the name or its ``model_name`` (extension dropped,
    "/" and "\\" as "_"). All of those map to the ``model_name``: "sub/m.safetensors
    [0123abcd45]", "sub/m.safetensors" and "sub_m" give "sub_m". A bare hash, or the
    basename stem of a file in a sub-folder, cannot be mapped without the pod's list and
    stays a key of its own. None for a blank name, and for one over
    ``MAX_CHECKPOINT_CHARS`` (checked first: the checksum pattern is quadratic on a long
    run of "[").
    """
    if len(name) > MAX_CHECKPOINT_CHARS:
        return None
    stem = _CHECKSUM.sub("", name).strip().lstrip("/\\")
    if stem.lower().endswith(_CHECKPOINT_EXTENSIONS):
        stem = stem.rsplit(".", 1)[0]
    stem = stem.replace("/", "_").replace("\\", "_")
    return stem or None


def _checkpoint(top: Mapping[str, Any], nested: Mapping[str, Any]) -> str | None:
    value = nested.get("sd_model_checkpoint", top.get("sd_model_checkpoint"))
    return checkpoint_key(value) if isinstance(value, str) else None


def _restore(top: Mapping[str, Any], nested: Mapping[str, Any]) -> bool:
    if "sd_model_checkpoint" not in nested and "sd_model_checkpoint" in top:
        return False  # POST options: the new default
    return read_bool(top, "override_settings_restore_afterwards", default=True)


def _info(top: Mapping[str, Any], nested: Mapping[str, Any], *, complete: bool) -> BodyInfo:
    return BodyInfo(
        fields=top,
        checkpoint=_checkpoint(top, nested),
        complete=complete,
        restore=_restore(top, nested),
    )


def inspect_body(data: bytes, *, complete: bool) -> BodyInfo:
    """Inspect a request body (whole, or a bounded prefix when ``complete`` is False).

    A whole body nested deeper than ``MAX_DEPTH`` is read like a prefix (``complete`` is
    False in the answer: it was not parsed as JSON); nothing here raises on any input."""
    text = data.decode("utf-8", errors="replace")
    if complete and not _too_deep(text):
        try:
            doc = json.loads(text) if text.strip() else {}
        except ValueError:
            return BodyInfo(fields={}, checkpoint=None, complete=False)
        if not isinstance(doc, dict):
            return BodyInfo(fields={}, checkpoint=None, complete=False)
        top = {k: v for k, v in doc.items() if not isinstance(v, dict | list)}
        over = doc.get(_NESTED_OF_INTEREST)
        nested = over if isinstance(over, dict) else {}
        return _info(top, nested, complete=True)
    scanned = _scan(text)
    return _info(scanned.top, scanned.nested, complete=False)


def body_keys(data: bytes) -> frozenset[str]:
    """Top-level keys of a small, complete JSON object body (empty if not one); those of
    a body nested deeper than ``MAX_DEPTH`` are read by the tokenizer."""
    text = data.decode("utf-8", errors="replace")
    if _too_deep(text):
        return frozenset(_scan(text).keys)
    try:
        doc = json.loads(data) if data.strip() else {}
    except ValueError:
        return frozenset()
    return frozenset(doc) if isinstance(doc, dict) else frozenset()

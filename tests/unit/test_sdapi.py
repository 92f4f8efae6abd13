"""Unit: reading cost fields and the checkpoint from sd-webui request bodies, within a bound."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdproxy.core.sdapi import (
    MAX_CHECKPOINT_CHARS,
    MAX_DEPTH,
    BodyInfo,
    body_keys,
    checkpoint_key,
    inspect_body,
)

TXT2IMG: dict[str, Any] = {
    "prompt": 'a lighthouse at dusk, {oil painting}: [detailed], "golden" light',
    "negative_prompt": "",
    "steps": 30,
    "width": 768,
    "height": 512,
    "cfg_scale": 7.5,
    "batch_size": 2,
    "n_iter": 1,
    "enable_hr": True,
    "hr_scale": 2.0,
    "seed": -1,
    "sampler_name": "DPM++ 2M",
    "styles": ["cinematic", "film"],
    "override_settings": {"sd_model_checkpoint": "sdxl_base.safetensors", "CLIP_stop": 2},
    "alwayson_scripts": {
        "controlnet": {"args": [{"steps": 99, "width": 64, "sd_model_checkpoint": "cn"}]},
        "steps": 77,
    },
    "restore_faces": None,
}
TXT2IMG_SCALARS = {k: v for k, v in TXT2IMG.items() if not isinstance(v, dict | list)}


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_complete_body() -> None:
    assert inspect_body(encode(TXT2IMG), complete=True) == BodyInfo(
        fields=TXT2IMG_SCALARS, checkpoint="sdxl_base", complete=True
    )


def test_truncated_scanner_reads_a_whole_body_like_json_does() -> None:
    info = inspect_body(encode(TXT2IMG), complete=False)
    assert info == BodyInfo(fields=TXT2IMG_SCALARS, checkpoint="sdxl_base", complete=False)


@pytest.mark.parametrize(
    "complete", [pytest.param(True, id="complete"), pytest.param(False, id="truncated")]
)
def test_keys_nested_in_alwayson_scripts_are_not_top_level(complete: bool) -> None:
    body = {
        "alwayson_scripts": {"steps": 99, "controlnet": {"args": [{"width": 2048}]}},
        "extra": {"override_settings": {"sd_model_checkpoint": "deep"}},
        "steps": 20,
    }
    info = inspect_body(encode(body), complete=complete)
    assert dict(info.fields) == {"steps": 20}
    assert info.checkpoint is None


def test_truncated_prefix_with_a_huge_base64_init_image() -> None:
    body = {
        "steps": 25,
        "width": 1024,
        "override_settings": {"sd_model_checkpoint": "realistic_v5"},
        "init_images": ["data:image/png;base64," + "iVBORw0KGgo" * 1_000_000],
        "denoising_strength": 0.4,  # after the image: beyond the prefix
        "height": 1024,
    }
    data = encode(body)
    assert len(data) > 10_000_000
    info = inspect_body(data[:65_536], complete=False)
    assert info == BodyInfo(
        fields={"steps": 25, "width": 1024}, checkpoint="realistic_v5", complete=False
    )


def test_long_string_values_are_skipped_only_when_truncated() -> None:
    body = {"prompt": "x" * 1000, "steps": 5}
    assert dict(inspect_body(encode(body), complete=False).fields) == {"steps": 5}
    assert dict(inspect_body(encode(body), complete=True).fields) == body


@pytest.mark.parametrize(
    ("body", "checkpoint"),
    [
        pytest.param({"override_settings": {"sd_model_checkpoint": "a"}}, "a", id="override"),
        pytest.param({"sd_model_checkpoint": "b"}, "b", id="post-options"),
        pytest.param(
            {"sd_model_checkpoint": "b", "override_settings": {"sd_model_checkpoint": "a"}},
            "a",
            id="override-wins",
        ),
        pytest.param({"override_settings": {"sd_model_checkpoint": ""}}, None, id="empty"),
        pytest.param({"override_settings": {"sd_model_checkpoint": 3}}, None, id="not-a-string"),
        pytest.param({"override_settings": {"CLIP_stop": 2}}, None, id="other-override"),
        pytest.param({"override_settings": ["sd_model_checkpoint"]}, None, id="not-an-object"),
        pytest.param({"steps": 20}, None, id="none"),
    ],
)
@pytest.mark.parametrize(
    "complete", [pytest.param(True, id="complete"), pytest.param(False, id="truncated")]
)
def test_checkpoint(body: dict[str, Any], checkpoint: str | None, complete: bool) -> None:
    assert inspect_body(encode(body), complete=complete).checkpoint == checkpoint


@pytest.mark.parametrize(
    "name",
    [
        "v1-5-pruned-emaonly.safetensors [6ce0161689]",  # title once the pod hashed it
        "v1-5-pruned-emaonly.safetensors",  # title before; the file name
        "v1-5-pruned-emaonly",  # model_name
        "v1-5-pruned-emaonly.SAFETENSORS",
        "  v1-5-pruned-emaonly.safetensors [stale-or-other-pods-hash]  ",
    ],
)
def test_checkpoint_key_names_a_file_whatever_the_title(name: str) -> None:
    assert checkpoint_key(name) == "v1-5-pruned-emaonly"


@pytest.mark.parametrize(
    ("name", "key"),
    [
        pytest.param("sdxl/base.safetensors [0123456789]", "sdxl_base", id="sub-folder-title"),
        pytest.param("sdxl/base.safetensors", "sdxl_base", id="sub-folder-name"),
        pytest.param("sdxl\\base.ckpt", "sdxl_base", id="windows-separator"),
        pytest.param("sdxl_base", "sdxl_base", id="its-model-name"),
        pytest.param("/sdxl/base.safetensors", "sdxl_base", id="leading-slash"),
        pytest.param("sd_xl_base_1.0", "sd_xl_base_1.0", id="dot-not-an-extension"),
        pytest.param("sd_xl_base_1.0.safetensors", "sd_xl_base_1.0", id="dot-and-extension"),
        pytest.param("6ce0161689", "6ce0161689", id="a-bare-hash-stays-itself"),
        pytest.param("", None, id="empty"),
        pytest.param(" [6ce0161689] ", None, id="only-a-checksum"),
        pytest.param(".safetensors", None, id="only-an-extension"),
        pytest.param("m" * MAX_CHECKPOINT_CHARS, "m" * MAX_CHECKPOINT_CHARS, id="longest"),
        pytest.param("m" * (MAX_CHECKPOINT_CHARS + 1), None, id="too-long"),
        pytest.param("x" * 250_000 + ".safetensors", None, id="a-250-kb-name"),
        # the checksum pattern backtracks quadratically on "[" runs: ~3 s for this one
        pytest.param("[" * 100_000, None, id="quadratic-for-the-checksum-pattern"),
    ],
)
def test_checkpoint_key(name: str, key: str | None) -> None:
    assert checkpoint_key(name) == key


@pytest.mark.parametrize(
    "complete", [pytest.param(True, id="complete"), pytest.param(False, id="truncated")]
)
def test_titles_with_and_without_a_hash_name_the_same_checkpoint(complete: bool) -> None:
    """What the proxy keys affinity by: the same for every pod, hashed or not yet."""
    names = ["m.safetensors [0123abcd45]", "m.safetensors", "m"]
    keys = {
        inspect_body(
            encode({"override_settings": {"sd_model_checkpoint": n}}), complete=complete
        ).checkpoint
        for n in names
    } | {
        inspect_body(encode({"sd_model_checkpoint": n}), complete=complete).checkpoint
        for n in names
    }
    assert keys == {"m"}


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"{not json", id="garbage"),
        pytest.param(b'{"steps": 20,}', id="trailing-comma"),
        pytest.param(b"[1, 2]", id="array"),
        pytest.param(b'"txt2img"', id="string"),
        pytest.param(b"\xff\xfe{", id="not-utf8"),
    ],
)
def test_invalid_complete_body_yields_nothing(data: bytes) -> None:
    assert inspect_body(data, complete=True) == BodyInfo(fields={}, checkpoint=None, complete=False)


@pytest.mark.parametrize("data", [pytest.param(b"", id="empty"), pytest.param(b" \n", id="ws")])
def test_empty_complete_body_is_an_empty_object(data: bytes) -> None:
    assert inspect_body(data, complete=True) == BodyInfo(fields={}, checkpoint=None, complete=True)


@pytest.mark.parametrize(
    ("prefix", "fields"),
    [
        pytest.param(b"", {}, id="empty"),
        pytest.param(b'{"bad\\q": 1, "steps": 5, ', {"steps": 5}, id="invalid-escape-in-key"),
        pytest.param(b'{"st\\u0065ps": 5, ', {"steps": 5}, id="escaped-key"),
        pytest.param(b'{"steps": 5, "width": 10', {"steps": 5}, id="number-cut-at-the-end"),
        pytest.param(b'{"steps": 5, "enable_hr": tr', {"steps": 5}, id="literal-cut"),
        pytest.param(
            b'{"steps": 5, "prompt": "a \\"b\\", {\\"width\\": 9}, \\"',
            {"steps": 5},
            id="cut-inside-a-string-with-json-inside",
        ),
        pytest.param(b'{"steps": 5, "prompt": "a {\\"wi', {"steps": 5}, id="cut-after-escape"),
        pytest.param(
            b'{"steps": 5, "prompt": "12 cats', {"steps": 5}, id="cut-string-not-a-number"
        ),
        pytest.param(b'{"steps": 5, "init_images": ["iVBOR', {"steps": 5}, id="cut-in-an-image"),
        pytest.param(b'{"steps": 5}}]] "x": 1', {"steps": 5}, id="unbalanced-garbage"),
        pytest.param(b"\xff\xfe{", {}, id="not-utf8"),
    ],
)
def test_truncated_prefix_edge_cases(prefix: bytes, fields: dict[str, Any]) -> None:
    assert inspect_body(prefix, complete=False) == BodyInfo(
        fields=fields, checkpoint=None, complete=False
    )


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(alphabet=st.sampled_from('a1 -.e"\\{}[]:,\n\u00e9'), max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
keys = st.sampled_from(["steps", "width", "prompt", "override_settings", 'q"k', "a\\b"])
documents = st.dictionaries(keys, values, max_size=6)


@settings(max_examples=200, deadline=None)
@given(documents)
def test_every_prefix_yields_only_true_fields(doc: dict[str, Any]) -> None:
    """A cut anywhere never invents a field or a wrong value; the whole body gives them all."""
    data = encode(doc)
    truth = {k: v for k, v in doc.items() if not isinstance(v, dict | list)}
    assert dict(inspect_body(data, complete=False).fields) == truth
    for end in range(len(data)):
        fields = inspect_body(data[:end], complete=False).fields
        assert {k: truth.get(k, "<absent>") for k in fields} == dict(fields), data[:end]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b'{"sd_model_checkpoint": "a", "x": {"y": 1}}', {"sd_model_checkpoint", "x"},
                     id="top-level-only"),
        pytest.param(b"", set(), id="empty"),
        pytest.param(b"{bad", set(), id="invalid"),
        pytest.param(b"[1]", set(), id="array"),
        pytest.param(b"\xff", set(), id="not-utf8"),
    ],
)  # fmt: skip
def test_body_keys(data: bytes, expected: set[str]) -> None:
    assert body_keys(data) == frozenset(expected)


# ---- nesting: bounded and iterative, whatever the depth ------------------------------------

DEEP = 1500  # json.loads raises RecursionError near 1000 levels


def nested_text(openers: list[str], leaf: str = "1") -> str:
    """JSON text of ``leaf`` wrapped in arrays ("[") and objects ("{"), outermost first,
    built as text: json.dumps itself recurses."""
    head = "".join("[" if o == "[" else '{"k[{":' for o in openers)
    tail = "".join("]" if o == "[" else "}" for o in reversed(openers))
    return head + leaf + tail


@pytest.mark.parametrize(
    ("data", "fields", "checkpoint", "keys"),
    [
        pytest.param(b"[" * DEEP, {}, None, set(), id="open-arrays"),
        pytest.param(b'{"a":' * DEEP, {}, None, {"a"}, id="open-objects"),
        pytest.param(nested_text(["["] * DEEP).encode(), {}, None, set(), id="closed-arrays"),
        pytest.param(
            ('{"steps": 5, "x": ' + nested_text(["[", "{"] * (DEEP // 2)) + ', "width": 9, '
             '"override_settings": {"sd_model_checkpoint": "m.safetensors"}}').encode(),
            {"steps": 5, "width": 9}, "m", {"steps", "x", "width", "override_settings"},
            id="fields-around-a-deep-value",
        ),
    ],
)  # fmt: skip
@pytest.mark.parametrize(
    "complete", [pytest.param(True, id="complete"), pytest.param(False, id="truncated")]
)
def test_a_deeply_nested_body_is_read_without_recursion(
    data: bytes, fields: dict[str, Any], checkpoint: str | None, keys: set[str], complete: bool
) -> None:
    """Not handed to json (RecursionError): read by the tokenizer, not parsed (complete is
    False in the answer), the scheduling fields around the deep value still found."""
    assert inspect_body(data, complete=complete) == BodyInfo(
        fields=fields, checkpoint=checkpoint, complete=False
    )
    assert body_keys(data) == frozenset(keys)


@pytest.mark.parametrize(
    ("levels", "parsed"),
    [pytest.param(MAX_DEPTH - 1, True, id="at-the-limit"),
     pytest.param(MAX_DEPTH, False, id="one-over")],
)  # fmt: skip
def test_json_parses_only_bodies_within_the_depth_limit(levels: int, parsed: bool) -> None:
    """The top-level object is level one: a value wrapped ``MAX_DEPTH - 1`` times is at the
    limit. Brackets inside strings do not count."""
    text = '{"p": "[[[[{{{{", "steps": 3, "deep": ' + nested_text(["["] * levels) + "}"
    assert inspect_body(text.encode(), complete=True) == BodyInfo(
        fields={"p": "[[[[{{{{", "steps": 3}, checkpoint=None, complete=parsed
    )


# a depth around the limit or far beyond json's, drawn as a number (hypothesis keeps lists
# short), filled with a repeated pattern of arrays and objects
depths = st.one_of(st.integers(0, MAX_DEPTH + 2), st.integers(900, 2 * DEEP))
patterns = st.lists(st.sampled_from(["[", "{"]), min_size=1, max_size=4)
openers = st.tuples(depths, patterns).map(lambda dp: (dp[1] * dp[0])[: dp[0]])


@settings(max_examples=60, deadline=None)
@given(documents, openers, st.sampled_from(["1", '"]}[{"', "null", "[]", "{}"]), st.data())
def test_any_nesting_yields_the_true_top_level_fields(
    doc: dict[str, Any], wrap: list[str], leaf: str, data: st.DataObject
) -> None:
    """A value nested to any depth (0 to 3000) among ordinary fields: inspection never
    raises, reads every top-level scalar from the whole body and nothing false from a
    prefix, and body_keys names the top-level keys."""
    head = encode(doc)[:-1] if doc else b"{"
    sep = b", " if doc else b""
    body = head + sep + b'"deep": ' + nested_text(wrap, leaf).encode() + b', "tail": 7}'
    truth = {k: v for k, v in doc.items() if not isinstance(v, dict | list)} | {"tail": 7}
    if not wrap and leaf in ("1", "null", '"]}[{"'):
        truth["deep"] = json.loads(leaf)
    depth = 1 + len(wrap) + (leaf in ("[]", "{}"))  # the top-level object is level one
    info = inspect_body(body, complete=True)
    assert dict(info.fields) == truth
    assert info.complete is (depth <= MAX_DEPTH)
    assert dict(inspect_body(body, complete=False).fields) == truth
    assert body_keys(body) == frozenset(doc) | {"deep", "tail"}
    end = data.draw(st.integers(0, len(body)), label="cut")
    fields = inspect_body(body[:end], complete=False).fields
    assert {k: truth.get(k, "<absent>") for k in fields} == dict(fields)

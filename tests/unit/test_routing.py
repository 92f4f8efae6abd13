"""Unit: route classification over sd-webui's API (docs/sd-webui.md, "Routes")."""

from __future__ import annotations

import pytest

from sdproxy.core.routing import RouteClass, RouteTable, Rule, classify_options, parse_rule
from sdproxy.errors import ConfigError

HEAVY, LIGHT, JOB, ADMIN = RouteClass.HEAVY, RouteClass.LIGHT, RouteClass.JOB, RouteClass.ADMIN

LIGHT_GETS = [
    "progress",
    "options",
    "cmd-flags",
    "samplers",
    "schedulers",
    "upscalers",
    "sd-models",
    "sd-vae",
    "hypernetworks",
    "embeddings",
    "memory",
    "scripts",
    "script-info",
    "prompt-styles",
    "face-restorers",
    "realesrgan-models",
    "latent-upscale-modes",
    "extensions",
]

CASES = [
    # heavy: take sd-webui's queue_lock
    *(
        pytest.param("POST", f"/sdapi/v1/{name}", HEAVY, id=f"heavy-{name}")
        for name in (
            "txt2img",
            "img2img",
            "extra-single-image",
            "extra-batch-images",
            "interrogate",
            "refresh-checkpoints",
            "refresh-vae",
            "refresh-embeddings",
        )
    ),
    # light reads (progress is job-bound: it reads the state of ONE pod)
    *(
        pytest.param("GET", f"/sdapi/v1/{name}", JOB if name == "progress" else LIGHT, id=name)
        for name in LIGHT_GETS
    ),
    pytest.param("POST", "/sdapi/v1/png-info", LIGHT, id="png-info"),
    pytest.param("POST", "/sdapi/v1/refresh-loras", LIGHT, id="refresh-loras"),
    pytest.param("HEAD", "/sdapi/v1/sd-models", LIGHT, id="head"),
    pytest.param("OPTIONS", "/sdapi/v1/txt2img", LIGHT, id="cors-preflight"),
    pytest.param("GET", "/", LIGHT, id="ui-root"),
    pytest.param("GET", "/file=outputs/x.png", LIGHT, id="ui-file"),
    # job-bound: must reach the pod running the caller's job
    pytest.param("POST", "/sdapi/v1/interrupt", JOB, id="interrupt"),
    pytest.param("POST", "/sdapi/v1/skip", JOB, id="skip"),
    # admin: unsafe mid-generation
    pytest.param("POST", "/sdapi/v1/train/embedding", ADMIN, id="train-embedding"),
    pytest.param("POST", "/sdapi/v1/train/hypernetwork", ADMIN, id="train-hypernetwork"),
    pytest.param("POST", "/sdapi/v1/create/embedding", ADMIN, id="create-embedding"),
    pytest.param("POST", "/sdapi/v1/unload-checkpoint", ADMIN, id="unload-checkpoint"),
    pytest.param("POST", "/sdapi/v1/reload-checkpoint", ADMIN, id="reload-checkpoint"),
    pytest.param("POST", "/sdapi/v1/server-kill", ADMIN, id="server-kill"),
    pytest.param("POST", "/sdapi/v1/server-restart", ADMIN, id="server-restart"),
    pytest.param("POST", "/sdapi/v1/server-stop", ADMIN, id="server-stop"),
    # unknown POSTs (extensions such as ControlNet run on the GPU) default to heavy
    pytest.param("POST", "/controlnet/detect", HEAVY, id="unknown-post-extension"),
    pytest.param("POST", "/agent-scheduler/v1/queue/txt2img", HEAVY, id="unknown-post-agent"),
    pytest.param("PUT", "/sdapi/v1/whatever", HEAVY, id="unknown-put"),
    pytest.param("DELETE", "/sdapi/v1/sd-models", HEAVY, id="unknown-delete"),
    pytest.param("POST", "/sdapi/v1/options", HEAVY, id="options-post-before-body"),
    # case of the method does not matter
    pytest.param("get", "/sdapi/v1/sd-models", LIGHT, id="lowercase-method"),
    pytest.param("post", "/sdapi/v1/txt2img", HEAVY, id="lowercase-post"),
]


@pytest.mark.parametrize(("method", "path", "expected"), CASES)
def test_builtin_classes(method: str, path: str, expected: RouteClass) -> None:
    assert RouteTable().classify(method, path) is expected


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        pytest.param("POST", "/sdapi/v1/options", True, id="post-options"),
        pytest.param("post", "/sdapi/v1/options", True, id="lowercase"),
        pytest.param("GET", "/sdapi/v1/options", False, id="get-options"),
        pytest.param("POST", "/sdapi/v1/txt2img", False, id="txt2img"),
        pytest.param("POST", "/sdapi/v1/options/x", False, id="not-exact"),
    ],
)
def test_only_post_options_needs_its_body(method: str, path: str, expected: bool) -> None:
    assert RouteTable().needs_body_to_classify(method, path) is expected


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        pytest.param({"sd_model_checkpoint"}, HEAVY, id="checkpoint-reloads-weights"),
        pytest.param({"sd_model_checkpoint", "CLIP_stop_at_last_layers"}, HEAVY, id="mixed"),
        pytest.param({"samples_format"}, LIGHT, id="other-option"),
        pytest.param(set(), LIGHT, id="empty"),
    ],
)
def test_options_heavy_only_when_it_changes_the_checkpoint(
    keys: set[str], expected: RouteClass
) -> None:
    assert classify_options(keys) is expected


@pytest.mark.parametrize(
    ("rules", "method", "path", "expected"),
    [
        pytest.param(["POST /controlnet/detect=light"], "POST", "/controlnet/detect", LIGHT,
                     id="extension-made-light"),
        pytest.param(["POST /controlnet/detect=light"], "POST", "/controlnet/other", HEAVY,
                     id="rule-only-covers-its-prefix"),
        pytest.param(["POST /sdapi/v1/txt2img=light"], "POST", "/sdapi/v1/txt2img", LIGHT,
                     id="beats-builtin-same-prefix"),
        pytest.param(["POST /sdapi/v1/server-=heavy"], "POST", "/sdapi/v1/server-kill", HEAVY,
                     id="admin-made-heavy"),
        pytest.param(["* /sdapi/v1/png-info=heavy"], "POST", "/sdapi/v1/png-info", HEAVY,
                     id="any-method"),
        pytest.param(["GET /agent-scheduler/=job"], "GET", "/agent-scheduler/v1/queue", JOB,
                     id="job-class"),
        pytest.param(["GET /agent-scheduler/=job"], "POST", "/agent-scheduler/v1/queue", HEAVY,
                     id="other-method-untouched"),
        pytest.param(["GET /=heavy"], "GET", "/sdapi/v1/sd-models", HEAVY,
                     id="user-catch-all-beats-builtin-catch-all"),
        pytest.param(["GET /=heavy"], "GET", "/sdapi/v1/progress", JOB,
                     id="longer-builtin-prefix-still-wins"),
        pytest.param(["POST /sdapi/=admin", "POST /sdapi/v1/txt2img=heavy"], "POST",
                     "/sdapi/v1/txt2img", HEAVY, id="longest-prefix-first"),
    ],
)  # fmt: skip
def test_user_rules(rules: list[str], method: str, path: str, expected: RouteClass) -> None:
    assert RouteTable.from_strings(rules).classify(method, path) is expected


def R(method: str, prefix: str, route_class: RouteClass) -> Rule:
    return Rule(method=method, prefix=prefix, route_class=route_class)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("POST /controlnet/detect=light", R("POST", "/controlnet/detect", LIGHT),
                     id="plain"),
        pytest.param("post /x=HEAVY", R("POST", "/x", HEAVY), id="case"),
        pytest.param("  GET   /x = job ", R("GET", "/x", JOB), id="spaces"),
        pytest.param("GET /a=b=admin", R("GET", "/a=b", ADMIN), id="equals-in-path"),
        pytest.param("* /x=light", R("*", "/x", LIGHT), id="any-method"),
    ],
)  # fmt: skip
def test_parse_rule(text: str, expected: Rule) -> None:
    assert parse_rule(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("POST /x", id="no-class"),
        pytest.param("POST /x=", id="empty-class"),
        pytest.param("POST /x=fast", id="unknown-class"),
        pytest.param("POST /x=proxy", id="proxy-class-is-internal"),
        pytest.param("/x=heavy", id="no-method"),
        pytest.param("POST x=heavy", id="path-not-absolute"),
        pytest.param("POST /x /y=heavy", id="too-many-parts"),
    ],
)
def test_bad_rules_raise_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="route rule"):
        parse_rule(text)
    with pytest.raises(ConfigError):
        RouteTable.from_strings(["POST /ok=light", text])


def test_a_user_rule_for_options_is_not_overridden_by_the_body_check() -> None:
    table = RouteTable([parse_rule("POST /sdapi/v1/options=light")])
    assert table.needs_body_to_classify("POST", "/sdapi/v1/options") is False
    assert table.classify("POST", "/sdapi/v1/options") is RouteClass.LIGHT


def test_an_options_body_too_large_to_read_whole_is_heavy() -> None:
    assert classify_options(["sd_vae"], complete=False) is RouteClass.HEAVY

"""Closed JSON schemas for the custom resources the manifests use.

kubernetes-validate ships schemas for built-in kinds only. For the CRDs we write the
subset of the upstream OpenAPI schemas that our manifests may use, CLOSED
(additionalProperties: false), so a misspelt or misplaced field fails as it would with
`kubectl apply --validate=strict` against the installed CRD. Field names and types follow
prometheus-operator's monitoring.coreos.com_{servicemonitors,prometheusrules}.yaml and
KEDA's keda.sh_scaledobjects.yaml; widen a schema here when a manifest needs more.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

# prometheus-operator's Duration pattern
DURATION = {
    "type": "string",
    "pattern": (
        r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
        r"(([0-9]+)ms)?)$"
    ),
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}


def closed(properties: Schema, *, required: tuple[str, ...] = ()) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


METADATA = closed(
    {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    required=("name",),
)

LABEL_SELECTOR = closed(
    {
        "matchLabels": STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": closed(
                {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
                required=("key", "operator"),
            ),
        },
    }
)

RELABELING = closed(
    {
        "action": {"type": "string"},
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "modulus": {"type": "integer"},
    }
)

SERVICE_MONITOR_SPEC = closed(
    {
        "selector": LABEL_SELECTOR,
        "namespaceSelector": closed(
            {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {}}}
        ),
        "jobLabel": {"type": "string"},
        "targetLabels": {"type": "array", "items": {"type": "string"}},
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "sampleLimit": INT32,
        "endpoints": {
            "type": "array",
            "minItems": 1,
            "items": closed(
                {
                    "port": {"type": "string"},
                    "targetPort": {"type": ["integer", "string"]},
                    "path": {"type": "string", "pattern": "^/"},
                    "scheme": {"enum": ["http", "https"]},
                    "interval": DURATION,
                    "scrapeTimeout": DURATION,
                    "honorLabels": {"type": "boolean"},
                    "honorTimestamps": {"type": "boolean"},
                    "params": {"type": "object"},
                    "relabelings": {"type": "array", "items": RELABELING},
                    "metricRelabelings": {"type": "array", "items": RELABELING},
                }
            ),
        },
    },
    required=("selector", "endpoints"),
)

RULE = {
    **closed(
        {
            "alert": {"type": "string", "minLength": 1},
            "record": {"type": "string", "minLength": 1},
            "expr": {"type": ["string", "integer"], "minLength": 1},
            "for": DURATION,
            "keep_firing_for": DURATION,
            "labels": STRING_MAP,
            "annotations": STRING_MAP,
        },
        required=("expr",),
    ),
    # exactly one of alert / record
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}

PROMETHEUS_RULE_SPEC = closed(
    {
        "groups": {
            "type": "array",
            "minItems": 1,
            "items": closed(
                {
                    "name": {"type": "string", "minLength": 1},
                    "interval": DURATION,
                    "limit": {"type": "integer"},
                    "partial_response_strategy": {"type": "string"},
                    "rules": {"type": "array", "minItems": 1, "items": RULE},
                },
                required=("name", "rules"),
            ),
        }
    },
    required=("groups",),
)

SCALED_OBJECT_SPEC = closed(
    {
        "scaleTargetRef": closed(
            {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "name": {"type": "string"},
                "envSourceContainerName": {"type": "string"},
            },
            required=("name",),
        ),
        "pollingInterval": INT32,
        "cooldownPeriod": INT32,
        "initialCooldownPeriod": INT32,
        "idleReplicaCount": INT32,
        "minReplicaCount": INT32,
        "maxReplicaCount": INT32,
        "fallback": closed(
            {
                "failureThreshold": INT32,
                "replicas": INT32,
                "behavior": {"type": "string"},
            },
            required=("failureThreshold", "replicas"),
        ),
        "advanced": closed(
            {
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                # `behavior` is autoscaling/v2 HorizontalPodAutoscalerBehavior; the tests
                # validate it with kubernetes-validate inside a synthetic HPA.
                "horizontalPodAutoscalerConfig": closed(
                    {"name": {"type": "string"}, "behavior": {"type": "object"}}
                ),
                "scalingModifiers": {"type": "object"},
            }
        ),
        "triggers": {
            "type": "array",
            "minItems": 1,
            "items": closed(
                {
                    "type": {"type": "string"},
                    "name": {"type": "string"},
                    # map[string]string upstream: `threshold: 1` (a number) is rejected
                    "metadata": STRING_MAP,
                    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                    "useCachedMetrics": {"type": "boolean"},
                    "authenticationRef": closed(
                        {"name": {"type": "string"}, "kind": {"type": "string"}},
                        required=("name",),
                    ),
                },
                required=("type", "metadata"),
            ),
        },
    },
    required=("scaleTargetRef", "triggers"),
)


def _object(api_version: str, kind: str, spec: Schema) -> Schema:
    return closed(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": spec,
        },
        required=("apiVersion", "kind", "metadata", "spec"),
    )


#: (apiVersion, kind) -> schema of the whole object
CRD_SCHEMAS: dict[tuple[str, str], Schema] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _object(
        "monitoring.coreos.com/v1", "ServiceMonitor", SERVICE_MONITOR_SPEC
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _object(
        "monitoring.coreos.com/v1", "PrometheusRule", PROMETHEUS_RULE_SPEC
    ),
    ("keda.sh/v1alpha1", "ScaledObject"): _object(
        "keda.sh/v1alpha1", "ScaledObject", SCALED_OBJECT_SPEC
    ),
}

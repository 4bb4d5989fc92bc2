"""A strict model of the KubeRay ``ray.io/v1`` RayCluster and RayJob fields, for checking
the manifests in ``cluster/kuberay`` offline.

Written from KubeRay's API types (``ray-operator/apis/ray/v1/raycluster_types.go`` and
``rayjob_types.go``, v1.4-1.5): every object is closed (an unknown or misspelt field
fails), required fields and enums are enforced. Pod templates are checked field by
field against the Kubernetes API models of the ``kubernetes`` Python client, so a
typo in a container spec fails too. The operator's own webhook checks are not
modelled beyond ``minReplicas <= maxReplicas``.
"""

from __future__ import annotations

import re

import jsonschema
import kubernetes.client as k8s

STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
INT = {"type": "integer"}
POD_TEMPLATE = {"type": "object"}  # checked by check_pod_template


def closed(properties: dict, required=()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


AUTOSCALER_OPTIONS = closed(
    {
        "resources": {"type": "object"},
        "image": {"type": "string"},
        "imagePullPolicy": {"type": "string"},
        "securityContext": {"type": "object"},
        "idleTimeoutSeconds": INT,
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "version": {"enum": ["v1", "v2"]},
        "env": {"type": "array"},
        "envFrom": {"type": "array"},
        "volumeMounts": {"type": "array"},
        "command": {"type": "array"},
        "args": {"type": "array"},
    }
)
HEAD_GROUP = closed(
    {
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "rayStartParams": STR_MAP,
        "template": POD_TEMPLATE,
        "resources": STR_MAP,
        "labels": STR_MAP,
    },
    required=["template"],
)
WORKER_GROUP = closed(
    {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": INT,
        "minReplicas": INT,
        "maxReplicas": INT,
        "idleTimeoutSeconds": INT,
        "suspend": {"type": "boolean"},
        "numOfHosts": INT,
        "rayStartParams": STR_MAP,
        "template": POD_TEMPLATE,
        "scaleStrategy": {"type": "object"},
        "resources": STR_MAP,
        "labels": STR_MAP,
    },
    required=["groupName", "template"],
)
CLUSTER_SPEC = closed(
    {
        "upgradeStrategy": {"type": "object"},
        "authOptions": {"type": "object"},
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "autoscalerOptions": AUTOSCALER_OPTIONS,
        "headServiceAnnotations": STR_MAP,
        "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "headGroupSpec": HEAD_GROUP,
        "rayVersion": {"type": "string"},
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
    },
    required=["headGroupSpec"],
)
JOB_SPEC = closed(
    {
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": INT,
        "rayClusterSpec": CLUSTER_SPEC,
        "submitterPodTemplate": POD_TEMPLATE,
        "metadata": STR_MAP,
        "clusterSelector": STR_MAP,
        "submitterConfig": {"type": "object"},
        "managedBy": {"type": "string"},
        "deletionStrategy": {"type": "object"},
        "entrypoint": {"type": "string"},
        "runtimeEnvYAML": {"type": "string"},
        "jobId": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "entrypointResources": {"type": "string"},
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "ttlSecondsAfterFinished": INT,
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "suspend": {"type": "boolean"},
    }
)
METADATA = {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
    "required": ["name"],
}
RESOURCES = {
    "RayCluster": closed(
        {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayCluster"},
            "metadata": METADATA,
            "spec": CLUSTER_SPEC,
        },
        required=["apiVersion", "kind", "metadata", "spec"],
    ),
    "RayJob": closed(
        {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": METADATA, "spec": JOB_SPEC},
        required=["apiVersion", "kind", "metadata", "spec"],
    ),
}


def check_k8s_object(value, model: str, where: str) -> None:
    """Walk ``value`` against a kubernetes client model (e.g. ``V1PodTemplateSpec``): unknown fields fail."""
    # the client spells containers `List[V1Container]` / `Dict[str, str]` (older: `list[...]`, `dict(str, ...)`)
    if match := re.fullmatch(r"[Ll]ist\[(.*)\]", model):
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list")
        for i, item in enumerate(value):
            check_k8s_object(item, match.group(1), f"{where}[{i}]")
        return
    if match := re.fullmatch(r"(?:Dict\[str, (.*)\]|dict\(str, (.*)\))", model):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping")
        for key, item in value.items():
            check_k8s_object(item, match.group(1) or match.group(2), f"{where}.{key}")
        return
    cls = getattr(k8s, model, None)
    if cls is None:  # a primitive (str, int, bool, object, datetime)
        return
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a {model} mapping")
    fields = {json_name: cls.openapi_types[attr] for attr, json_name in cls.attribute_map.items()}
    for key, item in value.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown field {key!r} for {model}")
        check_k8s_object(item, fields[key], f"{where}.{key}")


def validate(doc: dict) -> None:
    """Raise on anything KubeRay's CRD or the Kubernetes pod API would reject (as modelled here)."""
    schema = RESOURCES.get(doc.get("kind"))
    if schema is None:
        raise ValueError(f"unknown kind {doc.get('kind')!r}")
    jsonschema.validate(doc, schema)
    cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec")
    if doc["kind"] == "RayJob" and not (cluster or doc["spec"].get("clusterSelector")):
        raise ValueError("a RayJob needs rayClusterSpec or clusterSelector")
    if cluster:
        check_k8s_object(cluster["headGroupSpec"]["template"], "V1PodTemplateSpec", "headGroupSpec.template")
        for group in cluster.get("workerGroupSpecs", []):
            check_k8s_object(group["template"], "V1PodTemplateSpec", f"workerGroupSpecs[{group['groupName']}].template")
            if group.get("minReplicas", 0) > group.get("maxReplicas", 2**31 - 1):
                raise ValueError(f"worker group {group['groupName']}: minReplicas > maxReplicas")

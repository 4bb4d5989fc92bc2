"""KubeRay's own CRDs (vendored in ``cluster/kuberay/crds/``, the pinned release) as a validator for the
specs in ``cluster/kuberay/``, and the operator's rules that a schema cannot hold.

A Kubernetes API server validates a custom resource against its CRD's ``openAPIV3Schema`` and, with
``kubectl apply``'s default strict field validation, refuses unknown fields. jsonschema does the same
here once the schema's Kubernetes extensions are spelt in JSON Schema: objects with listed properties
are closed (unless ``x-kubernetes-preserve-unknown-fields``), ``x-kubernetes-int-or-string`` is an
integer or a string, ``nullable`` admits null. The CEL rules (``x-kubernetes-validations``) are not
evaluated; the few our specs could meet are among :func:`semantic_errors`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parents[1] / "cluster" / "kuberay" / "crds"
KUBERAY_VERSION = (CRDS / "VERSION").read_text().strip()  # the one place the pinned release is named
GPU_TERMINATION_GRACE_S = 90  # spot nodes get ~2 min notice: time for Ray to drain and a checkpoint


def _kubernetes_to_json_schema(node):
    if isinstance(node, list):
        return [_kubernetes_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _kubernetes_to_json_schema(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out:
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def schema(kind: str) -> dict:
    """The served version's schema of ``kind`` (RayCluster or RayJob), closed as strict validation is."""
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["served"] and v["storage"])
    return _kubernetes_to_json_schema(version["schema"]["openAPIV3Schema"])


def validate(doc: dict) -> None:
    """Raise jsonschema.ValidationError where the API server would refuse ``doc``."""
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") not in ("RayCluster", "RayJob"):
        raise jsonschema.ValidationError(f"not a ray.io/v1 RayCluster or RayJob: {doc.get('kind')}")
    jsonschema.Draft7Validator(schema(doc["kind"])).validate(doc)


def _cluster_errors(spec: dict, where: str) -> list[str]:
    errors = []
    if (spec.get("authOptions") or {}).get("mode") != "token":
        errors.append(f"{where}: authOptions.mode must be token (Ray's token authentication)")
    for group in spec.get("workerGroupSpecs", []):
        name = f"{where} group {group['groupName']}"
        if not group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 2**31):
            errors.append(f"{name}: needs minReplicas <= replicas <= maxReplicas")
        pod = group["template"]["spec"]
        gpus = any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in pod["containers"])
        if gpus and pod.get("terminationGracePeriodSeconds", 30) < GPU_TERMINATION_GRACE_S:
            errors.append(f"{name}: terminationGracePeriodSeconds under {GPU_TERMINATION_GRACE_S} on a GPU group")
    return errors


def semantic_errors(docs: dict[str, dict]) -> list[str]:
    """The operator's and our own rules over every spec (``{file name: doc}``): a RayJob names its cluster
    exactly as KubeRay reads it (``clusterSelector: {ray.io/cluster: <RayCluster name>}``) or brings its
    own (``rayClusterSpec``, shut down after the job); token auth on; spot-friendly GPU groups."""
    clusters = {d["metadata"]["name"] for d in docs.values() if d["kind"] == "RayCluster"}
    errors = []
    for name, doc in docs.items():
        spec = doc["spec"]
        if doc["kind"] == "RayCluster":
            errors += _cluster_errors(spec, name)
            continue
        selector, own = spec.get("clusterSelector"), spec.get("rayClusterSpec")
        if (selector is None) == (own is None):
            errors.append(f"{name}: a RayJob needs exactly one of clusterSelector and rayClusterSpec")
        if selector is not None and (
            list(selector) != ["ray.io/cluster"] or selector["ray.io/cluster"] not in clusters
        ):
            errors.append(
                f"{name}: clusterSelector must be {{ray.io/cluster: <a RayCluster's name>}} "
                f"(KubeRay reads that key only; clusters here: {sorted(clusters)}), got {selector}"
            )
        if own is not None:
            errors += _cluster_errors(own, name)
            if not spec.get("shutdownAfterJobFinishes") or "ttlSecondsAfterFinished" not in spec:
                errors.append(
                    f"{name}: an ephemeral cluster needs shutdownAfterJobFinishes and ttlSecondsAfterFinished"
                )
    return errors

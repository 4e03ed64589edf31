"""The KubeRay manifest: RayCluster fields as KubeRay's v1 API defines them, and every
pod template checked against the Kubernetes API schema (the official client's models)."""

from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

k8s_models = pytest.importorskip("kubernetes.client.models")

MANIFEST = Path(__file__).parent.parent / "deploy" / "kuberay" / "raycluster.yaml"

_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
_TEMPLATE = {"type": "object", "required": ["spec"]}
# The RayCluster v1 fields this manifest uses, as KubeRay documents them.
RAYCLUSTER = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["headGroupSpec"],
            "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "headGroupSpec": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["template"],
                    "properties": {
                        "rayStartParams": _START_PARAMS,
                        "serviceType": {"type": "string"},
                        "template": _TEMPLATE,
                    },
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["groupName", "template"],
                        "properties": {
                            "groupName": {"type": "string"},
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 0},
                            "rayStartParams": _START_PARAMS,
                            "template": _TEMPLATE,
                        },
                    },
                },
            },
        },
    },
}


def check_k8s(template: dict) -> None:
    """The Kubernetes API's own pod template model: unknown fields, wrong types and
    missing required fields are errors."""
    k8s_models.V1PodTemplateSpec.model_validate(template)


def test_manifest_is_a_valid_raycluster_with_valid_pod_templates():
    cluster = yaml.safe_load(MANIFEST.read_text())
    jsonschema.validate(cluster, RAYCLUSTER)
    spec = cluster["spec"]
    check_k8s(spec["headGroupSpec"]["template"])
    for group in spec["workerGroupSpecs"]:
        check_k8s(group["template"])
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        labels = group["rayStartParams"]["labels"]
        assert "gpuprovider.io/node=1" in labels.split(","), group["groupName"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == group["rayStartParams"]["num-gpus"]


def test_the_checker_catches_what_kubernetes_would_reject():
    check_k8s({"spec": {"containers": [{"name": "x", "imagePullPolicy": "Always"}]}})
    for broken, what in (
        ({"name": "x", "imagee": "a"}, "imagee"),
        ({"image": "a"}, "name"),
        ({"name": "x", "ports": [{"containerPort": "eighty"}]}, "containerPort"),
    ):
        with pytest.raises(ValidationError, match=what):
            check_k8s({"spec": {"containers": [broken]}})


def test_the_provider_shares_the_heads_ray_folder():
    """The provider is a Ray driver on the head's node: without the head's /tmp/ray (its
    sockets) a driver cannot start (tests/test_ray.py tries both)."""
    head = yaml.safe_load(MANIFEST.read_text())["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {
        c["name"]: {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        for c in head["containers"]
    }
    shared = mounts["ray-head"].get("/tmp/ray")
    assert shared and mounts["provider"].get("/tmp/ray") == shared
    volume = next(v for v in head["volumes"] if v["name"] == shared)
    assert "emptyDir" in volume

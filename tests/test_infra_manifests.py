"""infra/: every manifest parses and carries the fields KubeRay and the Ray launcher require."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
KUBE = sorted((INFRA / "k8s").glob("*.yaml"))


def _load(path: Path) -> dict:
    with open(path) as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict), f"{path} is not a mapping"
    return doc


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec.get("rayVersion", "").startswith("2.60"), f"{where}: rayVersion must be 2.60.x"
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head, f"{where}: headGroupSpec.rayStartParams is required"
    containers = head["template"]["spec"]["containers"]
    assert containers and all("image" in c and "name" in c for c in containers), where
    for group in spec.get("workerGroupSpecs", []):
        for key in ("groupName", "rayStartParams", "template"):
            assert key in group, f"{where}: workerGroupSpecs[].{key} is required"
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 0)
        assert 0 <= lo <= group.get("replicas", lo) <= hi, f"{where}: replicas out of bounds"
        for c in group["template"]["spec"]["containers"]:
            assert "image" in c and "name" in c, f"{where}: worker container needs image and name"


@pytest.mark.parametrize("path", KUBE, ids=[p.name for p in KUBE])
def test_kuberay_manifest(path: Path) -> None:
    doc = _load(path)
    assert doc["apiVersion"] == "ray.io/v1", path
    assert doc["metadata"]["name"], path
    kind, spec = doc["kind"], doc["spec"]
    if kind == "RayCluster":
        _check_cluster_spec(spec, path.name)
    elif kind == "RayJob":
        assert "prism_cli train" in spec["entrypoint"], "the RayJob must run prism's training"
        assert spec["shutdownAfterJobFinishes"] is True
        yaml.safe_load(spec["runtimeEnvYAML"])
        _check_cluster_spec(spec["rayClusterSpec"], path.name)
    elif kind == "RayService":
        serve = yaml.safe_load(spec["serveConfigV2"])
        app = serve["applications"][0]
        module, _, attr = app["import_path"].partition(":")
        assert module.startswith("serving") and attr, "the RayService must import prism's sampler"
        _check_cluster_spec(spec["rayClusterConfig"], path.name)
    else:
        pytest.fail(f"{path.name}: unexpected kind {kind}")


def test_kuberay_kinds_present() -> None:
    kinds = {_load(p)["kind"] for p in KUBE}
    assert kinds == {"RayCluster", "RayJob", "RayService"}


def test_cluster_launcher_yaml() -> None:
    doc = _load(INFRA / "ray" / "cluster-aws.yaml")
    assert doc["provider"]["type"] == "aws"
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    gpu = [n for n, t in types.items() if n != doc["head_node_type"]]
    group = types[gpu[0]]
    assert group["max_workers"] > group["min_workers"], "the GPU group autoscales"
    assert doc["max_workers"] >= sum(types[n]["max_workers"] for n in gpu)


def test_runtime_env_excludes_heavy_paths() -> None:
    env = _load(INFRA / "ray" / "runtime_env.yaml")
    assert ".venv/" in env["excludes"] and ".git/" in env["excludes"]

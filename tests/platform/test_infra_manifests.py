"""infra/: every manifest parses and carries the fields KubeRay and the Ray launcher require;
the launcher YAML passes Ray's own schema; the RayJob runs a valid `prism train`; the
RayService's Serve config passes Serve's schema and builds prism's sampler app; the job upload
leaves out everything heavy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
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


def test_cluster_launcher_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    doc = _load(INFRA / "ray" / "cluster-aws.yaml")
    validate_config(prepare_config(doc))  # raises on unknown or missing fields


def test_images_and_ray_version_agree() -> None:
    import ray

    images = set()
    for path in KUBE:
        doc = _load(path)
        spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") \
            or doc["spec"]
        assert spec["rayVersion"] == ray.__version__, path.name
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        images |= {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    images.add(_load(INFRA / "ray" / "cluster-aws.yaml")["docker"]["image"])
    assert len(images) == 1, f"one project image everywhere, got {images}"
    assert "docker build -f infra/Dockerfile -t " + images.pop() in \
        (INFRA / "Dockerfile").read_text()


def test_rayjob_entrypoint_is_a_valid_train_command() -> None:
    import shlex

    import typer

    from common.run_config import load_config
    from prism_cli import app

    doc = next(_load(p) for p in KUBE if _load(p)["kind"] == "RayJob")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "prism_cli", "train"], argv
    train = typer.main.get_command(app).commands["train"]
    ctx = train.make_context("train", argv[4:])  # unknown options fail here
    assert ctx.params["ray"] and ctx.params["gpu"] and ctx.params["workers"] >= 1
    assert ctx.params["storage"].startswith("s3://"), "cluster checkpoints need shared storage"
    cfg = load_config(ROOT / ctx.params["config"], ctx.params["set_"])  # overrides validate
    assert cfg.data.url.startswith("s3://")


def test_rayservice_builds_prisms_sampler_app() -> None:
    from ray.serve.schema import ServeDeploySchema

    from serving.app import AppArgs, build_app

    doc = next(_load(p) for p in KUBE if _load(p)["kind"] == "RayService")
    serve = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    local = ServeDeploySchema.model_validate(_load(ROOT / "serving" / "config.yaml"))
    (app,), (local_app,) = serve.applications, local.applications
    assert app.import_path == local_app.import_path == "serving.app:build_app"
    module, attr = app.import_path.split(":")
    assert callable(getattr(__import__(module, fromlist=[attr]), attr)) and build_app
    AppArgs.model_validate(app.args)
    assert app.args["model_uri"].startswith("models:/")
    names = {d.name for d in app.deployments}
    assert names == {d.name for d in local_app.deployments} == {"Sampler", "Ingress"}
    sampler = next(d for d in app.deployments if d.name == "Sampler")
    local_sampler = next(d for d in local_app.deployments if d.name == "Sampler")
    assert set(sampler.user_config) == set(local_sampler.user_config)
    assert sampler.ray_actor_options.num_gpus == 1
    assert sampler.max_ongoing_requests >= sampler.user_config["max_batch_size"]
    # Serve may scale the GPU Sampler beyond one replica: KubeRay must add the GPU pods, and
    # the spec carries no field KubeRay stopped reading (the unhealthy thresholds)
    max_replicas = sampler.autoscaling_config["max_replicas"]
    gpu_group = next(g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                     if "nvidia.com/gpu" in str(g))
    assert max_replicas <= gpu_group["maxReplicas"]
    if max_replicas > gpu_group["replicas"]:
        assert doc["spec"]["rayClusterConfig"].get("enableInTreeAutoscaling") is True
    assert not {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"} & \
        set(doc["spec"])


def test_runtime_env_upload_leaves_out_heavy_paths() -> None:
    """Ray's own packaging walk over this checkout, with the excludes alone (no .gitignore)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    env = _load(INFRA / "ray" / "runtime_env.yaml")
    assert env["working_dir"] == "."
    for must in ("/.venv", "/.git", "/.dvc/cache", "/data", "/outputs", "/runs", "/mlruns"):
        assert must in env["excludes"], must
    files: list[Path] = []
    _dir_travel(ROOT, [_get_excludes(ROOT, env["excludes"])],
                lambda p: files.append(p) if p.is_file() else None, include_gitignore=False)
    rel = {p.relative_to(ROOT).parts[0] for p in files}
    assert {"prism_cli.py", "training", "components", "infra"} <= rel
    assert not rel & {".venv", ".git", "runs", "outputs", "mlruns", "data"}
    assert sum(p.stat().st_size for p in files) < 50 * 2**20


def test_dockerfile_copies_every_package_before_the_install() -> None:
    """``pip install -e`` in the image fails on a package folder it cannot find: each package
    that pyproject.toml lists is copied before that line."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]
    text = (INFRA / "Dockerfile").read_text()
    before = text[: text.index("pip install --no-cache-dir --no-deps -e .")]
    assert "COPY --chown=ray:users pyproject.toml requirements.lock" in before
    tops = {p.split(".")[0] for p in packages}
    missing = sorted(t for t in tops if f"COPY --chown=ray:users {t} {t}" not in before)
    assert not missing, f"infra/Dockerfile installs before copying {missing}"

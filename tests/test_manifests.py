"""The manifests for real clusters (cluster/manifests/): no container engine or Kubernetes here,
so they are parsed and checked against each other and against pyproject.toml: one image whose
tag names the project, Ray and Python versions; token auth from a Secret on every Ray pod;
shared storage on every node; the same tracking server everywhere; GPUs in the worker group;
and `kdsweep` command lines that the CLI really accepts."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from cluster.jobs import entrypoint
from sweeps.cli import app

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "cluster" / "manifests"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
STORAGE = "/mnt/kdsweep"
TOKEN_SECRET = ("kdsweep-ray-token", "auth_token")


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc]


def dockerfile_ray_version() -> str:
    text = (MANIFESTS / "Dockerfile").read_text()
    (version,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", text, re.MULTILINE)
    return version


def image() -> str:
    """The one image every manifest runs: REGISTRY/kdsweep:PROJECT-rayRAY-pyPY-gpu."""
    images = {m for name in ("raycluster.yaml", "rayjob.yaml", "mlflow.yaml")
              for m in re.findall(r"image: (\S+)", (MANIFESTS / name).read_text())}
    images.add(load("aws.yaml")[0]["docker"]["image"])
    assert len(images) == 1, images
    return images.pop()


def ray_requirement() -> Requirement:
    return next(r for r in map(Requirement, PYPROJECT["project"]["dependencies"]) if r.name == "ray")


def test_dockerfile_builds_the_project_on_a_ray_image_pyproject_accepts() -> None:
    text = (MANIFESTS / "Dockerfile").read_text()
    ray_version = dockerfile_ray_version()
    assert ray_requirement().specifier.contains(ray_version), (ray_version, str(ray_requirement()))
    assert {"default", "tune"} <= ray_requirement().extras
    (base,) = re.findall(r"^FROM (\S+)$", text, re.MULTILINE)
    assert base == "rayproject/ray:${RAY_VERSION}-py311-gpu"
    assert PYPROJECT["project"]["requires-python"] == ">=3.11,<3.13"  # py311 is inside it
    # Ray pinned to the base image's version, then the project itself (its dependencies).
    assert re.search(r'pip install [^\n]*"ray\[default,tune\]==\$\{RAY_VERSION\}" \.', text)
    packages = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    for package in packages:
        assert f"COPY --chown=ray:users {package} ./{package}" in text
    assert "COPY --chown=ray:users pyproject.toml README.md ./" in text


def test_every_manifest_runs_the_same_versioned_image() -> None:
    name, tag = image().rsplit(":", 1)
    assert name.endswith("/kdsweep")
    match = re.fullmatch(r"(?P<project>[^-]+)-ray(?P<ray>[^-]+)-py(?P<py>\d+)-gpu", tag)
    assert match, tag
    assert match["project"] == PYPROJECT["project"]["version"]
    assert match["ray"] == dockerfile_ray_version()
    assert match["py"] == "311"
    assert f"-t {image()} ." in (MANIFESTS / "Dockerfile").read_text()  # the documented build


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def tracking_uri() -> str:
    """The MLflow Service of mlflow.yaml as pods address it."""
    service = next(d for d in load("mlflow.yaml") if d["kind"] == "Service")
    port = service["spec"]["ports"][0]["port"]
    return f"http://{service['metadata']['name']}.kdsweep.svc.cluster.local:{port}"


def check_ray_cluster_spec(spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == dockerfile_ray_version()
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # no public dashboard
    groups = [("head", head)] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    gpu_groups = []
    for group_name, group in groups:
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            assert container["image"] == image()
            env = env_of(container)
            assert env["RAY_AUTH_MODE"] == "token", group_name
            key_ref = env["RAY_AUTH_TOKEN"]["secretKeyRef"]
            assert (key_ref["name"], key_ref["key"]) == TOKEN_SECRET, group_name
            assert env["MLFLOW_TRACKING_URI"] == tracking_uri(), group_name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert claims[mounts[STORAGE]] == "kdsweep-storage", group_name  # the shared PVC
            limits = container["resources"]["limits"]
            if int(limits.get("nvidia.com/gpu", 0)) >= 1:
                assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
                gpu_groups.append(group_name)
    assert gpu_groups and "head" not in gpu_groups
    assert head["rayStartParams"]["num-cpus"] == "0"  # trials only on the GPU workers
    for _, group in groups[1:]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_raycluster_has_gpu_workers_token_auth_shared_storage_and_tracking() -> None:
    docs = load("raycluster.yaml")
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    check_ray_cluster_spec(cluster["spec"])
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "kdsweep-storage"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod mounts it
    assert "kind: Secret" not in (MANIFESTS / "raycluster.yaml").read_text()  # never a token in git


def run_command() -> click.Command:
    return typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]


def parse_kdsweep(command_line: str) -> dict[str, Any]:
    """The options `kdsweep run` gets from a command line (fails on any it does not accept)."""
    words = shlex.split(command_line)
    prefix = ["kdsweep", "run"] if words[0] == "kdsweep" else ["python", "-m", "sweeps.cli", "run"]
    assert words[:len(prefix)] == prefix, command_line
    with run_command().make_context("run", words[len(prefix):]) as context:
        return dict(context.params)


def test_rayjob_runs_kdsweep_on_a_cluster_like_raycluster() -> None:
    (job,) = load("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    params = parse_kdsweep(job["spec"]["entrypoint"])
    assert params["address"] == "auto" and str(params["storage"]) == STORAGE
    env_vars = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env_vars["MLFLOW_TRACKING_URI"] == tracking_uri()  # in the job's runtime environment
    spec = job["spec"]["rayClusterSpec"]
    check_ray_cluster_spec(spec)
    head = spec["headGroupSpec"]["template"]["spec"]
    config_maps = {v["name"] for v in head["volumes"] if "configMap" in v}
    spec_mounts = [m["mountPath"] for m in head["containers"][0]["volumeMounts"] if m["name"] in config_maps]
    assert any(str(params["spec_path"]).startswith(path + "/") for path in spec_mounts)  # the spec is there
    (submitter,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    env = env_of(submitter)
    assert env["RAY_AUTH_MODE"] == "token"
    assert tuple(env["RAY_AUTH_TOKEN"]["secretKeyRef"].values()) == TOKEN_SECRET
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_mlflow_server_is_internal_with_a_database_and_proxied_artifacts() -> None:
    docs = {d["kind"]: d for d in load("mlflow.yaml")}
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    option = dict(zip(args[::2], args[1::2], strict=True))
    assert option["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert "secretKeyRef" in env_of(container)["MLFLOW_BACKEND_STORE_URI"]
    assert option["--artifacts-destination"] in {m["mountPath"] for m in container["volumeMounts"]}
    assert option["--port"] == str(docs["Service"]["spec"]["ports"][0]["targetPort"])
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    assert "kdsweep-mlflow.kdsweep.svc.cluster.local:5000" in option["--allowed-hosts"].split(",")


def test_aws_launcher_config_has_gpu_workers_token_auth_storage_and_tracking() -> None:
    (config,) = load("aws.yaml")
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == image()
    run_options = " ".join(config["docker"]["run_options"])
    env = dict(re.findall(r"--env (\w+)=(\S+)", run_options))
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] in config["file_mounts"]  # the token reaches every node
    assert env["MLFLOW_TRACKING_URI"].startswith("http://")
    assert re.search(rf"-v \S+:{STORAGE}\b", run_options)
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes and nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert any(re.match(r"(g\d|p\d)", n["node_config"]["InstanceType"]) for n in workers)  # GPU instances
    assert all(n["max_workers"] <= config["max_workers"] for n in workers)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard` (SSH)


@pytest.mark.parametrize(("trials", "concurrent"), [(None, None), (8, 2)])
def test_submitted_entrypoint_is_a_valid_kdsweep_run(trials, concurrent) -> None:
    params = parse_kdsweep(entrypoint("sweep-1", "/mnt/shared/kdsweep", trials, concurrent))
    assert params["address"] == "auto" and params["name"] == "sweep-1"
    assert str(params["storage"]) == "/mnt/shared/kdsweep"
    assert (params["num_trials"], params["max_concurrent"]) == (trials, concurrent)
    assert params["tracking_uri"] is None  # from MLFLOW_TRACKING_URI in the job's runtime env


def test_ray_in_the_environment_matches_the_image() -> None:
    import importlib.metadata

    installed = Version(importlib.metadata.version("ray"))
    assert ray_requirement().specifier.contains(installed)
    # Clients and cluster should run the same Ray: at least the same minor version.
    assert installed.release[:2] == Version(dockerfile_ray_version()).release[:2]

"""Scale-out configs: ray-cluster.yaml against Ray's own schema, the KubeRay manifests against the
rendering, and both against the local stack's ports, image and Serve config."""

from __future__ import annotations

import copy
import json
import shlex
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from cluster import scale_out
from core.settings import REPO_ROOT, ModelSettings, RaySettings, ServeSettings
from jobs.config import load_config
from serve_apps.serve_config import with_knobs

LAUNCHER = REPO_ROOT / "ray-cluster.yaml"
KUSTOMIZATION = scale_out.KUBERAY_DIR / "kustomization.yaml"


RAY, SERVE = RaySettings(), ServeSettings()  # the defaults, not this machine's environment


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(LAUNCHER.read_text())
    return config


def start_flags(command: str) -> dict[str, str]:
    flags = {}
    for word in shlex.split(command):
        if word.startswith("--"):
            key, _, value = word[2:].partition("=")
            flags[key] = value
    return flags


def ray_start(commands: list[str]) -> dict[str, str]:
    (command,) = [c for c in commands if c.startswith("ray start")]
    return start_flags(command)


def manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((scale_out.KUBERAY_DIR / name).read_text()) if d]
    return docs


def cluster_specs() -> list[dict[str, Any]]:
    specs = []
    for doc in manifests():
        spec = doc["spec"]
        specs.append(spec.get("rayClusterConfig") or spec.get("rayClusterSpec"))
    return specs


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


# ray-cluster.yaml ------------------------------------------------------------------------------


def test_launcher_config_is_valid_for_ray_up(launcher):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    # What `ray up` does with the file before it launches anything: defaults merged, then checked.
    validate_config(prepare_config(copy.deepcopy(launcher)))
    assert launcher["provider"]["type"] == "aws" and launcher["provider"]["region"]
    assert launcher["provider"]["availability_zone"]
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    workers = [t for name, t in types.items() if name != launcher["head_node_type"]]
    assert workers and all(1 <= t["min_workers"] <= t["max_workers"] for t in workers)
    assert all(t["node_config"]["InstanceType"] for t in types.values())


def test_launcher_starts_ray_with_the_local_stack_flags(launcher):
    head = ray_start(launcher["head_start_ray_commands"])
    assert "head" in head
    assert int(head["port"]) == RAY.gcs_port != 6379  # Redis owns 6379 on our machines
    assert int(head["dashboard-port"]) == RAY.dashboard_port
    assert head["dashboard-host"] == "127.0.0.1"  # dashboard and Jobs API never public
    assert int(head["ray-client-server-port"]) == RAY.client_port
    assert int(head["dashboard-agent-listen-port"]) == RAY.dashboard_agent_port
    assert int(head["metrics-export-port"]) == RAY.metrics_export_port
    assert head["autoscaling-config"] == "~/ray_bootstrap_config.yaml"
    worker = ray_start(launcher["worker_start_ray_commands"])
    assert worker["address"] == f"$RAY_HEAD_IP:{RAY.gcs_port}"
    assert int(worker["metrics-export-port"]) == RAY.metrics_export_port
    assert int(worker["dashboard-agent-listen-port"]) == RAY.dashboard_agent_port
    # No rule of ours opens a port to the world; the launcher adds SSH and intra-cluster traffic.
    assert launcher["provider"]["security_group"]["IpPermissions"] == []


def test_launcher_turns_token_auth_on_and_passes_secrets_in_a_file(launcher):
    from ray.autoscaler.sdk import get_docker_host_mount_location

    options = launcher["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in options
    # RAY_AUTH_TOKEN and the other secrets come from a git-ignored env file, which exists on the
    # host before `docker run`: file mounts land under this prefix.
    (env_file,) = [o.split(" ", 1)[1] for o in options if o.startswith("--env-file ")]
    host_prefix = get_docker_host_mount_location(launcher["cluster_name"])
    target = env_file.removeprefix(host_prefix)
    assert env_file.startswith(host_prefix + "/") and target in launcher["file_mounts"]
    source = launcher["file_mounts"][target]
    assert source.startswith(".secrets/") and ".secrets/" in (REPO_ROOT / ".gitignore").read_text().split()
    commands = [c for key, value in launcher.items() if key.endswith("_commands") for c in value]
    assert not [c for c in [*options, *commands] if "RAY_AUTH_TOKEN=" in c]  # no token in this file


def test_launcher_head_deploys_the_shared_serve_config(launcher):
    from cluster.__main__ import app

    commands = launcher["head_start_ray_commands"]
    # After `ray start --head`, with replicas reachable from every node's HAProxy.
    assert commands[-1] == "SERVE_HOST=0.0.0.0 python -m cluster deploy-serve"
    assert "deploy-serve" in {c.name for c in app.registered_commands}
    # deploy-serve renders the image's own serve_apps/config.yaml; there is no copy to drift.
    assert SERVE.config_path == REPO_ROOT / "serve_apps" / "config.yaml"


# KubeRay ----------------------------------------------------------------------------------------


def test_committed_manifests_equal_the_rendering():
    for path, text in scale_out.kuberay_files().items():
        assert path.read_text() == text, f"{path} is stale: run `python -m cluster render-kuberay`"


def test_kustomization_applies_every_manifest():
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["kind"] == "Kustomization"
    shipped = {p.name for p in scale_out.KUBERAY_DIR.glob("*.yaml")} - {KUSTOMIZATION.name}
    assert set(kustomization["resources"]) == shipped
    kinds = sorted(d["kind"] for d in manifests())
    assert kinds == ["RayJob", "RayService"]
    assert {d["apiVersion"] for d in manifests()} == {"ray.io/v1"}


def test_serve_config_is_the_shared_one():
    (service,) = [d for d in manifests() if d["kind"] == "RayService"]
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    # The shipped shape with the settings' default knobs, as `cluster up` renders it locally.
    source = with_knobs(yaml.safe_load(SERVE.config_path.read_text()), SERVE, ModelSettings(), 1000)
    assert embedded["applications"] == source["applications"]
    (ingress,) = embedded["applications"][0]["deployments"]
    assert ingress["max_ongoing_requests"] == SERVE.max_ongoing_requests
    assert ingress["user_config"]["max_batch_size"] == SERVE.max_batch_size
    assert {k: v for k, v in embedded.items() if k != "http_options"} == {
        k: v for k, v in source.items() if k != "http_options"
    }
    source_http = {k: v for k, v in source["http_options"].items() if k != "host"}
    assert {k: v for k, v in embedded["http_options"].items() if k != "host"} == source_http
    assert embedded["http_options"]["host"] == "0.0.0.0"  # the pod's address, behind a ClusterIP Service


def test_every_cluster_has_token_auth_and_no_public_dashboard():
    specs = cluster_specs()
    assert len(specs) == 2
    for spec in specs:
        assert spec["authOptions"] == {"mode": "token"}
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP"
        assert head["enableIngress"] is False
        assert spec["rayVersion"] == version("ray")  # authOptions needs Ray >= 2.52
    # Nothing here creates a Service or Ingress of its own that could expose a port.
    assert not [d for d in manifests() if d["kind"] in {"Service", "Ingress"}]


def test_images_and_ports_match_the_launcher_and_the_stack(launcher):
    image = launcher["docker"]["image"]
    assert image == scale_out.platform_image()
    assert image.rsplit(":", 1)[1] == scale_out.project_version()
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    ours = {s["image"] for s in compose["services"].values() if "ray-cluster-platform" in str(s.get("image", ""))}
    # Compose may build the image locally under a tag of its own; the repository name is shared.
    assert all(i.split("/")[-1].split(":")[0] == "ray-cluster-platform" for i in ours)
    head_flags = ray_start(launcher["head_start_ray_commands"])
    for spec in cluster_specs():
        assert {c["image"] for c in containers(spec)} == {image}
        params = spec["headGroupSpec"]["rayStartParams"]
        for flag in ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port"):
            assert params[flag] == head_flags[flag], flag
        assert params["metrics-export-port"] == head_flags["metrics-export-port"]
        head_ports = {p["name"]: p["containerPort"] for p in containers(spec)[0]["ports"]}
        assert head_ports["gcs-server"] == RAY.gcs_port
        assert head_ports["dashboard"] == RAY.dashboard_port
        assert head_ports["serve"] == SERVE.port
        for container in containers(spec):
            assert container["envFrom"] == [{"secretRef": {"name": scale_out.ENV_SECRET}}]


def test_rayjob_trains_with_the_shipped_config():
    (job,) = [d for d in manifests() if d["kind"] == "RayJob"]
    assert job["spec"]["entrypoint"] == "python -m jobs.train --config jobs/configs/adult.yaml"
    config = load_config("jobs/configs/adult.yaml")
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    cpus = int(workers["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
    # The head takes no tasks (num-cpus 0): the Train workers have to fit on the worker pods.
    assert workers["replicas"] * cpus >= config.train.num_workers * config.train.cpus_per_worker
    assert job["spec"]["shutdownAfterJobFinishes"] is True


# Training placement ----------------------------------------------------------------------------


def test_placement_strategy_defaults_to_pack_and_takes_ray_strategies():
    config = load_config("jobs/configs/adult.yaml")
    assert config.train.placement_strategy == "PACK"
    assert config.with_overrides({"train.placement_strategy": "SPREAD"}).train.placement_strategy == "SPREAD"
    with pytest.raises(ValidationError):
        config.with_overrides({"train.placement_strategy": "EVERYWHERE"})

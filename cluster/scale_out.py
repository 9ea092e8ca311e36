"""Scale-out past one machine: the KubeRay manifests, rendered from the platform's own config.

`python -m cluster render-kuberay` writes cluster/kuberay/rayservice.yaml and rayjob-train.yaml;
tests/unit/test_scale_out.py keeps the committed files equal to the rendering.

Why a RayService with a rendered serveConfigV2, and not a RayCluster plus `serve deploy`: KubeRay
then owns the Serve app's life cycle (health checks, a zero-downtime switch to a new cluster when
the image or the config changes, a Service that targets only pods whose Serve proxy is ready),
with nothing to run by hand after `kubectl apply`. The price is that serveConfigV2 has to be inline
YAML in the manifest; generating it from serve_apps/config.yaml keeps that file the only Serve
config, for the local stack, the cluster launcher (ray-cluster.yaml) and Kubernetes alike.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from cluster.observability import write_files
from core.settings import REPO_ROOT, ModelSettings, RaySettings, ServeSettings, Settings
from serve_apps.serve_config import with_knobs

KUBERAY_DIR = REPO_ROOT / "cluster" / "kuberay"
RAYSERVICE_FILE = KUBERAY_DIR / "rayservice.yaml"
RAYJOB_FILE = KUBERAY_DIR / "rayjob-train.yaml"
# Where CI pushes the image built from the repo's Dockerfile (ghcr.io/<owner>/<repo>); the tag is
# the project's version, so a release moves the manifests and ray-cluster.yaml together.
IMAGE_REPOSITORY = "ghcr.io/ray-cluster-platform/ray-cluster-platform"
# The platform's settings and secrets (.env's variables) for every Ray container:
# `kubectl create secret generic platform-env --from-env-file=.secrets/cluster.env`.
ENV_SECRET = "platform-env"
TRAIN_ENTRYPOINT = "python -m jobs.train --config jobs/configs/adult.yaml"
HEADER = (
    "# Rendered by `python -m cluster render-kuberay` from serve_apps/config.yaml and the port\n"
    "# defaults in core/settings.py: edit cluster/scale_out.py, then render again.\n"
)


def project_version() -> str:
    with (REPO_ROOT / "pyproject.toml").open("rb") as fh:
        return str(tomllib.load(fh)["project"]["version"])


def platform_image() -> str:
    return f"{IMAGE_REPOSITORY}:{project_version()}"


def ports() -> dict[str, int]:
    # The groups' defaults: the manifests describe a fresh cluster, not this machine's .env.
    ray, serve = RaySettings(), ServeSettings()
    return {
        "gcs": ray.gcs_port,
        "dashboard": ray.dashboard_port,
        "client": ray.client_port,
        "dashboard_agent": ray.dashboard_agent_port,
        "metrics": ray.metrics_export_port,
        "serve": serve.port,
    }


def serve_config() -> dict[str, Any]:
    """serve_apps/config.yaml as the pods run it, with the settings' default knobs."""
    serve = ServeSettings()
    shipped: dict[str, Any] = yaml.safe_load(serve.config_path.read_text(encoding="utf-8"))
    max_rows = Settings.model_fields["max_batch_rows"].get_default(call_default_factory=True)
    config = with_knobs(shipped, serve, ModelSettings(), max_rows)
    # A pod's proxy has to listen on the pod's address for the Serve Service to reach it; that
    # Service is ClusterIP, so the API is still reachable only from inside the cluster (Nginx).
    config["http_options"] = {**config.get("http_options", {}), "host": "0.0.0.0", "port": ports()["serve"]}
    return config


def _container(name: str, resources: dict[str, str], container_ports: dict[str, int]) -> dict[str, Any]:
    return {
        "name": name,
        "image": platform_image(),
        "imagePullPolicy": "IfNotPresent",
        # Settings and secrets as `cluster up` gives them to its children. RAY_AUTH_MODE and
        # RAY_AUTH_TOKEN are set by KubeRay from authOptions, and an explicit env entry wins over
        # envFrom, so a stray RAY_AUTH_TOKEN in the secret cannot switch tokens.
        "envFrom": [{"secretRef": {"name": ENV_SECRET}}],
        "env": [
            {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
            # Serve's HAProxy ingress and throughput profile, as `cluster up` and compose set them.
            {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"},
            {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "1"},
            {"name": "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE", "value": "50"},
        ],
        "ports": [{"name": port_name, "containerPort": port} for port_name, port in container_ports.items()],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
    }


def ray_cluster_spec(*, workers: int, min_workers: int, max_workers: int, autoscaling: bool) -> dict[str, Any]:
    p = ports()
    head_start = {
        "port": str(p["gcs"]),
        # The dashboard and Jobs API listen on the pod's address because the KubeRay operator and
        # the RayJob submitter reach them through the head Service; that Service is ClusterIP
        # (never exposed) and every request needs the cluster's token.
        "dashboard-host": "0.0.0.0",
        "dashboard-port": str(p["dashboard"]),
        "ray-client-server-port": str(p["client"]),
        "dashboard-agent-listen-port": str(p["dashboard_agent"]),
        "metrics-export-port": str(p["metrics"]),
        # The control plane only: training and replicas run on the workers.
        "num-cpus": "0",
    }
    head_ports = {
        "gcs-server": p["gcs"],
        "dashboard": p["dashboard"],
        "client": p["client"],
        "serve": p["serve"],
        "metrics": p["metrics"],
    }
    worker = _container("ray-worker", {"cpu": "4", "memory": "16Gi"}, {"serve": p["serve"], "metrics": p["metrics"]})
    worker_start = {
        "dashboard-agent-listen-port": str(p["dashboard_agent"]),
        "metrics-export-port": str(p["metrics"]),
    }
    return {
        "rayVersion": version("ray"),
        # KubeRay >= 1.5.1 generates a token into a Secret and sets RAY_AUTH_MODE=token and
        # RAY_AUTH_TOKEN on every Ray container, the RayJob submitter included.
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": autoscaling,
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "enableIngress": False,
            "rayStartParams": head_start,
            "template": {
                "spec": {"containers": [_container("ray-head", {"cpu": "2", "memory": "8Gi"}, head_ports)]},
            },
        },
        "workerGroupSpecs": [
            {
                "groupName": "cpu",
                "replicas": workers,
                "minReplicas": min_workers,
                "maxReplicas": max_workers,
                "rayStartParams": worker_start,
                "template": {"spec": {"containers": [worker]}},
            }
        ],
    }


def _metadata(name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "labels": {"app.kubernetes.io/name": "ray-cluster-platform", "app.kubernetes.io/component": component},
    }


def rayservice() -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata("inference", "serve"),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(), sort_keys=False),
            # The ModelServer deployment autoscales; the Ray autoscaler adds worker pods for it.
            "rayClusterConfig": ray_cluster_spec(workers=1, min_workers=1, max_workers=4, autoscaling=True),
        },
    }


def rayjob_train() -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata("train-adult", "training"),
        "spec": {
            # The code and the job config are in the image: no working_dir to upload. Checkpoints
            # need storage every node reaches: RAY_STORAGE_PATH=s3://... in the platform-env Secret.
            "entrypoint": TRAIN_ENTRYPOINT,
            # A cluster of its own for the run, deleted when it ends; the RayJob stays as a record.
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "activeDeadlineSeconds": 3600,
            # Two Ray Train workers (train.num_workers in the config), one per worker pod.
            "rayClusterSpec": ray_cluster_spec(workers=2, min_workers=2, max_workers=2, autoscaling=False),
        },
    }


def _str(dumper: yaml.representer.BaseRepresenter, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def dump(document: dict[str, Any]) -> str:
    class Dumper(yaml.SafeDumper):
        """Multi-line strings (serveConfigV2) as literal blocks, readable in the manifest."""

    Dumper.add_representer(str, _str)
    return HEADER + yaml.dump(document, Dumper=Dumper, sort_keys=False, width=120)


def kuberay_files() -> dict[Path, str]:
    return {RAYSERVICE_FILE: dump(rayservice()), RAYJOB_FILE: dump(rayjob_train())}


def write_kuberay_files() -> list[Path]:
    return write_files(kuberay_files())

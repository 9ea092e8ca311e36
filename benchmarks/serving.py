"""Serving throughput and latency: the platform's `/v1/predict` through Nginx (TLS) and at the Serve
ingress, side by side with `mlflow models serve` and a bare FastAPI server of the same registered
model version, and the in-process model call as the ceiling. Then bulk requests through Nginx in
each form the platform reads (JSON rows, JSON columns, Arrow), with the prediction records they
left (benchmarks/bulk_profile.py's `form_run`). Plus a py-spy profile of the ingress replica under
load.

Every server gets the same rows, from the same wrk, one after the other in one run.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil

from benchmarks.load import run_wrk
from benchmarks.peers import FASTAPI, Peer, fastapi_peer, in_process, mlflow_peer, sample_rows, time_calls
from cluster.edge import bearer_headers, local_edge_url
from cluster.sandbox import replica_pids
from core.settings import Settings

EDGE = "platform (Nginx TLS)"
INGRESS = "platform (Serve ingress)"
# The forms a bulk request may take (serve_apps/routes/inference.py reads each): rows as objects,
# one list per column, an Arrow IPC stream.
BULK_FORMS = ("instances", "columns", "arrow")
SINGLE = "single"
BULK = "bulk"
# Our code and the frameworks on the request path, for the profile's "where the time goes".
PROFILE_MODULES = (
    "serve_apps/",
    "jobs/",
    "fastapi/",
    "starlette/",
    "uvicorn/",
    "pydantic",
    "ray/serve/",
    "ray/util/metrics",
    "psycopg",
    "logging/",
    "torch/",
    "numpy/",
    "pandas/",
    "opentelemetry",
)


@dataclass(frozen=True)
class Plan:
    connections: tuple[int, ...] = (1, 16, 64)
    duration_s: float = 15.0
    warmup_s: float = 3.0
    bulk_rows: int = 1000
    bulk_connections: int = 4
    profile_s: float = 10.0
    in_process_iterations: int = 300

    @classmethod
    def quick(cls) -> Plan:
        """Seconds, not minutes: the test suite's smoke run."""
        return cls(
            connections=(1, 4),
            duration_s=1,
            warmup_s=1,
            bulk_rows=100,
            bulk_connections=2,
            profile_s=1,
            in_process_iterations=20,
        )


Labeller = Callable[[list[dict[str, Any]]], list[str]]


@dataclass(frozen=True)
class Target:
    """One server under load: where to POST, with which headers, in its own body format."""

    server: str
    url: str
    headers: dict[str, str]
    rows_key: str
    labels: Labeller

    def body(self, rows: Sequence[dict[str, Any]]) -> bytes:
        return orjson.dumps({self.rows_key: list(rows)})


def _platform_labels(
    url: str, headers: dict[str, str], verify: str | bool
) -> Callable[[list[dict[str, Any]]], list[str]]:
    def labels(rows: list[dict[str, Any]]) -> list[str]:
        response = httpx.post(url, json={"instances": rows}, headers=headers, verify=verify, timeout=30)
        response.raise_for_status()
        return [p["label"] for p in response.json()["predictions"]]

    return labels


def platform_targets(settings: Settings, api_key: str, ca_file: Path | None) -> list[Target]:
    """The platform as users reach it (Nginx, TLS, keep-alive) and at the Serve ingress itself."""
    headers = {**bearer_headers(api_key), "Content-Type": "application/json"}
    targets = []
    if ca_file is not None:
        edge = f"{local_edge_url(settings)}/v1/predict"
        targets.append(Target(EDGE, edge, headers, "instances", _platform_labels(edge, headers, str(ca_file))))
    ingress = f"{settings.serve.url}/v1/predict"
    targets.append(Target(INGRESS, ingress, headers, "instances", _platform_labels(ingress, headers, True)))
    return targets


def peer_target(peer: Peer) -> Target:
    return Target(peer.name, peer.url, dict(peer.headers), peer.rows_key, peer.labels)


def measure(
    target: Target, rows: list[dict[str, Any]], plan: Plan, cpu_s: Callable[[], float] | None = None
) -> list[dict[str, Any]]:
    """Single-row requests at each connection count, then bulk requests; a warm-up run first.
    `cpu_s` (the server's CPU seconds so far) gives the cores the server used during each run."""
    loads = [(SINGLE, c, rows[:1]) for c in plan.connections]
    loads.append((BULK, plan.bulk_connections, rows[: plan.bulk_rows]))
    results = []
    for kind, connections, body_rows in loads:
        body = target.body(body_rows)
        n = len(body_rows)
        run_wrk(target.url, body, target.headers, connections, plan.warmup_s, rows_per_request=n)
        before = cpu_s() if cpu_s else None
        result = run_wrk(target.url, body, target.headers, connections, plan.duration_s, rows_per_request=n)
        row = {"server": target.server, "kind": kind, **result.to_dict()}
        if cpu_s is not None and before is not None and result.duration_s > 0:
            row["server_cores"] = (cpu_s() - before) / result.duration_s
        results.append(row)
    return results


def platform_cpu_s(settings: Settings) -> Callable[[], float]:
    """CPU seconds of what serves a prediction on the platform: the ingress replicas, Serve's
    HAProxy and Nginx. The processes are found once, here: walking the process table at every
    sample would cost CPU while the load runs and add to what is measured."""
    processes = platform_processes(settings)

    def total() -> float:
        seconds = 0.0
        for process in processes:
            with contextlib.suppress(psutil.Error):  # exited since: its time went with it
                times = process.cpu_times()
                seconds += times.user + times.system
        return seconds

    return total


def platform_processes(settings: Settings) -> list[psutil.Process]:
    """The ingress replicas, HAProxy and Nginx of this stack (under its Ray temp dir and state dir),
    with their children."""
    markers = (str(settings.ray.resolved_temp_dir), str(settings.state_dir))
    roots = set(replica_pids(settings))
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.info["name"] in {"haproxy", "nginx"} and any(m in cmdline for m in markers):
            roots.add(process.pid)  # nginx's master; its workers are its children
    found: list[psutil.Process] = []
    for pid in roots:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            found += [root, *root.children(recursive=True)]
    return found


def in_process_serving_path(
    model_uri: str, tracking_uri: str, rows: list[dict[str, Any]], sizes: Sequence[int], iterations: int
) -> list[dict[str, Any]]:
    """What an ingress replica does per batch, without HTTP: encode the JSON rows, run the model,
    build the prediction objects. The ceiling for the platform's own path."""
    import torch

    from benchmarks.peer_fastapi import predictor_directory
    from benchmarks.peers import resolve_model_dir
    from jobs.predictor import TabularPredictor
    from serve_apps.champion import to_predictions

    with tempfile.TemporaryDirectory() as tmp:
        predictor = TabularPredictor.load(predictor_directory(resolve_model_dir(model_uri, Path(tmp), tracking_uri)))
    schema = predictor.schema

    def serve(batch: list[dict[str, Any]]) -> None:
        to_predictions(predictor.record_outputs(batch), schema.task, schema.classes)

    # The report renders every key: these are the ones this path has always reported.
    keys = ("rows", "calls_per_s", "rows_per_s", "rows_per_s_p50", "p50_ms", "p99_ms")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    results = []
    try:
        for size in sizes:
            timed = time_calls(functools.partial(serve, rows[:size]), size, iterations)
            results.append({"path": "serving (encode_records + model + predictions)", **{k: timed[k] for k in keys}})
    finally:
        torch.set_num_threads(previous)
    return results


def bulk_forms(settings: Settings, api_key: str, rows: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """Bulk requests through Nginx (TLS) in each of BULK_FORMS, one after the other, as
    `benchmarks.bulk_profile http` measures them: wrk's figures, the cores of the replica, HAProxy,
    Nginx and PostgreSQL, and the prediction records (recorded, dropped) when the stack records."""
    from benchmarks.bulk_profile import BulkLoad, _bodies, form_run

    sample = rows[: plan.bulk_rows]
    bodies = _bodies(sample, list(sample[0]))
    edge = f"{local_edge_url(settings)}/v1/predict"
    dsn = settings.database.url.get_secret_value() if settings.database.url else None
    processes = platform_processes(settings)
    load = BulkLoad(plan.bulk_rows, plan.bulk_connections, plan.warmup_s, plan.duration_s)
    runs = {}
    for form in BULK_FORMS:
        content_type, body = bodies[form]
        headers = {**bearer_headers(api_key), "Content-Type": content_type}
        runs[form] = {"body_bytes": len(body), **form_run(edge, body, headers, load, processes, dsn)}
    return {"server": EDGE, "rows_per_request": load.rows, "connections": load.connections, "runs": runs}


def bulk_form_ratios(forms: dict[str, Any], rows: Sequence[Mapping[str, Any]], ceiling: Mapping[str, Any]) -> None:
    """Each form's rows/s against the bare FastAPI server's bulk run and the in-process serving path
    at the same rows per request, both from this run; into `forms["ratios"]`."""
    from benchmarks.bulk_profile import form_ratios

    size = forms["rows_per_request"]
    peer: Mapping[str, Any] = next((r for r in rows if r["server"] == FASTAPI and r["rows_per_request"] == size), {})
    path: Mapping[str, Any] = next((r for r in ceiling.get("serving_path") or [] if r["rows"] == size), {})
    forms["fastapi_rows_per_s"] = peer.get("rows_per_s")
    forms["in_process_serving_path_rows_per_s"] = path.get("rows_per_s")
    forms["ratios"] = form_ratios(forms["runs"], peer.get("rows_per_s") or 0.0, path.get("rows_per_s") or 0.0)


def same_answers(targets: Sequence[Target], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every server must give the same labels for the same rows, or the comparison is void."""
    answers = {t.server: t.labels(rows) for t in targets}
    reference = next(iter(answers.values()))
    disagreements = {
        server: sum(a != b for a, b in zip(labels, reference, strict=True)) for server, labels in answers.items()
    }
    return {"rows": len(rows), "disagreements": disagreements, "agree": not any(disagreements.values())}


# Profile -----------------------------------------------------------------------------------


def _py_spy() -> str:
    import shutil
    import sys

    candidate = Path(sys.executable).parent / "py-spy"
    found = str(candidate) if candidate.is_file() else shutil.which("py-spy")
    if found is None:
        raise FileNotFoundError("py-spy is not installed")
    return found


def collapsed_stacks(raw: str) -> Iterator[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output as (frames, outermost first; samples) per stack."""
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield stack.split(";"), int(count)


def summarise_profile(raw: str, top: int = 25) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks as shares of the samples: inclusive per frame, and self time
    attributed to the innermost frame in our code or a framework on the request path."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for frames, n in collapsed_stacks(raw):
        total += n
        for frame in set(frames):
            inclusive[_frame_name(frame)] += n
        known = [f for f in frames if any(m in f for m in PROFILE_MODULES)]
        own[_frame_name(known[-1] if known else frames[-1])] += n

    def shares(counts: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": f, "share": n / total} for f, n in counts.most_common(top)] if total else []

    return {"samples": total, "self": shares(own), "inclusive": shares(inclusive)}


def _frame_name(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (path/to/file.py)": lines of one function add up.
    name, _, location = frame.partition(" (")
    path = location.rstrip(")").rpartition(":")[0] or location.rstrip(")")
    for marker in ("site-packages/", "/work/", "python3.11/"):
        path = path.split(marker)[-1]
    return f"{name} ({path})" if path else name


def profile(target: Target, pid: int, rows: list[dict[str, Any]], seconds: float, out_dir: Path) -> dict[str, Any]:
    """py-spy samples (only while holding the GIL, i.e. Python's CPU time) of one replica while wrk
    sends single rows at 16 connections."""
    raw = out_dir / "profile-ingress.txt"
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as scratch:  # the script holds the API key
        script = _lua(Path(scratch), target, rows[:1])
        # wrk runs two seconds longer than the sampling, and its connections open in milliseconds:
        # the samples see the steady state.
        wrk = ["wrk", "-t2", "-c16", f"-d{max(2, round(seconds + 2))}s", "-s", str(script), target.url]
        _sample(raw, pid, seconds, subprocess.Popen(wrk, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    summary = summarise_profile(raw.read_text(encoding="utf-8"))
    summary["file"] = raw.name
    return summary


def _sample(raw: Path, pid: int, seconds: float, load: subprocess.Popen[bytes]) -> None:
    try:
        duration = str(max(1, round(seconds)))
        record = ["record", "-p", str(pid), "-d", duration, "-r", "250", "--gil", "--nonblocking"]
        subprocess.run(
            [_py_spy(), *record, "-f", "raw", "-o", str(raw)], check=True, capture_output=True, timeout=seconds + 60
        )
    finally:
        load.wait(timeout=seconds + 30)


def _lua(directory: Path, target: Target, rows: list[dict[str, Any]]) -> Path:
    from benchmarks.load import lua_script

    body = directory / "profile-body.json"
    body.write_bytes(target.body(rows))
    script = directory / "profile.lua"
    script.write_text(lua_script(body, target.headers), encoding="utf-8")
    return script


# The whole serving benchmark ------------------------------------------------------------------


def run_serving(
    settings: Settings,
    api_key: str,
    model_uri: str,
    plan: Plan,
    out_dir: Path,
    ca_file: Path | None = None,
) -> dict[str, Any]:
    """Measure the platform and its peers on `model_uri` (the version the platform serves)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sample_rows(max(plan.bulk_rows, 100))
    targets = platform_targets(settings, api_key, ca_file)
    results: list[dict[str, Any]] = []
    tracking = settings.mlflow.tracking_uri
    with (
        # The peers' logs and model downloads are scratch, not results.
        tempfile.TemporaryDirectory(prefix="bench-peers-") as scratch,
        mlflow_peer(model_uri, Path(scratch), tracking_uri=tracking) as mlflow,
        fastapi_peer(model_uri, Path(scratch), tracking_uri=tracking) as fastapi,
    ):
        all_targets = [*targets, peer_target(mlflow), peer_target(fastapi)]
        agreement = same_answers(all_targets, rows[:100])
        for target in targets:
            results += measure(target, rows, plan, platform_cpu_s(settings))
        results += measure(peer_target(mlflow), rows, plan, mlflow.cpu_s)
        results += measure(peer_target(fastapi), rows, plan, fastapi.cpu_s)
    # The request forms once the peers have stopped: nothing but the platform serves meanwhile.
    forms = bulk_forms(settings, api_key, rows, plan) if ca_file is not None else None
    pids = replica_pids(settings)
    prof = profile(targets[-1], pids[0], rows, plan.profile_s, out_dir) if pids else None
    sizes = (1, plan.bulk_rows)
    ceiling = in_process(model_uri, rows, plan.in_process_iterations, sizes=sizes, tracking_uri=tracking)
    ceiling["serving_path"] = in_process_serving_path(model_uri, tracking, rows, sizes, plan.in_process_iterations)
    if forms is not None:
        bulk_form_ratios(forms, results, ceiling)
    return {
        "model_uri": model_uri,
        "plan": plan.__dict__,
        "rows": results,
        "agreement": agreement,
        "in_process": ceiling,
        "bulk_forms": forms,
        "profile": prof,
        "replicas": len(pids),
    }

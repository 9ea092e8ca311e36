"""The servers the platform is compared with, each serving the same model, and the in-process
ceiling they all sit under.

    rows = sample_rows(1000)
    with fastapi_peer("models:/adult-income/3", log_dir, tracking_uri=uri) as peer:
        run_wrk(peer.url, peer.body(rows[:1]), peer.headers, connections=16, duration_s=10)

- `mlflow_peer`: `mlflow models serve --env-manager local`, one uvicorn worker. Its request body
  is `{"dataframe_records": [{feature: value, ...}, ...]}` on POST /invocations (pandas "records"
  orientation). MLflow checks it against the logged signature: integer features must be JSON
  integers (39, not 39.0, which is rejected with a 400), while a missing string feature may be
  null. It answers `{"predictions": [{"label", "probability", "p_<class>"...}, ...]}`.
  Health: GET /ping.
- `fastapi_peer`: benchmarks/peer_fastapi.py, `{"instances": [...]}` on POST /predict; GET /health.
- `in_process`: `predict_frame` called directly, no HTTP: the upper limit for any server.

Each server runs in its own process group, logs to `log_dir/<name>.log`, and is stopped (SIGTERM,
then SIGKILL) when its context exits, however it exits; if the benchmark process itself is killed,
the kernel sends the server SIGTERM (PR_SET_PDEATHSIG). Start peers from the main thread: that
signal follows the starting thread, not the process.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from tenacity import RetryError, retry, retry_if_result, stop_after_delay, wait_exponential

from cluster.sandbox import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
ADULT_CONFIG = REPO_ROOT / "jobs" / "configs" / "adult.yaml"
MLFLOW = "mlflow"
FASTAPI = "fastapi"
JSON_HEADERS = {"Content-Type": "application/json"}
# The first calls allocate; past these they are in the steady state that is measured.
WARMUP_CALLS = 10
Row = Mapping[str, Any]


class PeerError(RuntimeError):
    """A peer server exited or never became healthy; the message ends with its log."""


@dataclass
class Peer:
    name: str
    base_url: str
    predict_path: str
    rows_key: str
    process: subprocess.Popen[bytes]
    log_file: Path

    @property
    def url(self) -> str:
        return self.base_url + self.predict_path

    @property
    def headers(self) -> dict[str, str]:
        return dict(JSON_HEADERS)

    def body(self, rows: Sequence[Row]) -> bytes:
        """The request for `rows` in this server's own format."""
        return orjson.dumps({self.rows_key: list(rows)})

    def predict(self, rows: Sequence[Row], timeout_s: float = 30) -> list[dict[str, Any]]:
        response = httpx.post(self.url, content=self.body(rows), headers=self.headers, timeout=timeout_s)
        response.raise_for_status()
        predictions: list[dict[str, Any]] = response.json()["predictions"]
        return predictions

    def labels(self, rows: Sequence[Row]) -> list[str]:
        return [str(p["label"]) for p in self.predict(rows)]

    def cpu_s(self) -> float:
        """CPU seconds used so far by the server's processes (the CLI and the workers it forks)."""
        return process_tree_cpu_s(self.process.pid)


def process_tree_cpu_s(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


# Rows ---------------------------------------------------------------------------------------


def sample_rows(n: int = 1000, seed: int = 0, config_path: Path = ADULT_CONFIG) -> list[dict[str, Any]]:
    """`n` feature rows of the data set's test split as JSON-ready dicts (missing values as None)."""
    from jobs.config import load_config
    from jobs.data.loading import load_test_frame
    from jobs.schema import snake_case

    config = load_config(config_path)
    frame = load_test_frame(config).drop(columns=[snake_case(config.data.target)])
    frame = frame.sample(n=n, replace=n > len(frame), random_state=seed).reset_index(drop=True)
    return _json_records(frame)


def _json_records(frame: Any) -> list[dict[str, Any]]:
    # to_dict gives Python scalars, but NaN stays a float NaN, which is not JSON.
    records: list[dict[str, Any]] = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
    return records


def take_rows(rows: Sequence[Row], n: int) -> list[Row]:
    """The first `n` rows, cycling through `rows` when there are fewer: every server gets these."""
    if not rows:
        raise ValueError("no rows to take from")
    return [rows[i % len(rows)] for i in range(n)]


# Models ------------------------------------------------------------------------------------


def is_uri(model: str | Path) -> bool:
    return isinstance(model, str) and ("://" in model or model.startswith(("models:/", "runs:/")))


def resolve_model_dir(model: str | Path, dst: Path, tracking_uri: str | None = None) -> Path:
    """A local directory for `model`: downloaded into `dst` when it is an MLflow URI.

    The download runs in a child process given the tracking URI in its environment: MLflow
    resolves models:/ URIs against the process-wide registry URI whatever download_artifacts is
    passed, and changing that here would change it for the caller too.
    """
    if not is_uri(model):
        return Path(model)
    dst.mkdir(parents=True, exist_ok=True)
    script = "import sys, mlflow; print(mlflow.artifacts.download_artifacts(sys.argv[1], dst_path=sys.argv[2]))"
    done = subprocess.run(
        [sys.executable, "-c", script, str(model), str(dst)],
        env=_environment(_tracking_env(tracking_uri)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise PeerError(f"could not download {model}:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _tracking_env(tracking_uri: str | None) -> dict[str, str]:
    # The registry is set too, in case the caller's environment points it elsewhere.
    return {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri} if tracking_uri else {}


# Processes ---------------------------------------------------------------------------------


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def _environment(extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # mlflow starts `uvicorn` by name: it must resolve to this venv's, not whatever is on PATH.
    env["PATH"] = f"{_venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _log_tail(log_file: Path, chars: int = 3000) -> str:
    try:
        return log_file.read_text(encoding="utf-8", errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def wait_ready(health_url: str, process: subprocess.Popen[bytes], timeout_s: float, log_file: Path) -> None:
    """Poll `health_url` with backoff until it answers 200; fail fast if the process exits."""

    @retry(
        retry=retry_if_result(lambda ok: not ok),
        wait=wait_exponential(multiplier=0.05, max=1.0),
        stop=stop_after_delay(timeout_s),
    )
    def probe() -> bool:
        if process.poll() is not None:
            raise PeerError(f"exited with {process.returncode} before it was ready:\n{_log_tail(log_file)}")
        try:
            return httpx.get(health_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        probe()
    except RetryError as exc:
        raise PeerError(f"{health_url} not healthy after {timeout_s:.0f}s:\n{_log_tail(log_file)}") from exc


def stop_process_group(process: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    """SIGTERM the whole group (mlflow's CLI forks the server), SIGKILL what is left after grace_s."""
    pgid = process.pid  # start_new_session made the child its group's leader
    _signal_group(pgid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)
    process.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the thread that started it dies, so a
    benchmark killed outright (no `finally`) leaves no server behind. mlflow's CLI does the same
    for the uvicorn it starts."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@contextmanager
def serving(
    name: str, command: list[str], env: dict[str, str], log_dir: Path, health_url: str, timeout_s: float
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Start `command` in its own process group, wait until healthy, always stop it afterwards."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"{name}.log"
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        wait_ready(health_url, process, timeout_s, log_file)
        yield process, log_file
    finally:
        stop_process_group(process)


# The peers ---------------------------------------------------------------------------------


def _mlflow_binary() -> str:
    candidate = _venv_bin() / "mlflow"
    found = str(candidate) if candidate.is_file() else shutil.which("mlflow")
    if found is None:
        raise FileNotFoundError("the mlflow CLI is not installed")
    return found


@contextmanager
def mlflow_peer(
    model_uri: str,
    log_dir: Path,
    port: int | None = None,
    tracking_uri: str | None = None,
    timeout_s: float = 180,
    torch_threads: int | None = 1,
) -> Iterator[Peer]:
    """`mlflow models serve` on 127.0.0.1 with one worker.

    `torch_threads` goes in as OMP_NUM_THREADS (torch sizes its intra-op pool from it) so the model
    computes as in the FastAPI peer; None leaves torch's default of one thread per core.
    """
    port = port or free_port()
    extra = _tracking_env(tracking_uri)
    if torch_threads is not None:
        extra["OMP_NUM_THREADS"] = str(torch_threads)
    command = [_mlflow_binary(), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["-p", str(port), "-h", "127.0.0.1", "-w", "1"]
    base = f"http://127.0.0.1:{port}"
    with serving(MLFLOW, command, _environment(extra), log_dir, f"{base}/ping", timeout_s) as (process, log):
        yield Peer(MLFLOW, base, "/invocations", "dataframe_records", process, log)


@contextmanager
def fastapi_peer(
    model: str | Path,
    log_dir: Path,
    port: int | None = None,
    tracking_uri: str | None = None,
    timeout_s: float = 120,
    access_log: bool = True,
) -> Iterator[Peer]:
    """benchmarks/peer_fastapi.py on 127.0.0.1; `model` is a directory or an MLflow model URI."""
    port = port or free_port()
    model_dir = resolve_model_dir(model, log_dir / "fastapi-model", tracking_uri)
    command = [sys.executable, "-m", "benchmarks.peer_fastapi", "--model-dir", str(model_dir), "--port", str(port)]
    command.append("--access-log" if access_log else "--no-access-log")
    base = f"http://127.0.0.1:{port}"
    with serving(FASTAPI, command, _environment({}), log_dir, f"{base}/health", timeout_s) as (process, log):
        yield Peer(FASTAPI, base, "/predict", "instances", process, log)


# In process --------------------------------------------------------------------------------


def in_process(
    model: str | Path,
    rows: Sequence[Row],
    iterations: int = 200,
    sizes: Sequence[int] = (1, 1000),
    torch_threads: int = 1,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """`predict_frame` timed in this process for each batch size: no HTTP, no JSON, a DataFrame
    built beforehand. The torch thread count is the servers' and is restored afterwards."""
    import torch

    from benchmarks.peer_fastapi import predictor_directory
    from jobs.predictor import TabularPredictor

    with tempfile.TemporaryDirectory() as tmp:
        directory = resolve_model_dir(model, Path(tmp), tracking_uri)
        predictor = TabularPredictor.load(predictor_directory(directory))
    previous = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        results = [_time_predict_frame(predictor, take_rows(rows, n), iterations) for n in sizes]
    finally:
        torch.set_num_threads(previous)
    return {"torch_threads": torch_threads, "iterations": iterations, "results": results}


def _time_predict_frame(predictor: Any, rows: list[Row], iterations: int) -> dict[str, float]:
    import pandas as pd

    frame = pd.DataFrame.from_records(rows)
    # A short run (the smoke tests') warms up no longer than it measures.
    return time_calls(lambda: predictor.predict_frame(frame), len(rows), iterations, min(WARMUP_CALLS, iterations))


def time_calls(call: Callable[[], object], rows: int, iterations: int, warmup: int = WARMUP_CALLS) -> dict[str, float]:
    """`call`, which handles `rows` rows, timed over `iterations` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    durations = []
    for _ in range(iterations):
        started = time.perf_counter()
        call()
        durations.append(time.perf_counter() - started)
    total = sum(durations)
    median = statistics.median(durations)
    quantiles = statistics.quantiles(durations, n=100, method="inclusive")
    return {
        "rows": rows,
        "calls": iterations,
        "calls_per_s": iterations / total,
        "rows_per_s": iterations * rows / total,
        # From the median call: a ceiling that a few calls slowed by other load do not lower.
        "rows_per_s_p50": rows / median,
        "p50_ms": median * 1000,
        "p99_ms": quantiles[98] * 1000,
        "mean_ms": total / iterations * 1000,
    }

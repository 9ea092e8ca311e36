"""Nothing of the native stack listens beyond loopback but what the listening-socket table in
docs/arc42/08-crosscutting-concepts.md allows, with its reason and compensating control.

The table is the allowlist: its rows whose bind is not "loopback" are the only listeners that
may bind any other address. The stack's processes are the sessions `cluster up` started (each
component runs in a session of its own, `cluster/supervisor.py`) and their descendants, so
PostgreSQL, RabbitMQ, Redis and whatever else runs on this machine are left out, and so is any
other stack's. Some listeners live only while a job trains, so the stack is looked at idle and,
sampled, while a two-worker training job runs.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from cluster.components import components
from cluster.sandbox import Stack
from cluster.supervisor import LOCAL_CLUSTER_VARIABLE, child_environment, local_cluster_environment, managed, read_pid
from core.health import wait_until
from core.settings import REPO_ROOT, RaySettings, Settings, environment_variables, is_loopback
from services.ray_submission import jobs_client, submit_training

TABLE_PAGE = REPO_ROOT / "docs" / "arc42" / "08-crosscutting-concepts.md"
TABLE_HEADING = "### Listening sockets"
# A registered model of its own and no promotion: the session's champion stays what other tests made it.
MODEL_NAME = "listening-sockets-test"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class Allowed:
    """One row of the table that may listen beyond loopback."""

    settings: tuple[str, ...]  # the port settings it names; none: a port the kernel picks
    process: str  # part of the listening process's title (Ray workers retitle themselves per task)
    bind: str
    reason: str


@dataclass(frozen=True)
class Listener:
    port: int
    address: str
    pid: int


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _code(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def allowlist(page: Path = TABLE_PAGE) -> list[Allowed]:
    """The table's rows whose bind is not loopback."""
    lines = page.read_text(encoding="utf-8").splitlines()
    start = lines.index(TABLE_HEADING)
    rows = []
    for line in lines[start:]:
        if line.startswith("|"):
            rows.append(_cells(line))
        elif rows:
            break
    header, _, *body = rows
    assert header[:3] == ["port (setting, default)", "process", "bind"], header
    known = {name for name, _, _ in environment_variables()}
    allowed = []
    for port, process, bind, reason in body:
        if bind.startswith("loopback"):
            continue
        assert _code(process), f"no process named in the row for {port}"
        settings = tuple(name for name in _code(port) if name in known)
        allowed.append(Allowed(settings, _code(process)[0], bind, reason))
    return allowed


def setting_value(settings: Settings, variable: str) -> int:
    paths = {name: path for name, path, _ in environment_variables()}
    value: object = settings
    for part in paths[variable].split("."):
        value = getattr(value, part)
    assert isinstance(value, int), (variable, value)
    return value


def ephemeral_ports() -> range:
    """Where the kernel picks a port for a bind to port 0."""
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return range(int(low), int(high) + 1)


def stack_pids(settings: Settings) -> set[int]:
    """Every process of the stack: the sessions `cluster up` recorded, and the leaders' descendants
    in case one of them started a session of its own."""
    leaders = {pid for c in components(settings) if (pid := read_pid(managed(settings, c.name))) is not None}
    pids = set(leaders)
    for process in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(process.pid) in leaders:
                pids.add(process.pid)
    for leader in leaders:
        with contextlib.suppress(psutil.Error):
            pids.update(p.pid for p in psutil.Process(leader).children(recursive=True))
    return pids


def listeners(pids: set[int]) -> set[Listener]:
    return {
        Listener(conn.laddr.port, conn.laddr.ip, conn.pid)
        for conn in psutil.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids and conn.laddr
    }


def titles(pids: Iterable[int]) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found[pid] = {" ".join(psutil.Process(pid).cmdline())}
    return found


def unexplained(
    seen: Iterable[Listener], names: dict[int, set[str]], settings: Settings, allowed: list[Allowed]
) -> list[str]:
    """Listeners beyond loopback that no row of the allowlist explains, described for the failure message."""
    ephemeral = ephemeral_ports()
    wrong = []
    for listener in sorted(seen, key=lambda item: (item.port, item.address)):
        if is_loopback(listener.address):
            continue
        title = names.get(listener.pid, set())
        for row in allowed:
            if not any(row.process in name for name in title):
                continue
            ports = {setting_value(settings, name) for name in row.settings}
            if listener.port in ports or (not row.settings and listener.port in ephemeral):
                break
        else:
            wrong.append(f"{listener.address}:{listener.port} ({' / '.join(sorted(title)) or listener.pid})")
    return wrong


def test_every_allowed_listener_says_why_and_what_guards_it() -> None:
    allowed = allowlist()
    assert allowed, f"no row of the table in {TABLE_PAGE.name} may listen beyond loopback"
    for row in allowed:
        assert row.reason, f"{row.process} on {row.bind}: say why it is not on loopback and what guards it"


def test_the_idle_stack_listens_on_loopback_but_for_the_documented_ports(stack: Stack) -> None:
    settings = stack.settings
    pids = stack_pids(settings)
    seen = listeners(pids)
    ports = {listener.port for listener in seen}
    # Not an empty look: the Ray head, Serve's ingress and MLflow are among what was found.
    expected = {settings.ray.gcs_port, settings.ray.dashboard_port, settings.serve.port, settings.mlflow.port}
    assert expected <= ports, f"{sorted(expected - ports)} not found among the stack's listeners {sorted(ports)}"
    wrong = unexplained(seen, titles({listener.pid for listener in seen}), settings, allowlist())
    assert not wrong, f"listening beyond loopback, not in the table of {TABLE_PAGE.name}: {wrong}"


def test_a_training_job_listens_on_loopback_but_for_the_documented_ports(stack: Stack) -> None:
    """Ray Train workers, Ray Data and PyTorch's process group open ports only while a job runs."""
    settings = stack.settings
    overrides = ["train.epochs=1", "train.num_workers=2", f"model_name={MODEL_NAME}", "promotion.enabled=false"]
    job_id = submit_training(settings, "jobs/configs/adult.yaml", overrides)
    client = jobs_client(settings)
    seen: set[Listener] = set()
    names: dict[int, set[str]] = {}

    def sampled_until_done() -> bool:
        current = listeners(stack_pids(settings))
        seen.update(current)
        # Ray workers retitle themselves per task: a port is matched against every title its process had.
        for pid, title in titles({listener.pid for listener in current}).items():
            names.setdefault(pid, set()).update(title)
        return str(client.get_job_status(job_id).value) in TERMINAL

    assert wait_until(sampled_until_done, 900, max_wait_s=0.5), f"job {job_id} did not end"
    assert str(client.get_job_status(job_id).value) == "SUCCEEDED", client.get_job_logs(job_id)[-4000:]
    # The samples caught the job at work: its Train workers' own listeners are among them.
    workers = [pid for pid, title in names.items() if any("ray::RayTrainWorker" in t for t in title)]
    assert workers, "no Train worker was seen listening while the job ran"
    wrong = unexplained(seen, names, settings, allowlist())
    assert not wrong, f"listening beyond loopback, not in the table of {TABLE_PAGE.name}: {wrong}"


def test_ray_is_held_to_loopback_only_on_a_loopback_head() -> None:
    """Every process of a loopback stack, the head's included, gets Ray's one-machine switch; a
    head that other machines join (RAY_HOST set to its private address) keeps Ray's own choice."""
    single = Settings(ray=RaySettings(host="127.0.0.1"))
    assert local_cluster_environment(single) == {LOCAL_CLUSTER_VARIABLE: "0"}
    assert child_environment(single)[LOCAL_CLUSTER_VARIABLE] == "0"
    several = Settings(ray=RaySettings(host="10.0.0.5"))
    assert local_cluster_environment(several) == {}
    assert LOCAL_CLUSTER_VARIABLE not in child_environment(several)


def test_what_counts_as_loopback() -> None:
    for address in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "localhost"):
        assert is_loopback(address), address
    for address in ("0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2", "10.0.0.5", "ray-head"):
        assert not is_loopback(address), address

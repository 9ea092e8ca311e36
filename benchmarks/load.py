"""HTTP load with wrk: one fixed POST body, results read from a JSON line that a Lua `done()`
callback prints (wrk's own text summary rounds latencies and changes units from row to row).

    result = run_wrk(url, body, {"Content-Type": "application/json"}, connections=16, duration_s=10)
    result.rps, result.p99_ms, result.error_count, result.loadgen.machine_share

wrk runs on the same machine as the server it measures, so every run also records the CPU time
wrk itself used (`LoadGenUsage`): a load generator that takes a large share of the cores takes
them from the server, and the report should say so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Marks the callback's line among wrk's own output.
JSON_MARKER = "WRK_JSON "
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}
ERROR_KINDS = ("connect", "read", "write", "timeout", "status")

# The body is read from a file rather than inlined: a 1,000-row JSON body can contain any
# sequence a Lua string literal would have to escape.
_LUA = """
wrk.method = "POST"
local body_file = assert(io.open({body_path}, "rb"))
wrk.body = body_file:read("*a")
body_file:close()
{header_lines}

done = function(summary, latency, requests)
  local e = summary.errors
  local seconds = summary.duration / 1e6
  io.write(string.format(
    '{marker}{{"requests":%d,"duration_us":%d,"bytes":%d,"rps":%.6f,'
      .. '"errors":{{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d}},'
      .. '"latency_us":{{"p50":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f,'
      .. '"min":%d,"max":%d,"mean":%.1f,"stdev":%.1f}}}}\\n',
    summary.requests, summary.duration, summary.bytes, seconds > 0 and summary.requests / seconds or 0,
    e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.min, latency.max, latency.mean, latency.stdev))
end
"""


@dataclass(frozen=True)
class LoadGenUsage:
    """CPU that wrk itself used during a run, from the kernel's accounting of the reaped child,
    and what the whole machine used meanwhile: busy cores beyond wrk's and the server's mean
    something else competed for the CPU and the run should not be trusted."""

    cpu_s: float
    wall_s: float
    cpus: int
    machine_busy_s: float | None = None

    @property
    def cores(self) -> float:
        """Cores wrk kept busy on average (1.0 = one core all the time)."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def machine_share(self) -> float:
        """Fraction of the whole machine's CPU wrk used: what the server could not have."""
        return self.cores / self.cpus if self.cpus else 0.0

    @property
    def machine_busy_cores(self) -> float | None:
        """Cores busy on the whole machine during the run: wrk, the server and anything else."""
        if self.machine_busy_s is None or self.wall_s <= 0:
            return None
        return self.machine_busy_s / self.wall_s

    def to_dict(self) -> dict[str, float | None]:
        return {
            "cpu_s": self.cpu_s,
            "wall_s": self.wall_s,
            "cpus": self.cpus,
            "cores": self.cores,
            "machine_share": self.machine_share,
            "machine_busy_s": self.machine_busy_s,
            "machine_busy_cores": self.machine_busy_cores,
        }


@dataclass(frozen=True)
class LoadResult:
    url: str
    connections: int
    threads: int
    rows_per_request: int
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    bytes_read: int
    errors_by_kind: dict[str, int]
    loadgen: LoadGenUsage | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors_by_kind.values())

    @property
    def rows_per_s(self) -> float:
        return self.rps * self.rows_per_request

    def to_dict(self) -> dict[str, Any]:
        """Flat keys the report's serving rows use (`errors` is the total), plus the details."""
        data = asdict(self)
        data["loadgen"] = self.loadgen.to_dict() if self.loadgen else None
        data["errors"] = self.error_count
        data["rows_per_s"] = self.rows_per_s
        data["wrk_cores"] = self.loadgen.cores if self.loadgen else None
        data["wrk_machine_share"] = self.loadgen.machine_share if self.loadgen else None
        data["machine_busy_cores"] = self.loadgen.machine_busy_cores if self.loadgen else None
        return data


# Each connection sends to the rotation's paths in turn, each with its own headers: one wrk
# process splits its load evenly across several endpoints of one server.
_ROTATION_LUA = """
local rotation = {{ {targets} }}
local sent = 0
request = function()
  sent = sent + 1
  local target = rotation[(sent % #rotation) + 1]
  local headers = {{}}
  for name, value in pairs(target[2]) do headers[name] = value end
  return wrk.format(nil, target[1], headers)
end
"""


def lua_script(body_path: Path, headers: dict[str, str], rotation: Sequence[tuple[str, Mapping[str, str]]] = ()) -> str:
    header_lines = "\n".join(f"wrk.headers[{_lua_str(k)}] = {_lua_str(v)}" for k, v in headers.items())
    if rotation:
        targets = ", ".join(f"{{{_lua_str(path)}, {_lua_table(target_headers)}}}" for path, target_headers in rotation)
        header_lines += _ROTATION_LUA.format(targets=targets)
    return _LUA.format(body_path=_lua_str(str(body_path)), header_lines=header_lines, marker=JSON_MARKER)


def _lua_table(mapping: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"[{_lua_str(k)}] = {_lua_str(v)}" for k, v in mapping.items()) + "}"


def _lua_str(text: str) -> str:
    # For printable ASCII, json.dumps only escapes \" and \\, which mean the same in Lua; the
    # \uXXXX escapes it would use for anything else do not exist in wrk's LuaJIT.
    if not (text.isascii() and text.isprintable()):
        raise ValueError(f"only printable ASCII is supported in wrk header names, values and paths: {text!r}")
    return json.dumps(text)


def parse_done_json(
    output: str, rows_per_request: int = 1, url: str = "", connections: int = 0, threads: int = 0
) -> LoadResult:
    """The LoadResult from wrk's stdout: the last line the `done()` callback printed."""
    lines = [line for line in output.splitlines() if line.startswith(JSON_MARKER)]
    if not lines:
        raise ValueError(f"wrk printed no {JSON_MARKER.strip()} line; output:\n{output[-2000:]}")
    data = json.loads(lines[-1][len(JSON_MARKER) :])
    latency_ms = {key: float(value) / 1000 for key, value in data["latency_us"].items()}
    return LoadResult(
        url=url,
        connections=connections,
        threads=threads,
        rows_per_request=rows_per_request,
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6,
        rps=float(data["rps"]),
        p50_ms=latency_ms["p50"],
        p90_ms=latency_ms["p90"],
        p99_ms=latency_ms["p99"],
        p999_ms=latency_ms["p999"],
        max_ms=latency_ms["max"],
        mean_ms=latency_ms["mean"],
        bytes_read=int(data["bytes"]),
        errors_by_kind={kind: int(data["errors"][kind]) for kind in ERROR_KINDS},
    )


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise FileNotFoundError("wrk is not installed (apt-get install wrk)")
    return found


def run_wrk(
    url: str,
    body: bytes,
    headers: dict[str, str],
    connections: int,
    duration_s: float,
    threads: int | None = None,
    ca_file: Path | None = None,
    rows_per_request: int = 1,
    timeout_s: float = 10.0,
    rotation: Sequence[tuple[str, Mapping[str, str]]] = (),
) -> LoadResult:
    """POST `body` to `url` from `connections` keep-alive connections for `duration_s`.

    `ca_file` is accepted for symmetry with the HTTP clients but unused: wrk does not verify
    certificates. `timeout_s` is wrk's per-request timeout; a request slower than that counts as
    a timeout error and is left out of the latencies, so it is set well above the expected p99.
    """
    del ca_file
    threads = threads or min(connections, 2)
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        body_path = Path(tmp) / "body"
        body_path.write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(lua_script(body_path, headers, rotation), encoding="utf-8")
        command = [
            wrk_binary(),
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration_s))}s",
            f"--timeout={max(1, round(timeout_s))}s",
            "-s",
            str(script),
            url,
        ]
        returncode, output, usage = _run_measured(command, limit_s=duration_s + timeout_s + 30)
    if returncode != 0:
        raise RuntimeError(f"wrk exited with {returncode}:\n{output[-2000:]}")
    return replace(parse_done_json(output, rows_per_request, url, connections, threads), loadgen=usage)


def run_wrk_split(
    targets: Sequence[tuple[str, Mapping[str, str]]], body: bytes, connections: int, duration_s: float
) -> LoadResult:
    """Load split evenly across `targets` (URLs of one server, each with its headers) by one wrk
    process: every connection sends to each target in turn. With one target it is the same
    request path, so a one-endpoint figure and a split figure cost the load generator alike."""
    origins = {urlsplit(url)._replace(path="", query="", fragment="").geturl() for url, _ in targets}
    if len(origins) != 1:
        raise ValueError(f"one wrk process loads one server; these targets name {sorted(origins)}")
    rotation = [(_path_of(url), dict(headers)) for url, headers in targets]
    return run_wrk(targets[0][0], body, dict(targets[0][1]), connections, duration_s, rotation=rotation)


def _path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _run_measured(command: list[str], limit_s: float) -> tuple[int, str, LoadGenUsage]:
    """Run `command`, reaping it with wait4 so its rusage is its own (RUSAGE_CHILDREN would also
    count any other child reaped meanwhile). Output goes to a file: no pipe to drain."""
    with tempfile.TemporaryFile() as out:
        busy_before = _machine_busy_s()
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        # A hung wrk (a server that never closes) must not hang the benchmark.
        watchdog = threading.Timer(limit_s, process.kill)
        watchdog.start()
        try:
            _, status, rusage = os.wait4(process.pid, 0)
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - started
        busy = _machine_busy_s() - busy_before
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read().decode("utf-8", errors="replace")
    cpu_s = rusage.ru_utime + rusage.ru_stime
    usage = LoadGenUsage(cpu_s=cpu_s, wall_s=wall, cpus=os.cpu_count() or 1, machine_busy_s=busy)
    return process.returncode, output, usage


def _machine_busy_s() -> float:
    """CPU seconds all cores have spent not idle since boot."""
    import psutil

    # Only work done here: guest time is already inside user, steal is the hypervisor's.
    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq"))


def loadgen_summary(results: list[LoadResult]) -> dict[str, Any]:
    """The load generator's CPU over a set of runs, and a sentence for the report."""
    usages = [r.loadgen for r in results if r.loadgen is not None]
    if not usages:
        return {"runs": 0, "statement": "wrk's CPU use was not measured."}
    worst = max(usages, key=lambda u: u.cores)
    total_cpu = sum(u.cpu_s for u in usages)
    total_wall = sum(u.wall_s for u in usages)
    mean_cores = total_cpu / total_wall if total_wall else 0.0
    cpus = worst.cpus
    return {
        "runs": len(usages),
        "cpus": cpus,
        "mean_cores": mean_cores,
        "max_cores": worst.cores,
        "max_machine_share": worst.machine_share,
        "statement": (
            f"wrk used {mean_cores:.2f} cores on average and at most {worst.cores:.2f} "
            f"({worst.machine_share:.0%} of this machine's {cpus} CPUs) during a run; "
            "that CPU was not available to the server under test."
        ),
    }

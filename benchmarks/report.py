"""Benchmark results as files: results.json, report.md and PNG plots in one directory.

    write_report(results, Path("benchmarks/results/serving-2026-01-01"))
    .venv/bin/python -m benchmarks.report results.json --out DIR   # re-render from a saved run

`results` is a JSON-ready dict; every section is optional, so a partial run still gets a report:
  machine     machine_info(), filled in when absent
  quick, duration_s   how the run was made and how long it took
  headline    not stored: `headline(results)` picks the figures the issue tracker quotes
  serving     {"rows": [{server, connections, rows_per_request, rps, rows_per_s, p50_ms, p90_ms,
               p99_ms, errors, requests, [wrk_cores]}...], "in_process": peers.in_process(...),
               "multi_model": ..., "plan": ..., "agreement": ...}
  training    {plain|ray_train_1|ray_train_2: {epoch_rows_per_s, steady_rows_per_s, wall_s,
               train_loss, val_<metric>}, ratios, goals, tune, ...}
  batch_predict  benchmarks/batch_predict.py's batch_inference(): {rows, job: {rows_per_s, peak_pss_mib,
               spilled_mib...}, in_process_one_core: {predict_frame: {rows_per_s...}}, ratio_to_one_core...}
  loop, profile, shapes, monitor, shadow   see their renderers below

Each known section has a renderer in `SECTIONS` (a new benchmark section adds one there); any other
section, and any key a renderer does not know, is shown as a key/value table whose units come from
the key names (`wall_s` in s, `p99_ms` in ms, `rows_per_s` in rows/s...), never as headings.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import typer

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINES = (("mlflow", "mlflow"), ("fastapi", "bare FastAPI"))
# The platform as users reach it (benchmarks/serving.py's EDGE), then at the Serve port.
PLATFORM_SERVERS = ("platform (Nginx TLS)", "platform (Serve ingress)")
LATENCY_CONNECTIONS = 16
TRAINING_ORDER = ("plain", "ray_train_1", "ray_train_2")
MAX_TABLE_ROWS = 25
MAX_INLINE_VALUES = 8
THROUGHPUT_PNG = "serving_throughput.png"
LATENCY_PNG = "serving_latency.png"
TRAINING_PNG = "training_curves.png"
MISSING = "—"

cli = typer.Typer(add_completion=False)


# Machine -----------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import psutil

    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "ray": _version("ray"),
        "mlflow": _version("mlflow"),
        "wrk": _wrk_version(),
        "git_commit": _git_commit(),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def _version(package: str) -> str | None:
    # Metadata only: importing ray or torch here would take seconds and start their machinery.
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _command_output(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout or done.stderr).strip() or None


def _wrk_version() -> str | None:
    output = _command_output(["wrk", "-v"])  # wrk prints its version with the usage, and exits 1
    return output.splitlines()[0].split(" Copyright")[0] if output else None


def _git_commit() -> str | None:
    commit = _command_output(["git", "rev-parse", "HEAD"])
    if commit is None:
        return None
    dirty = _command_output(["git", "status", "--porcelain", "--untracked-files=no"])
    return f"{commit} (uncommitted changes)" if dirty else commit


# Formatting --------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return MISSING
    return f"{value / base:.2f}×"


def spread(values: Mapping[str, Any] | None, unit: str = "") -> str:
    """{median, min, max} as `median (min-max) unit`."""
    if not values:
        return MISSING
    suffix = f" {unit}" if unit else ""
    return f"{fmt(values.get('median'))} ({fmt(values.get('min'))}–{fmt(values.get('max'))}){suffix}"


# Units from key names --------------------------------------------------------------------------

_SUFFIX_UNITS = (
    ("_ms", "ms"),
    ("_us", "µs"),
    ("_s", "s"),
    ("_pct", "%"),
    ("_mib", "MiB"),
    ("_gib", "GiB"),
    ("_bytes", "bytes"),
    ("_cores", "cores"),
)
_TIME_UNITS = {"s": "s", "ms": "ms", "min": "min", "h": "h"}


def unit_of(key: str) -> str:
    """The unit a key names: `wall_s` s, `p99_ms` ms, `rows_per_s` rows/s, `rps` req/s,
    `cpu_s_per_window` s/window, `cost_pct` %, `rss_mib` MiB; "" when it names none."""
    k = key.lower()
    if k == "rps" or k.endswith("_rps"):
        return "req/s"
    if k.startswith("seconds_"):
        return "s"
    if "_per_" in k:
        numerator, denominator = k.split("_per_", 1)
        first = denominator.split("_")[0]
        per = _TIME_UNITS.get(first, denominator.replace("_", " "))
        top = _suffix_unit(numerator) or numerator.split("_")[-1]
        return f"{'req' if top == 'rps' else top}/{per}"
    return _suffix_unit(k)


def _suffix_unit(key: str) -> str:
    return next((unit for suffix, unit in _SUFFIX_UNITS if key.endswith(suffix)), "")


def _is_share(key: str) -> bool:
    return key == "share" or key.endswith("_share")


def with_unit(key: str, value: Any) -> str:
    """A value as a person reads it: `43.2 s`, `17.4 ms`, `36,372 rows/s`, `12.5%`, `yes`."""
    if isinstance(value, bool) or value is None:
        return fmt(value)
    if isinstance(value, int | float) and _is_share(key):
        return f"{value:.1%}"
    if isinstance(value, list):
        return _list_value(key, value)
    unit = unit_of(key) if isinstance(value, int | float) else ""
    if unit == "%":
        return f"{fmt(value)}%"
    return f"{fmt(value)} {unit}" if unit else fmt(value)


def _list_value(key: str, values: list[Any]) -> str:
    if not values:
        return "none"
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(values) <= MAX_INLINE_VALUES or len(numbers) != len(values):
        return ", ".join(with_unit(key, v) if not isinstance(v, Mapping | list) else json.dumps(v) for v in values)
    unit = unit_of(key)
    suffix = f" {unit}" if unit and unit != "%" else ""
    return (
        f"{len(values)} values, first {fmt(values[0])}, last {fmt(values[-1])}, "
        f"median {fmt(statistics.median(numbers))}{suffix}"
    )


def label(key: str) -> str:
    """A column header from a key: its words with the unit (`p99_ms` -> `p99 (ms)`,
    `steady_rows_per_s` -> `steady rows/s`, `cpu_s_per_window` -> `cpu s/window`)."""
    if key.lower() == "rps" or key.lower().endswith("_rps"):
        return f"{key[:-3].replace('_', ' ')}req/s".strip()
    if "_per_" in key:
        numerator, denominator = key.split("_per_", 1)
        lead, top = numerator.split("_")[:-1], numerator.split("_")[-1]
        top = _suffix_unit(numerator) or top
        after = denominator.split("_")
        per, trail = (after[0], after[1:]) if after[0] in _TIME_UNITS else (" ".join(after), [])
        return " ".join([*lead, f"{top}/{per}", *trail])
    unit = _suffix_unit(key.lower())
    if unit:
        return f"{key[: key.rfind('_')].replace('_', ' ')} ({unit})"
    return key.replace("_", " ")


# Generic sections ------------------------------------------------------------------------------


def _flatten(value: Mapping[str, Any], prefix: str = "") -> tuple[list[tuple[str, Any]], list[tuple[str, list[Any]]]]:
    """Scalars and short lists as dotted keys; lists of objects kept apart for tables of their own."""
    pairs: list[tuple[str, Any]] = []
    tables: list[tuple[str, list[Any]]] = []
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, Mapping):
            if not item:
                pairs.append((name, "none"))
                continue
            inner_pairs, inner_tables = _flatten(item, f"{name}.")
            pairs += inner_pairs
            tables += inner_tables
        elif isinstance(item, list) and item and all(isinstance(entry, Mapping) for entry in item):
            tables.append((name, item))
        else:
            pairs.append((name, item))
    return pairs, tables


def key_values(value: Any, title: str | None = None) -> list[str]:
    """Any figures as a key/value table (units from the key names), and a table per list of
    objects. Keys stay as results.json has them, so a figure is easy to find there."""
    if not isinstance(value, Mapping):
        value = {title or "value": value}
    pairs, tables = _flatten(value)
    lines = (
        table(["key", "value"], ((key, with_unit(key.rsplit(".", 1)[-1], item)) for key, item in pairs))
        if pairs
        else []
    )
    for name, rows in tables:
        lines += [f"`{name}` ({len(rows)} row{'' if len(rows) == 1 else 's'}):", "", *records_table(rows)]
    return lines


def records_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> list[str]:
    """A list of objects as one table: a column per key, headed with its unit."""
    keys = list(columns or dict.fromkeys(k for row in rows for k in row))
    shown = rows[:MAX_TABLE_ROWS]
    body = ([_cell(key, row.get(key)) for key in keys] for row in shown)
    lines = table([label(key) for key in keys], body)
    return lines + ([f"({len(rows) - len(shown)} more rows in results.json)", ""] if len(rows) > len(shown) else [])


def _cell(key: str, value: Any) -> Any:
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {with_unit(k, v)}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return _list_value(key, value)
    if isinstance(value, float) and _is_share(key):
        return f"{value:.1%}"
    return value


def _rest(section: Mapping[str, Any], known: Iterable[str]) -> list[str]:
    """What a renderer does not know yet (a new field), shown rather than dropped."""
    rest = {k: v for k, v in section.items() if k not in set(known) and v not in (None, {}, [])}
    return ["Other figures of this section:", "", *key_values(rest)] if rest else []


# Sections --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadlineRow:
    """One line of the headline table: what was measured, the platform's figure, and what it is
    compared with (a peer, the ceiling, or the same thing without the feature)."""

    measure: str
    platform: str
    reference: str = MISSING


@dataclass(frozen=True)
class Context:
    results: Mapping[str, Any]
    plots: Sequence[str] = ()

    def plot_lines(self, *names: str) -> list[str]:
        return [line for name in names if name in self.plots for line in (f"![{Path(name).stem}]({name})", "")]


Renderer = Callable[[Mapping[str, Any], Context], list[str]]
Headliner = Callable[[Mapping[str, Any]], list[HeadlineRow]]


@dataclass(frozen=True)
class Section:
    """How report.md shows one key of results.json: under `title`, by `render`; `headline`
    contributes to the headline table. A new benchmark section adds one to `SECTIONS`."""

    key: str
    title: str
    render: Renderer
    headline: Headliner | None = None
    plots: tuple[str, ...] = ()


# Serving -----------------------------------------------------------------------------------


def _errors(row: Mapping[str, Any]) -> int:
    errors = row.get("errors", 0)
    return sum(errors.values()) if isinstance(errors, Mapping) else int(errors or 0)


def _groups(rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """(rows_per_request, connections) pairs, single-row groups first, then by connections."""
    keys = {(int(r.get("rows_per_request", 1)), int(r["connections"])) for r in rows}
    return sorted(keys)


def _servers(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r["server"]) for r in rows))


def _ceilings(in_proc: Mapping[str, Any] | None) -> dict[int, float]:
    if not in_proc:
        return {}
    results = in_proc.get("results", [])
    return {int(r["rows"]): float(r.get("rows_per_s_p50") or r["rows_per_s"]) for r in results if "rows_per_s" in r}


def _plan_lines(plan: Mapping[str, Any]) -> list[str]:
    if not {"duration_s", "connections"} <= set(plan):
        return []
    connections = ", ".join(str(c) for c in plan["connections"])
    text = (
        f"Each load ran {fmt(plan['duration_s'])} s after a {fmt(plan.get('warmup_s'))} s warm-up, one server after "
        f"the other: single rows at {connections} connections"
    )
    if plan.get("bulk_rows"):
        text += f", {fmt(plan['bulk_rows'])}-row requests at {fmt(plan.get('bulk_connections'))} connections"
    return [text + ".", ""]


def _agreement_lines(agreement: Mapping[str, Any]) -> list[str]:
    rows = fmt(agreement.get("rows"))
    disagreements = agreement.get("disagreements") or {}
    if agreement.get("agree", not any(disagreements.values())):
        return [f"Before any load, every server gave the same labels for the same {rows} rows.", ""]
    differ = ", ".join(f"{server} {fmt(n)}" for server, n in disagreements.items() if n)
    return [f"**The servers disagree** on the labels of the same {rows} rows ({differ}): the comparison is void.", ""]


def serving_section(serving: Mapping[str, Any], context: Context) -> list[str]:
    rows: list[Mapping[str, Any]] = list(serving.get("rows") or [])
    in_proc = serving.get("in_process")
    cpus = (context.results.get("machine") or {}).get("logical_cpus")
    lines: list[str] = []
    if serving.get("model_uri"):
        replicas = f", {fmt(serving['replicas'])} ingress replica(s)" if serving.get("replicas") is not None else ""
        lines += [f"Model `{serving['model_uri']}`{replicas}.", ""]
    plan = serving.get("plan") or {}
    plan_lines = _plan_lines(plan)
    lines += plan_lines
    if serving.get("agreement"):
        lines += _agreement_lines(serving["agreement"])
    if rows:
        lines += _loadgen_lines(rows, cpus or os.cpu_count() or 1)
        for per_request, connections in _groups(rows):
            group = [
                r for r in rows if int(r.get("rows_per_request", 1)) == per_request and r["connections"] == connections
            ]
            lines += _serving_group(group, per_request, connections, _ceilings(in_proc).get(per_request))
    if serving.get("bulk_forms"):
        lines += bulk_forms_lines(serving["bulk_forms"])
    lines += context.plot_lines(THROUGHPUT_PNG, LATENCY_PNG)
    if in_proc:
        lines += _in_process_lines(in_proc)
    if serving.get("multi_model"):
        lines += multi_model_lines(serving["multi_model"])
    known = {"rows", "in_process", "model_uri", "replicas", "plan", "agreement", "multi_model", "bulk_forms"}
    # What the sentence about the plan did not say is shown with the other figures.
    plan_rest = {k: v for k, v in plan.items() if k not in PLAN_KEYS} if plan_lines else plan
    return lines + _rest({**serving, "plan": plan_rest}, known - {"plan"})


PLAN_KEYS = frozenset({"connections", "duration_s", "warmup_s", "bulk_rows", "bulk_connections"})


def _in_process_lines(in_proc: Mapping[str, Any]) -> list[str]:
    lines = [
        "### In-process ceiling (no HTTP)",
        "",
        f"`predict_frame` on a prepared DataFrame; torch threads: {fmt(in_proc.get('torch_threads'))}, "
        f"calls per size: {fmt(in_proc.get('iterations'))}.",
        "",
    ]
    header = ["rows per call", "calls/s", "rows/s", "rows/s at p50", "p50 (ms)", "p99 (ms)"]
    columns = ("rows", "calls_per_s", "rows_per_s", "rows_per_s_p50", "p50_ms", "p99_ms")
    lines += table(header, ([r.get(k) for k in columns] for r in in_proc.get("results") or []))
    if in_proc.get("serving_path"):
        lines += ["The platform's own path per batch (rows encoded, the model, the prediction objects):", ""]
        lines += table(
            ["path", *header], ([r.get("path"), *(r.get(k) for k in columns)] for r in in_proc["serving_path"])
        )
    return lines + _rest(in_proc, {"torch_threads", "iterations", "results", "serving_path"})


def _cores(value: Any) -> str:
    return MISSING if value is None else f"{float(value):.2f}"


def _loadgen_lines(rows: Sequence[Mapping[str, Any]], cpus: int) -> list[str]:
    cores = [float(r["wrk_cores"]) for r in rows if r.get("wrk_cores") is not None]
    if not cores:
        return []
    return [
        f"Load generator: wrk on the same machine used {sum(cores) / len(cores):.2f} cores on average, at most "
        f"{max(cores):.2f} ({max(cores) / cpus:.0%} of {cpus} CPUs) — CPU the servers did not have.",
        "",
    ]


def _serving_group(
    group: Sequence[Mapping[str, Any]], per_request: int, connections: int, ceiling: float | None
) -> list[str]:
    by_server = {str(r["server"]): r for r in group}
    bases = {key: by_server[key].get("rows_per_s") for key, _ in BASELINES if key in by_server}
    header = ["server", "req/s", "rows/s", "p50 (ms)", "p90 (ms)", "p99 (ms)", "errors / requests"]
    header += [f"vs {peer}" for key, peer in BASELINES if key in bases]
    if ceiling:
        header.append("of in-process p50 rate")
    with_cpu = any(r.get("wrk_cores") is not None for r in group)
    if with_cpu:
        header.append("CPU cores: machine / server / wrk")
    body = []
    for server, r in by_server.items():
        cells = [server, r.get("rps"), r.get("rows_per_s"), r.get("p50_ms"), r.get("p90_ms"), r.get("p99_ms")]
        cells.append(f"{fmt(_errors(r))} / {fmt(r.get('requests'))}")
        cells += [ratio(r.get("rows_per_s"), base) for base in bases.values()]
        if ceiling:
            cells.append(f"{float(r.get('rows_per_s') or 0) / ceiling:.1%}")
        if with_cpu:
            cells.append(" / ".join(_cores(r.get(k)) for k in ("machine_busy_cores", "server_cores", "wrk_cores")))
        body.append(cells)
    title = "1 row" if per_request == 1 else f"{per_request:,} rows"
    plural = "" if connections == 1 else "s"
    return [f"### {title} per request, {connections} connection{plural}", "", *table(header, body)]


FORM_KEYS = frozenset(
    {
        "body_bytes", "rps", "rows_per_s", "p50_ms", "p99_ms", "errors", "requests", "platform_cores",
        "postgres_cores", "rows_answered", "rows_recorded_during_run", "rows_recorded", "rows_dropped",
    }
)  # fmt: skip
# What wrk reports besides (benchmarks/load.py's LoadResult: the run's shape, its other latencies,
# its own CPU, errors by kind) and the cores by process kind: in results.json only.
FORM_DETAILS = frozenset(
    {
        "url", "connections", "threads", "rows_per_request", "duration_s", "p90_ms", "p999_ms", "max_ms",
        "mean_ms", "bytes_read", "errors_by_kind", "loadgen", "extra", "wrk_cores", "wrk_machine_share",
        "machine_busy_cores", "cores",
    }
)  # fmt: skip
# In the table (p50 and p99 are), or in results.json only (p99 over p50).
RATIO_KEYS = frozenset({"vs_fastapi", "vs_in_process", "p99_over_p50"})


def bulk_forms_lines(forms: Mapping[str, Any]) -> list[str]:
    """Bulk requests in each form the platform reads, through Nginx, against the bare FastAPI
    server's bulk run and the in-process serving path of the same run, with the prediction records."""
    runs: Mapping[str, Mapping[str, Any]] = forms.get("runs") or {}
    ratios = forms.get("ratios") or {}
    size, connections = forms.get("rows_per_request"), forms.get("connections")
    recorded = any("rows_recorded" in run for run in runs.values())
    header = ["form", "body (bytes)", "req/s", "rows/s", "p50 (ms)", "p99 (ms)", "errors / requests"]
    header += ["vs bare FastAPI", "vs in-process serving path", "CPU cores: platform / PostgreSQL"]
    if recorded:
        header += ["rows answered", "records: during the run / once drained", "records dropped"]
    body = []
    for form, run in runs.items():
        ratio_of = ratios.get(form) or {}
        cells = [form, run.get("body_bytes"), run.get("rps"), run.get("rows_per_s"), run.get("p50_ms")]
        cells += [run.get("p99_ms"), f"{fmt(_errors(run))} / {fmt(run.get('requests'))}"]
        cells += [_times(ratio_of.get("vs_fastapi")), _times(ratio_of.get("vs_in_process"))]
        cells.append(f"{_cores(run.get('platform_cores'))} / {_cores(run.get('postgres_cores'))}")
        if recorded:
            cells.append(run.get("rows_answered"))
            cells.append(f"{fmt(run.get('rows_recorded_during_run'))} / {fmt(run.get('rows_recorded'))}")
            cells.append(run.get("rows_dropped"))
        body.append(cells)
    server = forms.get("server", PLATFORM_SERVERS[0])
    lines = [
        f"### {fmt(size)} rows per request by form, {fmt(connections)} connections, {server}",
        "",
        f"The same rows as JSON row objects (`instances`), JSON columns (`columns`) and an Arrow IPC stream "
        f"(`arrow`), one form after the other; the ratios are to this run's bare FastAPI server "
        f"({with_unit('rows_per_s', forms.get('fastapi_rows_per_s'))}, `instances` body) and in-process serving "
        f"path ({with_unit('rows_per_s', forms.get('in_process_serving_path_rows_per_s'))}) at "
        f"{fmt(size)} rows per request. CPU cores: the ingress replica, HAProxy and Nginx; PostgreSQL's backends.",
        "",
        *table(header, body),
    ]
    if recorded:
        lines += [
            "Prediction records: counted in PostgreSQL during each run and again once the replica's buffer "
            "drained; what is missing then was dropped because PostgreSQL fell behind (the drained count can exceed "
            "the rows answered by the requests still in flight when wrk stopped).",
            "",
        ]
    return lines + _rest(
        {
            **{k: v for k, v in forms.items() if k not in {"runs", "ratios"}},
            "runs": _unshown(runs, FORM_KEYS | FORM_DETAILS),
            "ratios": _unshown(ratios, RATIO_KEYS),
        },
        {"server", "rows_per_request", "connections", "fastapi_rows_per_s", "in_process_serving_path_rows_per_s"},
    )


def _unshown(per_form: Mapping[str, Mapping[str, Any]], shown: frozenset[str]) -> dict[str, Any]:
    """Each form's figures that the table does not show and that are not kept to results.json alone."""
    unshown = {form: {k: v for k, v in figures.items() if k not in shown} for form, figures in per_form.items()}
    return {form: figures for form, figures in unshown.items() if figures}


def bulk_forms_headline(serving: Mapping[str, Any]) -> list[HeadlineRow]:
    forms = serving.get("bulk_forms") or {}
    runs: Mapping[str, Mapping[str, Any]] = forms.get("runs") or {}
    if not runs:
        return []
    where = str(forms.get("server", PLATFORM_SERVERS[0])).removeprefix("platform (").removesuffix(")")
    ratios = forms.get("ratios") or {}

    def versus(name: str, figure: Any, key: str) -> str:
        if figure is None:
            return ""
        multiples = ", ".join(f"{form} {_times((ratios.get(form) or {}).get(key))}" for form in runs)
        return f"{name} {fmt(figure)} rows/s ({multiples})"

    dropped = [run["rows_dropped"] for run in runs.values() if run.get("rows_dropped") is not None]
    records = f"; {fmt(sum(dropped))} records dropped" if dropped else ""
    refs = [
        versus("bare FastAPI", forms.get("fastapi_rows_per_s"), "vs_fastapi"),
        versus("in-process serving path", forms.get("in_process_serving_path_rows_per_s"), "vs_in_process"),
    ]
    return [
        HeadlineRow(
            f"{fmt(forms.get('rows_per_request'))}-row requests by form, {fmt(forms.get('connections'))} connections, "
            f"{where}",
            ", ".join(f"{form} {fmt(run.get('rows_per_s'))}" for form, run in runs.items()) + f" rows/s{records}",
            "; ".join(r for r in refs if r) or MISSING,
        )
    ]


def _load_row(name: str, load: Mapping[str, Any]) -> list[Any]:
    rounds = load.get("req_per_s_by_round") or []
    return [
        name,
        load.get("req_per_s"),
        load.get("p50_ms"),
        load.get("p99_ms"),
        f"{fmt(load.get('errors'))} / {fmt(load.get('requests'))}",
        ", ".join(fmt(r) for r in rounds) or MISSING,
    ]


LOAD_HEADER = ["load", "req/s (median round)", "p50 (ms)", "p99 (ms)", "errors / requests", "req/s by round"]


def multi_model_lines(multi: Mapping[str, Any]) -> list[str]:
    models = " and ".join(f"`{m}`" for m in multi.get("models") or [])
    connections = (multi.get("one_model") or {}).get("connections")
    lines = [
        "### Two models at once (multi model)",
        "",
        f"Single-row requests through Nginx at {fmt(connections)} connections to one model, then the same connections "
        f"sending to two ({models}) in turn; alternated, the median round's figures.",
        "",
        *table(
            LOAD_HEADER,
            [
                _load_row("one model", multi.get("one_model") or {}),
                _load_row("two models", multi.get("two_models") or {}),
            ],
        ),
        f"Two models against one: {fmt(multi.get('two_vs_one'))}× req/s. "
        f"Ingress replicas: {fmt(multi.get('replicas'))}, "
        f"their memory {with_unit('rss_mib', multi.get('replicas_rss_mib_one_model'))} with one model, "
        f"{with_unit('rss_mib', multi.get('replicas_rss_mib_two_models'))} with two "
        f"({with_unit('rss_mib', multi.get('rss_mib_per_extra_model_per_replica'))} per extra model per replica).",
        "",
    ]
    known = {
        "models",
        "one_model",
        "two_models",
        "two_vs_one",
        "two_vs_one_by_round",
        "replicas",
        "replicas_rss_mib_one_model",
        "replicas_rss_mib_two_models",
        "rss_mib_per_extra_model_per_replica",
    }
    return lines + _rest(multi, known)


def _find(
    rows: Sequence[Mapping[str, Any]], server: str, per_request: int, connections: int
) -> Mapping[str, Any] | None:
    return next(
        (
            r
            for r in rows
            if r["server"] == server
            and int(r.get("rows_per_request", 1)) == per_request
            and int(r["connections"]) == connections
        ),
        None,
    )


def _platform_server(rows: Sequence[Mapping[str, Any]]) -> str | None:
    servers = _servers(rows)
    preferred = [s for s in PLATFORM_SERVERS if s in servers]
    return preferred[0] if preferred else next((s for s in servers if s.startswith("platform")), None)


def _versus(name: str, figure: float | None, unit: str, mine: float | None) -> str:
    if figure is None:
        return ""
    share = f" ({mine / figure:.2f}×)" if mine is not None and figure else ""
    return f"{name} {fmt(figure)} {unit}{share}"


def serving_headline(results: Mapping[str, Any]) -> list[HeadlineRow]:
    serving = results.get("serving") or {}
    rows: list[Mapping[str, Any]] = list(serving.get("rows") or [])
    server = _platform_server(rows)
    if server is None:
        return []
    where = server.removeprefix("platform (").removesuffix(")")
    headline = []
    single = sorted({int(r["connections"]) for r in rows if int(r.get("rows_per_request", 1)) == 1})
    picks: list[tuple[int, str]] = []
    if single:
        many = min(single, key=lambda c: abs(c - LATENCY_CONNECTIONS))
        picks.append((many, "p99"))
        if 1 in single and many != 1:
            picks.append((1, "p50"))
    for connections, percentile in picks:
        mine = _find(rows, server, 1, connections)
        if mine is None:
            continue
        refs = [
            _versus(peer, (_find(rows, key, 1, connections) or {}).get("rps"), "req/s", mine.get("rps"))
            for key, peer in reversed(BASELINES)
        ]
        headline.append(
            HeadlineRow(
                f"1 row per request, {connections} connection{'s' if connections != 1 else ''}, {where}",
                f"{fmt(mine.get('rps'))} req/s, {percentile} {fmt(mine.get(f'{percentile}_ms'))} ms",
                "; ".join(r for r in refs if r) or MISSING,
            )
        )
    for per_request, connections in _groups(rows):
        mine = _find(rows, server, per_request, connections) if per_request > 1 else None
        if mine is None:
            continue
        fastapi = (_find(rows, "fastapi", per_request, connections) or {}).get("rows_per_s")
        path = next(
            (
                p.get("rows_per_s")
                for p in (serving.get("in_process") or {}).get("serving_path") or []
                if p.get("rows") == per_request
            ),
            None,
        )
        refs = [
            _versus("bare FastAPI", fastapi, "rows/s", mine.get("rows_per_s")),
            _versus("in-process serving path", path, "rows/s", mine.get("rows_per_s")),
        ]
        headline.append(
            HeadlineRow(
                f"{per_request:,}-row requests, {connections} connections, {where}",
                f"{fmt(mine.get('rows_per_s'))} rows/s, "
                f"p50 {fmt(mine.get('p50_ms'))} ms, p99 {fmt(mine.get('p99_ms'))} ms",
                "; ".join(r for r in refs if r) or MISSING,
            )
        )
    return headline + bulk_forms_headline(serving)


# Profile and shapes -----------------------------------------------------------------------------


def profile_section(profile: Mapping[str, Any], context: Context, top: int = 15) -> list[str]:
    """py-spy's view of the ingress replica under load: where its Python time goes."""
    lines = [
        f"py-spy, samples taken while the replica held the GIL: {fmt(profile.get('samples'))} "
        f"(raw stacks in `serving/{profile.get('file', 'profile-ingress.txt')}`).",
        "",
    ]
    for key, title in (("self", "Own time (innermost frame of our code or a framework)"), ("inclusive", "Inclusive")):
        entries = list(profile.get(key) or [])[:top]
        if entries:
            lines += [f"### {title}", ""]
            lines += table(["share", "frame"], ([f"{float(e['share']):.1%}", f"`{e['frame']}`"] for e in entries))
    return lines + _rest(profile, {"samples", "file", "self", "inclusive"})


def shapes_section(shapes: Mapping[str, Any], context: Context) -> list[str]:
    """Many models per cluster: each shape Serve offers, on Serve's own port (serving_shapes.py)."""
    measured = {k: v for k, v in shapes.items() if isinstance(v, Mapping) and "one_model" in v}
    header = [
        "shape",
        "1 model req/s",
        "2 models req/s",
        "2 vs 1 (median; rounds)",
        "MiB per extra model",
        "2nd model servable (s)",
        "1st model while adding: req/s",
        "p99 (ms)",
        "errors",
    ]
    rows = [
        [
            name,
            m["one_model"].get("req_per_s"),
            m["two_models"].get("req_per_s"),
            f"{m['two_vs_one']:.2f}× ({', '.join(f'{r:.2f}' for r in m.get('two_vs_one_by_round', []))})",
            m.get("rss_mib_extra_model"),
            m.get("second_model_servable_s"),
            m["first_model_while_second_added"].get("req_per_s"),
            m["first_model_while_second_added"].get("p99_ms"),
            m["first_model_while_second_added"].get("errors"),
        ]
        for name, m in measured.items()
    ]
    lines = [
        f"Single-row requests at {fmt(shapes.get('connections'))} connections; for two models each connection sends "
        f"to both in turn. One model and two alternated {fmt(shapes.get('rounds'))} times, "
        f"{fmt(shapes.get('duration_s'))} s each; req/s are the median round's. Memory: the replicas' RSS before and "
        "after the second model.",
        "",
        *table(header, rows),
    ]
    return lines + _rest(shapes, {*measured, "connections", "rounds", "duration_s"})


# Training ----------------------------------------------------------------------------------


def _val_keys(variant: Mapping[str, Any]) -> list[str]:
    return [k for k, v in variant.items() if k.startswith("val") and isinstance(v, list)]


def _val_key(variant: Mapping[str, Any]) -> str | None:
    """The validation curve a plot shows: a quality metric rather than the loss where there is one."""
    keys = _val_keys(variant)
    return next((k for k in keys if "loss" not in k), keys[0] if keys else None)


def _loss_key(variant: Mapping[str, Any]) -> str:
    return "train_loss" if "train_loss" in variant else "loss"


def _variants(training: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    found = {
        k: v
        for k, v in training.items()
        if isinstance(v, Mapping) and {"loss", "train_loss", "epoch_rows_per_s", "steady_rows_per_s"} & set(v)
    }
    ordered = [k for k in TRAINING_ORDER if k in found] + [k for k in found if k not in TRAINING_ORDER]
    return {k: found[k] for k in ordered}


def _last(values: Any) -> Any:
    return values[-1] if isinstance(values, list) and values else None


VARIANT_KEYS = frozenset(
    {
        "epochs", "workers", "rows_per_epoch", "epoch_rows", "epoch_rows_per_s", "steady_rows_per_s", "epoch_s",
        "epoch_period_s", "steady_epoch_period_s", "steady_rows_per_s_incl_report", "train_loss", "loss",
        "torch_threads", "wall_s", "startup_s", "fit_s", "wall_includes_ray_startup", "tuned_training_code",
        "load_avg_1m", "fresh_ray",
    }
)  # fmt: skip


def training_section(training: Mapping[str, Any], context: Context) -> list[str]:
    variants = _variants(training)
    ratios = training.get("ratios") or {}
    lines = []
    if training.get("train_rows"):
        lines += [
            f"`{training.get('config', 'the job config')}`: {fmt(training.get('train_rows'))} training and "
            f"{fmt(training.get('val_rows'))} validation rows, batch size {fmt(training.get('batch_size'))}, "
            f"{fmt(training.get('cpus'))} CPUs. Each variant trains the same model on the same rows for the same "
            "epochs; wall time includes Ray's start-up where it has one.",
            "",
        ]
    if variants:
        val_keys = list(dict.fromkeys(k for v in variants.values() for k in _val_keys(v)))
        header = ["variant", "workers", "epochs", "rows/epoch", "steady rows/s", "rows/s incl. report"]
        header += ["throughput vs plain", "start-up (s)", "fit (s)", "wall (s)", "wall vs plain", "final train loss"]
        header += [f"final {k.replace('_', ' ')}" for k in val_keys]
        body = []
        for name, v in variants.items():
            r = ratios.get(name) or {}
            epochs = v.get("epochs") or len(v.get(_loss_key(v)) or v.get("epoch_rows_per_s") or [])
            cells = [name, v.get("workers"), epochs, v.get("rows_per_epoch"), v.get("steady_rows_per_s")]
            cells += [v.get("steady_rows_per_s_incl_report"), _times(r.get("steady_throughput"))]
            cells += [v.get("startup_s"), v.get("fit_s"), v.get("wall_s"), _times(r.get("wall"))]
            cells += [_last(v.get(_loss_key(v))), *(_last(v.get(k)) for k in val_keys)]
            body.append(cells)
        lines += table(header, body)
        lines += _goal_lines(training, ratios)
        extra = {
            name: {k: x for k, x in v.items() if k not in VARIANT_KEYS and k not in val_keys}
            for name, v in variants.items()
        }
        lines += _rest({"variants": {k: v for k, v in extra.items() if v}}, ())
    lines += context.plot_lines(TRAINING_PNG)
    if training.get("tune"):
        lines += ["### Ray Tune", "", *tune_lines(training["tune"])]
    known = {*variants, "ratios", "goals", "tune", "config", "train_rows", "val_rows", "batch_size", "cpus", "quick"}
    other_ratios = {k: v for k, v in ratios.items() if k not in variants}
    return lines + _rest({**training, "ratios": other_ratios}, known - {"ratios"})


def _times(value: Any) -> str:
    return MISSING if value is None else f"{float(value):.2f}×"


def _goal_lines(training: Mapping[str, Any], ratios: Mapping[str, Any]) -> list[str]:
    goals = training.get("goals") or {}
    if not goals or not ratios:
        return []
    lines = [
        f"Goals: steady throughput at least {fmt(goals.get('steady_throughput'))}× plain PyTorch's, wall time at most "
        f"{fmt(goals.get('wall'))}× its.",
        "",
    ]
    for name, r in ratios.items():
        met = [
            f"throughput {'met' if r.get('meets_throughput_goal') else 'missed'}",
            f"wall time {'met' if r.get('meets_wall_goal') else 'missed'}",
        ]
        if not r.get("meets_wall_goal"):
            needed = r.get("epochs_for_wall_goal")
            met.append(
                f"it would be met from {fmt(needed)} epochs on" if needed else "it would not be met at any length"
            )
        lines.append(f"- {name}: {', '.join(met)}")
    return [*lines, ""]


def tune_lines(tune: Mapping[str, Any]) -> list[str]:
    rows = [
        ("trials completed / started", f"{fmt(tune.get('trials'))} / {fmt(tune.get('trials_started'))}"),
        ("epochs per trial", tune.get("epochs_per_trial")),
        ("trials at a time", tune.get("max_concurrent_trials")),
        ("workers per trial", tune.get("workers_per_trial")),
        ("wall time", with_unit("wall_s", tune.get("wall_s"))),
        ("trials per minute", tune.get("trials_per_min")),
        ("wall time includes Ray's start-up", tune.get("wall_includes_ray_startup")),
    ]
    known = {
        "trials",
        "trials_started",
        "epochs_per_trial",
        "max_concurrent_trials",
        "workers_per_trial",
        "wall_s",
        "trials_per_min",
        "wall_includes_ray_startup",
    }
    shown = [(name, value) for name, value in rows if value not in (None, MISSING)]
    return table(["measure", "value"], shown) + _rest(tune, known)


def training_headline(results: Mapping[str, Any]) -> list[HeadlineRow]:
    training = results.get("training") or {}
    variants = _variants(training)
    plain = variants.get("plain")
    ray_runs = [name for name in variants if name.startswith("ray_train") and "untuned" not in name]
    if plain is None or not ray_runs:
        return []
    name = max(ray_runs, key=lambda n: int(variants[n].get("workers") or 0))
    run = variants[name]
    wall, throughput = _ratio(run, plain, "wall_s"), _ratio(run, plain, "steady_rows_per_s")
    return [
        HeadlineRow(
            ", ".join(
                part
                for part in (
                    "Ray Train",
                    f"{fmt(run['workers'])} workers" if run.get("workers") else name,
                    f"{fmt(run['epochs'])} epochs" if run.get("epochs") else "",
                    "fit only, no API",
                )
                if part
            ),
            f"wall {fmt(run.get('wall_s'))} s; {fmt(run.get('steady_rows_per_s'))} rows/s",
            f"plain PyTorch loop, wall {fmt(plain.get('wall_s'))} s ({_times(wall)}); "
            f"{fmt(plain.get('steady_rows_per_s'))} rows/s ({_times(throughput)})",
        )
    ]


def _ratio(a: Mapping[str, Any], b: Mapping[str, Any], key: str) -> float | None:
    top, bottom = a.get(key), b.get(key)
    return float(top) / float(bottom) if top is not None and bottom else None


# Batch inference -------------------------------------------------------------------------------


BATCH_KEYS = frozenset(
    {
        "rows", "input_file_mib", "input_in_memory_mib", "generate_s", "cpus", "actors", "batch_size",
        "object_store_mib", "in_process_one_core", "job", "ratio_to_one_core", "ratio_to_scorer_one_core", "goal_ratio",
    }
)  # fmt: skip
BATCH_JOB_KEYS = frozenset(
    {"rows", "rejected_rows", "wall_s", "pipeline_s", "rows_per_s", "peak_rss_mib", "peak_pss_mib", "spilled_mib"}
)
IN_PROCESS_PATHS = (
    ("predict_frame", "`predict_frame`, the predictor's own API (the baseline)"),
    ("batch_scorer", "the batch job's scorer (its checks and Arrow encoding), without Ray"),
)


def batch_predict_section(batch: Mapping[str, Any], context: Context) -> list[str]:
    """Ray Data's batch job against the same model in this process on one core (batch_predict.py)."""
    job = batch.get("job") or {}
    in_proc = batch.get("in_process_one_core") or {}
    baseline = in_proc.get("predict_frame") or {}
    size = with_unit("size_mib", batch.get("input_file_mib"))
    in_memory = with_unit("size_mib", batch.get("input_in_memory_mib"))
    lines = [
        f"{fmt(batch.get('rows'))} noisy Adult rows in one Parquet file ({size}, {in_memory} once read into Arrow; "
        f"generated in {with_unit('generate_s', batch.get('generate_s'))}), scored by `jobs.batch_predict` on a Ray "
        f"of its own: {fmt(batch.get('cpus'))} CPUs, {fmt(batch.get('actors'))} actors, batches of "
        f"{fmt(batch.get('batch_size'))} rows, the object store capped at "
        f"{with_unit('size_mib', batch.get('object_store_mib'))}. Job rows/s over the whole job (model resolution, "
        "Ray Data's start, the actors' model loads, writing and committing); memory is the summed PSS of this "
        "process and Ray's, sampled.",
        "",
        *table(
            ["rows", "job rows/s", "one-core in-process rows/s", "ratio", "peak PSS (MiB)", "spilled (MiB)"],
            [
                [
                    job.get("rows", batch.get("rows")),
                    job.get("rows_per_s"),
                    baseline.get("rows_per_s"),
                    _times(batch.get("ratio_to_one_core")),
                    job.get("peak_pss_mib"),
                    job.get("spilled_mib"),
                ]
            ],
        ),
        *_batch_goal_lines(batch),
        *_batch_paths(job, in_proc),
    ]
    job_rest = {k: v for k, v in job.items() if k not in BATCH_JOB_KEYS}
    in_proc_rest = {k: v for k, v in in_proc.items() if k not in dict(IN_PROCESS_PATHS)}
    return lines + _rest(
        {**batch, "job": job_rest, "in_process_one_core": in_proc_rest}, BATCH_KEYS - {"job", "in_process_one_core"}
    )


def _batch_goal_lines(batch: Mapping[str, Any]) -> list[str]:
    ratio_to_one_core, goal = batch.get("ratio_to_one_core"), batch.get("goal_ratio")
    if ratio_to_one_core is None or goal is None:
        return []
    met = "met" if float(ratio_to_one_core) >= float(goal) else "missed"
    store, data = batch.get("object_store_mib"), batch.get("input_in_memory_mib")
    streamed = (
        f" The data in memory is {float(data) / float(store):.1f}× the object store: the job streamed it."
        if store and data and float(data) > float(store)
        else " The data fits in the object store: this run does not show streaming."
        if store and data
        else ""
    )
    return [f"Goal: the job at ≥ {fmt(goal)}× the one-core in-process rate: {met}.{streamed}", ""]


def _batch_paths(job: Mapping[str, Any], in_proc: Mapping[str, Any]) -> list[str]:
    """The job and each in-process path over its rows, and the job's rate as a multiple of each."""
    rows = [["the batch job (Ray Data)", job.get("rows"), job.get("wall_s"), job.get("rows_per_s"), MISSING]]
    for key, name in IN_PROCESS_PATHS:
        path = in_proc.get(key) or {}
        if path:
            multiple = ratio(job.get("rows_per_s"), path.get("rows_per_s"))
            rows.append(
                [
                    f"in-process, one core: {name}",
                    path.get("rows"),
                    path.get("seconds"),
                    path.get("rows_per_s"),
                    multiple,
                ]
            )
    lines = table(["path", "rows", "seconds", "rows/s", "the job's rows/s as a multiple"], rows)
    if job.get("peak_rss_mib") is not None:
        lines += [
            f"The job's Ray Data pipeline took {with_unit('pipeline_s', job.get('pipeline_s'))}, rows it rejected: "
            f"{fmt(job.get('rejected_rows'))}; peak RSS "
            f"{with_unit('rss_mib', job['peak_rss_mib'])} (RSS counts the object store's pages in every process that "
            "maps them, PSS shares them out).",
            "",
        ]
    return lines


def batch_predict_headline(results: Mapping[str, Any]) -> list[HeadlineRow]:
    batch = results.get("batch_predict") or {}
    job = batch.get("job") or {}
    baseline = (batch.get("in_process_one_core") or {}).get("predict_frame") or {}
    if job.get("rows_per_s") is None:
        return []
    return [
        HeadlineRow(
            f"batch inference, {fmt(batch.get('rows'))} rows",
            f"{fmt(job['rows_per_s'])} rows/s, peak PSS {with_unit('size_mib', job.get('peak_pss_mib'))}, "
            f"spilled {with_unit('size_mib', job.get('spilled_mib'))}",
            f"in-process on one core {fmt(baseline.get('rows_per_s'))} rows/s "
            f"({_times(batch.get('ratio_to_one_core'))})",
        )
    ]


# The retraining loop ---------------------------------------------------------------------------


def loop_section(loop: Mapping[str, Any], context: Context) -> list[str]:
    phases = [
        ("submitted to Ray", loop.get("submitted_s")),
        ("running", loop.get("started_s")),
        ("finished", loop.get("finished_s")),
        ("succeeded, as the API reports it", loop.get("job_succeeded_s")),
        ("the new version answers /v1/predict", loop.get("wall_s")),
    ]
    overrides = loop.get("overrides") or {}
    lines = [
        "`POST /v1/training-jobs` through Nginx, followed until `/v1/predict` answers with the new version; the "
        "job record's timestamps give the phases. Version before: "
        f"{fmt(loop.get('version_before'))}, after: {fmt(loop.get('version_after'))}; overrides: "
        f"{', '.join(f'{k}={v}' for k, v in overrides.items()) or 'none'}.",
        "",
    ]
    timed = [[name, seconds] for name, seconds in phases if seconds is not None]
    if timed:
        lines += table(["phase", "seconds after the request"], timed)
    if loop.get("test_metrics"):
        lines += ["The new version's test metrics:", "", *table(["metric", "value"], loop["test_metrics"].items())]
    known = {"overrides", "wall_s", "job_succeeded_s", "submitted_s", "started_s", "finished_s"}
    return lines + _rest(loop, known | {"version_before", "version_after", "test_metrics"})


def loop_headline(results: Mapping[str, Any]) -> list[HeadlineRow]:
    loop = results.get("loop") or {}
    if loop.get("wall_s") is None:
        return []
    return [
        HeadlineRow(
            "retraining loop, POST /v1/training-jobs to the new version serving",
            with_unit("wall_s", loop["wall_s"]),
            f"the job itself finished after {with_unit('finished_s', loop.get('finished_s'))}",
        )
    ]


# Alternating on/off measurements (the drift monitor, a shadow challenger) -----------------------


RUN_COLUMNS = ("rps", "p50_ms", "p90_ms", "p99_ms", "requests", "non_2xx", "socket_errors")


def _runs_table(runs: Sequence[Mapping[str, Any]], switch: str) -> list[str]:
    extra = [k for k in dict.fromkeys(k for run in runs for k in run) if k not in {switch, *RUN_COLUMNS}]
    columns = [switch, *(c for c in RUN_COLUMNS if any(c in run for run in runs)), *extra]
    return records_table(runs, columns)


def _settings_line(settings: Mapping[str, Any] | None) -> list[str]:
    if not settings:
        return []
    return ["Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()) + ".", ""]


def monitor_section(monitor: Mapping[str, Any], context: Context) -> list[str]:
    alert = monitor.get("alert") or {}
    lines = [
        f"Single-row `/v1/predict` at {fmt(monitor.get('connections'))} connections, "
        f"{fmt(monitor.get('duration_s'))} s per run, the stack restarted with the drift monitor off and on "
        "before each, alternating "
        f"(model version {fmt(monitor.get('model_version'))}).",
        "",
        f"- median req/s: off {spread(monitor.get('rps_off'))}, on {spread(monitor.get('rps_on'))}: "
        f"**{fmt(monitor.get('cost_pct'))}% fewer** with the monitor on",
        f"- CPU per judged window (median): {with_unit('cpu_s_per_window', monitor.get('cpu_s_per_window_median'))}",
        f"- `ModelDataDrift` fired {with_unit('seconds_to_firing', alert.get('seconds_to_firing'))} after shifted "
        "traffic began",
        "",
        *_settings_line(monitor.get("settings")),
        *_runs_table(monitor.get("runs") or [], "monitor"),
    ]
    known = {"machine", "model_version", "connections", "duration_s", "settings", "runs", "rps_off", "rps_on"}
    return lines + _rest(monitor, known | {"cost_pct", "cpu_s_per_window_median", "alert"})


def monitor_headline(results: Mapping[str, Any]) -> list[HeadlineRow]:
    monitor = results.get("monitor") or {}
    if monitor.get("cost_pct") is None:
        return []
    seconds = (monitor.get("alert") or {}).get("seconds_to_firing")
    return [
        HeadlineRow(
            f"drift monitor on, 1 row per request, {fmt(monitor.get('connections'))} connections",
            f"{fmt((monitor.get('rps_on') or {}).get('median'))} req/s ({fmt(monitor['cost_pct'])}% fewer); "
            f"drift alert after {with_unit('seconds_to_firing', seconds)}",
            f"monitor off {fmt((monitor.get('rps_off') or {}).get('median'))} req/s",
        )
    ]


def shadow_section(shadow: Mapping[str, Any], context: Context) -> list[str]:
    versions = shadow.get("versions") or {}
    lines = [
        f"Single-row `/v1/predict` at {fmt(shadow.get('connections'))} connections, {fmt(shadow.get('duration_s'))} s "
        f"per run: champion {fmt(versions.get('champion'))} alone, and with version "
        f"{fmt(versions.get('challenger'))} loaded as a shadow that scores every mirrored request, alternating.",
        "",
        f"- median req/s: none {spread(shadow.get('rps_off'))}, shadow {spread(shadow.get('rps_on'))}: "
        f"**{fmt(shadow.get('throughput_ratio'))}×**",
        f"- median p99: none {spread(shadow.get('p99_ms_off'), 'ms')}, shadow {spread(shadow.get('p99_ms_on'), 'ms')}: "
        f"{fmt(shadow.get('p99_ratio'))}×",
        f"- rows the shadow scored: {with_unit('mirrored_share', shadow.get('mirrored_share'))} of those answered",
        "",
        *_settings_line(shadow.get("settings")),
        *_runs_table(shadow.get("runs") or [], "shadow"),
    ]
    known = {"machine", "versions", "connections", "duration_s", "settings", "runs", "rps_off", "rps_on"}
    return lines + _rest(shadow, known | {"p99_ms_off", "p99_ms_on", "throughput_ratio", "p99_ratio", "mirrored_share"})


def shadow_headline(results: Mapping[str, Any]) -> list[HeadlineRow]:
    shadow = results.get("shadow") or {}
    if shadow.get("throughput_ratio") is None:
        return []
    return [
        HeadlineRow(
            f"shadow challenger loaded, 1 row per request, {fmt(shadow.get('connections'))} connections",
            f"{fmt(shadow['throughput_ratio'])}× req/s, {fmt(shadow.get('p99_ratio'))}× p99",
            f"no challenger {fmt((shadow.get('rps_off') or {}).get('median'))} req/s, "
            f"p99 {fmt((shadow.get('p99_ms_off') or {}).get('median'))} ms",
        )
    ]


# The registry ------------------------------------------------------------------------------------

# In report order. A new benchmark section adds its renderer (and headline rows) here; until it
# does, it is rendered as a key/value table by `key_values`.
SECTIONS: tuple[Section, ...] = (
    Section("loop", "Retraining loop (request to new champion serving)", loop_section, loop_headline),
    Section("serving", "Serving", serving_section, serving_headline, (THROUGHPUT_PNG, LATENCY_PNG)),
    Section("profile", "Profile of the ingress replica", profile_section),
    Section("shapes", "Many models: the shapes Serve offers", shapes_section),
    Section("training", "Training", training_section, training_headline, (TRAINING_PNG,)),
    Section(
        "batch_predict",
        "Batch inference: Ray Data against one core in-process",
        batch_predict_section,
        batch_predict_headline,
    ),
    Section("monitor", "Drift monitor: its cost and time to alert", monitor_section, monitor_headline),
    Section("shadow", "Shadow challenger: its cost to the clients", shadow_section, shadow_headline),
)
RUN_KEYS = frozenset({"machine", "quick", "duration_s"})


# A ratio in parentheses is the platform's figure divided by the one it follows.
HEADLINE_HEADER = ("measure", "platform", "compared with (in parentheses: the platform's figure as a multiple of it)")
# The headline's order: serving first, as the issue tracker quotes it; the rest in report order.
HEADLINE_FIRST = ("serving", "training", "loop")


def headline(results: Mapping[str, Any]) -> list[HeadlineRow]:
    """The figures a reader wants first, from whichever sections the run has."""
    rows: list[HeadlineRow] = []
    rank = {key: i for i, key in enumerate(HEADLINE_FIRST)}
    for section in sorted(SECTIONS, key=lambda s: rank.get(s.key, len(rank))):
        if section.headline is not None and results.get(section.key):
            rows += section.headline(results)
    return rows


def headline_text(results: Mapping[str, Any]) -> str:
    """The headline as aligned plain text, for the terminal."""
    rows = [
        HEADLINE_HEADER,
        *((r.measure, r.platform, r.reference) for r in headline(results)),
    ]
    if len(rows) == 1:
        return "Headline: no figures (every section was skipped)"
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"Headline ({_run_kind(results)}):"]
    lines += [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def _run_kind(results: Mapping[str, Any]) -> str:
    machine = results.get("machine") or {}
    kind = "quick run: not comparable with a full one" if results.get("quick") else "full run"
    parts = [kind, fmt(machine.get("cpu_model")) if machine.get("cpu_model") else None]
    if machine.get("logical_cpus"):
        parts.append(f"{machine['logical_cpus']} CPUs")
    return ", ".join(p for p in parts if p)


# Markdown ----------------------------------------------------------------------------------

MACHINE_LABELS = (
    ("cpu_model", "CPU"),
    ("logical_cpus", "logical CPUs"),
    ("physical_cores", "physical cores"),
    ("ram_gib", "memory"),
    ("os", "OS"),
    ("kernel", "kernel"),
    ("python", "Python"),
    ("torch", "PyTorch"),
    ("ray", "Ray"),
    ("mlflow", "MLflow"),
    ("wrk", "wrk"),
    ("git_commit", "git commit"),
    ("date_utc", "date (UTC)"),
)


def machine_section(machine: Mapping[str, Any]) -> list[str]:
    labels = dict(MACHINE_LABELS)
    rows = [(labels[k], with_unit(k, machine[k])) for k, _ in MACHINE_LABELS if machine.get(k) is not None]
    if machine.get("logical_cpus") is not None and machine.get("physical_cores") is not None:
        cores = f"{fmt(machine['logical_cpus'])} logical, {fmt(machine['physical_cores'])} physical"
        rows = [r for r in rows if r[0] not in {"logical CPUs", "physical cores"}]
        rows.insert(1, ("CPU cores", cores))
    rows += [(k, with_unit(k, v)) for k, v in machine.items() if k not in labels]
    return ["## Machine", "", *table(["", ""], rows)]


def _intro(results: Mapping[str, Any]) -> list[str]:
    machine = results.get("machine") or {}
    when = f" on {machine['date_utc']} UTC" if machine.get("date_utc") else ""
    commit = f" at commit `{str(machine['git_commit'])[:12]}`" if machine.get("git_commit") else ""
    took = f", {_minutes(results['duration_s'])}" if results.get("duration_s") is not None else ""
    if results.get("quick"):
        kind = "A quick run (seconds per measurement: it checks the code path; its figures are not comparable)"
    else:
        kind = "A full run"
    return [
        f"{kind} of `make bench`{when}{commit}{took}, on the machine below. All figures are from this one run on "
        "this one machine: compare ratios with runs elsewhere, not absolute figures.",
        "",
    ]


def _minutes(seconds: float) -> str:
    whole = round(float(seconds))
    return f"{whole // 60} min {whole % 60:02d} s" if whole >= 60 else f"{whole} s"


def render_markdown(results: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    context = Context(results, plots)
    lines = ["# Benchmark report", "", *_intro(results)]
    rows = headline(results)
    if rows:
        lines += [
            "## Headline",
            "",
            *table(HEADLINE_HEADER, ((r.measure, r.platform, r.reference) for r in rows)),
        ]
    if results.get("machine"):
        machine = results["machine"]
        lines += machine_section(machine) if isinstance(machine, Mapping) else ["## Machine", "", fmt(machine), ""]
    placed: set[str] = set()
    for section in SECTIONS:
        value = results.get(section.key)
        if value:
            placed.update(section.plots)
            body = section.render(value, context) if isinstance(value, Mapping) else key_values(value, section.key)
            lines += [f"## {section.title}", "", *body]
    known = {section.key for section in SECTIONS} | RUN_KEYS
    for key, value in results.items():
        if key in known or value in (None, {}, []):
            continue
        if isinstance(value, Mapping | list):
            lines += [f"## {key.replace('_', ' ').capitalize()}", "", *key_values(value, key)]
    scalars = {k: v for k, v in results.items() if k not in known and not isinstance(v, Mapping | list)}
    if scalars:
        lines += ["## Run", "", *key_values(scalars)]
    rest = [p for p in plots if p not in placed]
    if rest:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})\n" for p in rest]
    return "\n".join(lines).rstrip() + "\n"


# Plots -------------------------------------------------------------------------------------


def _figure(width: float, height: float, columns: int = 1) -> tuple[Any, Any]:
    """A figure on the Agg canvas directly: no pyplot, so no global backend or figure registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _log_if_spread(axis: Any, values: Sequence[float], spread: float = 20) -> None:
    positive = [v for v in values if v and v > 0]
    if positive and max(positive) / min(positive) > spread:
        axis.set_yscale("log")


def plot_serving_throughput(rows: Sequence[Mapping[str, Any]], path: Path) -> bool:
    single = [r for r in rows if int(r.get("rows_per_request", 1)) == 1]
    bulk = [r for r in rows if int(r.get("rows_per_request", 1)) > 1]
    if not single and not bulk:
        return False
    figure, axes = _figure(11 if single and bulk else 7, 4.5, 2 if single and bulk else 1)
    if single:
        _throughput_lines(axes[0], single)
    if bulk:
        _bulk_bars(axes[-1], bulk)
    figure.savefig(path, dpi=110)
    return True


def _throughput_lines(axis: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    for server in _servers(rows):
        points = sorted((int(r["connections"]), float(r["rps"])) for r in rows if r["server"] == server)
        axis.plot(*zip(*points, strict=True), marker="o", label=server)
        for x, y in points:
            axis.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    connections = sorted({int(r["connections"]) for r in rows})
    axis.set_xscale("log", base=2)
    axis.set_xticks(connections, [str(c) for c in connections])
    _log_if_spread(axis, [float(r["rps"]) for r in rows])
    axis.set(xlabel="connections", ylabel="requests/s", title="1 row per request")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()


def _bulk_bars(axis: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    labels = [f"{r['server']}\n{int(r['rows_per_request']):,} rows, c={r['connections']}" for r in rows]
    values = [float(r["rows_per_s"]) for r in rows]
    bars = axis.bar(range(len(rows)), values, color=[f"C{_servers(rows).index(str(r['server']))}" for r in rows])
    axis.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=7)
    axis.set_xticks(range(len(rows)), labels, fontsize=8)
    axis.set(ylabel="rows/s", title="bulk requests")
    axis.grid(True, axis="y", alpha=0.3)


def _latency_rows(rows: Sequence[Mapping[str, Any]], connections: int) -> list[Mapping[str, Any]]:
    single = [r for r in rows if int(r.get("rows_per_request", 1)) == 1]
    if not single:
        return []
    levels = {int(r["connections"]) for r in single}
    chosen = connections if connections in levels else min(levels, key=lambda c: abs(c - connections))
    return [r for r in single if int(r["connections"]) == chosen]


def plot_serving_latency(rows: Sequence[Mapping[str, Any]], path: Path, connections: int = LATENCY_CONNECTIONS) -> bool:
    chosen = _latency_rows(rows, connections)
    if not chosen:
        return False
    figure, (axis,) = _figure(7, 4.5)
    width = 0.27
    percentiles = ("p50_ms", "p90_ms", "p99_ms")
    for i, key in enumerate(percentiles):
        values = [float(r.get(key) or 0) for r in chosen]
        bars = axis.bar([x + (i - 1) * width for x in range(len(chosen))], values, width, label=key.removesuffix("_ms"))
        axis.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7)
    axis.set_xticks(range(len(chosen)), [str(r["server"]) for r in chosen])
    _log_if_spread(axis, [float(r.get(k) or 0) for r in chosen for k in percentiles])
    axis.set(ylabel="latency (ms)", title=f"latency at {chosen[0]['connections']} connections, 1 row per request")
    axis.grid(True, axis="y", which="both", alpha=0.3)
    axis.legend()
    figure.savefig(path, dpi=110)
    return True


def plot_training_curves(training: Mapping[str, Any], path: Path) -> bool:
    from matplotlib.ticker import MaxNLocator

    variants = _variants(training)
    if not variants:
        return False
    figure, axes = _figure(14, 4.2, 3)
    val_keys = sorted({k for v in variants.values() if (k := _val_key(v))})
    # Each panel: the curve's key in a variant (their names differ between result versions), its title.
    panels: tuple[tuple[Callable[[Mapping[str, Any]], str | None], str], ...] = (
        (_loss_key, "training loss"),
        (_val_key, " / ".join(val_keys) or "validation"),
        (lambda _: "epoch_rows_per_s", "epoch throughput (rows/s)"),
    )
    for axis, (key_of, title) in zip(axes, panels, strict=True):
        for name, variant in variants.items():
            values = variant.get(key_of(variant) or "")
            if isinstance(values, list) and values:
                axis.plot(range(1, len(values) + 1), values, marker=".", label=name)
        axis.set(xlabel="epoch", ylabel=title, title=title)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.savefig(path, dpi=110)
    return True


# Files -------------------------------------------------------------------------------------


def write_report(results: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write results.json, report.md and whichever plots the results have data for."""
    out_dir.mkdir(parents=True, exist_ok=True)
    complete = {"machine": machine_info(), **results} if not results.get("machine") else dict(results)
    written = {"results": out_dir / "results.json"}
    written["results"].write_text(json.dumps(complete, indent=2, default=str) + "\n", encoding="utf-8")
    rows = list((complete.get("serving") or {}).get("rows") or [])
    drawn = {
        THROUGHPUT_PNG: plot_serving_throughput(rows, out_dir / THROUGHPUT_PNG),
        LATENCY_PNG: plot_serving_latency(rows, out_dir / LATENCY_PNG),
        TRAINING_PNG: plot_training_curves(complete.get("training") or {}, out_dir / TRAINING_PNG),
    }
    plots = [name for name, ok in drawn.items() if ok]
    for name, ok in drawn.items():
        if ok:
            written[name.removesuffix(".png")] = out_dir / name
        else:  # a plot left from an earlier run in this directory would not match this report
            (out_dir / name).unlink(missing_ok=True)
    written["report"] = out_dir / "report.md"
    written["report"].write_text(render_markdown(complete, plots), encoding="utf-8")
    return written


@cli.command()
def main(
    results_json: Path = typer.Argument(..., exists=True, dir_okay=False, help="a results.json to render"),
    out: Path = typer.Option(..., help="directory for report.md and the plots"),
) -> None:
    written = write_report(json.loads(results_json.read_text(encoding="utf-8")), out)
    for path in written.values():
        print(path)


if __name__ == "__main__":
    cli()

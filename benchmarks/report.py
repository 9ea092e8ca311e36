"""Benchmark results as files: results.json, report.md and PNG plots in one directory.

    write_report(results, Path("benchmarks/results/serving-2026-01-01"))
    .venv/bin/python -m benchmarks.report results.json --out DIR   # re-render from a saved run

`results` is a JSON-ready dict; every section is optional, so a partial run still gets a report:
  machine     machine_info(), filled in when absent
  serving     {"rows": [{server, connections, rows_per_request, rps, rows_per_s, p50_ms, p90_ms,
               p99_ms, errors, requests, [wrk_cores]}...], "in_process": peers.in_process(...)}
  training    {plain|ray_train_1|ray_train_2: {epoch_rows_per_s, steady_rows_per_s, wall_s, loss,
               val_<metric>}, ratios, tune, ...}
  loop, profile  free-form; rendered as tables where their shape allows
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import typer

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINES = (("mlflow", "mlflow"), ("fastapi", "bare FastAPI"))
LATENCY_CONNECTIONS = 16
TRAINING_ORDER = ("plain", "ray_train_1", "ray_train_2")
MAX_TABLE_ROWS = 25
THROUGHPUT_PNG = "serving_throughput.png"
LATENCY_PNG = "serving_latency.png"
TRAINING_PNG = "training_curves.png"

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
        return "—"
    if isinstance(value, bool):
        return str(value)
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
        return "—"
    return f"{value / base:.2f}×"


def render_any(value: Any, depth: int = 0) -> list[str]:
    """A free-form section: flat dicts and lists of dicts as tables, nested dicts by key."""
    if isinstance(value, Mapping):
        scalars = {k: v for k, v in value.items() if not isinstance(v, Mapping | list)}
        nested = {k: v for k, v in value.items() if isinstance(v, Mapping | list)}
        lines = table(["key", "value"], scalars.items()) if scalars else []
        for key, item in nested.items():
            lines += [f"**{fmt(key)}**", "", *render_any(item, depth + 1)]
        return lines
    if isinstance(value, list):
        if value and all(isinstance(item, Mapping) for item in value):
            columns = list(dict.fromkeys(k for item in value for k in item))
            shown = value[:MAX_TABLE_ROWS]
            lines = table(columns, ([_cell(item.get(c)) for c in columns] for item in shown))
            return lines + ([f"({len(value) - len(shown)} more)", ""] if len(value) > len(shown) else [])
        return [", ".join(fmt(item) for item in value), ""]
    return [fmt(value), ""]


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, Mapping | list) else value


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


def serving_section(serving: Mapping[str, Any], cpus: int | None = None) -> list[str]:
    rows: list[Mapping[str, Any]] = list(serving.get("rows") or [])
    in_proc = serving.get("in_process")
    lines = ["## Serving", ""]
    if rows:
        lines += _loadgen_lines(rows, cpus or os.cpu_count() or 1)
        for per_request, connections in _groups(rows):
            group = [
                r for r in rows if int(r.get("rows_per_request", 1)) == per_request and r["connections"] == connections
            ]
            lines += _serving_group(group, per_request, connections, _ceilings(in_proc).get(per_request))
    if in_proc:
        lines += _in_process_lines(in_proc)
    # Whatever else the orchestrator recorded (plan, agreement, a profile...), as it is.
    for key, value in serving.items():
        if key not in {"rows", "in_process"} and value not in (None, {}, []):
            lines += [f"### {fmt(key)}", "", *render_any(value)]
    return lines


def shapes_section(shapes: Mapping[str, Any]) -> list[str]:
    """Many models per cluster: each shape Serve offers, on Serve's own port (serving_shapes.py)."""
    measured = {k: v for k, v in shapes.items() if isinstance(v, Mapping)}
    header = [
        "shape",
        "1 model req/s",
        "2 models req/s",
        "2 vs 1 (median; rounds)",
        "MiB per extra model",
        "2nd model servable (s)",
        "1st model while adding: req/s",
        "p99 ms",
        "errors",
    ]
    rows = [
        [
            name,
            m["one_model"]["req_per_s"],
            m["two_models"]["req_per_s"],
            f"{m['two_vs_one']:.2f}× ({', '.join(f'{r:.2f}' for r in m.get('two_vs_one_by_round', []))})",
            m["rss_mib_extra_model"],
            m["second_model_servable_s"],
            m["first_model_while_second_added"]["req_per_s"],
            m["first_model_while_second_added"]["p99_ms"],
            m["first_model_while_second_added"]["errors"],
        ]
        for name, m in measured.items()
    ]
    connections = shapes.get("connections")
    return [
        "## Many models: the shapes Serve offers",
        "",
        f"Single-row requests at {connections} connections; for two models each connection sends to both in turn. "
        f"One model and two alternated {shapes.get('rounds')} times, {shapes.get('duration_s')} s each; "
        "req/s are the median round's. Memory: the replicas' RSS before and after the second model.",
        "",
        *table(header, rows),
    ]


def profile_section(profile: Mapping[str, Any], top: int = 15) -> list[str]:
    """py-spy's view of the ingress replica under load: where its Python time goes."""
    lines = [
        "## Profile of the ingress replica",
        "",
        f"py-spy, samples taken while the replica held the GIL: {fmt(profile.get('samples'))} "
        f"(raw stacks in `serving/{profile.get('file', 'profile-ingress.txt')}`).",
        "",
    ]
    for key, title in (("self", "Own time (innermost frame of our code or a framework)"), ("inclusive", "Inclusive")):
        entries = list(profile.get(key) or [])[:top]
        if entries:
            lines += [f"### {title}", ""]
            lines += table(["share", "frame"], ([f"{float(e['share']):.1%}", f"`{e['frame']}`"] for e in entries))
            lines.append("")
    return lines


def _in_process_lines(in_proc: Mapping[str, Any]) -> list[str]:
    lines = ["### In-process ceiling (`predict_frame`, no HTTP)", ""]
    lines += [
        f"torch threads: {fmt(in_proc.get('torch_threads'))}, calls per size: {fmt(in_proc.get('iterations'))}",
        "",
    ]
    columns = ("rows", "calls_per_s", "rows_per_s", "rows_per_s_p50", "p50_ms", "p99_ms")
    lines += table(
        ["rows per call", "calls/s", "rows/s", "rows/s at p50", "p50 ms", "p99 ms"],
        ([r.get(k) for k in columns] for r in in_proc.get("results") or []),
    )
    for key, value in in_proc.items():
        if key not in {"torch_threads", "iterations", "results"} and value not in (None, {}, []):
            lines += [f"#### {fmt(key)}", "", *render_any(value)]
    return lines


def _cores(value: Any) -> str:
    return "—" if value is None else f"{float(value):.2f}"


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
    header = ["server", "req/s", "rows/s", "p50 ms", "p90 ms", "p99 ms", "errors / requests"]
    header += [f"vs {label}" for key, label in BASELINES if key in bases]
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


# Training ----------------------------------------------------------------------------------


def _val_key(variant: Mapping[str, Any]) -> str | None:
    return next((k for k, v in variant.items() if k.startswith("val") and isinstance(v, list)), None)


def _variants(training: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    found = {
        k: v
        for k, v in training.items()
        if isinstance(v, Mapping) and {"loss", "epoch_rows_per_s", "steady_rows_per_s"} & set(v)
    }
    ordered = [k for k in TRAINING_ORDER if k in found] + [k for k in found if k not in TRAINING_ORDER]
    return {k: found[k] for k in ordered}


def _last(values: Any) -> Any:
    return values[-1] if isinstance(values, list) and values else None


def training_section(training: Mapping[str, Any]) -> list[str]:
    variants = _variants(training)
    lines = ["## Training", ""]
    if variants:
        body = []
        for name, v in variants.items():
            val_key = _val_key(v)
            epochs = len(v.get("loss") or v.get("epoch_rows_per_s") or [])
            body.append(
                [
                    name,
                    epochs,
                    v.get("steady_rows_per_s"),
                    v.get("wall_s"),
                    _last(v.get("loss")),
                    f"{fmt(_last(v.get(val_key)))} ({val_key})" if val_key else "—",
                ]
            )
        lines += table(["variant", "epochs", "steady rows/s", "wall s", "final loss", "final val"], body)
    rest = {k: v for k, v in training.items() if k not in variants}
    for key, value in rest.items():
        lines += [f"### {fmt(key)}", "", *render_any(value)]
    return lines


# Markdown ----------------------------------------------------------------------------------


def render_markdown(results: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    lines = ["# Benchmark report", ""]
    known = {"machine", "serving", "training", "loop", "profile", "shapes"}
    run = {k: v for k, v in results.items() if k not in known and not isinstance(v, Mapping | list)}
    if run:
        lines += ["## Run", "", *table(["item", "value"], run.items())]
    if results.get("machine"):
        lines += ["## Machine", "", *table(["item", "value"], dict(results["machine"]).items())]
    if results.get("serving"):
        cpus = (results.get("machine") or {}).get("logical_cpus")
        lines += serving_section(results["serving"], cpus)
    if results.get("training"):
        lines += training_section(results["training"])
    if results.get("loop"):
        lines += ["## Retraining loop (request to new champion serving)", "", *render_any(results["loop"])]
    if results.get("profile"):
        lines += profile_section(results["profile"])
    if results.get("shapes"):
        lines += shapes_section(results["shapes"])
    for key in (k for k in results if k not in known and k not in run and results[k]):
        lines += [f"## {fmt(key)}", "", *render_any(results[key])]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})\n" for p in plots]
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
    panels = (
        ("loss", "training loss"),
        (None, " / ".join(val_keys) or "validation"),
        ("epoch_rows_per_s", "epoch throughput (rows/s)"),
    )
    for axis, (key, label) in zip(axes, panels, strict=True):
        for name, variant in variants.items():
            values = variant.get(key if key else _val_key(variant) or "")
            if isinstance(values, list) and values:
                axis.plot(range(1, len(values) + 1), values, marker=".", label=name)
        axis.set(xlabel="epoch", ylabel=label, title=label)
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

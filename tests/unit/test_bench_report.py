"""The benchmark report from a synthetic results dict and from the recorded run (benchmarks/results/),
and reading wrk's `done()` JSON line."""

import json

import pytest

from benchmarks.load import JSON_MARKER, LoadGenUsage, loadgen_summary, lua_script, parse_done_json
from benchmarks.report import fmt, headline, headline_text, label, machine_info, render_markdown, unit_of, write_report
from benchmarks.serving import bulk_form_ratios
from core.settings import REPO_ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULTS = REPO_ROOT / "benchmarks" / "results"
SERVERS = ("platform", "mlflow", "fastapi")


def _serving_rows():
    rows = []
    for i, server in enumerate(SERVERS):
        for connections in (1, 16, 64):
            rps = 1000.0 / (i + 1) * min(connections, 8) ** 0.5
            rows.append(_row(server, connections, 1, rps, p50=connections / rps * 1000))
        rows.append(_row(server, 4, 1000, 40.0 / (i + 1), p50=100.0 * (i + 1)))
    return rows


def _row(server, connections, rows_per_request, rps, p50):
    return {
        "server": server,
        "connections": connections,
        "rows_per_request": rows_per_request,
        "rps": rps,
        "rows_per_s": rps * rows_per_request,
        "p50_ms": p50,
        "p90_ms": p50 * 1.5,
        "p99_ms": p50 * 3,
        "errors": 0,
        "requests": int(rps * 10),
        "wrk_cores": 0.2,
    }


def _training():
    def variant(speed):
        return {
            "epoch_rows_per_s": [speed * 0.8, speed, speed],
            "steady_rows_per_s": speed,
            "wall_s": 30000 / speed,
            "loss": [0.5, 0.4, 0.35],
            "val_roc_auc": [0.85, 0.88, 0.89],
        }

    return {
        "plain": variant(90000.0),
        "ray_train_1": variant(40000.0),
        "ray_train_2": variant(60000.0),
        "ratios": {"ray_train_1_vs_plain": 0.44},
        "tune": {"trials": 4, "best": {"lr": 0.002}},
    }


def _results():
    return {
        "machine": {"cpu_model": "Test CPU", "logical_cpus": 2, "git_commit": "abc123"},
        "serving": {
            "rows": _serving_rows(),
            "in_process": {
                "torch_threads": 1,
                "iterations": 100,
                "results": [
                    {"rows": 1, "calls_per_s": 5000.0, "rows_per_s": 5000.0, "p50_ms": 0.2, "p99_ms": 0.4},
                    {"rows": 1000, "calls_per_s": 200.0, "rows_per_s": 200000.0, "p50_ms": 5.0, "p99_ms": 6.0},
                ],
                "serving_path": [{"path": "encode + model", "rows": 1, "rows_per_s": 3000.0}],
            },
            "agreement": {"rows": 100, "disagreements": {"mlflow": 0, "fastapi": 0}},
            "plan": {"duration_s": 10},
        },
        "quick": True,
        "duration_s": 812.5,
        "training": _training(),
        "loop": {"feedback_to_promotion_s": 42.0, "steps": [{"step": "train", "s": 30.0}]},
        "profile": {"top": [{"function": "predict_frame", "share": 0.4}, {"function": "orjson.dumps", "share": 0.1}]},
    }


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC), path


def test_full_report_writes_every_file(tmp_path):
    written = write_report(_results(), tmp_path)
    assert set(written) == {"results", "report", "serving_throughput", "serving_latency", "training_curves"}
    assert json.loads((tmp_path / "results.json").read_text())["machine"]["cpu_model"] == "Test CPU"
    for name in ("serving_throughput.png", "serving_latency.png", "training_curves.png"):
        _assert_png(tmp_path / name)
    report = (tmp_path / "report.md").read_text()
    for server in SERVERS:
        assert f"| {server} |" in report
    for heading in ("1 row per request, 1 connection", "1 row per request, 64 connections", "1,000 rows per request"):
        assert heading in report
    assert "vs mlflow" in report and "vs bare FastAPI" in report and "of in-process p50 rate" in report
    # fastapi's 1-row throughput is a third of the platform's at every level (see _serving_rows).
    assert "| platform | 1,000 |" in report and "3.00×" in report
    for text in ("ray_train_2", "final val roc auc", "predict_frame", "Retraining loop", "Load generator"):
        assert text in report
    # Each plot sits in its section.
    assert report.index("![serving_latency](serving_latency.png)") < report.index("## Training")
    assert report.index("![training_curves](training_curves.png)") > report.index("## Training")
    assert report.startswith("# Benchmark report\n\nA quick run") and "13 min 32 s" in report
    # Extra keys the orchestrator adds are shown, not dropped, and never as headings.
    for text in ("encode + model", "same labels for the same 100 rows", "| plan.duration_s | 10 s |"):
        assert text in report, text
    assert "| feedback_to_promotion_s | 42.0 s |" in report and "| step | s |" in report
    assert "### plan" not in report and "| quick |" not in report


def test_partial_results_skip_missing_sections(tmp_path):
    written = write_report({"serving": {"rows": _serving_rows()[:3]}}, tmp_path)
    assert "training_curves" not in written and not (tmp_path / "training_curves.png").exists()
    _assert_png(written["serving_throughput"])
    report = written["report"].read_text()
    assert "## Training" not in report and "## Machine" in report  # machine_info() fills it in


def test_empty_results_still_give_a_report_and_remove_stale_plots(tmp_path):
    (tmp_path / "serving_latency.png").write_bytes(PNG_MAGIC)
    written = write_report({}, tmp_path)
    assert written["report"].read_text().startswith("# Benchmark report")
    assert not (tmp_path / "serving_latency.png").exists()


def test_machine_info_names_versions_and_hardware():
    info = machine_info()
    assert info["logical_cpus"] >= 1 and info["ram_gib"] > 0
    assert info["python"].count(".") == 2 and info["torch"] and info["mlflow"]
    assert render_markdown({"machine": info}).count("|") > 10


# The recorded run (benchmarks/results/results.json) --------------------------------------------


def _recorded():
    return json.loads((RESULTS / "results.json").read_text())


def _keys_and_scalars(value):
    """Every key and every scalar value anywhere in a results dict, as the report would print them."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _keys_and_scalars(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys_and_scalars(item)
    else:
        yield str(value)
        yield fmt(value)


def test_the_recorded_run_has_no_headings_made_of_its_keys_or_values():
    results = _recorded()
    report = render_markdown(results)
    headings = [line.lstrip("#").strip() for line in report.splitlines() if line.startswith("#")]
    made_of_data = set(_keys_and_scalars(results)) & set(headings)
    assert not made_of_data, made_of_data
    for title in ("Headline", "Machine", "Retraining loop", "Serving", "Profile of the ingress replica", "Training"):
        assert any(h.startswith(title) for h in headings), title
    assert "False" not in report and "True" not in report


def test_the_recorded_machine_is_named_in_words():
    report = render_markdown(_recorded())
    for row in (
        "| CPU | AMD EPYC |",
        "| CPU cores | 2 logical, 2 physical |",
        "| memory | 23.5 GiB |",
        "| OS | Debian GNU/Linux 12 (bookworm) |",
        "| Python | 3.11.7 |",
        "| PyTorch | 2.13.0+cpu |",
        "| Ray | 2.60.0 |",
        "| MLflow | 3.17.2 |",
    ):
        assert row in report, row


def test_the_recorded_tables_carry_their_units():
    report = render_markdown(_recorded())
    for text in ("| req/s | rows/s | p50 (ms) | p90 (ms) | p99 (ms) |", "| steady rows/s |", "| wall (s) |"):
        assert text in report, text
    assert "| plan.profile_s | 10.0 s |" in report  # a figure the serving renderer has no sentence for
    # The training variants' final loss and validation figures come from their curves.
    assert "| plain | 1 | 25 | 29,184 | 160,797 | 157,542 | — | — | 5.64 | 5.64 | — | 0.27 | 0.30 | 0.86 |" in report
    assert "| ray_train_2 | 2 | 25 | 29,184 | 131,879 | 137,511 | 0.82× |" in report
    assert "| trials per minute | 3.29 |" in report and "| wall time | 109 s |" in report


def test_the_headline_of_the_recorded_run():
    rows = headline(_recorded())
    assert [r.measure for r in rows] == [
        "1 row per request, 16 connections, Nginx TLS",
        "1 row per request, 1 connection, Nginx TLS",
        "1,000-row requests, 4 connections, Nginx TLS",
        "Ray Train, 2 workers, 25 epochs, fit only, no API",
        "retraining loop, POST /v1/training-jobs to the new version serving",
    ]
    assert rows[0].platform == "1,869 req/s, p99 17.4 ms"
    assert rows[0].reference == "bare FastAPI 2,294 req/s (0.81×); mlflow 107 req/s (17.45×)"
    assert rows[1].platform == "776 req/s, p50 1.16 ms" and "(0.38×)" in rows[1].reference
    assert rows[2].platform.startswith("51,316 rows/s")
    assert rows[2].reference == "bare FastAPI 161,245 rows/s (0.32×); in-process serving path 309,748 rows/s (0.17×)"
    assert rows[3].reference == "plain PyTorch loop, wall 5.64 s (5.95×); 160,797 rows/s (0.82×)"
    text = headline_text(_recorded())
    assert text.startswith("Headline (full run, AMD EPYC, 2 CPUs):")
    assert len(text.splitlines()) == 2 + len(rows) and "1,869 req/s, p99 17.4 ms" in text
    report = render_markdown(_recorded())
    assert report.index("## Headline") < report.index("## Machine") < report.index("## Serving")


def test_the_recorded_monitor_and_shadow_runs_read_as_findings():
    monitor = json.loads((RESULTS / "monitor_overhead.json").read_text())
    shadow = json.loads((RESULTS / "shadow_overhead.json").read_text())
    results = {"monitor": monitor, "shadow": shadow}
    report = render_markdown(results)
    assert "## Drift monitor" in report and "## Shadow challenger" in report
    assert f"**{fmt(monitor['cost_pct'])}% fewer** with the monitor on" in report
    assert "| monitor | req/s | p50 (ms) | p90 (ms) | p99 (ms) | requests |" in report
    assert "| shadow | req/s |" in report and "% of those answered" in report
    assert "`MONITOR_REFRESH_S=5`" in report
    measures = [r.measure for r in headline(results)]
    assert measures == [
        "drift monitor on, 1 row per request, 16 connections",
        "shadow challenger loaded, 1 row per request, 16 connections",
    ]


def test_a_quick_run_is_flagged_as_not_comparable():
    assert "not comparable" in headline_text({"quick": True, "loop": {"wall_s": 10.0}})
    assert "A quick run" in render_markdown({"quick": True})
    assert headline_text({"quick": False}) == "Headline: no figures (every section was skipped)"


# Batch inference and the bulk request forms -----------------------------------------------------


def _batch_predict():
    """What benchmarks/batch_predict.py's batch_inference() returns, in its shape."""
    return {
        "rows": 5_000_000,
        "input_file_mib": 61.3,
        "input_in_memory_mib": 1210,
        "generate_s": 40.2,
        "cpus": 2,
        "actors": 2,
        "batch_size": 4096,
        "object_store_mib": 256,
        "in_process_one_core": {
            "predict_frame": {"rows": 1_000_000, "seconds": 10.0, "rows_per_s": 100_000},
            "batch_scorer": {"rows": 1_000_000, "seconds": 8.0, "rows_per_s": 125_000},
        },
        "job": {
            "rows": 5_000_000,
            "rejected_rows": 3,
            "wall_s": 20.0,
            "pipeline_s": 17.5,
            "rows_per_s": 250_000,
            "peak_rss_mib": 2900,
            "peak_pss_mib": 1234,
            "spilled_mib": 0.0,
        },
        "ratio_to_one_core": 2.5,
        "ratio_to_scorer_one_core": 2.0,
        "goal_ratio": 1.5,
    }


def _section(report, title):
    start = report.index(f"## {title}")
    end = report.find("\n## ", start + 1)
    return report[start : end if end > 0 else len(report)]


def test_batch_inference_is_a_table_with_units_and_its_goal():
    report = render_markdown({"batch_predict": _batch_predict()})
    body = _section(report, "Batch inference")
    assert [line for line in body.splitlines() if line.startswith("#")] == [
        "## Batch inference: Ray Data against one core in-process"
    ]
    assert "| rows | job rows/s | one-core in-process rows/s | ratio | peak PSS (MiB) | spilled (MiB) |" in body
    assert "| 5,000,000 | 250,000 | 100,000 | 2.50× | 1,234 | 0 |" in body
    assert "the object store capped at 256 MiB" in body and "2 actors, batches of 4,096 rows" in body
    assert "Goal: the job at ≥ 1.50× the one-core in-process rate: met." in body
    assert "4.7× the object store: the job streamed it" in body
    # The job against each in-process path, and what the renderer has no sentence for, with units.
    assert "| the batch job (Ray Data) | 5,000,000 | 20.0 | 250,000 | — |" in body
    assert "| 1,000,000 | 8.00 | 125,000 | 2.00× |" in body
    assert "rows it rejected: 3; peak RSS 2,900 MiB" in body and "Other figures" not in body
    assert "| ratio_to_one_core |" not in body and "| job.rows_per_s |" not in body  # shown in the tables


def test_batch_inference_headline_quotes_the_ratio_to_one_core():
    (row,) = headline({"batch_predict": _batch_predict()})
    assert row.measure == "batch inference, 5,000,000 rows"
    assert row.platform == "250,000 rows/s, peak PSS 1,234 MiB, spilled 0 MiB"
    assert row.reference == "in-process on one core 100,000 rows/s (2.50×)"


def test_a_batch_run_whose_data_fits_the_store_says_so():
    batch = {**_batch_predict(), "input_in_memory_mib": 20, "ratio_to_one_core": 1.2}
    body = _section(render_markdown({"batch_predict": batch}), "Batch inference")
    assert "rate: missed. The data fits in the object store: this run does not show streaming." in body


def _bulk_forms():
    def run(rows_per_s, dropped):
        return {
            "body_bytes": 100,
            "rps": rows_per_s / 1000,
            "rows_per_s": rows_per_s,
            "p50_ms": 50.0,
            "p99_ms": 90.0,
            "errors": 0,
            "requests": 600,
            "cores": {"nginx": 0.3, "haproxy": 0.2, "replica": 1.0},
            "platform_cores": 1.5,
            "postgres_cores": 0.3,
            "rows_answered": 600_000,
            "rows_recorded_during_run": 590_000,
            "rows_recorded": 600_000 - dropped,
            "rows_dropped": dropped,
            "wrk_cores": 0.01,
            # What wrk reports besides, in results.json only.
            "bytes_read": 123_456,
            "errors_by_kind": {"connect": 0, "read": 0},
            "extra": {},
            "p90_ms": 70.0,
            "loadgen": {"cpu_s": 0.1},
        }

    runs = {"instances": run(50_000.0, 0), "columns": run(80_000.0, 0), "arrow": run(100_000.0, 1000)}
    forms = {"server": "platform (Nginx TLS)", "rows_per_request": 1000, "connections": 4, "runs": runs}
    rows = [_row("fastapi", 4, 1000, 125.0, p50=30.0), _row("fastapi", 1, 1, 900.0, p50=1.0)]
    bulk_form_ratios(
        forms, rows, {"serving_path": [{"rows": 1, "rows_per_s": 3000.0}, {"rows": 1000, "rows_per_s": 200_000.0}]}
    )
    return forms


def test_bulk_form_ratios_are_to_the_bare_server_and_the_serving_path_of_the_same_size():
    forms = _bulk_forms()
    assert forms["fastapi_rows_per_s"] == 125_000.0 and forms["in_process_serving_path_rows_per_s"] == 200_000.0
    assert forms["ratios"]["arrow"] == {"vs_fastapi": 0.8, "vs_in_process": 0.5, "p99_over_p50": 1.8}
    assert forms["ratios"]["instances"]["vs_fastapi"] == 0.4


def test_bulk_forms_are_a_table_in_the_serving_section_and_a_headline_row():
    results = {"serving": {"rows": _serving_rows(), "bulk_forms": _bulk_forms()}}
    body = _section(render_markdown(results), "Serving")
    assert "### 1,000 rows per request by form, 4 connections, platform (Nginx TLS)" in body
    assert (
        "| form | body (bytes) | req/s | rows/s | p50 (ms) | p99 (ms) | errors / requests | vs bare FastAPI |" in body
    )
    arrow = "| arrow | 100 | 100 | 100,000 | 50.0 | 90.0 | 0 / 600 | 0.80× | 0.50× | 1.50 / 0.30 | 600,000 |"
    assert arrow + " 590,000 / 599,000 | 1,000 |" in body
    assert "| instances | 100 | 50.0 | 50,000 |" in body
    assert "bare FastAPI server (125,000 rows/s, `instances` body)" in body
    assert "Other figures" not in body and "bulk_forms" not in body  # every figure has its place
    row = headline(results)[-1]
    assert row.measure == "1,000-row requests by form, 4 connections, Nginx TLS"
    assert row.platform == "instances 50,000, columns 80,000, arrow 100,000 rows/s; 1,000 records dropped"
    assert row.reference == (
        "bare FastAPI 125,000 rows/s (instances 0.40×, columns 0.64×, arrow 0.80×); "
        "in-process serving path 200,000 rows/s (instances 0.25×, columns 0.40×, arrow 0.50×)"
    )


# Sections the report does not know yet ----------------------------------------------------------


def test_an_unknown_section_is_a_key_value_table_with_units_and_no_headings_of_its_own():
    section = {
        "rows": 5_000_000,
        "wall_s": 40.2,
        "rows_per_s": 124_000.0,
        "peak_rss_mib": 812.5,
        "quick": False,
        "input": {"format": "parquet", "size_bytes": 123_456_789},
        "per_worker": [{"worker": 1, "rows_per_s": 60_000.0, "cpu_s": 30.1}],
        "epoch_curve": [float(i) for i in range(20)],
        "rejected_share": 0.0125,
        "notes": None,
    }
    report = render_markdown({"bulk_export": section})
    body = report[report.index("## Bulk export") :]
    assert [line for line in body.splitlines() if line.startswith("#")] == ["## Bulk export"]
    for row in (
        "| rows | 5,000,000 |",
        "| wall_s | 40.2 s |",
        "| rows_per_s | 124,000 rows/s |",
        "| peak_rss_mib | 812 MiB |",
        "| quick | no |",
        "| input.format | parquet |",
        "| input.size_bytes | 123,456,789 bytes |",
        "| epoch_curve | 20 values, first 0, last 19.0, median 9.50 |",
        "| rejected_share | 1.2% |",
        "| notes | — |",
        "| worker | rows/s | cpu (s) |",
        "| 1 | 60,000 | 30.1 |",
    ):
        assert row in body, row


def test_an_unknown_field_of_a_known_section_is_shown_with_its_unit():
    training = {"plain": {"steady_rows_per_s": 1000.0, "wall_s": 2.0, "train_loss": [0.5]}, "phases": {"mlflow_s": 1.5}}
    report = render_markdown({"training": training})
    assert "| phases.mlflow_s | 1.50 s |" in report


@pytest.mark.parametrize(
    ("key", "unit", "header"),
    [
        ("wall_s", "s", "wall (s)"),
        ("p99_ms", "ms", "p99 (ms)"),
        ("rps", "req/s", "req/s"),
        ("rows_per_s", "rows/s", "rows/s"),
        ("steady_rows_per_s_incl_report", "rows/s", "steady rows/s incl report"),
        ("cpu_s_per_window", "s/window", "cpu s/window"),
        ("trials_per_min", "trials/min", "trials/min"),
        ("rss_mib_per_extra_model_per_replica", "MiB/extra model per replica", "rss MiB/extra model per replica"),
        ("cost_pct", "%", "cost (%)"),
        ("seconds_to_firing", "s", "seconds to firing"),
        ("server_cores", "cores", "server (cores)"),
        ("requests", "", "requests"),
        ("epochs", "", "epochs"),
    ],
)
def test_units_come_from_key_names(key, unit, header):
    assert unit_of(key) == unit
    assert label(key) == header


def _done_line(**overrides):
    data = {
        "requests": 1200,
        "duration_us": 10_000_000,
        "bytes": 360000,
        "rps": 120.0,
        "errors": {"connect": 0, "read": 1, "write": 0, "timeout": 2, "status": 3},
        "latency_us": {
            "p50": 8000.0,
            "p90": 12000.0,
            "p99": 20000.5,
            "p999": 30000.0,
            "min": 900,
            "max": 41000,
            "mean": 8300.0,
            "stdev": 2000.0,
        },
    } | overrides
    return JSON_MARKER + json.dumps(data)


def test_done_json_is_parsed_among_wrk_text():
    output = "Running 10s test @ http://x\n  2 threads and 16 connections\n" + _done_line() + "\nRequests/sec: 120.0\n"
    result = parse_done_json(output, rows_per_request=1000, url="http://x", connections=16, threads=2)
    assert result.requests == 1200 and result.duration_s == 10.0 and result.rps == 120.0
    assert (result.p50_ms, result.p99_ms, result.max_ms) == (8.0, 20.0005, 41.0)
    assert result.errors_by_kind == {"connect": 0, "read": 1, "write": 0, "timeout": 2, "status": 3}
    assert result.error_count == 6
    assert result.rows_per_s == 120_000.0
    data = result.to_dict()
    assert data["errors"] == 6 and data["rows_per_s"] == 120_000.0 and data["connections"] == 16
    json.dumps(data)


def test_missing_done_line_is_an_error():
    with pytest.raises(ValueError, match="WRK_JSON"):
        parse_done_json("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_lua_script_sets_method_headers_and_body_file(tmp_path):
    script = lua_script(tmp_path / "body", {"Content-Type": "application/json", "Authorization": 'Bearer a"b'})
    assert 'wrk.method = "POST"' in script
    assert 'wrk.headers["Authorization"] = "Bearer a\\"b"' in script
    assert json.dumps(str(tmp_path / "body")) in script
    assert "summary.errors" in script and "latency:percentile(99.9)" in script
    with pytest.raises(ValueError):
        lua_script(tmp_path / "body", {"X-Name": "é"})


def test_loadgen_summary_states_cpu_share():
    from dataclasses import replace

    base = parse_done_json(_done_line())
    results = [
        replace(base, loadgen=LoadGenUsage(cpu_s=2.0, wall_s=10.0, cpus=2, machine_busy_s=15.0)),
        replace(base, loadgen=LoadGenUsage(cpu_s=6.0, wall_s=10.0, cpus=2)),
    ]
    summary = loadgen_summary(results)
    assert summary["max_cores"] == pytest.approx(0.6) and summary["max_machine_share"] == pytest.approx(0.3)
    assert summary["mean_cores"] == pytest.approx(0.4)
    assert "30%" in summary["statement"]
    usage = results[0].loadgen
    assert usage is not None and usage.machine_busy_cores == pytest.approx(1.5)

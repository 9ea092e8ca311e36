"""The benchmark report from a synthetic results dict, and reading wrk's `done()` JSON line."""

import json

import pytest

from benchmarks.load import JSON_MARKER, LoadGenUsage, loadgen_summary, lua_script, parse_done_json
from benchmarks.report import machine_info, render_markdown, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
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
            "agreement": {"disagreements": {"mlflow": 0, "fastapi": 0}},
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
    for text in ("ray_train_2", "val_roc_auc", "predict_frame", "Retraining loop", "Load generator", "## Run"):
        assert text in report
    assert "![serving_latency](serving_latency.png)" in report
    # Extra keys the orchestrator adds are shown, not dropped.
    for text in ("| quick | True |", "serving_path", "encode + model", "disagreements", "### plan"):
        assert text in report


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

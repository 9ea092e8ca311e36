"""`make bench`'s code path in seconds: `python -m benchmarks --quick` with its own stack, the
retraining loop, every server under wrk, the bulk request forms, the profile, batch inference and
the report. No timing assertions: the figures belong to the full run on a quiet machine; this
keeps the benchmark from rotting.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.serving import BULK, EDGE, INGRESS, SINGLE
from core.settings import REPO_ROOT

# The benchmark's own end-to-end run (3 minutes, a stack of its own): `make test-extended`.
pytestmark = [pytest.mark.timeout(900), pytest.mark.extended]
SERVERS = {EDGE, INGRESS, "mlflow", "fastapi"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--skip", "training", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    return out, results


def test_the_loop_trained_promoted_and_served_a_new_version(bench):
    loop = bench[1]["loop"]
    assert loop["version_before"] is None and loop["version_after"] == "1"
    assert 0 < loop["finished_s"] <= loop["wall_s"]


def test_every_server_answered_every_load_without_errors(bench):
    serving = bench[1]["serving"]
    assert serving["agreement"]["agree"], serving["agreement"]
    loads = {(row["server"], row["kind"], row["connections"]) for row in serving["rows"]}
    plan = serving["plan"]
    expected = {(s, SINGLE, c) for s in SERVERS for c in plan["connections"]}
    expected |= {(s, BULK, plan["bulk_connections"]) for s in SERVERS}
    assert loads == expected
    for row in serving["rows"]:
        assert row["requests"] > 0 and row["errors"] == 0, row
        assert row["rows_per_request"] == (plan["bulk_rows"] if row["kind"] == BULK else 1)
        assert row["server_cores"] > 0, row  # the server's own CPU was measured, not only wrk's
    ceilings = serving["in_process"]["serving_path"]
    assert [c["rows"] for c in ceilings] == [1, plan["bulk_rows"]] and all(c["rows_per_s"] > 0 for c in ceilings)


def test_the_profile_sampled_the_ingress_replica(bench):
    profile = bench[1]["profile"]
    assert profile["samples"] > 0
    assert any("serve_apps/" in entry["frame"] for entry in profile["inclusive"]), profile["inclusive"][:10]


def test_the_report_names_every_server_and_has_its_plots(bench):
    out, results = bench
    report = (out / "report.md").read_text()
    for server in SERVERS:
        assert server in report
    assert results["machine"]["logical_cpus"] > 0
    plots = list(out.glob("*.png"))
    assert plots and all(p.read_bytes().startswith(PNG_MAGIC) for p in plots)


def test_two_models_were_served_at_once_without_errors(bench):
    multi = bench[1]["serving"]["multi_model"]
    assert multi["models"] == ["adult-income", "adult-income-twin"]
    assert multi["one_model"]["requests"] > 0 and multi["one_model"]["errors"] == 0
    # Each connection sends to both models in turn (the split itself: tests/unit/test_bench_load.py).
    assert multi["two_models"]["requests"] > 0 and multi["two_models"]["errors"] == 0, multi
    assert multi["two_vs_one"] > 0 and multi["replicas_rss_mib_two_models"] > 0
    assert "multi_model" in (bench[0] / "report.md").read_text().replace(" ", "_").lower()


def test_every_shape_of_serving_many_models_answered_both_models(bench):
    shapes = bench[1]["shapes"]
    assert set(shapes) >= {"fleet", "applications", "multiplexed", "fleet_minimal"}
    for name in ("fleet", "applications", "multiplexed", "fleet_minimal"):
        shape = shapes[name]
        for load in (shape["one_model"], shape["two_models"], shape["first_model_while_second_added"]):
            assert load["requests"] > 0 and load["errors"] == 0, (name, shape)
        assert shape["second_model_servable_s"] > 0 and shape["replicas_rss_mib_two_models"] > 0, (name, shape)
    # One application per model starts replicas of its own; the fleet loads a model into its own.
    assert shapes["applications"]["rss_mib_extra_model"] > shapes["fleet"]["rss_mib_extra_model"]
    assert "Many models" in (bench[0] / "report.md").read_text()


def test_every_bulk_form_was_answered_and_recorded(bench):
    serving = bench[1]["serving"]
    forms = serving["bulk_forms"]
    assert list(forms["runs"]) == ["instances", "columns", "arrow"]
    assert forms["rows_per_request"] == serving["plan"]["bulk_rows"] and forms["fastapi_rows_per_s"] > 0
    for form, run in forms["runs"].items():
        assert run["requests"] > 0 and run["errors"] == 0, (form, run)
        # At a quick run's load PostgreSQL keeps up: every answered row has its record once drained.
        assert run["rows_recorded"] >= run["rows_answered"] > 0 and run["rows_dropped"] == 0, (form, run)
        assert forms["ratios"][form]["vs_fastapi"] > 0 and forms["ratios"][form]["vs_in_process"] > 0
    assert "rows per request by form" in (bench[0] / "report.md").read_text()


def test_the_batch_job_scored_every_row(bench):
    batch = bench[1]["batch_predict"]
    assert batch["job"]["rows"] == batch["rows"] and batch["job"]["rejected_rows"] == 0
    assert batch["job"]["rows_per_s"] > 0 and batch["ratio_to_one_core"] > 0 and batch["job"]["peak_pss_mib"] > 0
    assert "## Batch inference" in (bench[0] / "report.md").read_text()

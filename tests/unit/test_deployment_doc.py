"""docs/deployment.md's "What is verified, and how" table against the repository: one row for every
service of compose.yaml and every manifest in cluster/kuberay/ (with each kind inside it), every
test file it names exists, and every row names a test or says why nothing can run here. A service
or manifest added without a row, or a test file renamed, fails here rather than leaving the page
claiming checks that do not exist."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import yaml

from core.settings import REPO_ROOT
from tests.compose_file import services

DEPLOYMENT_DOC = REPO_ROOT / "docs/deployment.md"
KUBERAY_DIR = REPO_ROOT / "cluster/kuberay"
SECTION = "## What is verified, and how"
COLUMNS = ["what", "runtime test", "static test", "not verifiable here"]
# What a cell holds when it has nothing to say; a dash followed by an explanation is not empty.
EMPTY_CELLS = {"", "—", "-"}
TEST_PATH = re.compile(r"tests/[\w/]+\.py")
# `tests/x.py::name`: the named test must exist in that file too.
TEST_FUNCTION = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
BACKTICKED = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class Row:
    what: str
    runtime: str
    static: str
    not_verifiable: str

    @property
    def subject(self) -> str:
        """The first code span of the `what` cell: the service, file or manifest the row is about."""
        spans = BACKTICKED.findall(self.what)
        return spans[0] if spans else ""


def section_text() -> str:
    text = DEPLOYMENT_DOC.read_text(encoding="utf-8")
    assert SECTION in text, f"{DEPLOYMENT_DOC} has no {SECTION!r} section"
    after = text.split(SECTION, 1)[1]
    # Up to the next heading of the same or a higher level.
    return re.split(r"^#{1,2} ", after, maxsplit=1, flags=re.MULTILINE)[0]


def cells(line: str) -> list[str]:
    # The table's cells hold no escaped pipes, so a plain split is exact.
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_rows() -> list[Row]:
    lines = [line for line in section_text().splitlines() if line.startswith("|")]
    assert len(lines) > 2, f"no table under {SECTION!r}"
    assert cells(lines[0]) == COLUMNS, cells(lines[0])
    assert set("".join(cells(lines[1]))) <= {"-", ":"}, "the second line is not the header's separator"
    rows = []
    for line in lines[2:]:
        row = cells(line)
        assert len(row) == len(COLUMNS), f"{len(row)} cells, not {len(COLUMNS)}: {line[:120]}"
        rows.append(Row(*row))
    return rows


def compose_services() -> list[str]:
    return sorted(services())


def kuberay_kinds() -> dict[str, set[str]]:
    """Each manifest file (as the page names it) and the kinds of the documents inside it."""
    found = {}
    for path in sorted(KUBERAY_DIR.glob("*.y*ml")):
        documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        found[str(path.relative_to(REPO_ROOT))] = {str(d["kind"]) for d in documents}
    return found


def rows_about(subject: str) -> list[Row]:
    return [row for row in table_rows() if row.subject == subject]


def is_empty(cell: str) -> bool:
    return cell.strip() in EMPTY_CELLS


def test_the_sources_of_truth_are_not_empty() -> None:
    # Guards the parametrised tests below, which would pass vacuously on an empty list.
    assert len(compose_services()) >= 10
    assert kuberay_kinds() and all(kuberay_kinds().values())


@pytest.mark.parametrize("service", compose_services())
def test_every_compose_service_has_a_row(service: str) -> None:
    assert len(rows_about(service)) == 1, f"compose service {service!r} needs exactly one row (`{service}` first)"


@pytest.mark.parametrize("manifest", sorted(kuberay_kinds()))
def test_every_kuberay_manifest_has_a_row_naming_its_kinds(manifest: str) -> None:
    rows = rows_about(manifest)
    assert len(rows) == 1, f"{manifest} needs exactly one row (`{manifest}` first)"
    named = set(BACKTICKED.findall(rows[0].what))
    missing = kuberay_kinds()[manifest] - named
    assert not missing, f"{manifest}: its row does not name the kinds {sorted(missing)}"


def test_every_named_test_file_exists() -> None:
    paths = set(TEST_PATH.findall(section_text()))
    assert paths, "the section names no test file"
    missing = sorted(path for path in paths if not (REPO_ROOT / path).is_file())
    assert not missing, f"named but not in the repository: {missing}"


def test_every_named_test_function_exists() -> None:
    for path, name in TEST_FUNCTION.findall(section_text()):
        source = (REPO_ROOT / path).read_text(encoding="utf-8")
        assert re.search(rf"^def {name}\(", source, flags=re.MULTILINE), f"{path} has no test {name}"


def test_every_row_names_a_test() -> None:
    untested = [row.what for row in table_rows() if is_empty(row.runtime) and is_empty(row.static)]
    assert not untested, f"rows with neither a runtime nor a static test: {untested}"


def test_a_row_without_a_runtime_test_says_why() -> None:
    for row in table_rows():
        if is_empty(row.runtime):
            assert not is_empty(row.not_verifiable), f"{row.what}: no runtime test and no reason given"


def test_test_cells_name_test_files() -> None:
    """A runtime or static cell says which test does the check. A cell that starts "— (" says why
    there is none and may point elsewhere."""
    for row in table_rows():
        for column, cell in (("runtime", row.runtime), ("static", row.static)):
            if is_empty(cell) or cell.startswith("— ("):
                continue
            assert TEST_PATH.search(cell), f"{row.what}: its {column} cell names no test file"


def test_is_empty_treats_a_dash_with_an_explanation_as_content() -> None:
    assert is_empty(" — ") and is_empty("")
    assert not is_empty("— (no Grafana process; see tests/e2e/test_rollout.py)")


def test_cells_split_a_table_line() -> None:
    assert cells("| `a` | b c | — | d |") == ["`a`", "b c", "—", "d"]

"""The documentation site: it builds with warnings as errors (broken links and anchors fail it),
every arc42 section is a page in the nav, and every Mermaid diagram sits in a `mermaid` fence
(the only kind the site renders as a diagram)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from mkdocs.config import load_config

from core.settings import REPO_ROOT

DOCS = REPO_ROOT / "docs"
MKDOCS_YML = REPO_ROOT / "mkdocs.yml"
ARC42_SECTIONS = [
    "Introduction and goals",
    "Constraints",
    "Context and scope",
    "Solution strategy",
    "Building block view",
    "Runtime view",
    "Deployment view",
    "Crosscutting concepts",
    "Architecture decisions",
    "Quality requirements",
    "Risks and technical debt",
    "Glossary",
]
# The first word of every Mermaid diagram type the pages might use.
MERMAID_STARTS = re.compile(
    r"^(flowchart|graph|sequenceDiagram|classDiagram|stateDiagram(-v2)?|erDiagram|journey|gantt|pie|"
    r"mindmap|timeline|C4Context|C4Container|C4Component|C4Deployment|quadrantChart|gitGraph|block-beta)\b"
)
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def nav_pages(nav: list[Any]) -> dict[str, str]:
    """Title → file for every page in the nav, nested sections included."""
    pages: dict[str, str] = {}
    for item in nav:
        if isinstance(item, str):
            pages[item] = item
            continue
        for title, value in item.items():
            if isinstance(value, list):
                pages.update(nav_pages(value))
            else:
                pages[title] = value
    return pages


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block."""
    blocks: list[tuple[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, body = opening["fence"], []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append((opening["info"].strip(), "\n".join(body)))
        i += 1
    return blocks


def doc_files() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def test_site_builds_strict(tmp_path: Path):
    site = tmp_path / "site"
    argv = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(MKDOCS_YML)]
    argv += ["--site-dir", str(site)]
    result = subprocess.run(
        argv,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "WARNING" not in result.stderr, result.stderr[-4000:]
    # Each Mermaid fence became a diagram element on its page.
    for path in doc_files():
        fences = sum(info == "mermaid" for info, _ in fenced_blocks(path.read_text(encoding="utf-8")))
        if not fences:
            continue
        relative = path.relative_to(DOCS).with_suffix("")
        page = site / ("index.html" if relative.name == "index" else relative / "index.html")
        assert page.read_text(encoding="utf-8").count('class="mermaid"') == fences, page


def test_config_is_strict_and_renders_mermaid():
    config = load_config(config_file=str(MKDOCS_YML))
    assert config["strict"] is True
    fences = config["mdx_configs"]["pymdownx.superfences"]["custom_fences"]
    assert any(f["name"] == "mermaid" and f["class"] == "mermaid" for f in fences)
    validation = config["validation"]
    for check in ("not_found", "anchors", "absolute_links", "unrecognized_links"):
        assert validation["links"][check] >= 30, check  # logging.WARNING: an error under strict
    assert validation["nav"]["not_found"] >= 30


def test_every_arc42_section_is_a_page_in_the_nav():
    pages = nav_pages(load_config(config_file=str(MKDOCS_YML))["nav"])
    for number, section in enumerate(ARC42_SECTIONS, start=1):
        title = f"{number} {section}"
        assert title in pages, f"arc42 section {title!r} missing from the nav"
        page = DOCS / pages[title]
        assert page.is_file(), page
        heading = page.read_text(encoding="utf-8").splitlines()[0]
        assert heading == f"# {title}", f"{page}: first line {heading!r}"
    for name in ("operations.md", "observability.md", "deployment.md", "scale-out.md"):
        assert name in pages.values(), f"{name} missing from the nav"


def test_mermaid_diagrams_are_in_mermaid_fences():
    diagrams = 0
    for path in doc_files():
        for info, body in fenced_blocks(path.read_text(encoding="utf-8")):
            first = next((line.strip() for line in body.splitlines() if line.strip()), "")
            if MERMAID_STARTS.match(first):
                assert info == "mermaid", f"{path}: a {first.split()[0]} diagram in a {info or 'plain'!r} fence"
                diagrams += 1
            elif info == "mermaid":
                raise AssertionError(f"{path}: a mermaid fence that holds no known diagram type: {first!r}")
    assert diagrams >= 6  # context, building blocks, three runtime scenarios, deployment


def test_fenced_blocks_finds_info_strings():
    text = "a\n```mermaid\nflowchart LR\n  a --> b\n```\n\n````bash\nmake docs\n````\n"
    assert fenced_blocks(text) == [("mermaid", "flowchart LR\n  a --> b"), ("bash", "make docs")]

"""Reading PromQL out of Grafana dashboards and Prometheus rule files, for tests that check the
metric names they use against what the platform exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*=\s*("(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\')')
_BRACES = re.compile(r"\{[^}]*\}")
_BRACKETS = re.compile(r"\[[^\]]*\]")
# Label lists of aggregations and vector matching: `by (le, route)`, `on() group_left(model)`.
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE)
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-zA-Z.]+", re.IGNORECASE)
_AT = re.compile(r"@\s*(?:[0-9.]+|start\s*\(\s*\)|end\s*\(\s*\))")
# Numbers first, so `1e-9` and `0x1f` are not read as identifiers.
_TOKEN = re.compile(
    r"(?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)"
)
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
    }
)


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    A name is an identifier used as a selector (alone or before `{`), or the value of a
    `__name__` matcher. Function and aggregation names (followed by `(`), keywords, label names
    in matchers and label lists, numbers and durations are not names.
    """
    text = "\n".join(line for line in expr.splitlines() if not line.lstrip().startswith("#"))
    names = {match.group(1)[1:-1] for match in _NAME_MATCHER.finditer(text)}
    text = _STRING.sub('""', text)
    text = _BRACES.sub("{}", text)
    text = _BRACKETS.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _AT.sub(" ", text)
    for match in _TOKEN.finditer(text):
        name = match.group("ident")
        if name is None or name.lower() in _KEYWORDS:
            continue
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):
            continue
        names.add(name)
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        # Collapsed rows keep their panels inside the row.
        yield from _panels(panel.get("panels", []))


def dashboard_panels(path: str | Path) -> list[dict[str, Any]]:
    """Every panel of a dashboard JSON file, rows and the panels inside collapsed rows included."""
    dashboard = json.loads(Path(path).read_text())
    return list(_panels(dashboard.get("panels", [])))


def _datasource_type(datasource: Any) -> str | None:
    if isinstance(datasource, dict):
        kind = datasource.get("type")
        return str(kind) if kind is not None else None
    return None


def dashboard_exprs(path: str | Path, datasource_type: str = "prometheus") -> list[str]:
    """The query of every target whose datasource (its own, else its panel's) is of this type;
    PromQL by default, so LogQL from logs panels stays out."""
    exprs = []
    for panel in dashboard_panels(path):
        for target in panel.get("targets", []):
            kind = _datasource_type(target.get("datasource")) or _datasource_type(panel.get("datasource"))
            if kind == datasource_type and target.get("expr"):
                exprs.append(str(target["expr"]))
    return exprs


def rule_exprs(path: str | Path) -> list[tuple[str, str]]:
    """(alert or record name, expr) of every rule in a Prometheus rule file, or in every
    .yml/.yaml file of a directory."""
    path = Path(path)
    files = sorted([*path.glob("*.yml"), *path.glob("*.yaml")]) if path.is_dir() else [path]
    rules = []
    for file in files:
        document = yaml.safe_load(file.read_text()) or {}
        for group in document.get("groups", []):
            for rule in group.get("rules", []):
                name = rule.get("alert") or rule.get("record")
                rules.append((str(name), str(rule["expr"])))
    return rules

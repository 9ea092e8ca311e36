"""Nginx's rate limit on the inference API counts per API key and answers 429 in the API's JSON
shape, so one client cannot use up another's budget."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.sandbox import Stack
from serve_apps.schemas import EXAMPLE_ROW
from tests.edge_helpers import require_edge, spare_edge


@pytest.fixture
def tight_edge(stack: Stack, tmp_path: Path) -> Iterator[Stack]:
    """A spare Nginx in front of the stack's ingress with a limit of 1 request per second."""
    with spare_edge(require_edge(stack), tmp_path / "state", api={"rate_limit_rps": 1, "rate_limit_burst": 2}) as edge:
        yield edge


def test_rate_limit_is_per_key_and_answers_429(tight_edge: Stack, trained: dict[str, Any]) -> None:
    other_key = f"second-{tight_edge.api_key}"  # the stack's second configured key
    body = {"instances": [EXAMPLE_ROW]}
    first = [tight_edge.http.post("/v1/predict", json=body, headers=tight_edge.auth) for _ in range(12)]
    codes = [r.status_code for r in first]
    assert 429 in codes, codes
    limited = next(r for r in first if r.status_code == 429)
    assert limited.json()["error"]["code"] == "rate_limited" and limited.headers["retry-after"] == "1"
    # The same key in the other header shares the budget; another key has its own.
    same = tight_edge.http.post("/v1/predict", json=body, headers={"X-API-Key": tight_edge.api_key})
    assert same.status_code == 429, same.text
    other = tight_edge.http.post("/v1/predict", json=body, headers={"Authorization": f"Bearer {other_key}"})
    assert other.status_code == 200, other.text

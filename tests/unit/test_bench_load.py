"""The benchmark's split load: one wrk process, each connection sending to several endpoints of one
server in turn, each with its own headers. Measured against a local HTTP server that counts what
it receives, so "split evenly" in a two-model figure is what the server saw."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import ClassVar

import pytest

from benchmarks.load import run_wrk_split
from tests.local_http import local_http_server

pytestmark = pytest.mark.unit


class _Counting(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as wrk's connections expect
    seen: ClassVar[Counter[tuple[str, str]]] = Counter()
    bodies: ClassVar[Counter[bytes]] = Counter()
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            self.seen[(self.path, self.headers.get("X-Model", ""))] += 1
            self.bodies[body] += 1
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def server() -> Iterator[str]:
    _Counting.seen.clear()
    _Counting.bodies.clear()
    with local_http_server(_Counting) as url:
        yield url


def test_each_connection_sends_to_every_target_in_turn_with_its_headers(server):
    targets = [
        (f"{server}/v1/models/a/predict", {"Content-Type": "application/json", "X-Model": "a"}),
        (f"{server}/v1/models/b/predict?x=1", {"Content-Type": "application/json", "X-Model": "b"}),
    ]
    result = run_wrk_split(targets, b'{"instances": []}', connections=4, duration_s=1)

    a = _Counting.seen[("/v1/models/a/predict", "a")]
    b = _Counting.seen[("/v1/models/b/predict?x=1", "b")]
    assert set(_Counting.seen) == {("/v1/models/a/predict", "a"), ("/v1/models/b/predict?x=1", "b")}
    assert result.error_count == 0 and a >= 10 and b >= 10
    # In turn on every connection: the two counts differ by at most one request per connection.
    assert abs(a - b) <= 4, (a, b)
    assert set(_Counting.bodies) == {b'{"instances": []}'}


def test_targets_on_two_servers_are_refused(server):
    with pytest.raises(ValueError, match="one server"):
        run_wrk_split([(f"{server}/a", {}), ("http://127.0.0.1:1/b", {})], b"{}", connections=1, duration_s=1)

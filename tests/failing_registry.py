"""A registry that is there but broken: a real HTTP server at a tracking URI that answers every
MLflow REST call with a 500, as a tracking server whose database is down does."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler

from tests.local_http import local_http_server

ERROR = {"error_code": "INTERNAL_ERROR", "message": "the registry's database is unreachable"}


class _Broken(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _fail(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps(ERROR).encode()
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _fail  # noqa: N815 - the handler's method names

    def log_message(self, *args: object) -> None:
        return


@contextmanager
def failing_registry() -> Iterator[str]:
    """The tracking URI of a registry that fails every call."""
    with local_http_server(_Broken) as url:
        yield url

"""Real HTTP servers on free loopback ports for the length of a `with` block: one of a test's own
handler in a thread, and moto's S3-compatible server as a process."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from cluster.sandbox import free_port
from core.health import wait_until


@contextmanager
def local_http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Its base URL, http://127.0.0.1:PORT."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class MotoS3:
    """moto in server mode, an S3-compatible endpoint over real HTTP, as a process of its own that a
    test can stop (the store going away under a running job). Its objects live in its memory."""

    def __init__(self) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        binary = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        port = self.url.rsplit(":", 1)[1]
        self.proc = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", port], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def up(self) -> bool:
        try:
            return httpx.get(self.url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@contextmanager
def moto_s3() -> Iterator[MotoS3]:
    server = MotoS3()
    try:
        assert wait_until(server.up, 30), "moto_server did not start"
        yield server
    finally:
        server.stop()


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto in server mode, an S3-compatible endpoint over real HTTP: its base URL."""
    with moto_s3() as server:
        yield server.url

"""Serving under a path prefix behind a proxy that strips it.

Nginx forwards https://host/ui/... to this process as /... and names the prefix in
X-Forwarded-Prefix. Gradio builds its asset and API URLs from the request's ASGI root_path when
its own root_path is empty, so copying the header there makes the same process answer both
through the proxy and when reached directly (no header, no prefix).
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

# A path of plain segments only: the header must not inject a host or a scheme into URLs.
_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")


def forwarded_prefix(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"x-forwarded-prefix":
            prefix = value.decode("latin-1").split(",")[0].strip().rstrip("/")
            return prefix if _PREFIX.match(prefix) else None
    return None


class ForwardedPrefixMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in {"http", "websocket"}:
            prefix = forwarded_prefix(scope.get("headers", []))
            if prefix and not scope.get("root_path"):
                scope = {**scope, "root_path": prefix}
        await self.app(scope, receive, send)

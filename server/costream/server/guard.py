"""Who may talk to the server from where: the ``Host`` check, the WebSocket ``Origin``
policy and the page's Content-Security-Policy.

- ``Host``: on loopback, only loopback names (``localhost``, ``127.0.0.1``, ``[::1]``) or
  ``allowed_hosts``; elsewhere, when ``allowed_hosts`` (``COSTREAM_ALLOWED_HOSTS``) is set,
  only those. Another name is answered 421 (a WebSocket: refused before the upgrade, 403):
  a DNS-rebinding page (a foreign name resolving to this server) gets nothing.
- ``Origin`` of a WebSocket: absent (not a browser), one of ``allowed_origins``, the
  server's own origin (the ``Host`` it was reached at), or, only when the server listens
  on loopback, a loopback origin on any port.
- Every HTML answer (``/``, ``/c/{id}``, ``/assets/index.html``) carries the page headers:
  ``connect-src 'self'`` plus the configured origins, so a page can open no WebSocket or
  request to another host.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Mapping
from typing import Final
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from costream.config import Settings
from costream.server.wire import keep_server_send

_LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def listens_on_loopback(settings: Settings) -> bool:
    """Whether the server listens on a loopback address only."""
    try:
        return ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        return settings.host == "localhost"


def _hostname(host: str) -> str:
    """``host`` (as in a Host header or an origin's netloc) without its port, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback_name(hostname: str) -> bool:
    if hostname in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(hostname.strip("[]")).is_loopback
    except ValueError:
        return False


def host_allowed(host: str | None, settings: Settings) -> bool:
    """Whether a request that named ``host`` (its Host header) is for this server."""
    if host is None:
        return not listens_on_loopback(settings) and not settings.allowed_hosts
    hostname = _hostname(host)
    allowed = {_hostname(name) for name in settings.allowed_hosts}
    if hostname in allowed or host.lower() in allowed:
        return True
    if listens_on_loopback(settings):
        return _is_loopback_name(hostname)
    return not allowed


def origin_allowed(headers: Mapping[str, str], settings: Settings) -> bool:
    """Whether a WebSocket with these request headers may be served (see the module)."""
    origin = headers.get("origin")
    if origin is None:
        return True
    allowed = settings.allowed_origins
    if origin in allowed or "*" in allowed:
        return True
    netloc = urlsplit(origin).netloc.lower()
    host = (headers.get("host") or "").lower()
    if netloc and netloc == host:
        return True  # the server's own origin, as the browser reached it
    return listens_on_loopback(settings) and _is_loopback_name(_hostname(netloc))


def content_security_policy(settings: Settings) -> str:
    """The page's policy: itself only, plus the configured origins for connections."""
    sources = ["'self'"]
    for origin in settings.allowed_origins:
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and parts.netloc:
            sources.append(f"{parts.scheme}://{parts.netloc}")
            ws = "wss" if parts.scheme == "https" else "ws"
            sources.append(f"{ws}://{parts.netloc}")
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {' '.join(sources)}; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )


def page_headers(settings: Settings) -> dict[str, str]:
    """The headers of every HTML answer."""
    return {
        "Cache-Control": "no-cache",
        # Model output is untrusted: the page renders it sanitized, and this policy stops
        # any script that slipped through from running or sending data elsewhere.
        "Content-Security-Policy": content_security_policy(settings),
        "Referrer-Policy": "no-referrer",  # share links carry tokens (in the fragment, still)
        "X-Content-Type-Options": "nosniff",
    }


class Guard:
    """ASGI middleware: the ``Host`` check on every request, the page headers on every
    HTML answer (static files included)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.headers = page_headers(settings)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine function: what it returns is awaited in its place, so a WebSocket
        # (every idle viewer) holds no frame of this middleware for its life.
        if scope["type"] not in ("http", "websocket"):
            return self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        if not host_allowed(host, self.settings):
            return self._refuse(scope, send)
        if scope["type"] == "websocket":
            keep_server_send(scope, send)  # for frames written straight to it (wire.py)
            return self.app(scope, receive, send)
        return self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if headers.get("content-type", "").startswith("text/html"):
                    for name, value in self.headers.items():
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @staticmethod
    async def _refuse(scope: Scope, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4403, "reason": "host not allowed"})
            return
        body = b'{"error":{"code":"bad_host","message":"this server does not answer to that Host"}}'
        await send(
            {
                "type": "http.response.start",
                "status": 421,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

"""Conversation links: a share link or a WebSocket URL, parsed into where to connect."""

from __future__ import annotations

import urllib.parse

import msgspec

from costream.client.errors import BadLink


class Link(msgspec.Struct, frozen=True):
    """Where a conversation lives: its WebSocket URL, its HTTP base URL, id and token."""

    ws_url: str
    http_url: str
    conversation_id: str
    token: str


def parse_link(url: str, token: str | None = None) -> Link:
    """Parse a share link ``http(s)://host/c/<id>#t=<token>`` or a WebSocket URL
    ``ws(s)://host/ws/conversations/<id>``; ``token`` wins over the fragment's."""
    parts = urllib.parse.urlsplit(url.strip())
    fragment = urllib.parse.parse_qs(parts.fragment)
    token = token or (fragment.get("t") or [""])[0]
    path = parts.path.rstrip("/")
    if parts.scheme in ("http", "https") and "/c/" in path:
        prefix, _, conversation_id = path.rpartition("/c/")
        ws_scheme = "wss" if parts.scheme == "https" else "ws"
        http_scheme = parts.scheme
    elif parts.scheme in ("ws", "wss") and "/ws/conversations/" in path:
        prefix, _, conversation_id = path.rpartition("/ws/conversations/")
        ws_scheme = parts.scheme
        http_scheme = "https" if parts.scheme == "wss" else "http"
    else:
        raise BadLink(
            "not a conversation link: expected http(s)://host/c/<id>#t=<token> "
            "or ws(s)://host/ws/conversations/<id>"
        )
    if not conversation_id or "/" in conversation_id or not parts.netloc:
        raise BadLink("not a conversation link: no conversation id in the path")
    if not token:
        raise BadLink("no token: use a link that ends in #t=<token>, or pass the token")
    ws_url = urllib.parse.urlunsplit(
        (ws_scheme, parts.netloc, f"{prefix}/ws/conversations/{conversation_id}", "", "")
    )
    http_url = urllib.parse.urlunsplit((http_scheme, parts.netloc, prefix, "", ""))
    return Link(ws_url=ws_url, http_url=http_url, conversation_id=conversation_id, token=token)

"""Where ``--redis-url`` points: one Redis or a cluster's startup nodes, and its secrets.

``redis://`` / ``rediss://`` (TLS) name one Redis; ``redis+cluster://`` /
``rediss+cluster://`` name a cluster by one or more ``host:port``, with the credentials
and options of the URL applied to every node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit


def secrets_of(url: str) -> list[str]:
    """The password of a redis URL in every spelling that could end up in a message."""
    parts = urlsplit(url)
    found = [parts.password or "", *parse_qs(parts.query).get("password", [])]
    return [s for text in found if text for s in {text, unquote(text)}]


_CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where ``--redis-url`` points."""

    url: str  # a redis:// or rediss:// URL: the one Redis, or a cluster's first startup node
    nodes: tuple[tuple[str, int], ...]  # a cluster's startup nodes; empty for one Redis
    where: str  # for messages: host:port, no credentials

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        scheme = _CLUSTER_SCHEMES.get(parts.scheme.lower())
        if scheme is None:
            return cls(url, (), _netloc(parts.hostname or "localhost", parts.port or 6379))
        userinfo, at, hosts = parts.netloc.rpartition("@")
        nodes = []
        for item in hosts.split(","):
            if item.strip():
                node = urlsplit(f"//{item.strip()}")
                nodes.append((node.hostname or "localhost", node.port or 6379))
        if not nodes:
            raise ValueError(f"a {parts.scheme} URL names at least one host:port")
        plain = urlunsplit(
            (scheme, userinfo + at + _netloc(*nodes[0]), parts.path, parts.query, "")
        )
        return cls(plain, tuple(nodes), "cluster " + ",".join(_netloc(*n) for n in nodes))

    def node_url(self, host: str, port: int) -> str:
        """The URL of one node of the cluster, with the credentials and options of ``url``."""
        parts = urlsplit(self.url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        netloc = userinfo + at + _netloc(host, port)
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))

"""The Starlette server: routes, auth, the WebSocket session, SSE, the AG-UI endpoints,
ingest for external producers, per-process fan-out, uvicorn and workers.

:mod:`.app` (routes and lifespan), :mod:`.deps` (what handlers share: services, errors,
auth), :mod:`.api` (the HTTP API), :mod:`.agui` (AG-UI clients: run and watch),
:mod:`.ingest` (runs of external producers), :mod:`.session` (one WebSocket), :mod:`.hub`
(fan-out), :mod:`.serve` (uvicorn).
"""

from costream.server.app import create_app
from costream.server.serve import serve

__all__ = ["create_app", "serve"]

"""The ``costream`` command: ``serve``, ``new``, ``say``, ``watch``.

Only ``serve`` imports the server (and, through its runner, LiteLLM); the client
commands stay light.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _serve(args: argparse.Namespace) -> int:
    from .app import serve
    from .config import Settings

    origins = None
    if args.allowed_origins is not None:
        origins = tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip())
    settings = Settings.from_env(
        host=args.host,
        port=args.port,
        redis_url=args.redis_url,
        flush_ms=args.flush_ms,
        model=args.model,
        allowed_origins=origins,
    )
    if args.workers > 1 and not settings.redis_url:
        print("costream serve: --workers needs Redis (--redis-url or REDIS_URL)", file=sys.stderr)
        return 2
    serve(settings, workers=args.workers)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="costream", description="Share one live LLM stream with many viewers."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument(
        "--redis-url", default=None, help="Redis URL (default REDIS_URL; none: embedded)"
    )
    serve.add_argument(
        "--flush-ms", type=int, default=None, help="delta merging window in ms, 0 = off"
    )
    serve.add_argument("--model", default=None, help="default LiteLLM provider/model")
    serve.add_argument(
        "--allowed-origins", default=None, help="comma-separated origins allowed to connect"
    )
    serve.add_argument("--workers", type=int, default=1, help="processes (needs Redis)")
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = args.handler
    result: int = handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())

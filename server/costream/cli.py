"""The ``costream`` command: ``serve``, ``new``, ``say``, ``watch``, ``cancel``.

Only ``serve`` imports the server (and, through its runner, LiteLLM); the client
commands (:mod:`costream.client.commands`) stay light.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from costream.client.commands import (
    DEFAULT_SERVER,
    CommandError,
    cancel_command,
    new_command,
    say_command,
    watch_command,
)


def _serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from costream.config import Settings
    from costream.errors import DataDirError
    from costream.server.serve import serve

    origins = None
    if args.allowed_origins is not None:
        origins = tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip())
    settings = Settings.from_env(
        host=args.host,
        port=args.port,
        redis_url=args.redis_url,
        data_dir=args.data_dir,
        flush_ms=args.flush_ms,
        model=args.model,
        allowed_origins=origins,
        metrics_listen=args.metrics_listen,
    )
    if args.memory:
        settings = replace(settings, data_dir=None)
    if args.workers > 1 and not settings.redis_url:
        print(
            "costream serve: --workers needs Redis (--redis-url or REDIS_URL): without it "
            "conversations live in one process (SQLite in --data-dir, or --memory)",
            file=sys.stderr,
        )
        return 2
    try:
        serve(settings, workers=args.workers)
    except DataDirError as error:
        print(f"costream serve: {error}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="costream", description="Share one live LLM stream with many viewers."
    )
    parser.add_argument("--version", action="version", version=f"costream {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument(
        "--redis-url",
        default=None,
        help="Redis URL, or redis+cluster://host:port for a cluster (default REDIS_URL; none: embedded)",
    )
    storage = serve.add_mutually_exclusive_group()
    storage.add_argument(
        "--data-dir",
        default=None,
        help="without Redis: where conversations are kept (default COSTREAM_DATA_DIR or ./.costream)",
    )
    storage.add_argument(
        "--memory",
        action="store_true",
        help="without Redis: keep conversations in memory only, lost when the server stops",
    )
    serve.add_argument(
        "--flush-ms", type=int, default=None, help="delta merging window in ms, 0 = off"
    )
    serve.add_argument("--model", default=None, help="default LiteLLM provider/model")
    serve.add_argument(
        "--allowed-origins", default=None, help="comma-separated origins allowed to connect"
    )
    serve.add_argument("--workers", type=int, default=1, help="processes (needs Redis)")
    serve.add_argument(
        "--metrics-listen",
        default=None,
        metavar="HOST:PORT",
        help="serve /metrics there instead of on the main port (default COSTREAM_METRICS_LISTEN)",
    )
    serve.set_defaults(handler=_serve)

    new = commands.add_parser("new", help="create a conversation and print its links")
    new.add_argument(
        "--server", default=None, help=f"server URL (default COSTREAM_URL or {DEFAULT_SERVER})"
    )
    new.add_argument("--title", default=None, help="the conversation's title")
    new.add_argument("--model", default=None, help="LiteLLM provider/model (default: server's)")
    new.add_argument("--system", default=None, help="system prompt")
    new.set_defaults(handler=new_command)

    say = commands.add_parser("say", help="send a message and follow the run it starts")
    say.add_argument("link", help="the conversation's write link")
    say.add_argument("text", help="the message")
    say.add_argument("--no-follow", action="store_true", help="return once the run started")
    say.add_argument("--json", action="store_true", help="print logged events as JSON lines")
    say.add_argument(
        "--cancel-on-interrupt",
        action="store_true",
        help="Ctrl-C cancels the run (default: the run goes on; stop it with costream cancel)",
    )
    say.add_argument("--name", default=None, help=_NAME_HELP)
    say.set_defaults(handler=say_command)

    watch = commands.add_parser("watch", help="watch a conversation live in the terminal")
    watch.add_argument("link", help="the conversation's view or write link")
    watch.add_argument("--json", action="store_true", help="print logged events as JSON lines")
    start = watch.add_mutually_exclusive_group()
    start.add_argument(
        "--from-start",
        dest="live",
        action="store_false",
        help="replay the conversation from the start, then follow it (default)",
    )
    start.add_argument("--live", action="store_true", help="show only what comes next")
    watch.add_argument("--name", default=None, help=_NAME_HELP)
    watch.add_argument(
        "--no-presence",
        action="store_true",
        help="do not print who joins and leaves (on stderr)",
    )
    watch.set_defaults(handler=watch_command, live=False)

    cancel = commands.add_parser("cancel", help="cancel the run under way")
    cancel.add_argument("link", help="the conversation's write link")
    cancel.set_defaults(handler=cancel_command)
    return parser


_NAME_HELP = "the name other viewers see (default COSTREAM_NAME; none: unnamed)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("costream")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = args.handler
    try:
        result: int = handler(args)
    except CommandError as error:
        print(f"costream {args.command}: {error}", file=sys.stderr)
        return error.exit_code
    return result


if __name__ == "__main__":
    sys.exit(main())

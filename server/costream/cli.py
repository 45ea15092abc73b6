"""The ``costream`` command: ``serve``, ``new``, ``say``, ``watch``, ``cancel``.

Only ``serve`` imports the server (and, through its runner, LiteLLM); the client
commands stay light.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from costream.client.connect import Conversation

DEFAULT_SERVER = "http://127.0.0.1:8000"
HTTP_TIMEOUT_S = 30.0


class CommandError(Exception):
    """A short message for stderr, and the exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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


# ---- new ------------------------------------------------------------------------------


def http_json(
    method: str, url: str, body: dict[str, Any] | None = None, token: str | None = None
) -> tuple[int, Any]:
    """A blocking JSON call: (status, parsed body). Raises ``CommandError`` when unreachable."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    request.add_header("Accept", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as answer:
            status, payload = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, payload = error.code, error.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise CommandError(f"cannot reach {url.split('/api/')[0]}: {reason}") from None
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, None


def error_text(body: Any) -> str:
    """The ``message (code)`` of a PROTOCOL.md error body."""
    if isinstance(body, dict) and isinstance(error := body.get("error"), dict):
        return f"{error.get('message', '')} ({error.get('code', '?')})"
    return "no error details"


def _new(args: argparse.Namespace) -> int:
    server = (args.server or os.environ.get("COSTREAM_URL") or DEFAULT_SERVER).rstrip("/")
    body = {
        name: value
        for name, value in (("title", args.title), ("model", args.model), ("system", args.system))
        if value is not None
    }
    key = os.environ.get("COSTREAM_CREATE_KEY") or None
    status, created = http_json("POST", f"{server}/api/conversations", body, token=key)
    if status != 201 or not isinstance(created, dict):
        hint = " (set COSTREAM_CREATE_KEY)" if status == 401 else ""
        raise CommandError(f"could not create a conversation: {error_text(created)}{hint}")
    print(f"conversation {created['id']}")
    print()
    print("view link (share it; it can only watch):")
    print(f"  {created['viewUrl']}")
    print("write link (keep it; it can send messages):")
    print(f"  {created['writeUrl']}")
    print()
    print("open a link in a browser, or:")
    print(f"  costream watch '{created['viewUrl']}'")
    print(f"  costream say '{created['writeUrl']}' 'Tell me a long story about LLM streaming'")
    return 0


# ---- watch and say --------------------------------------------------------------------


def _status_printer(stream: TextIO) -> Callable[[str], None]:
    def status(message: str) -> None:
        print(f"costream: {message}", file=stream, flush=True)

    return status


def _client_error(error: Exception) -> CommandError:
    from costream.client.connect import Closed, ConversationNotFound, Refused, Unauthorized
    from costream.client.errors import BadLink

    if isinstance(error, BadLink) and str(error).startswith("no token"):
        # The client library's wording offers a token argument; the commands take none.
        return CommandError(
            "this link carries no token: use the view or write link that `costream new` "
            "printed, which ends in #t=<token> (in quotes, so the shell keeps all of it)"
        )
    if isinstance(error, Unauthorized):
        return CommandError("the link's token is wrong or missing (4401)")
    if isinstance(error, ConversationNotFound):
        return CommandError("no such conversation (4404)")
    if isinstance(error, Refused):
        messages = {
            "forbidden": "this is a view link; sending needs the write link",
            "run_active": "a run is already active in this conversation; wait for it to end",
            "too_large": "the message is too long",
        }
        return CommandError(f"{messages.get(error.code, error.message)} ({error.code})")
    if isinstance(error, Closed):
        return CommandError(f"the server closed the connection: {error.reason} ({error.code})")
    return CommandError(str(error))


async def _follow(
    conv: Conversation,
    *,
    as_json: bool,
    color: bool,
    run_id: str | None = None,
    presence: bool = False,
) -> int:
    """Print events until Ctrl-C, or until run ``run_id`` ends (then its exit code). With
    ``presence``, who joins and leaves goes to stderr (stdout stays the stream)."""
    from costream import protocol
    from costream.client.terminal import PresenceReporter, TerminalRenderer

    renderer = TerminalRenderer(sys.stdout, color=color)
    reporter = PresenceReporter(conv.people, conv.viewer_id)
    status = _status_printer(sys.stderr)
    ours = run_id is None
    try:
        while True:
            event, text = await conv.next_with_text()
            if isinstance(event, protocol.Presence):
                for line in reporter.changes(event.people) if presence else ():
                    status(f"{line} · {event.viewers} watching")
                continue
            if as_json:
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
            else:
                renderer.render(event)
            if run_id is None:
                continue
            if isinstance(event, protocol.RunStarted):
                ours = event.run_id == run_id
            elif ours and isinstance(event, protocol.RunFinished):
                if event.outcome.type == "cancelled":
                    raise CommandError("the run was cancelled")
                return 0
            elif ours and isinstance(event, protocol.RunError):
                raise CommandError(f"the run failed: {event.message} ({event.code})")
    finally:
        if not as_json:
            renderer.finish()


async def _watch_async(args: argparse.Namespace) -> int:
    from costream.client.connect import ClientError, connect
    from costream.client.terminal import header_line, use_color

    status = _status_printer(sys.stderr)
    try:
        async with connect(
            args.link, from_start=not args.live, on_status=status, name=_name(args)
        ) as conv:
            status(header_line(conv.role, conv.viewers, conv.model, conv.people, conv.viewer_id))
            return await _follow(
                conv,
                as_json=args.json,
                color=use_color(sys.stdout),
                presence=not args.no_presence,
            )
    except ClientError as error:
        raise _client_error(error) from None


def _name(args: argparse.Namespace) -> str | None:
    name: str | None = args.name or os.environ.get("COSTREAM_NAME") or None
    return name


async def _say_async(args: argparse.Namespace) -> int:
    from costream.client.connect import ClientError, connect
    from costream.client.terminal import use_color

    try:
        async with connect(
            args.link, from_start=False, on_status=_status_printer(sys.stderr), name=_name(args)
        ) as conv:
            if conv.role != "writer":
                raise _client_error(_forbidden())
            run_id = await conv.send(args.text)
            args.run_id = run_id  # for Ctrl-C (see _say): which run goes on
            if args.no_follow:
                print(json.dumps({"runId": run_id}) if args.json else f"run {run_id} started")
                return 0
            return await _follow(
                conv, as_json=args.json, color=use_color(sys.stdout), run_id=run_id
            )
    except ClientError as error:
        raise _client_error(error) from None


def _forbidden() -> Exception:
    from costream.client.connect import Refused

    return Refused("forbidden", "this token can only view")


def _run_async(
    command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
    args: argparse.Namespace,
    *,
    interruptible: bool = True,
) -> int:
    """Run ``command``; Ctrl-C ends it quietly (exit 0), or, not ``interruptible``,
    propagates for the caller to explain."""
    try:
        result: int = asyncio.run(command(args))
        return result
    except KeyboardInterrupt:
        if not interruptible:
            raise
        return 0
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _watch(args: argparse.Namespace) -> int:
    return _run_async(_watch_async, args)


def _say(args: argparse.Namespace) -> int:
    args.run_id = None
    try:
        return _run_async(_say_async, args, interruptible=False)
    except KeyboardInterrupt:
        pass
    quoted = f"'{args.link}'"
    if args.run_id is None:
        print("costream say: interrupted before the message was sent", file=sys.stderr)
    elif args.cancel_on_interrupt:
        answer = _cancel_run(args.link)
        print(f"costream say: interrupted; {answer}", file=sys.stderr)
    else:
        print(
            f"costream say: stopped following; run {args.run_id} goes on on the server.\n"
            f"  watch it:  costream watch {quoted}\n"
            f"  stop it:   costream cancel {quoted}",
            file=sys.stderr,
        )
    return 130


# ---- cancel ---------------------------------------------------------------------------


def _cancel_run(link_text: str) -> str:
    """Cancel the conversation's run through the HTTP API; what happened, in words.
    Raises ``CommandError`` when it could not be asked."""
    from costream.client.errors import ClientError
    from costream.client.link import parse_link

    try:
        link = parse_link(link_text)
    except ClientError as error:
        raise _client_error(error) from None
    url = f"{link.http_url}/api/conversations/{link.conversation_id}/cancel"
    status, body = http_json("POST", url, token=link.token)
    if status == 202 and isinstance(body, dict):
        return f"cancelled run {body.get('runId')}"
    hints = {
        401: "the link's token is wrong or missing (unauthorized)",
        403: "this is a view link; cancelling needs the write link (forbidden)",
        404: "no such conversation (not_found)",
        409: "nothing is running (no_run)",
    }
    raise CommandError(hints.get(status) or f"could not cancel: {error_text(body)}")


def _cancel(args: argparse.Namespace) -> int:
    print(_cancel_run(args.link))
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
    serve.set_defaults(handler=_serve)

    new = commands.add_parser("new", help="create a conversation and print its links")
    new.add_argument(
        "--server", default=None, help=f"server URL (default COSTREAM_URL or {DEFAULT_SERVER})"
    )
    new.add_argument("--title", default=None, help="the conversation's title")
    new.add_argument("--model", default=None, help="LiteLLM provider/model (default: server's)")
    new.add_argument("--system", default=None, help="system prompt")
    new.set_defaults(handler=_new)

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
    say.set_defaults(handler=_say)

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
    watch.set_defaults(handler=_watch, live=False)

    cancel = commands.add_parser("cancel", help="cancel the run under way")
    cancel.add_argument("link", help="the conversation's write link")
    cancel.set_defaults(handler=_cancel)
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

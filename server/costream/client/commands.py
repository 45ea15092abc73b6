"""The client commands of ``costream``: ``new``, ``watch``, ``say``, ``cancel``.

They talk to a server over HTTP and WebSockets through :mod:`costream.client`; nothing
here imports the server side or LiteLLM. ``costream.cli`` parses the arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
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


def new_command(args: argparse.Namespace) -> int:
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


def watch_command(args: argparse.Namespace) -> int:
    return _run_async(_watch_async, args)


def say_command(args: argparse.Namespace) -> int:
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


def cancel_command(args: argparse.Namespace) -> int:
    print(_cancel_run(args.link))
    return 0

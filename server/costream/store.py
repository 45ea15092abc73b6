"""Conversations: record, access tokens, message history, workspace files, usage and cost.

Everything lives in the broker's storage, so every server process sees the same
conversation. Tokens are stored only as SHA-256 digests and compared in constant time.
The message history is kept as AG-UI messages (the shape of ``MESSAGES_SNAPSHOT``);
``runner`` turns it into LiteLLM messages.

Writes retried after storage failed (``agent.storage.durably``) may have been applied
already (Redis died after the command ran, before it answered), so each is idempotent:
a history entry stored twice is read once (every message has its own id, so two equal
entries are one message), a run's usage and cost are kept under its run id
(:meth:`Store.record_run`) and summed, files are put whole.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import unicodedata
from dataclasses import dataclass
from typing import Literal

import msgspec

from costream.broker import Broker
from costream.names import refused_character
from costream.protocol import CostUsd, SnapshotMessage, Usage, now_ms

Role = Literal["viewer", "writer"]

CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_HISTORY = "history"
_FILES = "files"
_RUN_TOTALS = "run_totals"  # map: run id -> that run's _RunTotals
MAX_FILE_NAME_CHARS = 200
_messages_decoder = msgspec.json.Decoder(SnapshotMessage)


class _RunTotals(msgspec.Struct, rename="camel", kw_only=True):
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: CostUsd = 0.0


_run_totals_decoder = msgspec.json.Decoder(_RunTotals)


def file_name_problem(path: str) -> str | None:
    """Why ``path`` cannot name a workspace file (a sentence), or None when it can: at most
    :data:`MAX_FILE_NAME_CHARS` characters in Unicode NFC, no control or format character
    (bidi overrides such as U+202E), no lone surrogate (it could not be sent as UTF-8)."""
    if not path or len(path) > MAX_FILE_NAME_CHARS:
        return f"a file name has 1 to {MAX_FILE_NAME_CHARS} characters"
    if (refused := refused_character(path)) is not None:
        return f"a file name may not contain {refused} (control, format or invalid characters)"
    if unicodedata.normalize("NFC", path) != path:
        return "a file name must be in Unicode NFC"
    return None


def mint_id(nbytes: int = 16) -> str:
    """A URL-safe random id (16 bytes: 22 characters)."""
    return secrets.token_urlsafe(nbytes)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _seal(view_token: bytes, write_token: str) -> bytes:
    """The view token, readable only with the write token: XOR with a pad derived from the
    write token (192 random bits, one pad per conversation, used once). So a writer can
    share the view link later, and stored data alone reveals neither token."""
    pad = hashlib.sha256(b"costream view token:" + write_token.encode()).digest()
    return bytes(a ^ b for a, b in zip(view_token, pad, strict=True))


@dataclass(frozen=True, slots=True)
class Conversation:
    """A conversation's record."""

    id: str
    title: str
    model: str
    system: str
    created_ms: int
    epoch: str
    external: bool = False  # an external producer owns its runs: messages start none here


@dataclass(frozen=True, slots=True)
class NewConversation:
    """What creating a conversation hands back, once: the tokens are not stored in clear."""

    conversation: Conversation
    view_token: str
    write_token: str


class Store:
    """Typed access to conversations kept in a :class:`Broker`."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    # ---- records and tokens ------------------------------------------------------
    async def create(self, *, title: str, model: str, system: str) -> NewConversation:
        conversation_id = mint_id()
        view_token, write_token = mint_id(24), mint_id(24)
        created = now_ms()
        epoch = await self.broker.create_conversation(
            conversation_id,
            {
                "title": title.encode(),
                "model": model.encode(),
                "system": system.encode(),
                "created_ms": str(created).encode(),
                "view_token": _digest(view_token),
                "write_token": _digest(write_token),
                "view_token_sealed": _seal(view_token.encode(), write_token),
            },
        )
        conversation = Conversation(conversation_id, title, model, system, created, epoch)
        return NewConversation(conversation, view_token, write_token)

    async def get(self, conversation_id: str) -> Conversation | None:
        if not CONVERSATION_ID.match(conversation_id):
            return None
        record = await self.broker.get_record(conversation_id)
        if record is None:
            return None
        return Conversation(
            id=conversation_id,
            title=record.get("title", b"").decode(),
            model=record.get("model", b"").decode(),
            system=record.get("system", b"").decode(),
            created_ms=int(record.get("created_ms", b"0")),
            epoch=record.get("epoch", b"").decode(),
            external=record.get("external") == b"1",
        )

    async def set_model(self, conversation_id: str, model: str) -> None:
        """The model shown to viewers (REST, ``welcome``): a published run's own."""
        await self.broker.update_record(conversation_id, {"model": model.encode()})

    async def mark_external(self, conversation_id: str) -> None:
        """An external producer owns the conversation's runs from now on: a writer's
        message no longer starts a run on the servers (:func:`costream.lifecycle.open_run`)."""
        await self.broker.update_record(conversation_id, {"external": b"1"})

    async def role_for(self, conversation_id: str, token: str | None) -> Role | None:
        """The role a token grants on a conversation (None: no or wrong token)."""
        record = await self.broker.get_record(conversation_id)
        if record is None or not token:
            return None
        digest = _digest(token)
        # Compare with both digests every time, so timing tells nothing about which matched.
        is_writer = hmac.compare_digest(digest, record.get("write_token", b""))
        is_viewer = hmac.compare_digest(digest, record.get("view_token", b""))
        if is_writer:
            return "writer"
        return "viewer" if is_viewer else None

    async def view_token(self, conversation_id: str, write_token: str) -> str | None:
        """The conversation's view token, for whoever holds its write token (None: not
        the write token, or a conversation made before view tokens were sealed)."""
        if await self.role_for(conversation_id, write_token) != "writer":
            return None
        record = await self.broker.get_record(conversation_id)
        sealed = record.get("view_token_sealed") if record is not None else None
        if record is None or sealed is None or len(sealed) != 32:
            return None
        token = _seal(sealed, write_token).decode("ascii", errors="replace")
        return token if hmac.compare_digest(_digest(token), record.get("view_token", b"")) else None

    # ---- message history -----------------------------------------------------------
    async def append_messages(self, conversation_id: str, messages: list[SnapshotMessage]) -> None:
        await self.broker.list_append(
            conversation_id, _HISTORY, [msgspec.json.encode(m) for m in messages]
        )

    async def messages(self, conversation_id: str) -> list[SnapshotMessage]:
        """The history in order; an entry equal to an earlier one (an append retried after
        its answer was lost) is left out."""
        items = await self.broker.list_all(conversation_id, _HISTORY)
        seen: set[bytes] = set()
        messages = []
        for item in items:
            if item not in seen:
                seen.add(item)
                messages.append(_messages_decoder.decode(item))
        return messages

    # ---- usage and cost --------------------------------------------------------------
    async def record_run(
        self, conversation_id: str, run_id: str, usage: Usage, cost_usd: float
    ) -> float:
        """Record a run's usage and cost under its id (a second call for the run replaces
        the first: a retry counts once); returns the conversation's total cost."""
        totals = _RunTotals(usage=usage, cost_usd=cost_usd)
        await self.broker.map_set(conversation_id, _RUN_TOTALS, run_id, msgspec.json.encode(totals))
        _, total = await self.totals(conversation_id)
        return total or 0.0

    async def totals(self, conversation_id: str) -> tuple[Usage, float | None]:
        """The conversation's token usage and cost so far. A stored total that is not a
        finite number (written before costs were range-checked) reads as cost None and
        tokens 0: shown as unknown, never an error."""
        record = await self.broker.get_record(conversation_id) or {}

        def number(name: str) -> float | None:
            try:
                value = float(record.get(name, b"0"))
            except ValueError:
                return None
            return value if math.isfinite(value) else None

        def tokens(name: str) -> int:
            value = number(name)
            return int(value) if value is not None and value >= 0 else 0

        usage = Usage(
            input_tokens=tokens("input_tokens"),
            output_tokens=tokens("output_tokens"),
            reasoning_tokens=tokens("reasoning_tokens"),
        )
        cost = number("cost_usd")
        cost = cost if cost is None or cost >= 0 else None
        for item in (await self.broker.map_all(conversation_id, _RUN_TOTALS)).values():
            try:
                run = _run_totals_decoder.decode(item)
            except msgspec.DecodeError:
                continue  # not ours to show; never an error
            usage += run.usage
            cost = None if cost is None else cost + run.cost_usd
        return usage, cost

    # ---- workspace files -----------------------------------------------------------
    async def list_files(self, conversation_id: str) -> dict[str, int]:
        """Path to size in bytes, sorted by path. A name that :func:`file_name_problem`
        refuses (stored before names were checked) is left out: it cannot be served."""
        files = await self.broker.map_all(conversation_id, _FILES)
        return {path: len(files[path]) for path in sorted(files) if file_name_problem(path) is None}

    async def read_file(self, conversation_id: str, path: str) -> str | None:
        if file_name_problem(path) is not None:
            return None
        data = await self.broker.map_get(conversation_id, _FILES, path)
        return None if data is None else data.decode(errors="replace")

    async def write_file(self, conversation_id: str, path: str, text: str) -> None:
        """Store a file; ValueError for a name :func:`file_name_problem` refuses or text
        that is not valid Unicode (a lone surrogate)."""
        if (problem := file_name_problem(path)) is not None:
            raise ValueError(problem)
        data = text.encode()  # UnicodeEncodeError (a ValueError) before anything is stored
        await self.broker.map_set(conversation_id, _FILES, path, data)

    async def delete_file(self, conversation_id: str, path: str) -> bool:
        return await self.broker.map_delete(conversation_id, _FILES, path)

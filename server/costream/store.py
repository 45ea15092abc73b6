"""Conversations: record, access tokens, message history, workspace files, usage and cost.

Everything lives in the broker's storage, so every server process sees the same
conversation. Tokens are stored only as SHA-256 digests and compared in constant time.
The message history is kept as AG-UI messages (the shape of ``MESSAGES_SNAPSHOT``);
``runner`` turns it into LiteLLM messages.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Literal

import msgspec

from costream.broker import Broker
from costream.protocol import SnapshotMessage, Usage, now_ms

Role = Literal["viewer", "writer"]

CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_HISTORY = "history"
_FILES = "files"
_messages_decoder = msgspec.json.Decoder(SnapshotMessage)
_usage_decoder = msgspec.json.Decoder(Usage)


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
        )

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
        items = await self.broker.list_all(conversation_id, _HISTORY)
        return [_messages_decoder.decode(item) for item in items]

    # ---- usage and cost --------------------------------------------------------------
    async def add_cost(self, conversation_id: str, usd: float) -> float:
        """Add a run's cost; returns the conversation's total."""
        return await self.broker.add_to_record(conversation_id, "cost_usd", usd)

    async def add_usage(self, conversation_id: str, usage: Usage) -> None:
        for name, amount in (
            ("input_tokens", usage.input_tokens),
            ("output_tokens", usage.output_tokens),
            ("reasoning_tokens", usage.reasoning_tokens),
        ):
            if amount:
                await self.broker.add_to_record(conversation_id, name, amount)

    async def totals(self, conversation_id: str) -> tuple[Usage, float]:
        """The conversation's token usage and cost so far."""
        record = await self.broker.get_record(conversation_id) or {}

        def number(name: str) -> float:
            return float(record.get(name, b"0"))

        usage = Usage(
            input_tokens=int(number("input_tokens")),
            output_tokens=int(number("output_tokens")),
            reasoning_tokens=int(number("reasoning_tokens")),
        )
        return usage, number("cost_usd")

    # ---- workspace files -----------------------------------------------------------
    async def list_files(self, conversation_id: str) -> dict[str, int]:
        """Path to size in bytes, sorted by path."""
        files = await self.broker.map_all(conversation_id, _FILES)
        return {path: len(files[path]) for path in sorted(files)}

    async def read_file(self, conversation_id: str, path: str) -> str | None:
        data = await self.broker.map_get(conversation_id, _FILES, path)
        return None if data is None else data.decode()

    async def write_file(self, conversation_id: str, path: str, text: str) -> None:
        await self.broker.map_set(conversation_id, _FILES, path, text.encode())

    async def delete_file(self, conversation_id: str, path: str) -> bool:
        return await self.broker.map_delete(conversation_id, _FILES, path)

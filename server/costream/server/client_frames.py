"""What a WebSocket client sends, read: text frames only, nested at most
``MAX_JSON_DEPTH`` deep, decoded to a :data:`protocol.ClientFrame`; anything else ends
the session with :class:`Close` and a close code (PROTOCOL.md, Close codes)."""

from __future__ import annotations

from typing import cast

import msgspec
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect

from costream import protocol
from costream.bodies import MAX_JSON_DEPTH, json_depth_ok
from costream.protocol import CLOSE_BAD_FRAME


class Close(Exception):
    """End the session with this close code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def text_of(message: Message) -> str:
    """A received message's text; a binary frame closes 4400 (PROTOCOL.md: text only)."""
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    text = message.get("text")
    if text is None:  # ASGI: a binary frame comes as "bytes", with "text" absent or None
        raise Close(CLOSE_BAD_FRAME, "text frames only")
    return cast(str, text)


def decode(text: str) -> protocol.ClientFrame:
    """A client frame, or Close 4400 naming what is wrong with it."""
    # Checked before decoding: msgspec recurses once per level and would end a deep
    # frame with RecursionError (a 1006 and a traceback) instead of 4400.
    if not json_depth_ok(text):
        raise Close(CLOSE_BAD_FRAME, f"bad frame: nested deeper than {MAX_JSON_DEPTH}")
    try:
        frame: protocol.ClientFrame = protocol.client_frame_decoder.decode(text)
    except msgspec.ValidationError as error:
        raise Close(CLOSE_BAD_FRAME, f"bad frame: {error}"[:120]) from None
    except msgspec.DecodeError:
        raise Close(CLOSE_BAD_FRAME, "bad frame: not JSON") from None
    return frame

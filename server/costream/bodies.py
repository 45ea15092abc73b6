"""Bounded decoding of what clients send: JSON bodies and frames, numbers in URLs and headers.

Everything here answers hostile input with :class:`BadInput` (a clear message, no
traceback), never with ``RecursionError``, ``UnicodeEncodeError`` or ``OverflowError``:

- JSON nesting is checked before decoding (at most :data:`MAX_JSON_DEPTH` levels), so a
  100 000-deep array costs one scan, not a recursion per level;
- JSON is decoded by msgspec, which refuses lone surrogates (``"\\ud800"``), ``NaN`` and
  numbers out of the float range (``1e309``): every string that gets through encodes as
  UTF-8;
- digits are ASCII digits only (``str.isdigit`` also accepts ``"²"``) and bounded.
"""

from __future__ import annotations

import re
from typing import Any, Final, TypeVar

import msgspec

MAX_JSON_DEPTH: Final = 64
"""Deepest nesting of arrays and objects accepted in a body or frame (the protocol needs
fewer than ten; AG-UI tool schemas a few more)."""

T = TypeVar("T")

# A JSON string (escapes skipped whole) or one bracket: strings are consumed as a unit so
# that brackets inside them do not count.
_TOKENS_BYTES: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_TOKENS_TEXT: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_ASCII_DIGITS: Final = re.compile(r"[0-9]{1,19}")


class BadInput(ValueError):
    """Input refused; ``message`` says why and is safe to send back."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def json_depth_ok(data: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether no array or object in ``data`` nests deeper than ``max_depth`` (brackets
    inside strings do not count). Not a validator: malformed JSON may pass."""
    if isinstance(data, bytes):
        if data.count(b"[") + data.count(b"{") <= max_depth:
            return True  # the common case, in two C-speed passes
        tokens = _TOKENS_BYTES.finditer(data)
        opening: tuple[Any, ...] = (b"[", b"{")
    else:
        if data.count("[") + data.count("{") <= max_depth:
            return True
        tokens = _TOKENS_TEXT.finditer(data)  # type: ignore[assignment]
        opening = ("[", "{")
    depth = 0
    for token in tokens:
        text = token.group()
        if text in opening:
            depth += 1
            if depth > max_depth:
                return False
        elif len(text) == 1:
            depth -= 1
    return True


def decode_json(data: bytes | str, kind: type[T] | Any = Any, *, what: str = "body") -> T:
    """``data`` decoded as JSON into ``kind`` (default: plain Python values).

    Raises :class:`BadInput` for nesting deeper than :data:`MAX_JSON_DEPTH`, malformed
    JSON, invalid UTF-8, lone surrogates, out-of-range numbers and values that do not fit
    ``kind``."""
    if not json_depth_ok(data):
        raise BadInput(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        value: T = msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as error:
        raise BadInput(f"{what}: {error}"[:300]) from None
    except msgspec.DecodeError as error:
        # msgspec says "Input data was truncated" for a lone surrogate escape.
        raise BadInput(
            f"{what} is not valid JSON in UTF-8 without lone surrogates ({error})"[:300]
        ) from None
    except UnicodeEncodeError:  # a str holding a lone surrogate itself, not escaped
        raise BadInput(f"{what} holds a lone surrogate") from None
    except RecursionError:  # unreachable after the depth check; kept as a last guard
        raise BadInput(f"{what} nests too deep") from None
    return value


def ascii_int(raw: str, maximum: int) -> int | None:
    """``raw`` as an integer from 0 to ``maximum`` written in ASCII digits; else None."""
    if _ASCII_DIGITS.fullmatch(raw) is None:
        return None
    value = int(raw)
    return value if value <= maximum else None

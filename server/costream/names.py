"""Names that people read: display names and file names, untrusted text from anyone.

Control, format (bidi overrides and isolates, zero-width), private-use, surrogate and
unassigned characters, and line/paragraph separators are refused in file names and
dropped from display names: none belongs in a name another person reads, and bidi
controls can make one name look like another. A person's colour comes from their name.
No I/O.
"""

from __future__ import annotations

import unicodedata
import zlib
from typing import Final

NAME_MAX_CHARS: Final = 40
NAME_MAX_BYTES: Final = 120  # of UTF-8: forty emoji would otherwise be 160 bytes
NAME_MAX_INPUT_CHARS: Final = 1000  # a longer name in hello is a bad frame (4400)

# Control (Cc), format (Cf: bidi overrides and isolates, zero-width characters), private
# use, surrogates and unassigned code points, and line/paragraph separators: none of them
# belongs in a name another person reads, and bidi controls can make one name look like
# another.
_NAME_REFUSED: Final = frozenset({"Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"})


def refused_character(text: str) -> str | None:
    """The first character of ``text`` no name or file name may hold, as ``U+XXXX``."""
    refused = next((ch for ch in text if unicodedata.category(ch) in _NAME_REFUSED), None)
    return None if refused is None else f"U+{ord(refused):04X}"


def clean_name(raw: str | None) -> str | None:
    """A display name fit to show to others, or None: refused characters dropped,
    whitespace runs made one space, cut to ``NAME_MAX_CHARS`` characters and
    ``NAME_MAX_BYTES`` UTF-8 bytes. Still untrusted text: pages show it as text only."""
    if raw is None:
        return None
    kept = "".join(
        " " if ch.isspace() else ch
        for ch in raw
        if ch.isspace() or unicodedata.category(ch) not in _NAME_REFUSED
    )
    name = " ".join(kept.split())[:NAME_MAX_CHARS]
    while len(name.encode()) > NAME_MAX_BYTES:
        name = name[:-1]
    return name.strip() or None


# Colours for people's initials, each readable with white text (WCAG AA on #fff text).
PERSON_COLORS: Final = (
    "#b42318",
    "#b54708",
    "#067647",
    "#0e7090",
    "#175cd3",
    "#5925dc",
    "#9f1ab1",
    "#c01048",
)


def person_color(key: str) -> str:
    """The colour of a name (the same in every session and process), or of a session."""
    return PERSON_COLORS[zlib.crc32(key.casefold().encode()) % len(PERSON_COLORS)]

"""The frame layout: made and read in protocol.py only, the Redis scripts included."""

from __future__ import annotations

import pytest

from costream import protocol
from costream.broker.redis import scripts


def _event() -> protocol.TextMessageContent:
    return protocol.TextMessageContent(message_id="m1", delta='say "hi", then {stop}')


def test_a_seq_spliced_in_is_read_back_and_decodes_with_the_event() -> None:
    """``with_seq`` puts the seq first; ``seq_of`` and ``seq_of_text`` read it back."""
    event = _event()
    frame = protocol.with_seq(protocol.encode(event), 1234)

    assert frame.startswith(protocol.SEQ_PREFIX.encode())
    assert protocol.is_logged_frame(frame)
    assert protocol.seq_of(frame) == 1234
    assert protocol.seq_of_text(frame.decode()) == 1234
    decoded = protocol.event_decoder.decode(frame)
    assert isinstance(decoded, protocol.TextMessageContent)
    assert decoded.seq == 1234
    assert decoded.delta == event.delta


def test_a_presence_frame_is_recognised_and_has_no_seq() -> None:
    """An encoded ``presence`` frame starts with PRESENCE_PREFIX, ends with its count,
    and reads as seq 0 (not logged)."""
    text = protocol.encode(protocol.Presence(viewers=7)).decode()

    assert text == protocol.PRESENCE_PREFIX + "7}"
    assert not protocol.is_logged_frame(text.encode())
    assert protocol.seq_of_text(text) == 0


def test_a_logged_frame_is_not_taken_for_presence() -> None:
    """An event whose text mentions presence is still a logged frame."""
    event = protocol.TextMessageContent(message_id="m", delta='{"type":"presence","viewers":1}')
    text = protocol.with_seq(protocol.encode(event), 5).decode()

    assert protocol.seq_of_text(text) == 5


@pytest.mark.parametrize(
    "name",
    [
        "START_RUN",
        "APPEND",
        "FINISH_RUN",
        "RENEW_LEASE",
        "TAKE_OVER_RUN",
        "REQUEST_CANCEL",
        "PRESENCE",
        "UPDATE_RECORD",
        "ADD_TO_RECORD",
    ],
)
def test_lua_scripts_take_the_frame_layout_from_protocol(name: str) -> None:
    """No script spells a frame's JSON itself: the prefixes come from protocol.py."""
    script: str = getattr(scripts, name)
    source = scripts.lua(script, sharded=False)

    assert '{"' not in script
    assert f"local SEQ_PREFIX = '{protocol.SEQ_PREFIX}'" in source
    assert f"local PRESENCE_PREFIX = '{protocol.PRESENCE_PREFIX}'" in source

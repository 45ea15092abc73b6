"""The close codes the Python client acts on, and the errors it raises.

Errors, all under costream's root ``CostreamError``::

    ClientError
    ├── BadLink           the URL is no conversation link, or carries no token
    ├── Unreachable       no connection (refused at first, or max_retries used up)
    ├── Closed            the server closed for good: ``code``, ``reason``
    │   ├── Unauthorized          4401 missing or wrong token
    │   ├── OriginRefused         4403
    │   └── ConversationNotFound  4404
    ├── ConnectionLost    the connection dropped while send() or cancel() awaited a reply
    └── Refused           an ``error`` frame answered send() or cancel(): ``code``, ``message``
"""

from __future__ import annotations

from typing import Final

from costream.errors import CostreamError
from costream.protocol import (
    CLOSE_BAD_ORIGIN,
    CLOSE_BAD_TOKEN,
    CLOSE_GOING_AWAY,
    CLOSE_LOST_TAIL,
    CLOSE_OVERLOADED,
    CLOSE_SERVER_ERROR,
    CLOSE_SLOW_CONSUMER,
    CLOSE_UNKNOWN_CONVERSATION,
)

CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_ABNORMAL: Final = 1006  # no close frame: the socket just went away
CLOSE_SERVICE_RESTART: Final = 1012  # uvicorn's code for the connections it drops on exit
CLOSE_CLIENT_GAP: Final = 4001  # what this client sends when it saw a seq jump

# Close codes after which the client reconnects and resumes (PROTOCOL.md, "Close codes").
RECONNECT_CODES: Final = frozenset(
    {
        CLOSE_GOING_AWAY,
        CLOSE_ABNORMAL,
        CLOSE_SERVER_ERROR,
        CLOSE_SERVICE_RESTART,
        CLOSE_OVERLOADED,
        CLOSE_LOST_TAIL,
        CLOSE_SLOW_CONSUMER,
        CLOSE_CLIENT_GAP,
    }
)


class ClientError(CostreamError):
    """Root of the errors this client raises."""


class BadLink(ClientError):
    """The URL is not a conversation link, or no token came with it."""


class Unreachable(ClientError):
    """The server could not be reached."""


class Closed(ClientError):
    """The server closed the connection with a code that says: do not come back."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection closed {code}: {reason or 'no reason given'}")
        self.code = code
        self.reason = reason


class Unauthorized(Closed):
    """4401: the token is missing or wrong."""


class OriginRefused(Closed):
    """4403: the server does not accept this origin."""


class ConversationNotFound(Closed):
    """4404: there is no such conversation."""


class ConnectionLost(ClientError):
    """The connection dropped while a request waited for its reply; its outcome is unknown."""


class Refused(ClientError):
    """The server answered a request with an ``error`` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


_CLOSED_BY_CODE: Final[dict[int, type[Closed]]] = {
    CLOSE_BAD_TOKEN: Unauthorized,
    CLOSE_BAD_ORIGIN: OriginRefused,
    CLOSE_UNKNOWN_CONVERSATION: ConversationNotFound,
}


def closed_error(code: int, reason: str) -> Closed:
    """The ``Closed`` subclass for a close code."""
    return _CLOSED_BY_CODE.get(code, Closed)(code, reason)

"""What runs in other programs: the Python client, the terminal viewer, the publisher.

Nothing here imports the server side (``costream.server``, ``costream.agent``) or
LiteLLM: a viewer or an external producer imports light. ``costream.client.publisher``
(:class:`~costream.client.publisher.TokenPublisher`) is imported on its own.
"""

from costream.client.connect import Conversation, connect
from costream.client.errors import (
    CLOSE_ABNORMAL,
    CLOSE_CLIENT_GAP,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SERVICE_RESTART,
    RECONNECT_CODES,
    BadLink,
    ClientError,
    Closed,
    ConnectionLost,
    ConversationNotFound,
    OriginRefused,
    Refused,
    Unauthorized,
    Unreachable,
    closed_error,
)
from costream.client.link import Link, parse_link

__all__ = [
    "CLOSE_ABNORMAL",
    "CLOSE_CLIENT_GAP",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_SERVICE_RESTART",
    "RECONNECT_CODES",
    "BadLink",
    "ClientError",
    "Closed",
    "ConnectionLost",
    "Conversation",
    "ConversationNotFound",
    "Link",
    "OriginRefused",
    "Refused",
    "Unauthorized",
    "Unreachable",
    "closed_error",
    "connect",
    "parse_link",
]

"""``costream.publisher.TokenPublisher``, the name the README and programs use.

It lives in :mod:`costream.client.publisher`; this module keeps the short import path.
"""

from costream.client.publisher import PublishError, TokenPublisher, as_usage

__all__ = ["PublishError", "TokenPublisher", "as_usage"]

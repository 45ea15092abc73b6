"""``TokenPublisher``: publish another program's LLM stream to a costream conversation.

The public class lives in :mod:`.publisher`; :mod:`.openhands` reads OpenHands'
conversation events into runs and tool results, :mod:`.steps` reads chunks into a run's
events, :mod:`.queue` holds them between the callers and the publishing thread (the flush
window), :mod:`.sender` is that thread, and :mod:`.transports` sends them (through a
server's HTTP ingest, or straight into Redis).
"""

from costream.chunks import as_usage
from costream.client.publisher.publisher import TokenPublisher
from costream.client.publisher.transports import PublishError

__all__ = ["PublishError", "TokenPublisher", "as_usage"]

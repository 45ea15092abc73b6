"""The Redis broker: :mod:`.broker` (commands and key layout), :mod:`.live` (the pub/sub
tail), :mod:`.scripts` (the Lua scripts). The only package that imports ``redis``."""

from costream.broker.redis.broker import RedisBroker

__all__ = ["RedisBroker"]

"""One run of the built-in agent: LiteLLM ``acompletion(stream=True)``, chunks to events,
tools between steps, retries, cancel, usage and cost.

:mod:`.runner` (the run loop, :class:`Runs`), :mod:`.step` (one LLM step),
:mod:`.storage` (writing through storage outages), :mod:`.llm` (LiteLLM's lazy import and
the request), :mod:`.tools` (the workspace tools), :mod:`.demo` (the offline demo model).
"""

from costream.agent.runner import Runs, TokenCallback

__all__ = ["Runs", "TokenCallback"]

"""costream's exceptions, one root.

CostreamError
├── NotFound            unknown conversation (HTTP 404, close 4404)
├── RunActive           a run is already active (HTTP 409, error run_active)
│   └── ExternallyProduced  the conversation's runs come from an external program
├── TooManyRuns         this process runs its limit of runs (HTTP 429, error rate_limited)
├── NoRun               nothing to cancel (HTTP 409, error no_run)
├── LeaseLost           this process no longer holds the run lease (fencing token moved on)
│   └── AppendConflict  an append's expected head matches neither before nor after its batch
├── RunTooLarge         a run's logged events would pass Settings.max_run_bytes (HTTP 413)
├── StorageUnavailable  the broker's storage did not answer (HTTP 503, close 4000)
└── DataDirError        the embedded store's data directory cannot be used (exit 2 at start)
"""

from __future__ import annotations


class CostreamError(Exception):
    """Root of every error costream raises on purpose."""


class NotFound(CostreamError):
    """The conversation does not exist."""


class RunActive(CostreamError):
    """The conversation already has a run; one run at a time per conversation."""


class ExternallyProduced(RunActive):
    """The conversation's runs come from an external producer (``Store.mark_external``):
    a writer's message starts no run on the servers."""


class TooManyRuns(CostreamError):
    """This process already runs ``Settings.max_runs`` runs; retry later."""


class NoRun(CostreamError):
    """There is no run to cancel."""


class LeaseLost(CostreamError):
    """The run lease expired or was taken over; the producer must stop appending."""


class AppendConflict(LeaseLost):
    """An append's ``expected_head`` is neither the log's head nor the head the batch
    would have made: someone else wrote, or the producer lost count. Nothing appended."""

    def __init__(self, conversation_id: str, head: int, expected_head: int) -> None:
        super().__init__(conversation_id)
        self.head, self.expected_head = head, expected_head


class RunTooLarge(CostreamError):
    """Appending would take the run's logged events past ``max_run_bytes``. Nothing
    appended; the run's end (``finish_run``) is always accepted."""

    def __init__(self, conversation_id: str, limit: int) -> None:
        super().__init__(conversation_id)
        self.limit = limit


class StorageUnavailable(CostreamError):
    """The broker's storage (Redis) did not answer in time."""


class DataDirError(CostreamError):
    """The data directory cannot be used: held by another process, or its database is
    unreadable. The message names the path and says what to do."""

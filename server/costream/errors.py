"""costream's exceptions, one root.

CostreamError
├── NotFound            unknown conversation (HTTP 404, close 4404)
├── RunActive           a run is already active (HTTP 409, error run_active)
├── NoRun               nothing to cancel (HTTP 409, error no_run)
├── LeaseLost           this process no longer holds the run lease (fencing token moved on)
└── StorageUnavailable  the broker's storage did not answer (HTTP 503, close 4000)
"""

from __future__ import annotations


class CostreamError(Exception):
    """Root of every error costream raises on purpose."""


class NotFound(CostreamError):
    """The conversation does not exist."""


class RunActive(CostreamError):
    """The conversation already has a run; one run at a time per conversation."""


class NoRun(CostreamError):
    """There is no run to cancel."""


class LeaseLost(CostreamError):
    """The run lease expired or was taken over; the producer must stop appending."""


class StorageUnavailable(CostreamError):
    """The broker's storage (Redis) did not answer in time."""

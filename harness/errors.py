"""One small error hierarchy: what cloudbench reports to the user as a message."""
from __future__ import annotations


class CloudbenchError(Exception):
    """Anything cloudbench reports to the user as a message (no traceback). exit_code is the CLI's."""

    exit_code = 1


class PlanError(CloudbenchError):
    """Invalid plan: names the field, the value given and what is allowed."""

    exit_code = 2

    def __init__(self, field, value, allowed):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"invalid {field}: {value!r} (expected {allowed})")


class ProviderError(CloudbenchError):
    """A provider could not do what was asked (credentials, capacity, API error)."""


class PointFailed(CloudbenchError):
    """One sweep point failed; the sweep records it and goes on. ``retryable``: the provider repaired the
    cause (e.g. replaced a reclaimed spot instance), so a relaunch may succeed (the plan's ``retries``)."""

    def __init__(self, message, log_path=None, retryable=False):
        super().__init__(message)
        self.log_path, self.retryable = log_path, retryable


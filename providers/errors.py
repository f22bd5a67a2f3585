"""One small error hierarchy, shared by the harness and the providers (it is part of the provider interface).

``CloudbenchError`` and its subclasses are what cloudbench reports to the user as one message. ``Interrupted``
is not one of them: like Python's own KeyboardInterrupt (which it extends) it is not an ``Exception``, so no
``except Exception`` in a retry loop, a watch or a best-effort clean-up can swallow a Ctrl-C.
"""
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


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the harness: raised from the signal handler wherever the main thread is.
    A KeyboardInterrupt, hence a BaseException: ordinary handlers let it through; only ``finally`` and
    ``except BaseException: ...; raise`` clean-ups see it."""

    exit_code = 130

    def __init__(self, signame="SIGINT"):
        super().__init__(f"interrupted by {signame}")
        self.signame = signame

"""One small error hierarchy and one retry helper (for retryable cloud errors only)."""
from __future__ import annotations

import logging
import random
import time

log = logging.getLogger("cloudbench")


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


class RetryableError(ProviderError):
    """A transient failure (throttling, 5xx): worth retrying with backoff."""


class PointFailed(CloudbenchError):
    """One sweep point failed; the sweep records it and goes on."""

    def __init__(self, message, log_path=None):
        super().__init__(message)
        self.log_path = log_path


def retry(fn, *, deadline_s=300.0, first_delay_s=1.0, max_delay_s=30.0, retry_on=(RetryableError,), what="call"):
    """Call fn() until it returns, retrying ``retry_on`` with exponential backoff and jitter until the deadline."""
    start, delay = time.monotonic(), first_delay_s
    while True:
        try:
            return fn()
        except retry_on as e:
            left = deadline_s - (time.monotonic() - start)
            if left <= 0:
                raise ProviderError(f"{what} still failing after {deadline_s:.0f} s: {e}") from e
            pause = min(delay * (1 + random.random() * 0.25), max_delay_s, left)
            log.warning("%s failed (%s); retrying in %.1f s", what, e, pause)
            time.sleep(pause)
            delay = min(delay * 2, max_delay_s)

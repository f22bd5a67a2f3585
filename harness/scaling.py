"""The scaling model: what data-parallel efficiency a fleet's link allows.

Per-step time with n ranks (per-rank batch fixed) = compute + sum over the step's allreduces of the ring
cost 2(n-1)/n x bytes / bandwidth + 2(n-1) x latency. Compute is the measured 1-rank step time; the
allreduces are the trainer's four gradient averages per batch (D twice, G twice; sizes from the trainer's
summary). Bandwidth and latency are fitted per run and rank count from Horovod allreduces on the fleet
itself (gan.commbench: single tensors and the model's D and G gradient lists), so latency includes
Horovod's negotiation; without that calibration, the provider's raw TCP link figures are used.
The same probe times the trainer's step without communication while all n ranks compute at once
(``compute_step_s``: equal to t(1) on separate GPUs, slower where ranks share caches, memory bandwidth
or clocks); without it compute is t(1).
Predicted efficiency E(n) = t(1) / t(n) = t(1) / (compute + communication).
"""
from __future__ import annotations

import math


def ring_allreduce_s(n, message_bytes, bandwidth_Bps, latency_s=0.0):
    """Seconds for one ring allreduce of ``message_bytes`` over n ranks."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * message_bytes / bandwidth_Bps + 2 * (n - 1) * latency_s


def predicted_efficiency(step_time_1, n, messages, bandwidth_Bps, latency_s=0.0, compute_s=None):
    """E(n) = t(1) / (compute + communication); NaN when the link or a size is unknown.

    ``compute_s`` is the measured step time without communication with all n ranks computing at once
    (t(1) when unknown or NaN)."""
    if n <= 1:
        return 1.0
    unknown = [bandwidth_Bps, step_time_1, *messages]
    if any(v is None or math.isnan(v) for v in unknown) or bandwidth_Bps <= 0:
        return float("nan")
    if compute_s is None or math.isnan(compute_s):
        compute_s = step_time_1
    comm = sum(ring_allreduce_s(n, m, bandwidth_Bps, latency_s) for m in messages)
    return step_time_1 / (compute_s + comm)

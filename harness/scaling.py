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
import socket
import threading
import time


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


def measure_tcp_link(host="127.0.0.1", megabytes=64, chunk=1 << 20):
    """(bandwidth bytes/s, round-trip latency s) of a TCP connection to ourselves on ``host``."""
    srv = socket.create_server((host, 0))
    port = srv.getsockname()[1]
    total = megabytes * chunk

    def sink():
        conn, _ = srv.accept()
        with conn:
            got = 0
            while got < total:
                data = conn.recv(chunk)
                if not data:
                    break
                got += len(data)
            conn.sendall(b"k")
            while True:  # echo for the latency probe
                b = conn.recv(1)
                if not b:
                    return
                conn.sendall(b)

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    with socket.create_connection((host, port)) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b"\0" * chunk
        t0 = time.perf_counter()
        for _ in range(megabytes):
            c.sendall(buf)
        c.recv(1)
        bw = total / (time.perf_counter() - t0)
        rtts = []
        for _ in range(50):
            t1 = time.perf_counter()
            c.sendall(b"p")
            c.recv(1)
            rtts.append(time.perf_counter() - t1)
    srv.close()
    t.join(timeout=5)
    rtts.sort()
    return bw, rtts[len(rtts) // 2] / 2

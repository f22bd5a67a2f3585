"""Link measurement that providers report with their fleet (``link_bandwidth_Bps``, ``link_latency_s``); the
harness's scaling model falls back on these figures when it has no Horovod calibration."""
from __future__ import annotations

import socket
import threading
import time


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

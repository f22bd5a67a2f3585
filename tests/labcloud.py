"""Helpers the cloud tests share: a lab with one emulator for a test module, calls to an emulator's control
surface, and polling."""
import os
import time

import pytest

from harness.lab import hosts as lab


def lab_cloud(name, kind, hosts=2, real=False):
    """Generator for a module fixture: lab ``name`` with emulator ``kind`` (``real``: the real OpenStack control
    plane instead) and ``cloudbench lab env`` in this process's environment (so the cloudbench processes the
    tests start see it too); all undone after."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    lab.down(name)
    st = lab.up(hosts=hosts, name=name, slots=1, **({"openstack": "real"} if real else {"emulate": (kind,)}))
    env = lab.env(name)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {**st["emulators"][kind], "lab": st, "env": env}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        lab.down(name)


def emulator(cloud, path, body=None):
    """GET (or POST body to) /_emulator/<path> of an emulator (its URL, or a lab_cloud() record); its JSON
    answer. HTTP errors raise urllib.error.HTTPError."""
    from harness.bench.signals import emulator_call

    return emulator_call(cloud if isinstance(cloud, str) else cloud["url"], path, body)


def provision(provider, run_id, tmp_path, slots=2):
    """provider.provision() for a small plan as the runner calls it, torn down when it fails: (fleet, the
    records it wrote)."""
    from providers.base import FleetSpec

    records = []
    spec = FleetSpec(run_id=run_id, provider=provider.name, slots=slots, variant="small", workdir=str(tmp_path))
    try:
        return provider.provision(spec, records.append), records
    except BaseException:
        provider.teardown(run_id, records[-1] if records else None)
        raise


def until(what, fn, timeout=15, period=0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(period)


def running(pid):
    """The process exists and has not exited (a zombie waits for a reaper that may be slow)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

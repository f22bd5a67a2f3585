"""The real control plane's floating-IP router: what Neutron's L3 agent would do, for lab hosts.

    python -m harness.lab.openstack.l3 --lab NAME        # started by `cloudbench lab up --openstack real`

Neutron allocates and associates floating IPs in its database; with no L3 agent nothing makes them reachable.
This loop reads Neutron's floating IPs every half second (as admin) and, for each one associated with a fixed
address, puts it on the lab host whose interface holds that fixed address and routes it there from this
machine and the other hosts, as the OpenStack emulator does (``labhost.floating_ip_commands``). A
disassociated or deleted floating IP is taken off again; on SIGTERM every route it made goes.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time

from harness.lab.common import LabError, state_dir
from harness.lab.emulators import labhost
from harness.lab.openstack import control


def floating_ips(plane):
    """Neutron's floating IPs, as admin (through the control plane's own API helper)."""
    if not plane.token:
        plane.token, _ = plane.login()
    try:
        return plane.api("GET", plane.url("neutron") + "/v2.0/floatingips")[0]["floatingips"]
    except LabError:
        plane.token = None  # expired, or the API restarting: log in again next round
        raise


def holder(hosts, address):
    """The lab host whose eth0 holds ``address`` (where the compute driver put the server's port), or None."""
    for h in hosts:
        out = subprocess.run(["ip", "-n", h["netns"], "-4", "-o", "addr", "show", "dev", "eth0"],
                             capture_output=True, text=True).stdout
        if f" {address}/" in out:
            return h
    return None


def apply(hosts, address, host, on):
    for cmd in labhost.floating_ip_commands(host, hosts, address, on):
        subprocess.run(cmd, capture_output=True)


def serve(lab, period=0.5):
    state = json.loads((state_dir(lab) / "state.json").read_text())
    hosts = state["hosts"]
    plane = control.Plane(state)
    plane.rec.update(json.loads((state_dir(lab) / "openstack" / "record.json").read_text()))
    routed = {}  # floating address -> (fixed address, host)

    def stop(*_):
        for address, (_, host) in list(routed.items()):
            apply(hosts, address, host, False)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("l3: routing floating IPs", flush=True)
    while True:
        try:
            sync(plane, hosts, routed)
        except Exception as e:  # noqa: BLE001 (the API restarting or slow, an `ip` failing: next round, said)
            print(f"l3: {type(e).__name__}: {e}", flush=True)
        time.sleep(period)


def sync(plane, hosts, routed):
    """One round: route what Neutron has associated, unroute what it no longer has."""
    want = {f["floating_ip_address"]: f["fixed_ip_address"] for f in floating_ips(plane)
            if f.get("port_id") and f.get("fixed_ip_address")}
    for address, (fixed, host) in list(routed.items()):
        if want.get(address) != fixed:
            apply(hosts, address, host, False)
            del routed[address]
            print(f"l3: {address} off {host['name']}", flush=True)
    for address, fixed in want.items():
        if address not in routed:
            host = holder(hosts, fixed)
            if host:  # else the server is not spawned yet: next round
                apply(hosts, address, host, True)
                routed[address] = (fixed, host)
                print(f"l3: {address} -> {fixed} on {host['name']}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m harness.lab.openstack.l3", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", required=True)
    serve(ap.parse_args(argv).lab)


if __name__ == "__main__":
    main()

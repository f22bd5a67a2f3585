"""How long a cloud provider takes to hand over a fleet and to take it back (no training).

    python -m harness.bench.provision --provider openstack --cloud cloudbench-lab --slots 2 --repeat 3

Each repetition provisions a fleet for ``--slots`` ranks (servers, key pair, security group, SSH up, host
probe, link measurement), tears it down, and checks that the provider finds nothing of it afterwards.
Prints one JSON line per repetition and a summary (median seconds); ``--out`` also writes the summary.
Against the lab's OpenStack emulator it measures cloudbench's own overhead (API calls, SSH set-up);
against a real cloud, the cloud's build times on top.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid

from providers import base
from harness.bench import machine_line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", default="openstack")
    ap.add_argument("--cloud", default="cloudbench-lab")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    print(machine_line(), flush=True)
    options = dict(o.split("=", 1) for o in a.option)
    if a.provider == "openstack":
        options["cloud"] = a.cloud
    rows = []
    for i in range(a.repeat):
        provider = base.get(a.provider, **options)
        run_id = f"bench-{uuid.uuid4().hex[:8]}"
        with tempfile.TemporaryDirectory() as d:
            spec = base.FleetSpec(run_id=run_id, provider=a.provider, slots=a.slots, variant="small", workdir=d)
            t0 = time.monotonic()
            fleet = None
            try:
                fleet = provider.provision(spec, on_record=lambda f: None)
                t1 = time.monotonic()
            finally:
                t2 = time.monotonic()
                gone = provider.teardown(run_id, fleet)
                t3 = time.monotonic()
        left = [r for r in provider.list_tagged() if r.run_id == run_id]
        row = {"repetition": i + 1, "provider": a.provider, "nodes": len(fleet.nodes),
               "instance_type": fleet.instance_type, "provision_s": round(t1 - t0, 2),
               "teardown_s": round(t3 - t2, 2), "removed": len(gone), "left_behind": len(left)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"provider": a.provider, "cloud": a.cloud if a.provider == "openstack" else None, "slots": a.slots,
               "repetitions": a.repeat, "provision_s_median": statistics.median(r["provision_s"] for r in rows),
               "teardown_s_median": statistics.median(r["teardown_s"] for r in rows),
               "left_behind": sum(r["left_behind"] for r in rows), "rows": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

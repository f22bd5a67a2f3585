"""Which machines made a run's figures, and whether two runs may be compared.

The trainer gathers each node's fingerprint (gan.sysinfo) into its summary; the runner keeps them in
environment.json (``nodes``: host -> fingerprint) and gives every sample a ``hardware_id`` and a
``software_id``: short digests of the fields that decide comparability (CPU model, family/model/stepping,
ISA features, visible cores, GPU model/count/memory; TensorFlow, Horovod, Python, driver, CUDA). A point whose
nodes differ has ``heterogeneous`` set. ``differences`` names what differs between two runs.
"""
from __future__ import annotations

import hashlib
import json

from gan import sysinfo

MIXED = "mixed"


def _digest(d) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def ids(fingerprints: dict) -> dict:
    """Sample columns for one point from its nodes' fingerprints (host -> fingerprint); all None without any."""
    if not fingerprints:
        return {"cpu_model": None, "hardware_id": None, "software_id": None, "heterogeneous": None}
    hw = _hardware_ids(fingerprints)
    sw = {_digest(sysinfo.software_key(fp)) for fp in fingerprints.values()}
    cpus = sorted({(fp.get("cpu") or {}).get("model") or "unknown CPU" for fp in fingerprints.values()})
    return {"cpu_model": " + ".join(cpus), "hardware_id": next(iter(hw)) if len(hw) == 1 else MIXED,
            "software_id": next(iter(sw)) if len(sw) == 1 else MIXED, "heterogeneous": len(hw) > 1 or len(sw) > 1}


def record(store, fingerprints: dict):
    """Merge the point's fingerprints into environment.json's ``nodes``; returns the hosts whose fingerprint
    changed since an earlier point of the same run (a node replaced, or migrated under a VM)."""
    env = store.read_json("environment.json", {}) or {}
    nodes = env.setdefault("nodes", {})
    changed = [h for h, fp in fingerprints.items()
               if h in nodes and sysinfo.differences(nodes[h], fp)]
    nodes.update(fingerprints)
    store.write_json("environment.json", env)
    return changed


def nodes(store) -> dict:
    return (store.read_json("environment.json", {}) or {}).get("nodes") or {}


def differences(base_nodes: dict, cur_nodes: dict) -> list:
    """[(field, baseline value, current value)] between two runs' machines; a run without fingerprints
    differs from every other."""
    if not base_nodes or not cur_nodes:
        which = "baseline" if not base_nodes else "current run"
        return [("fingerprint", "none recorded" if not base_nodes else "recorded",
                 "none recorded" if not cur_nodes else "recorded", f"the {which} records no fingerprint")]
    out = []
    b, c = next(iter(sorted(base_nodes.items())))[1], next(iter(sorted(cur_nodes.items())))[1]
    for field, bv, cv in sysinfo.differences(b, c):
        out.append((field, bv, cv, ""))
    for name, group in (("baseline", base_nodes), ("current run", cur_nodes)):
        if heterogeneous(group):
            out.append(("fleet", name, "heterogeneous", f"the {name}'s nodes differ in hardware"))
    return out


def _hardware_ids(nodes: dict) -> set:
    return {_digest(sysinfo.hardware_key(fp)) for fp in nodes.values()}


def heterogeneous(nodes: dict) -> bool:
    return len(_hardware_ids(nodes)) > 1


def summary_lines(nodes: dict) -> list:
    """One line per node (host -> fingerprint): host and what it is."""
    return [f"{host}: {sysinfo.summary(fp)}" for host, fp in sorted(nodes.items())]

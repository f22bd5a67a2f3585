"""What the lab's parts share: where a lab keeps its state, how to reach its hosts, what it calls its clouds.
A leaf module: the hosts, the Slurm cluster and the emulators import it; it imports none of them."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from providers.errors import CloudbenchError

STATE_ROOT = Path(os.environ.get("CLOUDBENCH_LAB_DIR", "/run/cloudbench-lab"))
CLOUD_NAME = "cloudbench-lab"  # the clouds.yaml entry of the OpenStack emulator, the AWS profile of the lab


class LabError(CloudbenchError):
    pass


def state_dir(name):
    return STATE_ROOT / name


def ssh_command(state, host, *remote):
    d = Path(state["dir"])
    return ["ssh", "-i", str(d / "id_ed25519"), "-o", f"UserKnownHostsFile={d / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
            f"root@{host['address']}", *remote]


def subnet_user(prefix):
    """The interface that already has an address in prefix.0/24, or None."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        words = line.split()
        if len(words) > 3 and words[3].startswith(prefix + "."):
            return words[1]
    return None


def kubeconfig(url, token, namespace="cloudbench", context="cloudbench-lab"):
    """A kubeconfig document (for ``kubernetes.config.load_kube_config``) pointing at the emulator."""
    return {"apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": context, "cluster": {"server": url}}],
            "users": [{"name": context, "user": {"token": token}}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context, "namespace": namespace}}],
            "current-context": context}


def signal_all(pids, sig):
    """Send ``sig`` to each pid; ones already gone are skipped."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

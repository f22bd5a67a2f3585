"""A Nova compute driver whose servers are lab hosts (runs inside nova-compute, in the lab's OpenStack venv).

Built on Nova's own fake driver: Nova, Placement and Neutron do everything real (scheduling, claims,
allocations, port binding, states, faults); this driver only makes the server exist. One nova-compute runs per
lab host (``[DEFAULT] host`` = the host's name; ``CLOUDBENCH_LAB_HOST`` = its record from the lab's state), sized
to the host's slots, so the scheduler puts one lab-sized server on each host. Spawning a server:

- adds the address Neutron allocated for the server's port to the host's ``eth0`` (the lab bridge carries it);
- appends the server's key pair to the host's authorized_keys, as cloud-init would;
- remembers when it launched, for a console log that prints the host key block as cloud-init does.

Deleting it kills every process in the host's namespace but its sshd, removes the key and the address.

Told to fail (``<state>/faults.json``: ``{"spawn_error": N}``, decremented per spawn), spawn raises Nova's
BuildAbortException, so the server ends in ERROR with the fault record Nova itself writes.

Loaded as ``compute_driver = cloudbench_lab.LabHostDriver`` through the one-line module ``nova/virt/cloudbench_lab.py``
that the lab writes into its venv (Nova imports drivers from ``nova.virt`` only).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

from nova import exception
from nova.virt import fake

from harness.lab.emulators import labhost


def _host():
    return json.loads(os.environ["CLOUDBENCH_LAB_HOST"])


def take_fault(state, name):
    """True once per armed count of fault ``name`` in ``<state>/faults.json`` (shared by the computes)."""
    path = Path(state) / "faults.json"
    if not path.exists():
        return False

    def take(faults):
        if int(faults.get(name) or 0) <= 0:
            return False
        faults[name] = int(faults[name]) - 1
        return True
    return labhost.update_json_locked(path, take)


class LabHostDriver(fake.FakeDriver):
    """FakeDriver sized to one lab host, whose spawn and destroy act on that host."""

    def __init__(self, virtapi, read_only=False):
        host = _host()
        slots = int(host["slots"])
        self.vcpus, self.memory_mb, self.local_gb = slots, 4096 * slots + 512, 100
        self.gpus = slots  # vGPUs: one per core, as the emulator counts them
        super().__init__(virtapi, read_only)
        self.lab_host = host
        self.state = os.environ["CLOUDBENCH_LAB_OPENSTACK_DIR"]
        self.launched = {}  # instance uuid -> (address, launched at)
        self.claims = set()  # the instance whose spawn holds this host (one at most)

    # A node UUID that survives a restart (the fake driver draws a new one per process; Nova then refuses
    # to start, seeing its compute_id change): the same one where Nova asks for it and where it is reported.
    def _node_uuid(self):
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"cloudbench-lab/{self.lab_host['netns']}"))

    def get_nodenames_by_uuid(self, refresh=False):
        return {self._node_uuid(): n for n in self.get_available_nodes()}

    def get_available_resource(self, nodename):
        resources = super().get_available_resource(nodename)
        if resources:
            resources["uuid"] = self._node_uuid()
        return resources

    def update_provider_tree(self, provider_tree, nodename, allocations=None):
        super().update_provider_tree(provider_tree, nodename, allocations)
        inv = provider_tree.data(nodename).inventory
        inv["VGPU"] = {"total": self.gpus, "min_unit": 1, "max_unit": self.gpus, "step_size": 1,
                       "allocation_ratio": 1.0, "reserved": 0}
        provider_tree.update_inventory(nodename, inv)

    def spawn(self, context, instance, image_meta, injected_files, admin_password, allocations,
              network_info=None, block_device_info=None, power_on=True, accel_info=None):
        if any(u != instance.uuid for u in (*self.instances, *self.claims)):
            # One server per lab host: a second one must go elsewhere (Nova reschedules it). Checked before an
            # armed fault, which belongs to a spawn that happens.
            raise exception.ComputeResourcesUnavailable(reason=f"lab host {self.lab_host['name']} is taken")
        # Claimed at once, with nothing between the check and the claim that could yield: nova-compute builds
        # servers concurrently (green threads), and the fake driver's spawn below waits for the server's
        # network (vif.fixed_ips()) before it records the instance. Without the claim two servers scheduled
        # here together both passed the check and shared the host (a CI run saw it).
        self.claims.add(instance.uuid)
        try:
            if take_fault(self.state, "spawn_error"):
                raise exception.BuildAbortException(instance_uuid=instance.uuid,
                                                    reason="the lab was told to fail this spawn (spawn_error)")
            super().spawn(context, instance, image_meta, injected_files, admin_password, allocations,
                          network_info, block_device_info, power_on, accel_info)
        except BaseException:
            self.claims.discard(instance.uuid)
            raise
        address = self.lab_host["address"]
        for vif in network_info or []:
            for subnet in vif["network"]["subnets"]:
                for ip in subnet["ips"]:
                    if ip["version"] == 4:
                        address = ip["address"]
                        self._address("add", address, subnet["cidr"])
        if labhost.key_blob(instance.key_data):
            labhost.authorize(self.lab_host, instance.key_data, instance.uuid)
        self.launched[instance.uuid] = (address, time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime()))

    def _address(self, action, address, cidr):
        if address == self.lab_host["address"]:
            return
        prefix = cidr.split("/")[1] if cidr and "/" in cidr else "24"
        subprocess.run(["ip", "netns", "exec", self.lab_host["netns"], "ip", "addr", action, f"{address}/{prefix}",
                        "dev", "eth0"], capture_output=True, text=True)

    def destroy(self, context, instance, network_info, block_device_info=None, destroy_disks=True,
                destroy_secrets=True):
        spawned = instance.uuid in self.instances
        self.claims.discard(instance.uuid)
        super().destroy(context, instance, network_info, block_device_info, destroy_disks, destroy_secrets)
        if not spawned:
            # Nova also destroys a server whose spawn was refused here (the host was taken): the host and its
            # address belong to the server that runs there, which must keep running.
            return
        labhost.release(self.lab_host, instance.uuid)
        for vif in network_info or []:
            for subnet in vif["network"]["subnets"]:
                for ip in subnet["ips"]:
                    if ip["version"] == 4:
                        self._address("del", ip["address"], subnet["cidr"])
        self.launched.pop(instance.uuid, None)

    def get_host_uptime(self):
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    def get_console_output(self, context, instance):
        address, launched = self.launched.get(instance.uuid, (self.lab_host["address"], None))
        created = instance.created_at.strftime("%a, %d %b %Y %H:%M:%S +0000") if instance.created_at else ""
        return "\n".join(labhost.console_lines(instance.hostname or instance.display_name, address,
                                               labhost.host_key(self.lab_host), bool(instance.key_data), created,
                                               launched)) + "\n"

"""An ML2 mechanism driver that binds every port (runs inside neutron's API, in the lab's OpenStack venv).

The lab runs no Neutron agent: its "VMs" are lab hosts on the lab bridge, which already carries their
traffic. Without a driver that binds, Nova's port update would answer ``binding_failed`` and the server would
go to ERROR. Loaded by name (``mechanism_drivers = cloudbench_lab``) through the entry point the lab registers
in its venv.
"""
from __future__ import annotations

from neutron_lib import constants
from neutron_lib.api.definitions import portbindings
from neutron_lib.plugins.ml2 import api


class LabMechanismDriver(api.MechanismDriver):
    def initialize(self):
        pass

    @property
    def connectivity(self):
        return portbindings.CONNECTIVITY_L2

    def bind_port(self, context):
        for segment in context.segments_to_bind:
            context.set_binding(segment[api.ID], portbindings.VIF_TYPE_OVS, {portbindings.CAP_PORT_FILTER: True},
                                status=constants.PORT_STATUS_ACTIVE)
            return

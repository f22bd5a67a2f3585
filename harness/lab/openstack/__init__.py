"""A real OpenStack control plane in the lab (``cloudbench lab up --openstack real``).

- ``control``: installs (a pinned PyPI venv, RabbitMQ, PostgreSQL), starts, configures and stops the services;
- ``nova_virt``: the Nova compute driver whose servers are lab hosts (runs inside nova-compute);
- ``ml2``: the Neutron ML2 mechanism driver that binds every port (runs inside neutron's API);
- ``lock.txt``: the exact OpenStack 2026.2 packages.

The two drivers import nova and neutron, which exist only in the control plane's venv.
"""

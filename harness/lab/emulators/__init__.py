"""Loopback emulators of cloud APIs backed by the lab (see harness.lab.emulators.openstack)."""

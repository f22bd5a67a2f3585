# A fleet for one cloudbench run: a keypair, a security group (ssh from the harness only, anything
# between the run's own instances for Horovod/Gloo), one port and one instance per node on one network
# and, if a pool is given, one floating IP each (on the port: the instance's own network[0].port is
# empty when the network is given by name). Everything is named cb-<run_id>... and tagged
# cloudbench-run=<run_id> (metadata on instances, description elsewhere), with the harness as owner so
# `cloudbench gc` spares a live run.

locals {
  name         = "cb-${var.run_id}"
  tag          = "cloudbench-run=${var.run_id}"
  owned        = "cloudbench-run=${var.run_id} owner=${var.owner}"
  floating_ips = var.floating_ip_pool != "" ? var.instance_count : 0
}

resource "openstack_compute_keypair_v2" "run" {
  name       = local.name
  public_key = var.public_key
}

resource "openstack_networking_secgroup_v2" "run" {
  name        = local.name
  description = local.owned
}

resource "openstack_networking_port_v2" "node" {
  count              = var.instance_count
  name               = "${local.name}-${count.index}"
  description        = local.tag
  network_id         = var.network
  security_group_ids = [openstack_networking_secgroup_v2.run.id]
  admin_state_up     = true
}

resource "openstack_networking_secgroup_rule_v2" "ssh" {
  security_group_id = openstack_networking_secgroup_v2.run.id
  description       = local.tag
  direction         = "ingress"
  ethertype         = "IPv4"
  protocol          = "tcp"
  port_range_min    = 22
  port_range_max    = 22
  remote_ip_prefix  = var.ssh_cidr
}

resource "openstack_networking_secgroup_rule_v2" "internal" {
  security_group_id = openstack_networking_secgroup_v2.run.id
  description       = local.tag
  direction         = "ingress"
  ethertype         = "IPv4"
  remote_group_id   = openstack_networking_secgroup_v2.run.id
}

resource "openstack_compute_instance_v2" "node" {
  count             = var.instance_count
  name              = "${local.name}-${count.index}"
  image_id          = var.image
  flavor_name       = var.flavor
  key_pair          = openstack_compute_keypair_v2.run.name
  availability_zone = var.availability_zone

  metadata = {
    cloudbench-run   = var.run_id
    cloudbench-owner = var.owner
  }

  network {
    port = openstack_networking_port_v2.node[count.index].id
  }

  # The rules must exist before the trainer's ranks talk to each other.
  depends_on = [
    openstack_networking_secgroup_rule_v2.ssh,
    openstack_networking_secgroup_rule_v2.internal,
  ]
}

resource "openstack_networking_floatingip_v2" "node" {
  count       = local.floating_ips
  pool        = var.floating_ip_pool
  description = local.tag
}

resource "openstack_networking_floatingip_associate_v2" "node" {
  count       = local.floating_ips
  floating_ip = openstack_networking_floatingip_v2.node[count.index].address
  port_id     = openstack_networking_port_v2.node[count.index].id
}

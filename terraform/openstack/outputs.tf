output "hosts" {
  description = "The instances as a JSON list of {name, address, internal_address, slots, user}; address is the floating IP if there is one, else the fixed IPv4 address; internal_address is always the fixed one (how the instances reach each other)."
  value = jsonencode([for i, n in openstack_compute_instance_v2.node : {
    name             = n.name
    address          = local.floating_ips > 0 ? openstack_networking_floatingip_associate_v2.node[i].floating_ip : n.access_ip_v4
    internal_address = n.access_ip_v4
    slots            = var.slots_per_instance
    user             = var.ssh_user
  }])
}

# Leases lab (or any ssh inventory's) hosts exactly as providers/ssh does: one lease file per host,
# <lease_dir>/<name>.lease, created atomically with noclobber and holding
# {"run_id": ..., "owner": ..., "host": ..., "since": ...}, so `cloudbench gc --provider ssh` sees these
# leases too. Destroy releases a lease only if it names this run.

locals {
  chosen = slice(var.hosts, 0, min(var.instance_count, length(var.hosts)))
}

resource "terraform_data" "lease" {
  count = length(local.chosen)

  # A different host (or lease file, or run) at this index is a new lease, never an in-place edit.
  triggers_replace = [local.chosen[count.index].name, local.chosen[count.index].address, var.lease_dir, var.run_id]

  # Everything the provisioners need, as the lease script's environment (a destroy-time provisioner
  # may only reference self).
  input = {
    name    = local.chosen[count.index].name
    address = local.chosen[count.index].address
    slots   = local.chosen[count.index].slots
    user    = var.user
    env = {
      CB_SCRIPT      = abspath("${path.module}/lease.sh")
      CB_NAME        = local.chosen[count.index].name
      CB_ADDRESS     = local.chosen[count.index].address
      CB_PORT        = local.chosen[count.index].port
      CB_USER        = var.user
      CB_KEY         = var.ssh_key
      CB_KNOWN_HOSTS = var.known_hosts
      CB_LEASE_DIR   = var.lease_dir
      CB_RUN_ID      = var.run_id
      CB_RUN_JSON    = jsonencode(var.run_id)
      CB_OWNER_JSON  = jsonencode(var.owner)
      CB_HOST_JSON   = jsonencode(local.chosen[count.index].name)
      CB_INVENTORY   = var.inventory
    }
  }

  provisioner "local-exec" {
    command     = "sh \"$CB_SCRIPT\" acquire"
    environment = self.input.env
  }

  provisioner "local-exec" {
    when = destroy
    # An unreachable host must not wedge the state: its lease stays (the script says so) until
    # `cloudbench gc --provider ssh` releases it, as with the ssh provider.
    on_failure  = continue
    command     = "sh \"$CB_SCRIPT\" release"
    environment = self.input.env
  }
}

variable "run_id" {
  description = "The cloudbench run that holds the leases."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9._:-]+$", var.run_id))
    error_message = "run_id must be letters, digits and . _ : - only."
  }
}

variable "instance_count" {
  description = "How many hosts to lease: the first instance_count entries of hosts."
  type        = number

  validation {
    condition     = var.instance_count >= 1 && floor(var.instance_count) == var.instance_count && var.instance_count <= length(var.hosts)
    error_message = "instance_count is ${var.instance_count}, but it must be a whole number from 1 to the number of hosts given (${length(var.hosts)}): the inventory has too few hosts for the plan."
  }
}

variable "hosts" {
  description = "The lab's hosts, in the inventory's order."
  type = list(object({
    name    = string
    address = string
    slots   = number
    port    = optional(number, 22)
  }))

  validation {
    condition     = length(var.hosts) == length(distinct([for h in var.hosts : h.name]))
    error_message = "Every host needs a name no other host has."
  }
}

variable "ssh_key" {
  description = "Private key for ssh to the hosts (\"\": the ssh agent's keys)."
  type        = string
  default     = ""
}

variable "known_hosts" {
  description = "known_hosts file holding every host's key (host keys are always checked)."
  type        = string
}

variable "lease_dir" {
  description = "Directory on the hosts for the lease files (<lease_dir>/<name>.lease), as the ssh provider's inventory says."
  type        = string
}

variable "owner" {
  description = "The harness holding the leases, as <hostname>:<pid>, so that cloudbench gc can tell a crashed one."
  type        = string
}

variable "inventory" {
  description = "The ssh inventory listing these hosts, named in messages (cloudbench gc --provider ssh --inventory ...)."
  type        = string
  default     = ""
}

variable "user" {
  description = "ssh user on the hosts."
  type        = string
  default     = "root"
}

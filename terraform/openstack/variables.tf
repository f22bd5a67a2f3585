variable "cloud" {
  description = "The clouds.yaml entry to use (OS_CLOUD)."
  type        = string
}

variable "run_id" {
  description = "The cloudbench run: names every resource and tags it cloudbench-run=<run_id>."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]+$", var.run_id))
    error_message = "run_id must be letters, digits and . _ - only."
  }
}

variable "instance_count" {
  description = "How many instances to start."
  type        = number

  validation {
    condition     = var.instance_count >= 1 && floor(var.instance_count) == var.instance_count
    error_message = "instance_count must be a whole number of at least 1."
  }
}

variable "flavor" {
  description = "Flavor name, e.g. a GPU flavor."
  type        = string
}

variable "image" {
  description = "Image id (names need not be unique); it must have the trainer's Python, TensorFlow and Horovod (see harness/setup.sh)."
  type        = string
}

variable "public_key" {
  description = "The run's ssh public key (OpenSSH format), installed as the keypair cb-<run_id>."
  type        = string
}

variable "network" {
  description = "Id of the (tenant) network the instances attach to (names need not be unique)."
  type        = string
}

variable "floating_ip_pool" {
  description = "External network to take floating IPs from; \"\" gives private addresses only."
  type        = string
  default     = ""
}

variable "ssh_cidr" {
  description = "The only source allowed to reach port 22, normally the harness's own address as a.b.c.d/32."
  type        = string

  validation {
    condition     = can(cidrhost(var.ssh_cidr, 0))
    error_message = "ssh_cidr must be a CIDR block such as 203.0.113.7/32."
  }
}

variable "availability_zone" {
  description = "Availability zone for every instance (null: the cloud's default)."
  type        = string
  default     = null
}

variable "slots_per_instance" {
  description = "Ranks per instance (its GPUs, or CPU workers)."
  type        = number
  default     = 1
}

variable "ssh_user" {
  description = "ssh user of the image."
  type        = string
  default     = "root"
}

variable "owner" {
  description = "The harness that made the run (host:pid), recorded so `cloudbench gc` spares a live run."
  type        = string
  default     = ""
}

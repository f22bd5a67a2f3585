terraform {
  required_version = ">= 1.5"

  required_providers {
    openstack = {
      source  = "terraform-provider-openstack/openstack"
      version = ">= 2.1, < 4.0"
    }
  }
}

# Credentials come from clouds.yaml (and secure.yaml / OS_* variables), never from this module.
provider "openstack" {
  cloud = var.cloud
}

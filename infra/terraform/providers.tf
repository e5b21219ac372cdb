# One provider configuration per city of cluster/topology.json, in that city's region
# (var.regions). Terraform cannot choose a provider per for_each instance, so the cities
# are written out here and in main.tf; tests/unit/test_terraform.py checks that these
# are exactly the cities of topology.json.
#
# Credentials are never in this code: the provider reads ALICLOUD_ACCESS_KEY /
# ALICLOUD_SECRET_KEY (or ALICLOUD_PROFILE, or an ECS RAM role) from the environment of
# whoever runs terraform.

provider "alicloud" {
  alias  = "beijing"
  region = var.regions["beijing"]
}

provider "alicloud" {
  alias  = "shanghai"
  region = var.regions["shanghai"]
}

provider "alicloud" {
  alias  = "shenzhen"
  region = var.regions["shenzhen"]
}

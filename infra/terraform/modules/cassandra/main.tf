# The city's Cassandra nodes: one in every zone of topology.json, dc = city and
# rack = zone, like `clearingctl cluster up --cassandra-nodes 6` locally. The keyspace
# gives each city one replica per node (two here), so a city keeps the whole ledger
# after losing a zone, and QUORUM spans two cities.

resource "alicloud_instance" "node" {
  for_each = var.zones

  instance_name        = "${var.name}-cassandra-${each.key}"
  host_name            = "cassandra-${each.key}"
  availability_zone    = each.value.cloud_zone
  vswitch_id           = var.vswitch_ids[each.key]
  private_ip           = each.value.cassandra_address
  security_groups      = [var.security_group_id]
  image_id             = var.image_id
  instance_type        = var.instance_type
  instance_charge_type = "PostPaid"
  role_name            = var.role_name
  key_name             = var.key_pair_name
  deletion_protection  = true

  system_disk_category = "cloud_essd"
  system_disk_size     = 40

  data_disks {
    name                 = "${var.name}-cassandra-${each.key}"
    category             = "cloud_essd"
    performance_level    = "PL1"
    size                 = var.data_disk_gib
    encrypted            = true
    delete_with_instance = false
  }

  user_data = templatefile("${path.module}/templates/cloud-init.yaml.tftpl", {
    cluster_name     = var.cluster_name
    dc               = var.dc
    rack             = each.key
    address          = each.value.cassandra_address
    initial_token    = each.value.cassandra_token
    seeds            = join(",", [for s in var.seeds : "${s}:${each.value.ports["storage"]}"])
    storage_port     = each.value.ports["storage"]
    cql_port         = each.value.ports["cql"]
    bootstrap_script = var.bootstrap_script
    ca_secret        = var.secret_names["cluster_ca"]
    cert_secret      = var.secret_names["cassandra_cert"]
    key_secret       = var.secret_names["cassandra_key"]
  })

  tags = merge(var.tags, {
    "clearing:role" = "cassandra"
    "clearing:zone" = each.key
    "clearing:dc"   = var.dc
  })

  lifecycle {
    # A node keeps its token and data for life; replace one on purpose, never as a side
    # effect of a new image or a changed template.
    ignore_changes = [image_id, user_data]
  }
}

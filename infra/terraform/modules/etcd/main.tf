# The city's etcd member: one instance at a fixed address, so every member's initial
# cluster list is known before any instance exists. Shard ownership (leases, claims,
# fences' epochs) lives here; no etcd request is made per payment.

locals {
  member = one([for m in var.members : m if m.name == var.zone.name])

  # Members are named after their topology zone, as in the local cluster.
  initial_cluster = join(",", [for m in var.members : "${m.name}=https://${m.address}:${m.peer_port}"])
}

resource "alicloud_instance" "member" {
  instance_name        = "${var.name}-etcd-${var.zone.name}"
  host_name            = "etcd-${var.zone.name}"
  availability_zone    = var.zone.cloud_zone
  vswitch_id           = var.vswitch_id
  private_ip           = var.zone.etcd_address
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
    name                 = "${var.name}-etcd-${var.zone.name}"
    category             = "cloud_essd"
    performance_level    = "PL1"
    size                 = 40
    encrypted            = true
    delete_with_instance = false
  }

  user_data = templatefile("${path.module}/templates/cloud-init.yaml.tftpl", {
    member_name      = local.member.name
    address          = local.member.address
    client_port      = local.member.client_port
    peer_port        = local.member.peer_port
    initial_cluster  = local.initial_cluster
    cluster_token    = var.name
    bootstrap_script = var.bootstrap_script
    ca_secret        = var.secret_names["cluster_ca"]
    cert_secret      = var.secret_names["etcd_cert"]
    key_secret       = var.secret_names["etcd_key"]
  })

  tags = merge(var.tags, { "clearing:role" = "etcd", "clearing:zone" = var.zone.name })

  lifecycle {
    # A member keeps its data and identity; a new image is rolled out member by member
    # by replacing the instance on purpose, never as a side effect of a plan.
    ignore_changes = [image_id, user_data]
  }
}

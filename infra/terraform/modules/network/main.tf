# A city's network: one VPC, one vSwitch per topology zone (each in its own
# availability zone), a security group per role, and the city's CEN transit router.

locals {
  prefix = "${var.name}-${var.city.name}"

  # Ports by name as topology.json gives them; every zone uses the same ports there
  # (the JMX port differs per zone only because local JMX binds 127.0.0.1; it is not
  # opened here).
  port = {
    for p in ["etcd_client", "etcd_peer", "cql", "storage", "switch", "admin_http"] :
    p => distinct([for z in values(var.city.zones) : z.ports[p]])
  }

  roles = toset(["switch", "etcd", "cassandra", "load_balancer"])

  # Who may open what. Cluster traffic comes from address_space (all three cities,
  # joined by CEN): switch nodes forward payments to shard owners in any city,
  # Cassandra replicates to every city, etcd members elect across cities.
  rule_list = flatten([
    [for p in local.port.switch : { role = "switch", port = p, cidr = var.address_space, what = "gRPC from the load balancer and other switch nodes" }],
    [for p in local.port.admin_http : [for c in var.operator_cidrs : { role = "switch", port = p, cidr = c, what = "Prometheus metrics for operators" }]],
    [for p in local.port.etcd_client : { role = "etcd", port = p, cidr = var.address_space, what = "etcd clients (switch nodes)" }],
    [for p in local.port.etcd_peer : { role = "etcd", port = p, cidr = var.address_space, what = "etcd peers" }],
    [for p in local.port.cql : { role = "cassandra", port = p, cidr = var.address_space, what = "CQL from switch nodes" }],
    [for p in local.port.storage : { role = "cassandra", port = p, cidr = var.address_space, what = "Cassandra internode" }],
    [for p in local.port.switch : [for c in var.participant_cidrs : { role = "load_balancer", port = p, cidr = c, what = "participants' gRPC" }]],
  ])
  rules = { for r in local.rule_list : "${r.role}/${r.port}/${r.cidr}" => r }
}

resource "alicloud_vpc" "this" {
  vpc_name    = local.prefix
  cidr_block  = var.city.cidr
  description = "Clearing switch, city ${var.city.name}."
  tags        = var.tags
}

# One vSwitch per zone of topology.json, keyed by the zone's name (beijing-a, ...).
resource "alicloud_vswitch" "zone" {
  for_each = var.city.zones

  vswitch_name = "${var.name}-${each.key}"
  vpc_id       = alicloud_vpc.this.id
  zone_id      = each.value.cloud_zone
  cidr_block   = each.value.cidr
  description  = "Zone ${each.key} of cluster/topology.json."
  tags         = merge(var.tags, { "clearing:zone" = each.key })
}

resource "alicloud_security_group" "role" {
  for_each = local.roles

  security_group_name = "${local.prefix}-${replace(each.key, "_", "-")}"
  vpc_id              = alicloud_vpc.this.id
  description         = "Clearing switch ${each.key} in ${var.city.name}."
  # Instances of one role do not talk to each other unless a rule says so.
  inner_access_policy = "Drop"
  tags                = var.tags
}

resource "alicloud_security_group_rule" "ingress" {
  for_each = local.rules

  security_group_id = alicloud_security_group.role[each.value.role].id
  type              = "ingress"
  ip_protocol       = "tcp"
  nic_type          = "intranet"
  policy            = "accept"
  port_range        = "${each.value.port}/${each.value.port}"
  cidr_ip           = each.value.cidr
  priority          = 1
  description       = each.value.what
}

# The city's end of the backbone: a transit router with its own route table; the VPC
# is attached through every zone's vSwitch, so losing a zone keeps the city connected.
resource "alicloud_cen_transit_router" "this" {
  cen_id              = var.cen_id
  transit_router_name = local.prefix
  tags                = var.tags
}

resource "alicloud_cen_transit_router_route_table" "this" {
  transit_router_id               = alicloud_cen_transit_router.this.transit_router_id
  transit_router_route_table_name = local.prefix
  tags                            = var.tags
}

resource "alicloud_cen_transit_router_vpc_attachment" "this" {
  cen_id                             = var.cen_id
  transit_router_id                  = alicloud_cen_transit_router.this.transit_router_id
  vpc_id                             = alicloud_vpc.this.id
  transit_router_vpc_attachment_name = local.prefix
  # Routes the transit router learns (the other cities' /16s) go into the VPC.
  auto_publish_route_enabled = true

  dynamic "zone_mappings" {
    for_each = var.city.zones
    content {
      zone_id    = zone_mappings.value.cloud_zone
      vswitch_id = alicloud_vswitch.zone[zone_mappings.key].id
    }
  }

  tags = var.tags
}

resource "alicloud_cen_transit_router_route_table_association" "vpc" {
  transit_router_route_table_id = alicloud_cen_transit_router_route_table.this.transit_router_route_table_id
  transit_router_attachment_id  = alicloud_cen_transit_router_vpc_attachment.this.transit_router_attachment_id
}

resource "alicloud_cen_transit_router_route_table_propagation" "vpc" {
  transit_router_route_table_id = alicloud_cen_transit_router_route_table.this.transit_router_route_table_id
  transit_router_attachment_id  = alicloud_cen_transit_router_vpc_attachment.this.transit_router_attachment_id
}

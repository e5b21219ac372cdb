# The three-city clearing switch on Alibaba Cloud: one region per city of
# cluster/topology.json, one availability zone per zone of it.
#
# Nothing here names a zone. Cities, zones, ports, the etcd placement and the keyspace
# come from cluster/topology.json, the file the local cluster reads; var.regions and
# var.availability_zones only say where each city and zone lands on the cloud.

locals {
  # The one description of the cluster's shape, shared with `clearingctl cluster up`.
  topology = jsondecode(file("${path.module}/../../cluster/topology.json"))

  # Which zone of each city runs its etcd member (topology.json "placement").
  etcd_zone_index = local.topology.placement.etcd_zone_index

  # Every city and zone of topology.json, placed on the cloud:
  # - city i (0-based, file order) -> region var.regions[city], VPC 10.<i+1>.0.0/16;
  # - zone j of that city (<city>-a is j = 0, <city>-b is j = 1) -> availability zone
  #   var.availability_zones[city][j], vSwitch 10.<i+1>.<j+1>.0/24.
  # Locally the same zone is the loopback address 127.0.<i+1>.<j+1>.
  cities = {
    for ci, c in local.topology.cities : c.name => {
      name   = c.name
      index  = ci
      region = var.regions[c.name]
      cidr   = cidrsubnet(var.address_space, 8, ci + 1)
      zones = {
        for zi, z in c.zones : z.name => {
          name       = z.name
          city       = c.name
          index      = zi
          cloud_zone = var.availability_zones[c.name][zi]
          cidr       = cidrsubnet(cidrsubnet(var.address_space, 8, ci + 1), 8, zi + 1)
          # The ports are topology.json's, so a node is configured the same way on the
          # cloud as on a laptop (the switch serves gRPC on ports.switch, 15051).
          ports = z.ports
          # One etcd member per city, in the zone placement.etcd_zone_index names.
          etcd         = zi == local.etcd_zone_index
          etcd_address = cidrhost(cidrsubnet(cidrsubnet(var.address_space, 8, ci + 1), 8, zi + 1), 10)
          # A Cassandra node in every zone: dc = city, rack = zone.
          cassandra_address = cidrhost(cidrsubnet(cidrsubnet(var.address_space, 8, ci + 1), 8, zi + 1), 20)
          # One token per node, evenly spread over the ring inside each city and offset
          # by the city's index so no two nodes share one: the rule of
          # clearinghouse.localcluster.cassandra.nodes (exact: Terraform numbers are
          # arbitrary-precision and the powers of two are exact).
          cassandra_token = format("%d", -pow(2, 63) + zi * (pow(2, 64) / length(c.zones)) + ci)
        }
      }
    }
  }

  etcd_members = [
    for c in local.topology.cities : {
      name        = c.zones[local.etcd_zone_index].name
      city        = c.name
      address     = local.cities[c.name].zones[c.zones[local.etcd_zone_index].name].etcd_address
      client_port = c.zones[local.etcd_zone_index].ports.etcd_client
      peer_port   = c.zones[local.etcd_zone_index].ports.etcd_peer
    }
  ]

  # Cassandra node addresses by city (dc), zones in file order.
  cassandra_by_city = {
    for c in local.topology.cities : c.name => [
      for z in c.zones : local.cities[c.name].zones[z.name].cassandra_address
    ]
  }

  keyspace = {
    name  = local.topology.keyspace.name
    class = "NetworkTopologyStrategy"
    # One replica per Cassandra node of each city, as
    # clearinghouse.localcluster.cassandra.replication computes it locally; with a node
    # in every zone that is two per city, six in all.
    replication = { for city, nodes in local.cassandra_by_city : city => length(nodes) }
    # QUORUM (from topology.json): 4 of 6 replicas, so at least two cities hold every
    # acknowledged write and any one city can be lost.
    write_consistency = local.topology.keyspace.write_consistency
    read_consistency  = local.topology.keyspace.read_consistency
  }

  # The same text clearinghouse.storage.schema.keyspace_cql produces (dcs sorted).
  keyspace_replication_cql = format(
    "{'class': '%s', %s}",
    local.keyspace.class,
    join(", ", [for dc in sort(keys(local.keyspace.replication)) : format("'%s': %d", dc, local.keyspace.replication[dc])]),
  )

  cluster = {
    name              = var.name
    etcd_members      = local.etcd_members
    cassandra_by_city = local.cassandra_by_city
    keyspace          = local.keyspace
  }

  tags = merge(var.tags, {
    "clearing:deployment" = var.name
    "clearing:topology"   = local.topology.name
  })
}

# Every city, with the zone count and ports the file gives it, must land on a region
# that has that many distinct availability zones.
check "topology_fits_the_cloud" {
  assert {
    condition = alltrue([
      for c in local.topology.cities :
      contains(keys(var.regions), c.name) && length(lookup(var.availability_zones, c.name, [])) >= length(c.zones)
    ])
    error_message = "Every city of cluster/topology.json needs a region in var.regions and one availability zone per zone in var.availability_zones."
  }
}

# The backbone between the cities: one CEN instance (a global resource, created through
# the first city's provider), a transit router per region (modules/network) and an
# inter-region connection per pair of cities (modules/peering).
resource "alicloud_cen_instance" "backbone" {
  provider          = alicloud.beijing
  cen_instance_name = "${var.name}-backbone"
  description       = "Connects the VPCs of the clearing switch's cities."
  tags              = local.tags
}

# One region module per city of topology.json. The provider must be static, so each
# city is written out; the test suite checks this list against the file.

module "beijing" {
  source    = "./modules/region"
  providers = { alicloud = alicloud.beijing }

  name                       = var.name
  city                       = local.cities["beijing"]
  cluster                    = local.cluster
  cen_id                     = alicloud_cen_instance.backbone.id
  address_space              = var.address_space
  images                     = var.images["beijing"]
  instance_types             = var.instance_types
  cassandra_data_disk_gib    = var.cassandra_data_disk_gib
  switch_nodes_per_zone      = var.switch_nodes_per_zone
  participant_cidrs          = var.participant_cidrs
  operator_cidrs             = var.operator_cidrs
  load_balancer_address_type = var.load_balancer_address_type
  switch_health_check_path   = var.switch_health_check_path
  tls_secret_names           = var.tls_secret_names
  key_pair_name              = var.key_pair_name
  tags                       = local.tags
}

module "shanghai" {
  source    = "./modules/region"
  providers = { alicloud = alicloud.shanghai }

  name                       = var.name
  city                       = local.cities["shanghai"]
  cluster                    = local.cluster
  cen_id                     = alicloud_cen_instance.backbone.id
  address_space              = var.address_space
  images                     = var.images["shanghai"]
  instance_types             = var.instance_types
  cassandra_data_disk_gib    = var.cassandra_data_disk_gib
  switch_nodes_per_zone      = var.switch_nodes_per_zone
  participant_cidrs          = var.participant_cidrs
  operator_cidrs             = var.operator_cidrs
  load_balancer_address_type = var.load_balancer_address_type
  switch_health_check_path   = var.switch_health_check_path
  tls_secret_names           = var.tls_secret_names
  key_pair_name              = var.key_pair_name
  tags                       = local.tags
}

module "shenzhen" {
  source    = "./modules/region"
  providers = { alicloud = alicloud.shenzhen }

  name                       = var.name
  city                       = local.cities["shenzhen"]
  cluster                    = local.cluster
  cen_id                     = alicloud_cen_instance.backbone.id
  address_space              = var.address_space
  images                     = var.images["shenzhen"]
  instance_types             = var.instance_types
  cassandra_data_disk_gib    = var.cassandra_data_disk_gib
  switch_nodes_per_zone      = var.switch_nodes_per_zone
  participant_cidrs          = var.participant_cidrs
  operator_cidrs             = var.operator_cidrs
  load_balancer_address_type = var.load_balancer_address_type
  switch_health_check_path   = var.switch_health_check_path
  tls_secret_names           = var.tls_secret_names
  key_pair_name              = var.key_pair_name
  tags                       = local.tags
}

# A full mesh between the cities: every acknowledged write goes to two cities at least,
# and a switch node may forward a payment to a shard owner in any city.

module "peering_beijing_shanghai" {
  source = "./modules/peering"
  providers = {
    alicloud.local = alicloud.beijing
    alicloud.peer  = alicloud.shanghai
  }

  name           = "${var.name}-beijing-shanghai"
  cen_id         = alicloud_cen_instance.backbone.id
  local_router   = module.beijing.transit_router
  peer_router    = module.shanghai.transit_router
  bandwidth_mbps = var.inter_region_bandwidth_mbps
  tags           = local.tags
}

module "peering_beijing_shenzhen" {
  source = "./modules/peering"
  providers = {
    alicloud.local = alicloud.beijing
    alicloud.peer  = alicloud.shenzhen
  }

  name           = "${var.name}-beijing-shenzhen"
  cen_id         = alicloud_cen_instance.backbone.id
  local_router   = module.beijing.transit_router
  peer_router    = module.shenzhen.transit_router
  bandwidth_mbps = var.inter_region_bandwidth_mbps
  tags           = local.tags
}

module "peering_shanghai_shenzhen" {
  source = "./modules/peering"
  providers = {
    alicloud.local = alicloud.shanghai
    alicloud.peer  = alicloud.shenzhen
  }

  name           = "${var.name}-shanghai-shenzhen"
  cen_id         = alicloud_cen_instance.backbone.id
  local_router   = module.shanghai.transit_router
  peer_router    = module.shenzhen.transit_router
  bandwidth_mbps = var.inter_region_bandwidth_mbps
  tags           = local.tags
}

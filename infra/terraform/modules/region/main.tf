# One city of cluster/topology.json in one region: its network, the RAM role that
# reads the TLS secrets, its etcd member, a Cassandra node in every zone (dc = city,
# rack = zone) and a switch scaling group in every zone behind one load balancer.

locals {
  # The zone that runs this city's etcd member (topology.json placement.etcd_zone_index).
  etcd_zone = one([for z in values(var.city.zones) : z.name if z.etcd])

  # Own city first, then the others: like NodeConfig.for_zone locally, a switch node
  # talks to its own city's etcd member and Cassandra nodes while they are up, and the
  # Cassandra driver's local dc is its own city.
  etcd_endpoints = concat(
    [for m in var.cluster.etcd_members : "${m.address}:${m.client_port}" if m.city == var.city.name],
    [for m in var.cluster.etcd_members : "${m.address}:${m.client_port}" if m.city != var.city.name],
  )
  cassandra_contact_points = concat(
    var.cluster.cassandra_by_city[var.city.name],
    flatten([for city, addresses in var.cluster.cassandra_by_city : addresses if city != var.city.name]),
  )
  # Every Cassandra node of every city is a seed, as in the local cluster.
  cassandra_seeds = flatten(values(var.cluster.cassandra_by_city))
}

module "network" {
  source = "../network"

  name              = var.name
  city              = var.city
  address_space     = var.address_space
  participant_cidrs = var.participant_cidrs
  operator_cidrs    = var.operator_cidrs
  cen_id            = var.cen_id
  tags              = var.tags
}

module "tls" {
  source = "../tls"

  name         = var.name
  city         = var.city.name
  region       = var.city.region
  secret_names = var.tls_secret_names
  tags         = var.tags
}

module "etcd" {
  source = "../etcd"

  name              = var.name
  zone              = var.city.zones[local.etcd_zone]
  members           = var.cluster.etcd_members
  vswitch_id        = module.network.vswitch_ids[local.etcd_zone]
  security_group_id = module.network.security_group_ids["etcd"]
  image_id          = var.images.etcd
  instance_type     = var.instance_types.etcd
  role_name         = module.tls.role_name
  bootstrap_script  = module.tls.bootstrap_script
  secret_names      = var.tls_secret_names
  key_pair_name     = var.key_pair_name
  tags              = var.tags
}

module "cassandra" {
  source = "../cassandra"

  name              = var.name
  cluster_name      = var.cluster.name
  dc                = var.city.name
  zones             = var.city.zones
  seeds             = local.cassandra_seeds
  vswitch_ids       = module.network.vswitch_ids
  security_group_id = module.network.security_group_ids["cassandra"]
  image_id          = var.images.cassandra
  instance_type     = var.instance_types.cassandra
  data_disk_gib     = var.cassandra_data_disk_gib
  role_name         = module.tls.role_name
  bootstrap_script  = module.tls.bootstrap_script
  secret_names      = var.tls_secret_names
  key_pair_name     = var.key_pair_name
  tags              = var.tags
}

module "switch" {
  source = "../switch"

  name                     = var.name
  city                     = var.city.name
  region                   = var.city.region
  zones                    = var.city.zones
  vpc_id                   = module.network.vpc_id
  vswitch_ids              = module.network.vswitch_ids
  security_group_id        = module.network.security_group_ids["switch"]
  lb_security_group_id     = module.network.security_group_ids["load_balancer"]
  load_balancer_type       = var.load_balancer_address_type
  health_check_path        = var.switch_health_check_path
  nodes_per_zone           = var.switch_nodes_per_zone
  etcd_endpoints           = local.etcd_endpoints
  cassandra_contact_points = local.cassandra_contact_points
  keyspace                 = var.cluster.keyspace
  image_id                 = var.images.switch
  instance_type            = var.instance_types.switch
  role_name                = module.tls.role_name
  bootstrap_script         = module.tls.bootstrap_script
  secret_names             = var.tls_secret_names
  key_pair_name            = var.key_pair_name
  tags                     = var.tags
}

output "placement" {
  description = "Where each zone of cluster/topology.json landed: region, availability zone, vSwitch CIDR, and the fixed private addresses of its etcd member (if any) and Cassandra node."
  value = {
    for city in values(local.cities) : city.name => {
      region = city.region
      cidr   = city.cidr
      zones = {
        for zone in values(city.zones) : zone.name => {
          availability_zone = zone.cloud_zone
          cidr              = zone.cidr
          etcd_address      = zone.etcd ? zone.etcd_address : null
          cassandra_address = zone.cassandra_address
        }
      }
    }
  }
}

output "switch_endpoints" {
  description = "Per city, the host:port participants call (the city's network load balancer in front of its switch nodes; gRPC with TLS on the topology's switch port)."
  value = {
    beijing  = module.beijing.switch_endpoint
    shanghai = module.shanghai.switch_endpoint
    shenzhen = module.shenzhen.switch_endpoint
  }
}

output "etcd_endpoints" {
  description = "Client URLs of the etcd members, one per city, in topology order (what `etcdctl --endpoints` takes)."
  value       = [for m in local.etcd_members : "https://${m.address}:${m.client_port}"]
}

output "cassandra_contact_points" {
  description = "Cassandra node addresses by dc (= city); the CQL port is the topology's."
  value       = local.cassandra_by_city
}

output "keyspace" {
  description = "The ledger keyspace: name, replication per dc (one replica per Cassandra node of each city) and the consistency levels, all from cluster/topology.json."
  value       = local.keyspace
}

output "keyspace_replication_cql" {
  description = "The replication clause for CREATE KEYSPACE, the same text clearinghouse.storage.schema.keyspace_cql builds."
  value       = local.keyspace_replication_cql
}

output "switch_scaling_groups" {
  description = "ESS scaling group id of every zone's switch nodes, by zone."
  value = merge(
    module.beijing.switch_scaling_group_ids,
    module.shanghai.switch_scaling_group_ids,
    module.shenzhen.switch_scaling_group_ids,
  )
}

output "node_role_names" {
  description = "Per city, the RAM role the instances assume to read their TLS secrets."
  value = {
    beijing  = module.beijing.node_role_name
    shanghai = module.shanghai.node_role_name
    shenzhen = module.shenzhen.node_role_name
  }
}

output "vpc_id" {
  description = "The city's VPC."
  value       = module.network.vpc_id
}

output "vswitch_ids" {
  description = "vSwitch id of each zone of the city, by topology zone name."
  value       = module.network.vswitch_ids
}

output "transit_router" {
  description = "The city's CEN transit router and its route table, for the inter-region connections."
  value       = module.network.transit_router
}

output "etcd_member" {
  description = "The city's etcd member: name (its zone), address, instance id."
  value       = module.etcd.member
}

output "cassandra_nodes" {
  description = "The city's Cassandra nodes by zone (rack): address and instance id."
  value       = module.cassandra.nodes
}

output "switch_endpoint" {
  description = "host:port of the city's switch load balancer."
  value       = module.switch.endpoint
}

output "switch_scaling_group_ids" {
  description = "ESS scaling group id of each zone's switch nodes, by zone."
  value       = module.switch.scaling_group_ids
}

output "node_role_name" {
  description = "RAM role of the city's instances (reads the TLS secrets)."
  value       = module.tls.role_name
}

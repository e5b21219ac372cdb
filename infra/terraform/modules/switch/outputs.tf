output "endpoint" {
  description = "host:port participants call: the load balancer's DNS name and the topology's switch port."
  value       = "${alicloud_nlb_load_balancer.switch.dns_name}:${local.switch_port}"
}

output "load_balancer_id" {
  description = "The city's network load balancer."
  value       = alicloud_nlb_load_balancer.switch.id
}

output "server_group_id" {
  description = "The load balancer's server group the scaling groups register their nodes in."
  value       = alicloud_nlb_server_group.switch.id
}

output "scaling_group_ids" {
  description = "ESS scaling group id of each zone, by topology zone name."
  value       = { for zone, group in alicloud_ess_scaling_group.zone : zone => group.id }
}

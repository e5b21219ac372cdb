output "vpc_id" {
  description = "The city's VPC."
  value       = alicloud_vpc.this.id
}

output "vswitch_ids" {
  description = "vSwitch id of each zone, by topology zone name."
  value       = { for zone, vsw in alicloud_vswitch.zone : zone => vsw.id }
}

output "security_group_ids" {
  description = "Security group id by role: switch, etcd, cassandra, load_balancer."
  value       = { for role, sg in alicloud_security_group.role : role => sg.id }
}

output "transit_router" {
  description = "The city's region, transit router id and transit router route table id."
  value = {
    region         = var.city.region
    id             = alicloud_cen_transit_router.this.transit_router_id
    route_table_id = alicloud_cen_transit_router_route_table.this.transit_router_route_table_id
  }
}

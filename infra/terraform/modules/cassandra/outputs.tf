output "nodes" {
  description = "The city's Cassandra nodes by rack (topology zone name): dc, address, token and instance id."
  value = {
    for zone, node in alicloud_instance.node : zone => {
      dc            = var.dc
      rack          = zone
      address       = var.zones[zone].cassandra_address
      initial_token = var.zones[zone].cassandra_token
      instance_id   = node.id
    }
  }
}

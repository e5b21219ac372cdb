output "member" {
  description = "The etcd member: name (its topology zone), client URL and instance id."
  value = {
    name        = local.member.name
    client_url  = "https://${local.member.address}:${local.member.client_port}"
    instance_id = alicloud_instance.member.id
  }
}

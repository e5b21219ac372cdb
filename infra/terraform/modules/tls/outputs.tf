output "role_name" {
  description = "RAM role for the city's instances (ECS instance role)."
  value       = alicloud_ram_role.node.role_name
}

output "secret_arns" {
  description = "ARNs of the TLS secrets in this region, by secret name."
  value       = { for n in local.secret_names : n => "acs:kms:${var.region}:${data.alicloud_account.current.id}:secret/${n}" }
}

output "bootstrap_script" {
  description = "Shell script an instance runs at boot, with NAME=PATH arguments, to copy secrets into files (mode 0600) through its RAM role."
  value = templatefile("${path.module}/templates/fetch-secrets.sh.tftpl", {
    region    = var.region
    role_name = alicloud_ram_role.node.role_name
  })
}

# The TLS material of a city's nodes, by reference only. Certificates and private keys
# live in KMS Secrets Manager (created and rotated outside Terraform, the same names in
# every region); this module checks that they exist and lets the city's instances read
# them, through a RAM role, when they boot. No secret value is ever in this code, in a
# plan or in the state.

locals {
  secret_names = distinct(values(var.secret_names))
}

data "alicloud_account" "current" {}

# Existence check only: enable_details stays false, so the data source lists names and
# never returns secret_data.
data "alicloud_kms_secrets" "tls" {
  ids = local.secret_names

  lifecycle {
    postcondition {
      condition     = length(self.names) == length(local.secret_names)
      error_message = "Some TLS secrets are missing from KMS Secrets Manager in ${var.region}: need ${join(", ", local.secret_names)}."
    }
  }
}

resource "alicloud_ram_role" "node" {
  role_name   = "${var.name}-${var.city}-node"
  description = "Assumed by the clearing switch's instances in ${var.city} to read their TLS secrets."
  assume_role_policy_document = jsonencode({
    Version = "1"
    Statement = [{
      Action    = "sts:AssumeRole"
      Effect    = "Allow"
      Principal = { Service = ["ecs.aliyuncs.com"] }
    }]
  })
  tags = var.tags
}

resource "alicloud_ram_policy" "read_tls" {
  policy_name = "${var.name}-${var.city}-read-tls"
  description = "Read the clearing switch's TLS secrets in ${var.region}, and nothing else."
  policy_document = jsonencode({
    Version = "1"
    Statement = [
      {
        Effect   = "Allow"
        Action   = ["kms:GetSecretValue"]
        Resource = [for n in local.secret_names : "acs:kms:${var.region}:${data.alicloud_account.current.id}:secret/${n}"]
      },
      {
        # Secrets are encrypted under a KMS key; reading one decrypts with it.
        Effect   = "Allow"
        Action   = ["kms:Decrypt"]
        Resource = ["acs:kms:${var.region}:${data.alicloud_account.current.id}:key/*"]
      },
    ]
  })
  tags = var.tags
}

resource "alicloud_ram_role_policy_attachment" "read_tls" {
  role_name   = alicloud_ram_role.node.role_name
  policy_name = alicloud_ram_policy.read_tls.policy_name
  policy_type = "Custom"
}

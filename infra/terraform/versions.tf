terraform {
  # check blocks, optional() object attributes and startswith() need 1.5 or newer.
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    alicloud = {
      source = "aliyun/alicloud"
      # Pinned to one minor release: a provider upgrade is a reviewed change, never a
      # side effect of `terraform init -upgrade`. The modules accept a range; the root
      # module decides.
      version = "~> 1.289.0"
    }
  }
}

variable "name" {
  description = "Prefix of every resource name; also the etcd cluster token."
  type        = string
}

variable "zone" {
  description = "The zone that hosts this city's etcd member: topology zone name, city, availability zone, fixed address and topology ports."
  type = object({
    name         = string
    city         = string
    cloud_zone   = string
    etcd_address = string
    ports        = map(number)
  })
}

variable "members" {
  description = "All etcd members of the cluster (one per city): name, city, address, client and peer ports."
  type = list(object({
    name        = string
    city        = string
    address     = string
    client_port = number
    peer_port   = number
  }))

  validation {
    condition     = length(var.members) >= 3 && length(var.members) % 2 == 1
    error_message = "etcd needs an odd number of members, three or more, to survive the loss of a city."
  }
}

variable "vswitch_id" {
  description = "vSwitch of the member's zone."
  type        = string
}

variable "security_group_id" {
  description = "Security group of the etcd members."
  type        = string
}

variable "image_id" {
  description = "ECS image with etcd 3.4+ (reading /etc/default/etcd), the aliyun CLI and jq."
  type        = string
}

variable "instance_type" {
  description = "ECS instance type of the member."
  type        = string
}

variable "role_name" {
  description = "RAM role the instance assumes to read its TLS secrets."
  type        = string
}

variable "bootstrap_script" {
  description = "The secret-fetching script from the tls module."
  type        = string
}

variable "secret_names" {
  description = "TLS secret names by purpose (cluster_ca, etcd_cert, etcd_key are used here)."
  type        = map(string)
}

variable "key_pair_name" {
  description = "ECS key pair for SSH, or null."
  type        = string
}

variable "tags" {
  description = "Tags for every resource that takes tags."
  type        = map(string)
}

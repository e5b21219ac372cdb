variable "name" {
  description = "Prefix of every resource name."
  type        = string
}

variable "cluster_name" {
  description = "Cassandra cluster_name, the same in every city."
  type        = string
}

variable "dc" {
  description = "Cassandra data centre of this city's nodes: the city's name, as in the local cluster and in the keyspace's replication map."
  type        = string
}

variable "zones" {
  description = "The city's zones by topology zone name; each gets one Cassandra node (rack = zone name) at its fixed address with its token and topology ports."
  type = map(object({
    name              = string
    cloud_zone        = string
    cassandra_address = string
    cassandra_token   = string
    ports             = map(number)
  }))
}

variable "seeds" {
  description = "Seed addresses: every Cassandra node of every city."
  type        = list(string)
}

variable "vswitch_ids" {
  description = "vSwitch id of each zone, by topology zone name."
  type        = map(string)
}

variable "security_group_id" {
  description = "Security group of the Cassandra nodes."
  type        = string
}

variable "image_id" {
  description = "ECS image with Apache Cassandra 5.0 on Java 17 (config in /etc/cassandra), the aliyun CLI and jq."
  type        = string
}

variable "instance_type" {
  description = "ECS instance type of each node."
  type        = string
}

variable "data_disk_gib" {
  description = "Size of each node's data disk, GiB."
  type        = number
}

variable "role_name" {
  description = "RAM role the instances assume to read their TLS secrets."
  type        = string
}

variable "bootstrap_script" {
  description = "The secret-fetching script from the tls module."
  type        = string
}

variable "secret_names" {
  description = "TLS secret names by purpose (cluster_ca, cassandra_cert, cassandra_key are used here)."
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

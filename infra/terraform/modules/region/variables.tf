variable "name" {
  description = "Prefix of every resource name (the deployment's name)."
  type        = string
}

variable "city" {
  description = "This city as the root module derives it from cluster/topology.json: its name, region, VPC CIDR and its zones (by zone name: availability zone, vSwitch CIDR, topology ports, whether it hosts the city's etcd member, the fixed addresses of its etcd member and Cassandra node, the Cassandra node's token)."
  type = object({
    name   = string
    index  = number
    region = string
    cidr   = string
    zones = map(object({
      name              = string
      city              = string
      index             = number
      cloud_zone        = string
      cidr              = string
      ports             = map(number)
      etcd              = bool
      etcd_address      = string
      cassandra_address = string
      cassandra_token   = string
    }))
  })

  validation {
    condition     = length(var.city.zones) >= 2
    error_message = "A city needs two zones at least: the load balancer and the city's own redundancy span them."
  }

  validation {
    condition     = length([for z in values(var.city.zones) : z if z.etcd]) == 1
    error_message = "Exactly one zone of a city hosts the city's etcd member."
  }

  validation {
    condition     = alltrue([for z in values(var.city.zones) : startswith(z.cloud_zone, "${var.city.region}-")])
    error_message = "Every availability zone of a city must belong to the city's region."
  }

  validation {
    condition     = length(distinct([for z in values(var.city.zones) : z.cloud_zone])) == length(var.city.zones)
    error_message = "Each zone of a city needs its own availability zone."
  }
}

variable "cluster" {
  description = "What every city needs to know about all of them: the deployment name, the etcd members (name, city, address, ports), the Cassandra node addresses by city, and the keyspace (name, replication, consistency)."
  type = object({
    name = string
    etcd_members = list(object({
      name        = string
      city        = string
      address     = string
      client_port = number
      peer_port   = number
    }))
    cassandra_by_city = map(list(string))
    keyspace = object({
      name              = string
      class             = string
      replication       = map(number)
      write_consistency = string
      read_consistency  = string
    })
  })
}

variable "cen_id" {
  description = "Id of the CEN instance that connects the cities' VPCs."
  type        = string
}

variable "address_space" {
  description = "Private range of the whole deployment (all cities); cluster traffic is allowed from it."
  type        = string
}

variable "images" {
  description = "ECS image ids in this region for the etcd, Cassandra and switch instances."
  type = object({
    etcd      = string
    cassandra = string
    switch    = string
  })
}

variable "instance_types" {
  description = "ECS instance types for the etcd, Cassandra and switch instances."
  type = object({
    etcd      = string
    cassandra = string
    switch    = string
  })
}

variable "cassandra_data_disk_gib" {
  description = "Data disk size of each Cassandra node, GiB."
  type        = number
}

variable "switch_nodes_per_zone" {
  description = "min, desired and max switch instances of each zone's scaling group."
  type = object({
    min     = number
    desired = number
    max     = number
  })
}

variable "participant_cidrs" {
  description = "Ranges allowed to the city's switch load balancer."
  type        = list(string)
}

variable "operator_cidrs" {
  description = "Ranges allowed to the switch nodes' admin (Prometheus) port."
  type        = list(string)
}

variable "load_balancer_address_type" {
  description = "Intranet or Internet, for the city's switch load balancer."
  type        = string
}

variable "switch_health_check_path" {
  description = "HTTP path on the admin port for the load balancer's health check; null for a TCP check of the gRPC port."
  type        = string
}

variable "tls_secret_names" {
  description = "Names of the KMS Secrets Manager secrets holding the TLS material (see the root module's variable)."
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

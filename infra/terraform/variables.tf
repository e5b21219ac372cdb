# Inputs of the root module. Cities and zones are NOT inputs: they come from
# cluster/topology.json (main.tf). These variables only say where each of them goes on
# Alibaba Cloud, how big it is, and which secrets it reads.

variable "name" {
  description = "Prefix of every resource name and tag; one deployment per name."
  type        = string
  default     = "clearing"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name must be 2-21 characters: lower-case letters, digits and hyphens, starting with a letter."
  }
}

variable "regions" {
  description = "Alibaba Cloud region of each city of cluster/topology.json (city name => region id)."
  type        = map(string)
  default = {
    beijing  = "cn-beijing"
    shanghai = "cn-shanghai"
    shenzhen = "cn-shenzhen"
  }

  validation {
    condition     = length(distinct(values(var.regions))) == length(var.regions)
    error_message = "Every city needs its own region: losing a region must lose one city only."
  }
}

variable "availability_zones" {
  description = "Availability zones of each city's region, in the order of the city's zones in cluster/topology.json: the city's first zone (<city>-a) goes to the first, the second (<city>-b) to the second. Pick zones that sell the instance types below and support CEN transit routers."
  type        = map(list(string))
  default = {
    beijing  = ["cn-beijing-h", "cn-beijing-k"]
    shanghai = ["cn-shanghai-l", "cn-shanghai-m"]
    shenzhen = ["cn-shenzhen-e", "cn-shenzhen-f"]
  }

  validation {
    condition     = alltrue([for zones in values(var.availability_zones) : length(distinct(zones)) == length(zones)])
    error_message = "A city's zones must be distinct availability zones, or losing one zone loses both."
  }
}

variable "address_space" {
  description = "Private IPv4 range of the whole deployment. City i (0-based, topology order) gets the /16 number i+1 of it and its zone j the /24 number j+1 of that, the same plan as the loopback addresses of topology.json (127.0.<city+1>.<zone+1>)."
  type        = string
  default     = "10.0.0.0/8"

  validation {
    # try(): Terraform's && does not short-circuit, and a malformed value must fail here.
    condition     = try(cidrhost(var.address_space, 0) != "" && tonumber(split("/", var.address_space)[1]) <= 8, false)
    error_message = "address_space must be a CIDR block of /8 or larger (three /16s and their /24s are cut from it)."
  }
}

variable "images" {
  description = "ECS image ids per city (custom images are regional): etcd (etcd 3.4+ and the aliyun CLI), cassandra (Apache Cassandra 5.0 on Java 17 and the aliyun CLI), switch (this repository installed, its systemd unit reading /etc/clearing/switch.env, and the aliyun CLI)."
  type = map(object({
    etcd      = string
    cassandra = string
    switch    = string
  }))
}

variable "instance_types" {
  description = "ECS instance types per role. See the sizing table in README.md (\"Beyond one machine\") for how many cores each role needs at a given payment rate."
  type = object({
    etcd      = string
    cassandra = string
    switch    = string
  })
  default = {
    etcd      = "ecs.g7.large"
    cassandra = "ecs.g7.4xlarge"
    switch    = "ecs.c7.2xlarge"
  }
}

variable "cassandra_data_disk_gib" {
  description = "Size in GiB of each Cassandra node's data disk (ESSD PL1; commit log and data on it)."
  type        = number
  default     = 500

  validation {
    condition     = var.cassandra_data_disk_gib >= 100 && var.cassandra_data_disk_gib <= 32768
    error_message = "cassandra_data_disk_gib must be between 100 and 32768."
  }
}

variable "switch_nodes_per_zone" {
  description = "Size of each zone's switch scaling group: min, desired and max ECS instances. The group also scales on CPU around 60 %, the utilisation the sizing table assumes."
  type = object({
    min     = number
    desired = number
    max     = number
  })
  default = {
    min     = 1
    desired = 2
    max     = 8
  }

  validation {
    condition     = var.switch_nodes_per_zone.min >= 1 && var.switch_nodes_per_zone.min <= var.switch_nodes_per_zone.desired && var.switch_nodes_per_zone.desired <= var.switch_nodes_per_zone.max
    error_message = "Need 1 <= min <= desired <= max: every zone keeps at least one switch node."
  }
}

variable "participant_cidrs" {
  description = "IPv4 ranges from which payment institutions and banks reach the switch's load balancers (their leased lines or VPN ranges)."
  type        = list(string)

  validation {
    condition     = length(var.participant_cidrs) > 0 && alltrue([for c in var.participant_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "participant_cidrs must be a non-empty list of CIDR blocks, and not 0.0.0.0/0."
  }
}

variable "operator_cidrs" {
  description = "IPv4 ranges of operators and monitoring, allowed to the switch nodes' admin (Prometheus) port."
  type        = list(string)
  default     = []
}

variable "load_balancer_address_type" {
  description = "Address type of each city's switch load balancer: Intranet (participants come in over leased lines / Express Connect, as at NetsUnion) or Internet."
  type        = string
  default     = "Intranet"

  validation {
    condition     = contains(["Intranet", "Internet"], var.load_balancer_address_type)
    error_message = "load_balancer_address_type must be Intranet or Internet."
  }
}

variable "switch_health_check_path" {
  description = "HTTP path on the switch's admin port for the load balancer's health check. null: a TCP check on the gRPC port (the load balancer cannot speak gRPC health checking; see infra/terraform/README.md)."
  type        = string
  default     = null
}

variable "inter_region_bandwidth_mbps" {
  description = "Bandwidth limit of each inter-region CEN connection (pay by data transfer), in Mbit/s. Every acknowledged write crosses it."
  type        = number
  default     = 1000
}

variable "tls_secret_names" {
  description = "Names of the KMS Secrets Manager secrets that hold the TLS material (PEM), the same names in every region: cluster_ca signs every node's certificate (etcd, Cassandra, switch; the switch's serves participants and is its client certificate towards etcd, Cassandra and other switch nodes), participant_ca signs the participants' client certificates. Only names: nodes read the values at boot through their RAM role; Terraform never reads them."
  type = object({
    cluster_ca        = string
    participant_ca    = string
    switch_cert       = string
    switch_key        = string
    etcd_cert         = string
    etcd_key          = string
    cassandra_cert    = string
    cassandra_key     = string
  })
  default = {
    cluster_ca        = "clearing-cluster-ca-pem"
    participant_ca    = "clearing-participant-ca-pem"
    switch_cert       = "clearing-switch-server-cert-pem"
    switch_key        = "clearing-switch-server-key-pem"
    etcd_cert         = "clearing-etcd-cert-pem"
    etcd_key          = "clearing-etcd-key-pem"
    cassandra_cert    = "clearing-cassandra-cert-pem"
    cassandra_key     = "clearing-cassandra-key-pem"
  }
}

variable "key_pair_name" {
  description = "Name of an existing ECS key pair for SSH to the instances, per region the same name; null: no SSH key (use Cloud Assistant)."
  type        = string
  default     = null
}

variable "tags" {
  description = "Extra tags for every resource that takes tags."
  type        = map(string)
  default     = {}
}

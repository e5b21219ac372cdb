variable "name" {
  description = "Prefix of every resource name."
  type        = string
}

variable "city" {
  description = "The city's name (the Cassandra driver's local dc)."
  type        = string
}

variable "region" {
  description = "The city's region."
  type        = string
}

variable "zones" {
  description = "The city's zones by topology zone name; each gets its own scaling group of switch nodes. Ports are the topology's (switch = gRPC, admin_http = Prometheus)."
  type = map(object({
    name       = string
    cloud_zone = string
    ports      = map(number)
  }))
}

variable "vpc_id" {
  description = "The city's VPC."
  type        = string
}

variable "vswitch_ids" {
  description = "vSwitch id of each zone, by topology zone name."
  type        = map(string)
}

variable "security_group_id" {
  description = "Security group of the switch nodes."
  type        = string
}

variable "lb_security_group_id" {
  description = "Security group of the load balancer (participants' ranges on the switch port)."
  type        = string
}

variable "load_balancer_type" {
  description = "Address type of the load balancer: Intranet or Internet."
  type        = string
}

variable "health_check_path" {
  description = "HTTP path on the admin port for the load balancer's health check; null for a TCP check of the gRPC port."
  type        = string
}

variable "nodes_per_zone" {
  description = "min, desired and max instances of each zone's scaling group."
  type = object({
    min     = number
    desired = number
    max     = number
  })
}

variable "etcd_endpoints" {
  description = "host:port of every etcd member, this city's first."
  type        = list(string)
}

variable "cassandra_contact_points" {
  description = "Addresses of every Cassandra node, this city's first."
  type        = list(string)
}

variable "keyspace" {
  description = "The ledger keyspace: name, replication class and map, write and read consistency."
  type = object({
    name              = string
    class             = string
    replication       = map(number)
    write_consistency = string
    read_consistency  = string
  })
}

variable "image_id" {
  description = "ECS image with the switch installed (systemd unit clearing-switch reading /etc/clearing/*.env), the aliyun CLI and jq."
  type        = string
}

variable "instance_type" {
  description = "ECS instance type of the switch nodes."
  type        = string
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
  description = "TLS secret names by purpose (cluster_ca, participant_ca, switch_cert, switch_key are used here)."
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

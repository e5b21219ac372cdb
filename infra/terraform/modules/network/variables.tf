variable "name" {
  description = "Prefix of every resource name."
  type        = string
}

variable "city" {
  description = "The city (name, region, VPC CIDR) and its zones by topology zone name (availability zone, vSwitch CIDR, topology ports)."
  type = object({
    name   = string
    region = string
    cidr   = string
    zones = map(object({
      name       = string
      cloud_zone = string
      cidr       = string
      ports      = map(number)
    }))
  })
}

variable "address_space" {
  description = "Private range of the whole deployment: the other cities' nodes reach this one's from it."
  type        = string
}

variable "participant_cidrs" {
  description = "Ranges allowed to the switch load balancer's listener."
  type        = list(string)
}

variable "operator_cidrs" {
  description = "Ranges allowed to the switch nodes' admin (Prometheus) port."
  type        = list(string)
}

variable "cen_id" {
  description = "CEN instance the city's transit router joins."
  type        = string
}

variable "tags" {
  description = "Tags for every resource that takes tags."
  type        = map(string)
}

variable "name" {
  description = "Name of the inter-region connection."
  type        = string
}

variable "cen_id" {
  description = "The CEN instance both transit routers belong to."
  type        = string
}

variable "local_router" {
  description = "Transit router of the region that owns the connection (provider alicloud.local): region, id, route_table_id."
  type = object({
    region         = string
    id             = string
    route_table_id = string
  })
}

variable "peer_router" {
  description = "Transit router of the other region (provider alicloud.peer): region, id, route_table_id."
  type = object({
    region         = string
    id             = string
    route_table_id = string
  })
}

variable "bandwidth_mbps" {
  description = "Bandwidth limit of the connection, Mbit/s (billed by data transfer)."
  type        = number
}

variable "tags" {
  description = "Tags for the connection."
  type        = map(string)
}

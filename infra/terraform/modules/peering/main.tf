# One inter-region connection between two cities' transit routers, associated with and
# propagating routes into both routers' route tables, so each city's VPC learns the
# other's /16.

resource "alicloud_cen_transit_router_peer_attachment" "this" {
  provider = alicloud.local

  cen_id                              = var.cen_id
  transit_router_id                   = var.local_router.id
  peer_transit_router_id              = var.peer_router.id
  peer_transit_router_region_id       = var.peer_router.region
  transit_router_peer_attachment_name = var.name
  bandwidth_type                      = "DataTransfer"
  bandwidth                           = var.bandwidth_mbps
  tags                                = var.tags
}

resource "alicloud_cen_transit_router_route_table_association" "local" {
  provider = alicloud.local

  transit_router_route_table_id = var.local_router.route_table_id
  transit_router_attachment_id  = alicloud_cen_transit_router_peer_attachment.this.transit_router_attachment_id
}

resource "alicloud_cen_transit_router_route_table_propagation" "local" {
  provider = alicloud.local

  transit_router_route_table_id = var.local_router.route_table_id
  transit_router_attachment_id  = alicloud_cen_transit_router_peer_attachment.this.transit_router_attachment_id
}

resource "alicloud_cen_transit_router_route_table_association" "peer" {
  provider = alicloud.peer

  transit_router_route_table_id = var.peer_router.route_table_id
  transit_router_attachment_id  = alicloud_cen_transit_router_peer_attachment.this.transit_router_attachment_id
}

resource "alicloud_cen_transit_router_route_table_propagation" "peer" {
  provider = alicloud.peer

  transit_router_route_table_id = var.peer_router.route_table_id
  transit_router_attachment_id  = alicloud_cen_transit_router_peer_attachment.this.transit_router_attachment_id
}

output "attachment_id" {
  description = "Id of the inter-region connection (the same in both transit routers)."
  value       = alicloud_cen_transit_router_peer_attachment.this.transit_router_attachment_id
}

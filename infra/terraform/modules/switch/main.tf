# The city's switch nodes: stateless gRPC servers (all state is in Cassandra and etcd),
# a scaling group per zone of topology.json, behind one network load balancer for the
# city. The load balancer passes TCP through, so participants' mutual TLS ends on the
# switch node itself, which checks their certificates.

locals {
  # The topology's ports; the load balancer listens on one port, so the city's zones
  # must agree (they do in topology.json: 15051 and 18081 everywhere).
  switch_port = one(distinct([for z in values(var.zones) : z.ports["switch"]]))
  admin_port  = one(distinct([for z in values(var.zones) : z.ports["admin_http"]]))
  cql_port    = one(distinct([for z in values(var.zones) : z.ports["cql"]]))

  tcp_health_check = var.health_check_path == null
}

resource "alicloud_nlb_load_balancer" "switch" {
  load_balancer_name = "${var.name}-${var.city}-switch"
  load_balancer_type = "Network"
  address_type       = var.load_balancer_type
  address_ip_version = "Ipv4"
  vpc_id             = var.vpc_id
  security_group_ids = [var.lb_security_group_id]
  # A zone with no healthy node left is served by the other zone's nodes.
  cross_zone_enabled = true

  dynamic "zone_mappings" {
    for_each = var.zones
    content {
      zone_id    = zone_mappings.value.cloud_zone
      vswitch_id = var.vswitch_ids[zone_mappings.key]
    }
  }

  tags = var.tags
}

resource "alicloud_nlb_server_group" "switch" {
  server_group_name        = "${var.name}-${var.city}-switch"
  server_group_type        = "Instance"
  vpc_id                   = var.vpc_id
  protocol                 = "TCP"
  scheduler                = "Wrr"
  address_ip_version       = "Ipv4"
  connection_drain_enabled = true
  # A draining node reports NOT_SERVING and finishes its calls within its 5 s grace.
  connection_drain_timeout = 10

  # The load balancer checks TCP or HTTP only, not gRPC health: by default a TCP
  # connect to the gRPC port; with var.health_check_path, an HTTP GET on the admin port.
  health_check {
    health_check_enabled         = true
    health_check_type            = local.tcp_health_check ? "TCP" : "HTTP"
    health_check_connect_port    = local.tcp_health_check ? local.switch_port : local.admin_port
    health_check_url             = local.tcp_health_check ? null : var.health_check_path
    health_check_http_code       = local.tcp_health_check ? null : ["http_2xx"]
    health_check_connect_timeout = 2
    health_check_interval        = 5
    healthy_threshold            = 2
    unhealthy_threshold          = 2
  }

  tags = var.tags
}

resource "alicloud_nlb_listener" "switch" {
  load_balancer_id     = alicloud_nlb_load_balancer.switch.id
  listener_protocol    = "TCP"
  listener_port        = local.switch_port
  server_group_id      = alicloud_nlb_server_group.switch.id
  idle_timeout         = 900
  listener_description = "gRPC over mutual TLS, passed through to the switch nodes"
  tags                 = var.tags
}

# One scaling group per zone, keyed by the topology zone name: losing a zone loses its
# group only, and each group keeps its nodes in its own zone's vSwitch.
resource "alicloud_ess_scaling_group" "zone" {
  for_each = var.zones

  scaling_group_name = "${var.name}-switch-${each.key}"
  min_size           = var.nodes_per_zone.min
  max_size           = var.nodes_per_zone.max
  desired_capacity   = var.nodes_per_zone.desired
  vswitch_ids        = [var.vswitch_ids[each.key]]
  removal_policies   = ["OldestScalingConfiguration", "OldestInstance"]
  default_cooldown   = 300
  # A node is replaced when its instance fails or the load balancer finds it unhealthy.
  health_check_types = ["ECS", "LOAD_BALANCER"]
  tags               = merge(var.tags, { "clearing:role" = "switch", "clearing:zone" = each.key })
}

resource "alicloud_ess_scaling_configuration" "zone" {
  for_each = var.zones

  scaling_group_id           = alicloud_ess_scaling_group.zone[each.key].id
  scaling_configuration_name = "${var.name}-switch-${each.key}"
  instance_name              = "${var.name}-switch-${each.key}"
  image_id                   = var.image_id
  instance_type              = var.instance_type
  security_group_ids         = [var.security_group_id]
  role_name                  = var.role_name
  key_name                   = var.key_pair_name
  system_disk_category       = "cloud_essd"
  system_disk_size           = 40
  active                     = true
  enable                     = true
  force_delete               = true

  user_data = templatefile("${path.module}/templates/cloud-init.yaml.tftpl", {
    zone                     = each.key
    city                     = var.city
    switch_port              = each.value.ports["switch"]
    admin_port               = each.value.ports["admin_http"]
    cql_port                 = local.cql_port
    etcd_endpoints           = join(",", var.etcd_endpoints)
    cassandra_contact_points = join(",", var.cassandra_contact_points)
    keyspace                 = var.keyspace.name
    write_consistency        = var.keyspace.write_consistency
    read_consistency         = var.keyspace.read_consistency
    bootstrap_script         = var.bootstrap_script
    ca_secret                = var.secret_names["cluster_ca"]
    participant_ca_secret    = var.secret_names["participant_ca"]
    cert_secret              = var.secret_names["switch_cert"]
    key_secret               = var.secret_names["switch_key"]
  })

  tags = merge(var.tags, { "clearing:role" = "switch", "clearing:zone" = each.key })
}

resource "alicloud_ess_server_group_attachment" "zone" {
  for_each = var.zones

  scaling_group_id = alicloud_ess_scaling_group.zone[each.key].id
  server_group_id  = alicloud_nlb_server_group.switch.id
  type             = "NLB"
  port             = local.switch_port
  weight           = 100
  force_attach     = true

  depends_on = [alicloud_ess_scaling_configuration.zone, alicloud_nlb_listener.switch]
}

# Scale each zone's group around 60 % CPU, the utilisation the sizing table assumes.
resource "alicloud_ess_scaling_rule" "cpu" {
  for_each = var.zones

  scaling_group_id          = alicloud_ess_scaling_group.zone[each.key].id
  scaling_rule_name         = "${var.name}-switch-${each.key}-cpu"
  scaling_rule_type         = "TargetTrackingScalingRule"
  metric_name               = "CpuUtilization"
  target_value              = 60
  estimated_instance_warmup = 120
}

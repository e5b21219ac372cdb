# An example of the inputs to give `terraform plan -var-file=...`. Copy it, replace the
# image ids and ranges with yours. It holds no secret, and neither must your copy:
# credentials come from the environment, TLS material from KMS Secrets Manager.

name = "clearing"

# Custom images are regional: one set per city (see README.md, "Images").
images = {
  beijing = {
    etcd      = "m-beijing-etcd-image-id"
    cassandra = "m-beijing-cassandra-image-id"
    switch    = "m-beijing-switch-image-id"
  }
  shanghai = {
    etcd      = "m-shanghai-etcd-image-id"
    cassandra = "m-shanghai-cassandra-image-id"
    switch    = "m-shanghai-switch-image-id"
  }
  shenzhen = {
    etcd      = "m-shenzhen-etcd-image-id"
    cassandra = "m-shenzhen-cassandra-image-id"
    switch    = "m-shenzhen-switch-image-id"
  }
}

# Participants' leased-line ranges, and the operators' monitoring range.
participant_cidrs = ["172.16.0.0/16"]
operator_cidrs    = ["192.168.100.0/24"]

switch_nodes_per_zone = {
  min     = 2
  desired = 2
  max     = 8
}

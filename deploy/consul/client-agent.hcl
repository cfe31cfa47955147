# A Consul client agent on every host that runs kleinserve servers; servers register with
# the agent on their own host (--consul=127.0.0.1:8500), which runs their health checks.
datacenter = "dc1"
data_dir   = "/var/lib/consul"
client_addr = "127.0.0.1"
retry_join = ["consul-server-1", "consul-server-2", "consul-server-3"]
# ACLs: give each server a token with service:write on "inference" (CONSUL_HTTP_TOKEN),
# and clients a token with service:read + node:read.
acl {
  enabled = true
  default_policy = "deny"
  enable_token_persistence = true
}

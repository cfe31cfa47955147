# ACL policy for kleinserve servers: consul acl policy create -name inference -rules @inference-policy.hcl
# (tests/test_deploy_integration.py registers real servers with a token of it.)
service "inference" { policy = "write" }
node_prefix "" { policy = "read" }
# /v1/agent/self: a server listening on all interfaces without --advertise (--rest_api_port,
# the TF Serving way) registers the address its local agent advertises, which it reads there.
agent_prefix "" { policy = "read" }

# ACL policy for kleinserve servers: consul acl policy create -name inference -rules @inference-policy.hcl
service "inference" { policy = "write" }
node_prefix "" { policy = "read" }

"""Clustered mode: amaters nodes as stateless front ends over etcd clusters (consensus by etcd's Raft)."""

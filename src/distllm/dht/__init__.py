"""Kademlia DHT: pure routing table, lookup and records (L1) and the node over RPC (L4)."""

"""The network service: networks, IPAM, ports (docs/network.md)."""

"""The NAT test lab: real Linux NATs built from network namespaces and nftables."""

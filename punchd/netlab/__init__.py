"""The NAT test lab: real Linux NATs built from network namespaces and nftables.

:mod:`punchd.netlab.lab` builds the lab (``Lab``, sites of each NAT profile,
hosts that run processes); :mod:`punchd.netlab.udp` probes it with plain UDP
sockets (a reflector and a remote-controlled endpoint).
"""

"""
Tests for L{punchd.rendezvous}: the protocol under a fake clock and
transport, and the real server process on loopback.
"""

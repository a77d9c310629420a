"""
punchd: direct UDP paths between programs behind NATs.

A public rendezvous server introduces peers; a punch-agent on each host
punches the path and hands the connected UDP socket to the program that
asked for it.
"""

__version__ = "0.1.0"

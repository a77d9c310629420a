"""
twistd plugins for punchd: one lazy ServiceMaker per daemon.

Nothing of punchd is imported until twistd picks one of them.
"""

from twisted.application.service import ServiceMaker

rendezvous = ServiceMaker(
    "punchd rendezvous",
    "punchd.rendezvous.tap",
    "punchd rendezvous server: STUN Binding for anyone, introductions for agents",
    "rendezvous",
)

punchAgent = ServiceMaker(
    "punchd punch-agent",
    "punchd.agent.tap",
    "punchd agent: punches UDP paths to peers and hands them to local programs",
    "punch-agent",
)

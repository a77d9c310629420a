"""
A rendezvous service of two nodes on two public hosts of the NAT lab, with
Redis beside the first: agents behind real NATs registered on different
nodes reach each other both ways (the Incoming leaves from the node the
target's NAT has a mapping for), through the initiator's node's relay when
no direct path exists, and again after the target's node dies.
"""

from __future__ import annotations

import time

import pytest

from netlab.lab import RENDEZVOUS_ADDRESS, Lab
from netlab.scenarios import World
from tests import wait_for
from tests.rendezvous.redis_helpers import RedisServer, Service

pytestmark = pytest.mark.netlab

REDIS_PORT = 6379
NODE_PORT = 3478


def node_of(world: World, service: Service, agent: str) -> str:
    rendezvous = world.deployment.status(agent)["rendezvous"]
    return next(n for n, node in service.nodes.items() if rendezvous == f"{node.host}:{node.port}")


def test_agents_behind_nats_on_two_nodes_connect_both_ways(lab: Lab) -> None:
    world = World(lab, keepalive=2.0)
    second = lab.add_public_host("rv2")
    redis = RedisServer(
        lab.tmpdir / "redis", REDIS_PORT, host=RENDEZVOUS_ADDRESS, launch=lab.rendezvous_host.run
    )
    service = Service(world.deployment, redis)
    try:
        redis.start()
        world.add("conea", "cone")
        world.add("coneb", "cone")
        world.add("symb", "symmetric")
        service.add_node("rv1", host=RENDEZVOUS_ADDRESS, port=NODE_PORT)
        service.add_node("rv2", host=second.address, port=NODE_PORT)
        service.start_node("rv1", launch=lab.rendezvous_host.run)
        service.start_node("rv2", launch=second.run)
        service.point("conea1", "rv1", "rv2")
        service.point("coneb1", "rv2", "rv1")
        service.point("symb1", "rv2", "rv1")
        for name, host in world.hosts.items():
            world.deployment.start_agent(name, launch=host.run, wait=0)
        world.wait_registered(timeout=60)
        assert node_of(world, service, "conea1") == "rv1"
        assert node_of(world, service, "coneb1") == "rv2"
        time.sleep(0.5)  # the claims reach Redis
        for initiator, target in (("conea1", "coneb1"), ("coneb1", "conea1")):
            outcome = world.retry_tunnel(initiator, target, within=10, count=5)
            assert outcome.ok, f"{initiator} -> {target}: {outcome.code}: {outcome.message}"
            assert outcome.path == "direct"
        # A cone facing a symmetric NAT has no direct path: the initiator's
        # node relays, and tells the target (on the other node) where.
        for initiator, target in (("conea1", "symb1"), ("symb1", "conea1")):
            outcome = world.retry_tunnel(initiator, target, within=10, count=50)
            assert outcome.ok, f"{initiator} -> {target}: {outcome.code}: {outcome.message}"
            assert outcome.path == "relay" and outcome.exchanged == 50
            relay = outcome.info["relay"]
            assert relay.startswith(world.deployment.status(initiator)["rendezvous"].split(":")[0])
        service.kill_node("rv2")
        wait_for(
            lambda: node_of(world, service, "coneb1") == "rv1", 40, "coneb1 to fail over to rv1"
        )
        outcome = world.retry_tunnel("conea1", "coneb1", within=15, count=5)
        assert outcome.ok, f"after the failover: {outcome.code}: {outcome.message}"
    finally:
        service.close()
        redis.stop()

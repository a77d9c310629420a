"""
punchd through real Linux NATs: every pairing of NAT profiles, loss, a
rendezvous restart, and a NAT reboot.  Real twistd processes run inside the
lab's namespaces and a program on each host uses punchd.client.
"""

from __future__ import annotations

import pytest

from netlab.lab import Lab
from netlab.scenarios import (
    SURE_BIRTHDAY,
    Outcome,
    World,
    build_matrix_world,
    format_table,
    matrix_pairs,
)

pytestmark = pytest.mark.netlab


def test_every_pair_of_nat_profiles(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    # Two pairs go direct only by birthday probing.
    world = build_matrix_world(lab, agent_extra=SURE_BIRTHDAY)
    try:
        world.start()
        world.wait_netcheck()
        rows: list[tuple[str, Outcome]] = []
        wrong = []
        for label, initiator, responder, expected in matrix_pairs():
            outcome = world.tunnel(initiator, responder, timeout=8.0)
            rows.append((label, outcome))
            got = outcome.path if outcome.ok else outcome.code
            if got not in expected.split("|"):
                wrong.append(f"{label}: expected {expected}, got {got}: {outcome.message}")
            elif outcome.ok:
                if outcome.exchanged != 20 or outcome.strays:
                    wrong.append(f"{label}: exchanged {outcome.exchanged}, strays {outcome.strays}")
            elif "tried" not in outcome.message:
                wrong.append(f"{label}: unexplained failure: {outcome.message}")
        with capsys.disabled():
            print("\n" + format_table(rows))
        assert not wrong, "\n".join(wrong)
    finally:
        world.close()


def test_candidate_types_that_win(lab: Lab) -> None:
    world = World(lab)
    try:
        world.add("lan", "same-lan")
        world.add("pub", "public")
        world.add("sym", "symmetric")
        world.add("conea", "cone")
        world.add("coneb", "cone")
        world.start()
        lan = world.tunnel("lan1", "lan2")
        assert (lan.local_kind, lan.remote_kind) == ("host", "host")
        cones = world.tunnel("conea1", "coneb1")
        assert (cones.local_kind, cones.remote_kind) == ("srflx", "srflx")
        # The public host learns the symmetric NAT's real port from its probes.
        learned = world.tunnel("pub", "sym1")
        assert learned.ok and learned.remote_kind == "prflx"
    finally:
        world.close()


def test_cone_to_cone_connects_every_time_with_ten_percent_loss(lab: Lab) -> None:
    world = World(lab)
    try:
        world.add("conea", "cone", loss=10)
        world.add("coneb", "cone", loss=10)
        world.start()
        outcomes = [world.tunnel("conea1", "coneb1", count=10, timeout=10) for _ in range(10)]
        failures = [o.message for o in outcomes if not o.ok]
        assert not failures
        assert all(o.exchanged == 10 and not o.strays for o in outcomes)
    finally:
        world.close()


def test_agents_recover_from_a_rendezvous_restart(lab: Lab) -> None:
    world = World(lab, keepalive=1.0)
    try:
        world.add("conea", "cone")
        world.add("coneb", "cone")
        world.start()
        assert world.tunnel("conea1", "coneb1").ok
        world.restart_rendezvous()
        outcome = world.retry_tunnel("conea1", "coneb1", within=15)
        assert outcome.ok, outcome.message
        world.wait_registered()
    finally:
        world.close()


def test_agent_recovers_when_its_nat_forgets_everything(lab: Lab) -> None:
    world = World(lab, keepalive=1.0)
    try:
        world.add("conea", "cone")
        world.add("coneb", "cone")
        world.start()
        assert world.tunnel("conea1", "coneb1").ok
        world.sites["coneb"].flush_conntrack()
        outcome = world.retry_tunnel("conea1", "coneb1", within=15)
        assert outcome.ok, outcome.message
        world.sites["conea"].flush_conntrack()
        outcome = world.retry_tunnel("conea1", "coneb1", within=15)
        assert outcome.ok, outcome.message
    finally:
        world.close()


def enable_ipv6(world: World, name: str, address: str) -> None:
    host = world.hosts[name]
    for key in ("all", "default", "eth0"):
        host.check_output(["sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=0"])
    host.check_output(["ip", "-6", "addr", "add", f"{address}/64", "dev", "eth0", "nodad"])


def test_ipv6_host_candidates_carry_the_tunnel_when_ipv4_cannot(lab: Lab) -> None:
    world = World(lab)
    try:
        world.add("sixa", "public")
        world.add("sixb", "public")
        enable_ipv6(world, "sixa", "2001:db8::a")
        enable_ipv6(world, "sixb", "2001:db8::b")
        # IPv4 between the two is cut (the rendezvous stays reachable).
        world.hosts["sixa"].check_output(
            ["nft", "-f", "-"],
            input=(
                "table ip cut {\n  chain out {\n    type filter hook output priority 0;\n"
                f"    ip daddr {world.hosts['sixb'].address} drop\n  }}\n}}\n"
            ),
        )
        world.start()
        outcome = world.tunnel("sixa", "sixb")
        assert outcome.ok, outcome.message
        assert (outcome.local_kind, outcome.remote_kind) == ("host", "host")
        assert outcome.accept["info"]["remote"].startswith("[2001:db8::a]:")
        assert outcome.exchanged == 20 and not outcome.strays
    finally:
        world.close()

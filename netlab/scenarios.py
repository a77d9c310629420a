"""
punchd inside the NAT lab: a rendezvous on the lab's internet, an agent on
every host, and tunnels opened between hosts by the lab program
(L{netlab.program}) exactly as users' programs open them.

Tests, benchmarks and C{make demo} build on L{World}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from netlab.deployment import Deployment
from netlab.lab import RENDEZVOUS_ADDRESS, Host, Lab, Profile, Site

RENDEZVOUS_PORT = 3478
#: The rendezvous's second Binding port, so that agents can tell a hard NAT.
ALTERNATE_PORT = 3479
#: Agent settings for tests that expect birthday probing to go direct every
#: time: twice the default probes in the same 4.8 s.  With the defaults one
#: tunnel in about 120 stays relayed (1 - 256/64512 per probe, 1,200 probes),
#: which a suite of several such tunnels meets every few runs; with these,
#: one in about 14,000.  The default's rate is bench/bench_birthday.py's.
SURE_BIRTHDAY = "hard_nat_budget = 2400\nhard_nat_probe_rate = 500.0\n"

#: Profiles a pair of peers may have; "public" means no NAT at all.
PAIR_PROFILES = ("public", "cone", "full-cone", "symmetric", "cgnat")


@dataclass
class Outcome:
    """
    How one tunnel attempt between two lab hosts went.
    """

    initiator: str
    responder: str
    ok: bool
    code: str | None = None
    message: str = ""
    path: str | None = None
    local_kind: str | None = None
    remote_kind: str | None = None
    setup_ms: float | None = None
    exchanged: int = 0
    strays: list[str] = field(default_factory=list)
    accept: dict[str, Any] = field(default_factory=dict)
    #: The initiator's tunnel description, as its program got it.
    info: dict[str, Any] = field(default_factory=dict)


class World:
    """
    A lab with punchd running in it.  Add hosts, call L{start}, then
    L{tunnel} between any two of them.
    """

    def __init__(
        self,
        lab: Lab,
        keepalive: float = 2.0,
        alternate_port: int = 0,
        rendezvous_extra: str = "",
        agent_extra: str = "",
    ) -> None:
        self.lab = lab
        self.hosts: dict[str, Host] = {}
        self.sites: dict[str, Site] = {}
        self.deployment = Deployment(
            lab.tmpdir / "punchd",
            rendezvous_host=RENDEZVOUS_ADDRESS,
            rendezvous_port=RENDEZVOUS_PORT,
            listen_interface="0.0.0.0",
            keepalive=keepalive,
            rendezvous_extra=rendezvous_extra,
            alternate_port=alternate_port,
            agent_extra=agent_extra,
        )

    def add(
        self,
        name: str,
        profile: Profile | str,
        *,
        loss: int = 0,
        wan_input: str = "drop",
        isp_router: bool = False,
        hosts: int | None = None,
        agents: list[str] | None = None,
    ) -> list[Host]:
        """
        A site called C{name} with the given NAT profile (or a public host
        for "public"), with an agent per host, named after its host unless
        C{agents} names them.  C{isp_router}: see L{Lab.add_site}.
        """
        if profile == "public":
            added = [self.lab.add_public_host(name)]
        else:
            site = self.lab.add_site(
                name,
                profile,  # type: ignore[arg-type]
                hosts=hosts,
                loss=loss,
                wan_input=wan_input,  # type: ignore[arg-type]
                isp_router=isp_router,
            )
            self.sites[name] = site
            added = list(site.hosts)
        for index, host in enumerate(added):
            agent = agents[index] if agents else host.name
            self.hosts[agent] = host
            self.deployment.add_agent(agent, socket_dir=self.lab.tmpdir)
        return added

    def start(self) -> None:
        """
        Start the rendezvous and every agent, and wait until all registered.
        """
        self.deployment.start_rendezvous(launch=self.lab.rendezvous_host.run)
        for name, host in self.hosts.items():
            self.deployment.start_agent(name, launch=host.run, wait=0)
        for name in self.hosts:
            self.deployment.wait_registered(name, timeout=20)

    def restart_rendezvous(self) -> None:
        self.deployment.stop_rendezvous()
        self.deployment.start_rendezvous(launch=self.lab.rendezvous_host.run)

    def _program(self, name: str, *args: str) -> list[str]:
        socket_path = self.deployment.agents[name].socket_path
        return [sys.executable, "-m", "netlab.program", "--socket", socket_path, *args]

    def tunnel(
        self,
        initiator: str,
        responder: str,
        service: str = "chat",
        count: int = 20,
        timeout: float = 8.0,
    ) -> Outcome:
        """
        Run the lab program on both hosts: C{responder} accepts, C{initiator}
        connects, and they exchange C{count} datagrams.
        """
        accept = self.hosts[responder].run(
            self._program(
                responder, "--count", str(count), "--timeout", str(timeout), "accept", service
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert accept.stdout is not None
            line = accept.stdout.readline()
            if '"listening"' not in line:
                errors = accept.stderr.read() if accept.stderr else ""
                raise RuntimeError(f"accepting program failed: {line}{errors}")
            try:
                output = self.hosts[initiator].check_output(
                    self._program(
                        initiator,
                        "--count",
                        str(count),
                        "--timeout",
                        str(timeout),
                        "connect",
                        responder,
                        service,
                    ),
                    timeout=timeout + 60,
                )
            except subprocess.CalledProcessError as e:
                output = e.stdout
            result = json.loads(output.strip().splitlines()[-1])
            accepted: dict[str, Any] = {}
            if result.get("ok"):
                out, _ = accept.communicate(timeout=60)
                accepted = json.loads(out.strip().splitlines()[-1])
        finally:
            if accept.poll() is None:
                accept.kill()
                accept.wait(5)
        if not result.get("ok"):
            return Outcome(
                initiator,
                responder,
                False,
                code=result.get("code"),
                message=result.get("message", ""),
            )
        info = result["info"]
        return Outcome(
            initiator,
            responder,
            True,
            path=info.get("path"),
            local_kind=info["candidates"]["local"],
            remote_kind=info["candidates"]["remote"],
            setup_ms=info.get("setup_ms"),
            exchanged=min(result.get("exchanged", 0), accepted.get("exchanged", 0)),
            strays=result.get("strays", []) + accepted.get("strays", []),
            accept=accepted,
            info=info,
        )

    def wait_netcheck(self, timeout: float = 30.0) -> None:
        """
        Wait until every agent has checked its network: tunnels choose their
        strategy (birthday probing, port mapping) from it.
        """
        deadline = time.monotonic() + timeout
        for name in self.hosts:
            while not self.deployment.status(name).get("netcheck"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not check its network")
                time.sleep(0.2)

    def wait_registered(self, names: list[str] | None = None, timeout: float = 20.0) -> None:
        for name in names or list(self.hosts):
            self.deployment.wait_registered(name, timeout=timeout)

    def retry_tunnel(self, initiator: str, responder: str, within: float, **kwargs: Any) -> Outcome:
        """
        Try a tunnel until one works or C{within} seconds pass (after a
        rendezvous restart or a NAT reboot agents need a keepalive or two).
        """
        deadline = time.monotonic() + within
        while True:
            outcome = self.tunnel(initiator, responder, **kwargs)
            if outcome.ok or time.monotonic() > deadline:
                return outcome
            time.sleep(0.5)

    def close(self) -> None:
        self.deployment.close()


def format_table(rows: list[tuple[str, Outcome]]) -> str:
    """
    The matrix as text: pair, outcome, path, setup time.
    """
    lines = [f"{'pair':<26} {'outcome':<10} {'path':<28} {'setup':>9}"]
    lines.append("-" * len(lines[0]))
    for pair, outcome in rows:
        if outcome.ok:
            path = f"{outcome.path} {outcome.local_kind}->{outcome.remote_kind}"
            setup = f"{outcome.setup_ms:.1f} ms"
            verdict = "connected"
        else:
            path = "-"
            setup = "-"
            verdict = outcome.code or "failed"
        lines.append(f"{pair:<26} {verdict:<10} {path:<28} {setup:>9}")
    return "\n".join(lines)


#: Site names per profile: two of each so that a profile can face itself.
SITE_NAMES = {
    "public": ("puba", "pubb"),
    "cone": ("conea", "coneb"),
    "full-cone": ("fulla", "fullb"),
    "symmetric": ("syma", "symb"),
    "cgnat": ("cgna", "cgnb"),
}

#: Where no direct path can exist: both symmetric NATs hide the port they
#: will use toward the peer, so not even birthday probing can find one.
#: (A symmetric NAT facing a cone is found by birthday probing.)
NO_DIRECT_PATH = {frozenset({"symmetric"})}


def expected(first: str, second: str) -> str:
    return "relay" if frozenset({first, second}) in NO_DIRECT_PATH else "direct"


def host_of(profile: str, instance: int) -> str:
    """
    The lab host name for the C{instance}th (0 or 1) site of C{profile}.
    """
    site = SITE_NAMES[profile][instance]
    return site if profile == "public" else f"{site}1"


def build_matrix_world(lab: Lab, keepalive: float = 2.0, agent_extra: str = "") -> World:
    """
    Two sites of every profile, a same-LAN site with two hosts, two cone
    NATs whose input chains admit unsolicited WAN traffic (docs/architecture.rst, "The NAT lab"),
    and one more plain cone to face them.  (Two such NATs behind routers
    of their ISPs: tests/netlab/test_open_input.py.)  C{agent_extra} goes
    into every agent's configuration.
    """
    world = World(lab, keepalive=keepalive, alternate_port=ALTERNATE_PORT, agent_extra=agent_extra)
    for profile, names in SITE_NAMES.items():
        for name in names:
            world.add(name, profile)
    world.add("lan", "same-lan")
    world.add("opena", "cone", wan_input="accept")
    world.add("openb", "cone", wan_input="accept")
    world.add("plainc", "cone")
    return world


def matrix_pairs() -> list[tuple[str, str, str, str]]:
    """
    (label, initiator host, responder host, expected outcome) for every pair
    of profiles, plus same-LAN and open-input cones.
    """
    from itertools import combinations_with_replacement

    pairs = [
        (f"{a} -> {b}", host_of(a, 0), host_of(b, 1), expected(a, b))
        for a, b in combinations_with_replacement(PAIR_PROFILES, 2)
    ]
    pairs.append(("same-lan", "lan1", "lan2", "direct"))
    pairs.append(("cone(open) -> cone", "opena1", "plainc1", "direct"))
    pairs.append(("cone -> cone(open)", "plainc1", "openb1", "direct"))
    # Both NATs let the other's first probe claim their mapping, and their
    # WAN sides share one link (no router on which a primer could die): only
    # probes that cross in flight pass, so a direct path is a race; the
    # relay carries the tunnel when it is lost.
    pairs.append(("cone(open) -> cone(open)", "opena1", "openb1", "direct|relay"))
    return pairs

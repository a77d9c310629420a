"""Build real NATs from network namespaces, veth pairs and nftables.

Topology: an ``inet`` namespace holds a bridge that plays "the internet"
(203.0.113.0/24, gateway .1).  Public hosts plug straight into it; a site is a
NAT namespace whose ``wan`` veth is on that bridge and whose ``lan`` bridge
(one /28 of 192.0.2.0/24) connects the site's host namespaces.  A ``cgnat``
site puts the home NAT's ``wan`` on a /30 of 198.51.100.0/24 behind a
carrier NAT namespace, which is the one on the internet.  A site built with
``isp_router`` reaches the bridge through a router namespace of its own (one
more hop, as on a real path).  A ``miniupnpd``
site is a symmetric NAT running miniupnpd (PCP, NAT-PMP and UPnP-IGD), as
set up by :mod:`netlab.upnp`.

Nothing links to the root namespace: every veth is created directly inside
lab namespaces (``ip -n``), so the host's own network is never touched.  All
names carry a per-run prefix, and a lock file in :data:`STATE_DIR` held for
the lab's lifetime lets :func:`cleanup_stale` tell a killed run from a live
one.  Everything is removed on exit, on an exception, on SIGTERM/SIGHUP
(turned into ``SystemExit`` while a lab is open) and at interpreter exit.

Limits: IPv4 only (IPv6 is disabled in every namespace, so programs see no
link-local addresses); no NAT hairpinning (a LAN host cannot reach its own
site through the public address); no delay emulation (no ``tc netem`` in
the kernels this runs on), only loss.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal, get_args

from netlab import child_env, upnp

Profile = Literal["cone", "full-cone", "symmetric", "same-lan", "cgnat", "miniupnpd"]
PROFILES: tuple[Profile, ...] = get_args(Profile)
WanInput = Literal["drop", "accept"]

INTERNET = ipaddress.IPv4Network("203.0.113.0/24")
GATEWAY = "203.0.113.1"
RENDEZVOUS_ADDRESS = "203.0.113.10"
SITE_LANS = tuple(ipaddress.IPv4Network("192.0.2.0/24").subnets(new_prefix=28))
CARRIER_LINKS = tuple(ipaddress.IPv4Network("198.51.100.0/24").subnets(new_prefix=30))
STATE_DIR = Path("/run/punchd-netlab")
NETNS_DIR = Path("/run/netns")

_PREFIX_RE = re.compile(r"pl[0-9a-f]{6}")
_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,11}")
_COMMAND_TIMEOUT = 15.0
_TERM_GRACE = 2.0
_KILL_GRACE = 2.0
_TERM_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_DEFERRED_SIGNALS = (signal.SIGINT, *_TERM_SIGNALS)


class LabError(RuntimeError):
    """The lab could not be built or changed."""


def unavailable_reason() -> str | None:
    """Why this machine cannot build a lab (not root, a tool missing), or None."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces and nftables)"
    for tool in ("ip", "nft", "conntrack", "sysctl"):
        if shutil.which(tool) is None:
            return f"the NAT lab needs {tool!r}, which is not installed"
    return None


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    """Run a lab-building command; its stderr becomes the error message."""
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise LabError(f"{' '.join(argv)} timed out") from e
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def _ip(netns: str, *commands: str) -> None:
    """Run several ``ip`` commands inside one namespace in one process."""
    _run(["ip", "-n", netns, "-batch", "-"], "\n".join(commands) + "\n")


def _nft(netns: str, script: str) -> None:
    """Load an nftables script atomically inside a namespace."""
    _run(["ip", "netns", "exec", netns, "nft", "-f", "-"], script)


def nat_ruleset(profile: Profile, wan_input: WanInput = "drop") -> str:
    """The nftables ruleset of a NAT namespace with interfaces ``wan`` and ``lan``.

    Every profile filters like a port-restricted cone: only conntrack replies
    get in.  ``wan_input="accept"`` leaves the NAT's own input chain open, so
    an unsolicited datagram to a mapped port is confirmed as a conntrack entry
    of its own (and may push a later outbound mapping onto another port).
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown NAT profile {profile!r}; choose from {PROFILES}")
    masquerade = "masquerade fully-random" if profile == "symmetric" else "masquerade"
    full_cone = profile == "full-cone"
    if profile == "miniupnpd":
        # Symmetric for the LAN; the NAT's own traffic (miniupnpd's STUN
        # test) and traffic to ports miniupnpd forwards go through untouched.
        masquerade = 'iifname "lan" masquerade fully-random'
        full_cone = False
    lines = [
        "table ip punchd {",
        "\tchain input {",
        f"\t\ttype filter hook input priority filter; policy {wan_input};",
        "\t\tct state established,related accept",
        '\t\tiifname { "lo", "lan" } accept',
        "\t}",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy drop;",
        "\t\tct state established,related accept",
        '\t\tiifname "lan" accept',
        *(["\t\tct status dnat accept"] if full_cone or profile == "miniupnpd" else []),
        "\t}",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat;",
        f'\t\toifname "wan" {masquerade}',
        "\t}",
    ]
    if full_cone:
        # Endpoint-independent filtering: remember each public UDP port that
        # carried outbound traffic (after masquerade, so a remapped port is
        # right too) and forward new inbound datagrams on it to its LAN owner.
        # UDP only; the map entry lives 120 s after the last outbound datagram,
        # however long conntrack keeps the flows.
        lines += [
            "\tmap fullcone {",
            "\t\ttype inet_service : ipv4_addr . inet_service",
            "\t\tflags dynamic,timeout",
            "\t\ttimeout 120s",
            "\t}",
            "\tchain mapped {",
            "\t\ttype filter hook postrouting priority srcnat + 1;",
            '\t\toifname "wan" ct direction original update @fullcone'
            " { udp sport : ct original ip saddr . ct original proto-src }",
            '\t\toifname "wan" ct direction reply update @fullcone'
            " { udp sport : ct reply ip saddr . ct reply proto-src }",
            "\t}",
            "\tchain prerouting {",
            "\t\ttype nat hook prerouting priority dstnat;",
            '\t\tiifname "wan" dnat ip to udp dport map @fullcone',
            "\t}",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def loss_ruleset(table: str, port: str, percent: int) -> str:
    """Replace a bridge table dropping ``percent``% of IPv4 frames both ways on a port."""
    script = f"table bridge {table} {{}}\ndelete table bridge {table}\n"
    if percent:
        script += (
            f"table bridge {table} {{\n"
            "\tchain forward {\n"
            "\t\ttype filter hook forward priority filter;\n"
            f'\t\tmeta protocol ip iifname "{port}" numgen random mod 100 < {percent} drop\n'
            f'\t\tmeta protocol ip oifname "{port}" numgen random mod 100 < {percent} drop\n'
            "\t}\n"
            "}\n"
        )
    return script


class Host:
    """One machine of the lab: a namespace with a single ``eth0``."""

    def __init__(self, lab: Lab, name: str, netns: str, address: str) -> None:
        self.name = name
        self.netns = netns
        self.address = address
        self._lab = lab

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address} in {self.netns}>"

    def run(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this host; the lab kills it on teardown.

        It gets its own session (unless ``start_new_session`` says otherwise)
        so that teardown can signal its whole process group.
        """
        return self._lab._spawn(self.netns, argv, popen_kwargs)

    def check_output(
        self, argv: Sequence[str], *, timeout: float = 30.0, input: str | None = None
    ) -> str:
        """Run ``argv`` inside this host to completion and return its stdout.

        Raises ``subprocess.CalledProcessError`` (with ``.stderr``) on failure
        and ``subprocess.TimeoutExpired`` after killing it on timeout.
        """
        self._lab._check_open()
        done = subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return done.stdout


class Site:
    """A NAT (and for ``cgnat`` its carrier NAT) with hosts on its LAN."""

    def __init__(
        self,
        lab: Lab,
        name: str,
        profile: Profile,
        nat_netns: str,
        carrier_netns: str | None,
        public_address: str,
        wan_address: str,
        bridge_port: str,
    ) -> None:
        self.name = name
        self.profile = profile
        self.nat_netns = nat_netns
        self.carrier_netns = carrier_netns
        self.public_address = public_address
        self.wan_address = wan_address
        self.hosts: list[Host] = []
        self._lab = lab
        self._bridge_port = bridge_port
        self._loss = 0
        #: Where miniupnpd logs, for a ``miniupnpd`` site.
        self.miniupnpd_log: Path | None = None

    def __repr__(self) -> str:
        return f"<Site {self.name} {self.profile} {self.public_address}>"

    @property
    def loss(self) -> int:
        """Percentage of IPv4 packets dropped each way on the internet link."""
        return self._loss

    def set_loss(self, percent: int) -> None:
        """Drop ``percent``% of packets in each direction on the site's internet link.

        The drop happens on the internet bridge port, outside the NAT, so the
        NAT's state evolves as if the packets had been lost on the wire.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"loss must be a percentage, got {percent}")
        self._lab._check_open()
        _nft(self._lab.inet_netns, loss_ruleset(f"loss_{self.name}", self._bridge_port, percent))
        self._loss = percent

    def block_udp(self, blocked: bool = True) -> None:
        """
        Drop (or stop dropping) every UDP packet the site's hosts send out,
        as an office firewall that lets only TCP through would.  The rule
        sits in the NAT's forward path, before any mapping is made.
        """
        self._lab._check_open()
        script = "table inet block_udp {}\ndelete table inet block_udp\n"
        if blocked:
            script += (
                "table inet block_udp {\n"
                "\tchain forward {\n"
                "\t\ttype filter hook forward priority filter - 10;\n"
                '\t\tiifname "lan" meta l4proto udp drop\n'
                "\t}\n"
                "}\n"
            )
        _nft(self.nat_netns, script)

    def port_mappings(self) -> list[str]:
        """The DNAT rules miniupnpd keeps for a ``miniupnpd`` site, one per mapping."""
        self._lab._check_open()
        listing = _run(
            [
                "ip",
                "netns",
                "exec",
                self.nat_netns,
                "nft",
                "list",
                "chain",
                "inet",
                "miniupnpd",
                "prerouting_miniupnpd",
            ]
        )
        return [line.strip() for line in listing.splitlines() if "dnat" in line]

    def flush_conntrack(self) -> None:
        """Forget every mapping of the site's (home) NAT, as a router reboot would."""
        self._lab._check_open()
        _run(["ip", "netns", "exec", self.nat_netns, "conntrack", "-F"])
        if self.profile == "full-cone":
            _nft(self.nat_netns, "flush map ip punchd fullcone\n")


class Lab:
    """A disposable set of namespaces; use as a context manager.

    >>> with Lab() as lab:                                  # doctest: +SKIP
    ...     alice = lab.add_site("alice", "cone").hosts[0]
    ...     print(alice.check_output(["ip", "route"]))
    """

    rendezvous_host: Host
    """A public host named ``rv`` at :data:`RENDEZVOUS_ADDRESS`."""

    def __init__(self) -> None:
        self.prefix = ""
        self.inet_netns = ""
        self.sites: dict[str, Site] = {}
        self.public_hosts: dict[str, Host] = {}
        self._names: set[str] = set()
        self._netns: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock_fd: int | None = None
        self._next_public = 11
        self._next_port = 0
        self._carriers = 0
        self._closed = False
        self._stun_started = False

    # -- lifecycle -------------------------------------------------------

    def __enter__(self) -> Lab:
        if self._lock_fd is not None or self._closed:
            raise LabError("a Lab can be entered only once")
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise LabError(reason)
        cleanup_stale()
        self.prefix, self._lock_fd = _take_lock()
        _open_labs.add(self)
        _install_exit_handlers()
        self.tmpdir.mkdir(mode=0o700)
        self.inet_netns = self._new_netns("inet")
        _ip(
            self.inet_netns,
            "link add br0 type bridge",
            f"addr add {GATEWAY}/{INTERNET.prefixlen} dev br0",
            "link set br0 up",
        )
        self.rendezvous_host = self._add_public_host("rv", RENDEZVOUS_ADDRESS)

    def close(self) -> None:
        """Kill the lab's processes and delete its namespaces and files; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            with _signals_deferred():
                clean = False
                try:
                    self._stop_processes()
                    _delete_netns(self._netns)
                    if self.prefix:
                        shutil.rmtree(self.tmpdir, ignore_errors=True)
                    clean = not set(self._netns) & set(_list_netns())
                finally:
                    if self._lock_fd is not None:
                        # Left in place unless clean, so cleanup_stale finishes the job.
                        _release_lock(self.prefix, self._lock_fd, remove=clean)
                        self._lock_fd = None
                    _open_labs.discard(self)
        finally:
            # After a deferred signal was delivered to the handlers it found.
            if not _open_labs:
                _restore_exit_handlers()

    def _check_open(self) -> None:
        if self._closed or self._lock_fd is None:
            raise LabError("the lab is not running")

    @property
    def tmpdir(self) -> Path:
        """A private directory for configs and sockets, removed with the lab."""
        return STATE_DIR / self.prefix

    @property
    def netns_names(self) -> list[str]:
        """Every namespace this lab created, in creation order."""
        return list(self._netns)

    # -- building --------------------------------------------------------

    def add_public_host(self, name: str) -> Host:
        """Add a host with an address directly on the internet."""
        self._check_open()
        return self._add_public_host(name, str(INTERNET[self._take_public_index()]))

    def add_site(
        self,
        name: str,
        profile: Profile,
        hosts: int | None = None,
        *,
        loss: int = 0,
        wan_input: WanInput = "drop",
        isp_router: bool = False,
    ) -> Site:
        """Add a NAT of the given profile with ``hosts`` hosts on its LAN.

        ``hosts`` defaults to 2 for ``same-lan`` and 1 otherwise; hosts are
        named ``<site>1``, ``<site>2``...  Each ``cgnat`` site has a carrier
        NAT of its own.  ``wan_input`` is the policy of the (home) NAT's input
        chain for unsolicited traffic, see :func:`nat_ruleset`.  ``loss`` is
        :meth:`Site.set_loss` from the start.  ``isp_router`` puts a router
        of the site's own between its NAT and the internet, as an ISP's is on
        any real path: a hop that decrements the TTL, so a datagram can run
        out of TTL after leaving the site's NAT and before reaching another
        site's (:meth:`_add_isp_router`).
        """
        self._check_open()
        if profile not in PROFILES:
            raise ValueError(f"unknown NAT profile {profile!r}; choose from {PROFILES}")
        if wan_input not in get_args(WanInput):
            raise ValueError(f"wan_input must be 'drop' or 'accept', got {wan_input!r}")
        count = hosts if hosts is not None else (2 if profile == "same-lan" else 1)
        if not 1 <= count <= SITE_LANS[0].num_addresses - 3:
            raise ValueError(f"a site has 1 to 13 hosts, not {count}")
        if profile == "same-lan" and count < 2:
            raise ValueError("a same-lan site needs at least two hosts")
        if not 0 <= loss <= 100:
            raise ValueError(f"loss must be a percentage, got {loss}")
        if len(self.sites) >= len(SITE_LANS):
            raise LabError("no LAN prefix left for another site")
        self._check_names([name, *(f"{name}{i}" for i in range(1, count + 1))])
        lan = SITE_LANS[len(self.sites)]
        public = str(INTERNET[self._take_public_index()])

        nat = self._new_netns(f"{name}-nat", forwarding=True)
        carrier: str | None = None
        outside = self._add_isp_router if isp_router else self._plug
        if profile == "cgnat":
            carrier = self._new_netns(f"{name}-cgn", forwarding=True)
            port = outside(carrier, "wan", public)
            link = CARRIER_LINKS[self._carriers]
            self._carriers += 1
            wan = str(link[2])
            _ip(
                carrier,
                f"link add lan type veth peer name wan netns {nat}",
                f"addr add {link[1]}/{link.prefixlen} dev lan",
                "link set lan up",
            )
            _ip(
                nat,
                f"addr add {wan}/{link.prefixlen} dev wan",
                "link set wan up",
                f"route add default via {link[1]}",
            )
            _nft(carrier, nat_ruleset("cone"))
        else:
            port = outside(nat, "wan", public)
            wan = public
        _ip(
            nat,
            "link add lan type bridge",
            f"addr add {lan[1]}/{lan.prefixlen} dev lan",
            "link set lan up",
        )
        _nft(nat, nat_ruleset(profile, wan_input))

        site = Site(self, name, profile, nat, carrier, public, wan, port)
        self.sites[name] = site
        for i in range(1, count + 1):
            host_name = f"{name}{i}"
            netns = self._new_netns(host_name)
            address = str(lan[1 + i])
            _ip(
                nat,
                f"link add h{i} type veth peer name eth0 netns {netns}",
                f"link set h{i} master lan",
                f"link set h{i} up",
            )
            _ip(
                netns,
                f"addr add {address}/{lan.prefixlen} dev eth0",
                "link set eth0 up",
                f"route add default via {lan[1]}",
            )
            site.hosts.append(Host(self, host_name, netns, address))
        if profile == "miniupnpd":
            self._start_miniupnpd(site, str(lan))
        if loss:
            site.set_loss(loss)
        return site

    def _start_miniupnpd(self, site: Site, lan: str) -> None:
        """Run miniupnpd in the site's NAT, once it has found its WAN open."""
        if shutil.which("miniupnpd") is None:
            raise LabError("the miniupnpd profile needs miniupnpd (Debian: miniupnpd-nftables)")
        if not self._stun_started:
            argv = [sys.executable, "-m", "netlab.upnp", "stun", str(upnp.STUN_PORT)]
            self._spawn(self.inet_netns, argv, {"stdout": subprocess.DEVNULL})
            self._stun_started = True
        directory = self.tmpdir / f"{site.name}-upnp"
        directory.mkdir()
        config = directory / "miniupnpd.conf"
        config.write_text(upnp.miniupnpd_config(directory, GATEWAY, lan, str(uuid.uuid4())))
        _nft(site.nat_netns, upnp.MINIUPNPD_TABLES)
        site.miniupnpd_log = directory / "log"
        argv = ["miniupnpd", "-d", "-f", str(config), "-P", str(directory / "pid")]
        with open(site.miniupnpd_log, "wb") as log:
            self._spawn(site.nat_netns, argv, {"stdout": log, "stderr": subprocess.STDOUT})
        deadline = time.monotonic() + _COMMAND_TIMEOUT
        while "Listening for NAT-PMP" not in site.miniupnpd_log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise LabError(f"miniupnpd did not start: {site.miniupnpd_log.read_text()}")
            time.sleep(0.05)

    def _check_names(self, names: list[str]) -> None:
        for name in names:
            if not _NAME_RE.fullmatch(name):
                raise ValueError(f"names are 1-12 of [a-z0-9] starting with a letter: {name!r}")
            if name in self._names:
                raise ValueError(f"the lab already has something named {name!r}")
        self._names.update(names)

    def _take_public_index(self) -> int:
        """Next free internet address index; .1 is the gateway, .10 the rendezvous."""
        if self._next_public >= INTERNET.num_addresses - 1:
            raise LabError("the internet is full")
        self._next_public += 1
        return self._next_public - 1

    def _add_public_host(self, name: str, address: str) -> Host:
        self._check_names([name])
        netns = self._new_netns(name)
        self._plug(netns, "eth0", address)
        host = Host(self, name, netns, address)
        self.public_hosts[name] = host
        return host

    def _new_netns(self, suffix: str, *, forwarding: bool = False) -> str:
        """Create a namespace with lo up and no IPv6 (so no stray link-local candidates)."""
        netns = f"{self.prefix}-{suffix}"
        _run(["ip", "netns", "add", netns])
        self._netns.append(netns)
        sysctls = [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
            f"net.ipv4.ip_forward={int(forwarding)}",
        ]
        _run(["ip", "netns", "exec", netns, "sysctl", "-q", "-e", "-w", *sysctls])
        _ip(netns, "link set lo up")
        return netns

    def _plug(self, netns: str, ifname: str, address: str) -> str:
        """Connect ``ifname`` in ``netns`` to the internet bridge; return the bridge port."""
        port = f"p{self._next_port}"
        self._next_port += 1
        _ip(netns, f"link add {ifname} type veth peer name {port} netns {self.inet_netns}")
        _ip(self.inet_netns, f"link set {port} master br0", f"link set {port} up")
        _ip(
            netns,
            f"addr add {address}/{INTERNET.prefixlen} dev {ifname}",
            f"link set {ifname} up",
            f"route add default via {GATEWAY}",
        )
        return port

    def _add_isp_router(self, netns: str, ifname: str, address: str) -> str:
        """
        Connect ``ifname`` in ``netns`` to the internet through a router of
        its own; return the router's bridge port.

        The router has an internet address of its own and answers ARP for
        ``address`` (proxy ARP), which it routes to ``netns`` over a
        point-to-point veth: ``address`` stays on the internet's /24 for
        everyone else, one hop further away.
        """
        router = self._new_netns(f"{netns.removeprefix(self.prefix + '-')}-isp", forwarding=True)
        router_address = str(INTERNET[self._take_public_index()])
        port = self._plug(router, "wan", router_address)
        # Proxy ARP answers after a random delay of up to 0.8 s by default.
        sysctls = ["net.ipv4.conf.wan.proxy_arp=1", "net.ipv4.neigh.wan.proxy_delay=0"]
        _run(["ip", "netns", "exec", router, "sysctl", "-q", "-w", *sysctls])
        _ip(
            router,
            f"link add cust type veth peer name {ifname} netns {netns}",
            "link set cust up",
            f"route add {address}/32 dev cust",
        )
        _ip(
            netns,
            f"addr add {address}/32 dev {ifname}",
            f"link set {ifname} up",
            f"route add {router_address}/32 dev {ifname}",
            f"route add default via {router_address}",
        )
        return port

    # -- processes -------------------------------------------------------

    def _spawn(
        self, netns: str, argv: Sequence[str], popen_kwargs: dict[str, Any]
    ) -> subprocess.Popen[Any]:
        self._check_open()
        popen_kwargs.setdefault("start_new_session", True)
        popen_kwargs["env"] = child_env(popen_kwargs.get("env"))
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv], **popen_kwargs
        )
        self._procs.append(proc)
        return proc

    def _stop_processes(self) -> None:
        """SIGTERM every process group we started, then SIGKILL what lingers."""
        running = [p for p in self._procs if p.poll() is None]
        for proc in running:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + _TERM_GRACE
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(_KILL_GRACE)
        # The rest of a group (a shell's children) gets the same grace to
        # finish its SIGTERM handling before the sweep kills it.
        while any(_group_alive(p) for p in running) and time.monotonic() < deadline:
            time.sleep(0.02)
        _kill_netns_processes(self._netns)


def _group_alive(proc: subprocess.Popen[Any]) -> bool:
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    return True


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)


# -- namespaces, processes and locks shared with cleanup_stale -------------


def _netns_ids(names: Sequence[str]) -> set[tuple[int, int]]:
    ids = set()
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(NETNS_DIR / name)
            ids.add((st.st_dev, st.st_ino))
    return ids


def _pids_in(ids: set[tuple[int, int]]) -> list[int]:
    """Processes whose network namespace is one of ``ids`` (zombies have none)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{entry.name}/ns/net")
                if (st.st_dev, st.st_ino) in ids:
                    pids.append(int(entry.name))
    return pids


def _kill_netns_processes(names: Sequence[str]) -> None:
    """SIGKILL whatever still runs in these namespaces (daemons that escaped)."""
    ids = _netns_ids(names)
    if not ids:
        return
    deadline = time.monotonic() + _KILL_GRACE
    while (pids := _pids_in(ids)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def _delete_netns(names: Sequence[str]) -> None:
    if names:
        commands = "".join(f"netns delete {name}\n" for name in names)
        with contextlib.suppress(LabError):
            _run(["ip", "-force", "-batch", "-"], commands)


def _lock_path(prefix: str) -> Path:
    return STATE_DIR / f"{prefix}.lock"


def _take_lock() -> tuple[str, int]:
    """Pick a fresh prefix and hold its lock file for the lab's lifetime."""
    STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    for _ in range(16):
        prefix = "pl" + secrets.token_hex(3)
        path = _lock_path(prefix)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # A concurrent cleanup_stale may have unlinked it just before.
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                os.write(fd, f"{os.getpid()}\n".encode())  # for humans only
                return prefix, fd
        except OSError:
            pass
        os.close(fd)
    raise LabError(f"could not take a lab lock in {STATE_DIR}")


def _release_lock(prefix: str, fd: int, *, remove: bool) -> None:
    if remove:
        _lock_path(prefix).unlink(missing_ok=True)
    os.close(fd)


def _list_netns() -> list[str]:
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line]


def cleanup_stale() -> list[str]:
    """Delete what labs killed before they could clean up left behind.

    Only prefixes that have a lock file in :data:`STATE_DIR` which nobody
    holds any more are touched (a live lab holds its lock, and namespaces of
    other tools never have one): their processes, namespaces and files.
    Returns the namespaces deleted.
    """
    if not STATE_DIR.is_dir():
        return []
    deleted: list[str] = []
    for path in sorted(STATE_DIR.glob("pl*.lock")):
        prefix = path.name.removesuffix(".lock")
        if not _PREFIX_RE.fullmatch(prefix):
            continue
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its lab is alive
            names = [n for n in _list_netns() if n.startswith(prefix + "-")]
            _kill_netns_processes(names)
            _delete_netns(names)
            shutil.rmtree(STATE_DIR / prefix, ignore_errors=True)
            path.unlink(missing_ok=True)
            deleted += names
        finally:
            os.close(fd)
    return deleted


# -- signals and interpreter exit ------------------------------------------

_open_labs: set[Lab] = set()
_saved_handlers: dict[int, Any] = {}


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    """Unwind the stack so that ``with Lab()`` blocks clean up."""
    raise SystemExit(128 + signum)


def _install_exit_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _TERM_SIGNALS:
        if sig not in _saved_handlers and signal.getsignal(sig) == signal.SIG_DFL:
            _saved_handlers[sig] = signal.signal(sig, _exit_on_signal)


def _restore_exit_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in list(_saved_handlers.items()):
        if signal.getsignal(sig) is _exit_on_signal:
            signal.signal(sig, handler)
        del _saved_handlers[sig]


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM/SIGHUP until a teardown has finished, then deliver them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def defer(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    saved = {}
    for sig in _DEFERRED_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is not None:
            saved[sig] = signal.signal(sig, defer)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_open_labs):
        lab.close()

"""Each NAT profile of the lab behaves as its name claims, and the lab cleans up.

One lab serves the behaviour tests; every test uses its own local ports so
that conntrack state from one test cannot help or hinder another.
"""

import ipaddress
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netlab import child_env
from netlab.lab import (
    CARRIER_LINKS,
    INTERNET,
    RENDEZVOUS_ADDRESS,
    STATE_DIR,
    Lab,
    cleanup_stale,
)
from netlab.udp import Address, Reflector, UdpEndpoint

pytestmark = pytest.mark.netlab

QUIET = 0.5  # nothing more arrives after this long on veth links


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        lab.add_public_host("a")
        lab.add_public_host("b")
        lab.add_site("cone", "cone")
        lab.add_site("full", "full-cone")
        lab.add_site("sym", "symmetric")
        lab.add_site("lan", "same-lan")
        lab.add_site("cg", "cgnat")
        lab.add_site("open", "cone", wan_input="accept")
        lab.add_site("lossy", "cone", loss=50)
        yield lab


@pytest.fixture(scope="module")
def reflectors(lab: Lab) -> Iterator[tuple[Address, Address]]:
    with Reflector(lab.rendezvous_host, 3478) as r1, Reflector(lab.public_hosts["a"], 3478) as r2:
        yield r1.address, r2.address


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line}


#: How long a child may take to tear its lab down on a machine busy with other work.
DEADLINE = 60.0


def poll(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def sources(datagrams: list[tuple[Address, bytes]]) -> list[Address]:
    return [source for source, _ in datagrams]


def test_addresses_come_from_documentation_prefixes(lab: Lab) -> None:
    assert lab.rendezvous_host.address == RENDEZVOUS_ADDRESS
    cg = lab.sites["cg"]
    assert ipaddress.ip_address(cg.public_address) in INTERNET
    assert any(ipaddress.ip_address(cg.wan_address) in link for link in CARRIER_LINKS)
    for site in lab.sites.values():
        for host in site.hosts:
            assert ipaddress.ip_address(host.address) in ipaddress.ip_network("192.0.2.0/24")
    assert all(name.startswith(lab.prefix + "-") for name in lab.netns_names)


def test_cone_keeps_one_mapping_for_every_destination(
    lab: Lab, reflectors: tuple[Address, Address]
) -> None:
    site = lab.sites["cone"]
    with UdpEndpoint(site.hosts[0], 41001) as e:
        seen = {e.mapped_address(r) for r in reflectors}
    assert seen == {(site.public_address, 41001)}


def test_symmetric_maps_each_destination_to_another_port(
    lab: Lab, reflectors: tuple[Address, Address]
) -> None:
    site = lab.sites["sym"]
    with UdpEndpoint(site.hosts[0], 41002) as e:
        (ip1, port1), (ip2, port2) = (e.mapped_address(r) for r in reflectors)
    assert ip1 == ip2 == site.public_address
    assert port1 != port2


def test_cone_lets_in_only_the_endpoint_it_sent_to(lab: Lab) -> None:
    site = lab.sites["cone"]
    a, b = lab.public_hosts["a"], lab.public_hosts["b"]
    with (
        UdpEndpoint(site.hosts[0], 41003) as inside,
        UdpEndpoint(a, 5000) as peer,
        UdpEndpoint(a, 5001) as peer_other_port,
        UdpEndpoint(b, 5000) as stranger,
    ):
        inside.send((a.address, 5000), b"out")
        got = peer.recv()
        assert got is not None
        mapped = got[0]
        stranger.send(mapped, b"unsolicited")
        peer_other_port.send(mapped, b"other port")
        peer.send(mapped, b"reply")
        assert inside.recv_all(QUIET) == [((a.address, 5000), b"reply")]


def test_full_cone_lets_anyone_in_once_mapped(
    lab: Lab, reflectors: tuple[Address, Address]
) -> None:
    site = lab.sites["full"]
    b = lab.public_hosts["b"]
    with UdpEndpoint(site.hosts[0], 41004) as inside, UdpEndpoint(b, 5002) as stranger:
        stranger.send((site.public_address, 41004), b"too early")
        assert inside.recv_all(QUIET) == []
        mapped = inside.mapped_address(reflectors[0])
        stranger.send(mapped, b"hello")
        assert inside.recv_all(QUIET) == [((b.address, 5002), b"hello")]
        site.flush_conntrack()
        stranger.send(mapped, b"after reboot")
        assert inside.recv_all(QUIET) == []


def test_same_lan_hosts_talk_directly_and_share_a_public_address(
    lab: Lab, reflectors: tuple[Address, Address]
) -> None:
    site = lab.sites["lan"]
    h1, h2 = site.hosts
    with UdpEndpoint(h1, 41005) as e1, UdpEndpoint(h2, 41005) as e2:
        e1.send((h2.address, 41005), b"neighbour")
        assert e2.recv_all(QUIET) == [((h1.address, 41005), b"neighbour")]
        assert e1.mapped_address(reflectors[0])[0] == site.public_address
        assert e2.mapped_address(reflectors[0])[0] == site.public_address


def test_cgnat_is_two_nats_seen_from_the_carrier_address(
    lab: Lab, reflectors: tuple[Address, Address]
) -> None:
    site = lab.sites["cg"]
    assert site.carrier_netns is not None
    with UdpEndpoint(site.hosts[0], 41006) as e:
        seen = e.mapped_address(reflectors[0])
        carrier_flows = subprocess.run(
            ["ip", "netns", "exec", site.carrier_netns, "conntrack", "-L", "-p", "udp"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    assert seen[0] == site.public_address
    # The carrier only ever sees the home NAT's translated address.
    assert f"src={site.wan_address} dst={reflectors[0][0]}" in carrier_flows
    assert "src=192.0.2." not in carrier_flows


def test_loss_drops_about_the_share_asked_and_can_be_changed(lab: Lab) -> None:
    site = lab.sites["lossy"]
    a = lab.public_hosts["a"]
    with UdpEndpoint(site.hosts[0], 41007) as inside, UdpEndpoint(a, 5003) as sink:
        for i in range(200):
            inside.send((a.address, 5003), str(i).encode())
        lossy = len(sink.recv_all(QUIET))
        site.set_loss(0)
        try:
            for i in range(100):
                inside.send((a.address, 5003), str(i).encode())
            clean = len(sink.recv_all(QUIET))
        finally:
            site.set_loss(50)
    assert 55 <= lossy <= 145, f"{lossy} of 200 arrived through 50% loss"
    assert clean == 100
    assert site.loss == 50


@pytest.mark.parametrize(("site_name", "moved"), [("cone", False), ("open", True)])
def test_early_probe_moves_the_mapping_only_if_input_accepts_it(
    lab: Lab, site_name: str, moved: bool
) -> None:
    site = lab.sites[site_name]
    a = lab.public_hosts["a"]
    with UdpEndpoint(site.hosts[0], 41008) as inside, UdpEndpoint(a, 5004) as peer:
        peer.send((site.public_address, 41008), b"early probe")
        assert inside.recv_all(QUIET) == []
        inside.send((a.address, 5004), b"late probe")
        got = peer.recv()
    assert got is not None
    source, _ = got
    assert source[0] == site.public_address
    assert (source[1] != 41008) is moved


def test_flush_conntrack_forgets_the_mapping(lab: Lab) -> None:
    site = lab.sites["cone"]
    a = lab.public_hosts["a"]
    with UdpEndpoint(site.hosts[0], 41009) as inside, UdpEndpoint(a, 5005) as peer:
        inside.send((a.address, 5005), b"open")
        got = peer.recv()
        assert got is not None
        peer.send(got[0], b"before")
        assert sources(inside.recv_all(QUIET)) == [(a.address, 5005)]
        site.flush_conntrack()
        peer.send(got[0], b"after")
        assert inside.recv_all(QUIET) == []


def test_teardown_removes_namespaces_files_and_processes() -> None:
    with Lab() as lab:
        host = lab.add_site("s", "cone").hosts[0]
        names = lab.netns_names
        sleeper = host.run(["sleep", "300"])
        escaper = host.run(
            ["sh", "-c", "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $!"],
            stdout=subprocess.PIPE,
            text=True,
        )
        escaped_pid = int(escaper.communicate(timeout=DEADLINE)[0])
        assert alive(escaped_pid)
        assert set(names) <= namespaces()
    assert not set(names) & namespaces()
    assert sleeper.poll() is not None
    assert not alive(escaped_pid)
    assert not lab.tmpdir.exists()
    assert not (STATE_DIR / f"{lab.prefix}.lock").exists()


def test_teardown_asks_whole_process_groups_to_stop(tmp_path: Path) -> None:
    marker = tmp_path / "stopped"
    inner = tmp_path / "inner.sh"
    inner.write_text(f"trap 'echo bye > {marker}; exit 0' TERM\nsleep 300 &\necho ready\nwait\n")
    with Lab() as lab:
        host = lab.add_site("s", "cone").hosts[0]
        leader = host.run(["sh", "-c", f"sh {inner} & wait"], stdout=subprocess.PIPE, text=True)
        assert leader.stdout is not None
        assert leader.stdout.readline() == "ready\n"
    # The grandchild got SIGTERM with its group, not just the SIGKILL sweep.
    assert marker.read_text() == "bye\n"


def test_an_exception_inside_the_with_still_tears_down() -> None:
    names: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        lab.add_site("s", "symmetric")
        names = lab.netns_names
        raise RuntimeError("boom")
    assert names
    assert not set(names) & namespaces()


CHILD = textwrap.dedent(
    """
    import sys, time
    from netlab.lab import Lab
    with Lab() as lab:
        host = lab.add_site("s", "cone").hosts[0]
        sleeper = host.run(["sleep", "300"])
        print(lab.prefix, sleeper.pid, flush=True)
        time.sleep(300)  # until the test's signal
    """
)


def start_child() -> tuple[subprocess.Popen[str], str, int]:
    """A separate process owning a lab; returns it, the lab prefix and a pid in the lab."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=child_env(),
    )
    assert child.stdout is not None
    prefix, pid = child.stdout.readline().split()
    return child, prefix, int(pid)


def lab_namespaces(prefix: str) -> set[str]:
    return {name for name in namespaces() if name.startswith(prefix + "-")}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_tears_the_lab_down(sig: signal.Signals) -> None:
    child, prefix, pid = start_child()
    try:
        assert lab_namespaces(prefix)
        os.kill(child.pid, sig)
        child.wait(DEADLINE)
    finally:
        child.kill()
        child.wait()
    assert lab_namespaces(prefix) == set()
    poll(lambda: not alive(pid), "the lab's process to be gone")


SLOW_TEARDOWN_CHILD = textwrap.dedent(
    """
    import subprocess, sys
    from netlab.lab import Lab
    marker = sys.argv[1]
    # Notes teardown's SIGTERM in the marker file, then ignores it: costs
    # teardown its grace time.
    script = (
        f"trap 'echo term > {marker}; trap \\"\\" TERM' TERM; echo ready; "
        "while :; do sleep 0.1; done"
    )
    with Lab() as lab:
        host = lab.add_site("s", "cone").hosts[0]
        sh = host.run(["sh", "-c", script], stdout=subprocess.PIPE, text=True)
        assert sh.stdout.readline() == "ready\\n"
        print(lab.prefix, flush=True)
    """
)


def test_a_signal_during_teardown_waits_until_it_is_done(tmp_path: Path) -> None:
    marker = tmp_path / "term"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_TEARDOWN_CHILD, str(marker)],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert child.stdout is not None
    try:
        prefix = child.stdout.readline().strip()
        # Teardown has sent SIGTERM and now waits for the process that ignores it.
        poll(marker.exists, "teardown to signal the lab's processes")
        os.kill(child.pid, signal.SIGTERM)
        assert child.wait(DEADLINE) == 128 + signal.SIGTERM
        left = lab_namespaces(prefix)
    finally:
        child.kill()
        child.wait()
        cleanup_stale()  # what an interrupted teardown left, so that it cannot leak
    assert prefix and left == set()


def test_interpreter_exit_tears_down_a_lab_left_open() -> None:
    script = (
        "import sys\n"
        "from netlab.lab import Lab\n"
        "lab = Lab().__enter__()\n"
        "lab.add_site('s', 'cone')\n"
        "print(lab.prefix, flush=True)\n"
        "sys.exit(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=child_env(), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 3, done.stderr
    prefix = done.stdout.strip()
    assert prefix and lab_namespaces(prefix) == set()


def test_cleanup_stale_removes_killed_labs_only(lab: Lab) -> None:
    foreign = f"pl{os.urandom(3).hex()}-foreign"  # our pattern, but no lock file
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        child, prefix, pid = start_child()
        child.kill()
        child.wait()
        stale = lab_namespaces(prefix)
        assert stale and alive(pid)
        assert stale <= set(cleanup_stale())
        assert lab_namespaces(prefix) == set()
        assert not alive(pid)
        assert set(lab.netns_names) <= namespaces()
        assert foreign in namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", foreign], check=True)

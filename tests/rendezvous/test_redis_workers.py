"""
A node of two worker processes sharing one UDP port, with its directory in
Redis managed by the directory command; and the settings around them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.deployment import Deployment
from punchd.config import ConfigError, load_rendezvous_config
from punchd.keys import PrivateKey, write_private_key
from punchd.rendezvous import directory
from punchd.rendezvous.resp import RedisError, encode, parse, parse_url
from tests import wait_for
from tests.rendezvous.redis_helpers import RedisServer, Service
from tests.rendezvous.test_redis_cluster import check_tunnel, peer_names, wait_peers


def run_directory(service: Service, *args: str) -> subprocess.CompletedProcess[str]:
    node = service.nodes["big"]
    return subprocess.run(
        [sys.executable, "-m", "punchd.rendezvous.directory", "--config", str(node.config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    d = Deployment(tmp_path / "service", keepalive=2.0)
    s = Service(d, redis)
    try:
        for name in ("alice", "bob", "carol", "erin"):
            d.add_agent(name)
        s.add_node("big", workers=2, directory="redis")
        s.start_node("big")
        for name in ("alice", "bob", "carol", "erin"):
            s.point(name, "big")
            d.start_agent(name, wait=60)
        yield s
    finally:
        s.close()
        redis.stop()


def test_two_workers_share_the_port_and_introduce_across_each_other(service: Service) -> None:
    d = service.deployment
    redis = service.redis.client()
    wait_for(lambda: redis.execute("ZCARD", "punchd:nodes") == 2, 30, "both workers' heartbeats")
    assert "worker 1 started" in service.tail("big")
    wait_peers(d, "alice", ["bob", "carol", "erin"])
    for initiator, target in [
        ("alice", "bob"),
        ("bob", "carol"),
        ("carol", "erin"),
        ("erin", "alice"),
    ]:
        check_tunnel(d, initiator, target)
    # Each worker is a node: the kernel spread the four agents over them.
    holders = {redis.execute("HGET", f"punchd:agent:{n}", "node") for n in d.agents}
    assert len(holders) in (1, 2)
    # The main process's death takes its workers along.
    main = service.nodes["big"].process
    assert main is not None
    workers = children(main.pid)
    assert workers
    main.kill()
    main.wait(10)
    wait_for(
        lambda: not any(Path(f"/proc/{w}").exists() for w in workers),
        30,
        "the workers to stop with the main process",
    )


def test_the_directory_in_redis_reaches_every_worker_without_a_reload(service: Service) -> None:
    d = service.deployment
    dave = d.add_agent("dave")  # the peers file gets dave, but no node reads it again
    service.point("dave", "big")
    d.start_agent("dave", wait=0)
    time.sleep(3)
    assert d.status("dave")["registration"] != "registered"
    key = dave.key.public_key().to_base64()
    done = run_directory(service, "add", "dave", key)
    assert done.returncode == 0, done.stderr
    d.wait_registered("dave", 40)
    wait_for(lambda: "dave" in peer_names(d, "alice"), 20, "dave in alice's peers")
    check_tunnel(d, "alice", "dave")
    check_tunnel(d, "dave", "bob")
    listed = run_directory(service, "list")
    assert listed.stdout.split() == ["dave", "default", key]
    # Another agent's key is refused; removing dave drops him at once.
    clash = run_directory(service, "add", "mallory", key)
    assert clash.returncode == 1 and "already used by agent dave" in clash.stderr
    assert run_directory(service, "remove", "dave").returncode == 0
    wait_for(lambda: "dave" not in peer_names(d, "alice"), 20, "dave to leave alice's peers")


def test_import_of_a_peers_file(service: Service, tmp_path: Path) -> None:
    peers = tmp_path / "more-peers.toml"
    keys = [PrivateKey.generate().public_key().to_base64() for _ in range(3)]
    peers.write_text(
        "".join(
            f'[peers.n{i}]\npublic_key = "{k}"\nnetwork = "net{i % 2}"\n'
            for i, k in enumerate(keys)
        )
    )
    done = run_directory(service, "import", str(peers))
    assert done.returncode == 0, done.stderr
    assert "imported 3 agents (3 new or changed)" in done.stdout
    listed = run_directory(service, "list", "--network", "net0").stdout.splitlines()
    assert [line.split()[0] for line in listed] == ["n0", "n2"]


# -- settings, and the client's wire format ------------------------------------------


def write_config(tmp_path: Path, extra: str) -> Path:
    write_private_key(tmp_path / "rdv.key", PrivateKey.generate())
    (tmp_path / "peers.toml").write_text("")
    config = tmp_path / "rendezvous.toml"
    config.write_text(f'private_key = "rdv.key"\npeers = "peers.toml"\n{extra}')
    return config


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ("workers = 2\n", "workers > 1 needs registry"),
        ('directory = "redis"\n', "needs a redis registry"),
        ('registry = "redis://u:pw@127.0.0.1:6379/0"\n', "no credentials in the Redis URL"),
        ('registry = "http://127.0.0.1/"\n', 'must be "memory" or "redis://HOST:PORT/DB"'),
    ],
)
def test_bad_scale_out_settings_are_one_line_errors(tmp_path: Path, extra: str, error: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_rendezvous_config(write_config(tmp_path, extra))
    assert error in str(e.value) and "\n" not in str(e.value)
    assert "pw@" not in str(e.value)


def test_the_password_file_is_read_and_never_shown(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("agent-acl:hunter2\n")
    config = write_config(
        tmp_path, 'registry = "redis://127.0.0.1:1/3"\nredis_password_file = "pw"\n'
    )
    address = directory.redis_of(str(config))
    assert (address.username, address.password, address.db) == ("agent-acl", "hunter2", 3)
    assert "hunter2" not in repr(address) and "hunter2" not in str(address)
    assert parse_url("redis://[::1]:7000/2").port == 7000


def test_resp_replies_parse_incrementally() -> None:
    reply = b"*3\r\n$3\r\nfoo\r\n:42\r\n*2\r\n$-1\r\n+OK\r\n"
    for cut in range(len(reply)):
        _, pos = parse(reply[:cut], 0)
        assert pos == 0  # nothing consumed until the reply is whole
    assert parse(reply, 0) == ([b"foo", 42, [None, b"OK"]], len(reply))
    error, _ = parse(b"-ERR no\r\n", 0)
    assert isinstance(error, RedisError) and str(error) == "ERR no"
    assert encode(["SET", b"k", 5]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n"


def test_a_worker_stops_when_its_parent_does(tmp_path: Path) -> None:
    """
    The worker's watch on its stdin, without a rendezvous: a closed pipe ends it.
    """
    code = (
        "import sys\n"
        "from twisted.internet import reactor, stdio\n"
        "from punchd.rendezvous.workers import _ParentWatch\n"
        "stdio.StandardIO(_ParentWatch(reactor))\n"
        "reactor.run()\n"
        "print('stopped')\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    time.sleep(1)
    assert child.poll() is None
    assert child.stdin is not None
    child.stdin.close()
    assert child.wait(20) == 0
    assert child.stdout is not None and b"stopped" in child.stdout.read()

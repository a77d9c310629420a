"""
Tests for L{punchd.keys}: key text and files, X25519, HKDF derivations.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from punchd.keys import (
    KeyFileError,
    PrivateKey,
    PublicKey,
    derive_rendezvous_key,
    derive_tunnel_key,
    load_private_key,
    write_private_key,
)

# RFC 7748 section 6.1.
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")

NONCE = bytes(range(100, 116))
TUNNEL_ID = bytes(range(16))


def rfc5869_hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """
    HKDF-SHA256 written from RFC 5869 section 2, independently of the code
    under test.
    """
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """
    A permissive umask, so that a key file's mode comes from the code under
    test and not from the test runner's umask.
    """
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_rfc7748_vectors() -> None:
    alice, bob = PrivateKey(ALICE_PRIVATE), PrivateKey(BOB_PRIVATE)
    assert alice.public_key() == PublicKey(ALICE_PUBLIC)
    assert bob.public_key() == PublicKey(BOB_PUBLIC)
    assert alice.exchange(bob.public_key()) == SHARED
    assert bob.exchange(alice.public_key()) == SHARED


def test_rfc5869_helper() -> None:
    """
    The test's own HKDF matches RFC 5869 test case 1, so the known-answer
    tests below compare against something right.
    """
    okm = rfc5869_hkdf_sha256(bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_generate_is_random() -> None:
    assert PrivateKey.generate() != PrivateKey.generate()


def test_base64_round_trip() -> None:
    key = PrivateKey.generate()
    text = key.to_base64()
    assert len(text) == 44
    assert base64.b64decode(text) == key.raw
    assert PrivateKey.from_base64(text) == key
    public = key.public_key()
    assert PublicKey.from_base64(public.to_base64()) == public
    assert str(public) == public.to_base64()


def test_from_base64_ignores_surrounding_whitespace() -> None:
    key = PrivateKey.generate()
    assert PrivateKey.from_base64(f"  {key.to_base64()}\n") == key


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64 at all!",
        base64.b64encode(bytes(31)).decode(),
        base64.b64encode(bytes(33)).decode(),
        base64.b64encode(bytes(32)).decode()[:-2] + "B=",  # non-canonical trailing bits
        base64.urlsafe_b64encode(b"\xfb" * 32).decode(),  # the other alphabet
    ],
)
@pytest.mark.parametrize("cls", [PrivateKey, PublicKey])
def test_from_base64_rejects(cls: type[PrivateKey] | type[PublicKey], text: str) -> None:
    with pytest.raises(ValueError) as info:
        cls.from_base64(text)
    if text:
        assert text not in str(info.value)


@pytest.mark.parametrize("length", [0, 31, 33])
@pytest.mark.parametrize("cls", [PrivateKey, PublicKey])
def test_raw_length_checked(cls: type[PrivateKey] | type[PublicKey], length: int) -> None:
    with pytest.raises(ValueError):
        cls(bytes(length))


def test_repr_hides_private_key() -> None:
    key = PrivateKey.generate()
    for text in (repr(key), str(key), repr([key]), f"{key}"):
        assert key.to_base64() not in text
        assert key.raw.hex() not in text
        assert repr(key.raw) not in text
        assert key.public_key().to_base64() in text


@pytest.mark.parametrize(
    "u",
    [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ],
)
def test_exchange_rejects_low_order_points(u: str) -> None:
    """
    Low-order points (Curve25519's small-order list) give the all-zero
    secret, which an attacker knows too.
    """
    with pytest.raises(ValueError, match="low-order"):
        PrivateKey.generate().exchange(PublicKey(bytes.fromhex(u)))


def test_write_load_round_trip(tmp_path: Path, umask_zero: None) -> None:
    key = PrivateKey.generate()
    path = tmp_path / "agent.key"
    write_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == key.to_base64() + "\n"
    assert load_private_key(path) == key
    assert load_private_key(str(path)) == key


def test_write_refuses_to_overwrite(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.key", "precious\n")
    with pytest.raises(KeyFileError, match="already exists") as info:
        write_private_key(path, PrivateKey.generate())
    assert str(path) in str(info.value)
    assert path.read_text() == "precious\n"


def test_write_refuses_symlink(tmp_path: Path) -> None:
    """
    A planted symlink cannot redirect the key into another file.
    """
    target = write(tmp_path / "target", "")
    link = tmp_path / "agent.key"
    link.symlink_to(target)
    with pytest.raises(KeyFileError):
        write_private_key(link, PrivateKey.generate())
    assert target.read_text() == ""


def test_write_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "agent.key"
    with pytest.raises(KeyFileError, match="No such file") as info:
        write_private_key(path, PrivateKey.generate())
    assert str(path) in str(info.value)


def test_load_ignores_comments_and_blank_lines(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    path = write(tmp_path / "k", f"# punchd agent key\n\n   {key.to_base64()}  \n# end\n\n")
    assert load_private_key(path) == key


@pytest.mark.parametrize(
    ("mode", "described"),
    [
        (0o644, "readable by group, readable by others (mode 0644)"),
        (0o640, "readable by group (mode 0640)"),
        (0o604, "readable by others (mode 0604)"),
        (0o620, "writable by group (mode 0620)"),
        (0o666, "readable and writable by group, readable and writable by others"),
    ],
)
def test_load_refuses_accessible_file(tmp_path: Path, mode: int, described: str) -> None:
    key = PrivateKey.generate()
    path = write(tmp_path / "agent.key", key.to_base64() + "\n", mode)
    with pytest.raises(KeyFileError) as info:
        load_private_key(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert described in message
    assert message.endswith(f"run chmod 600 {path}")
    assert key.to_base64() not in message


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(KeyFileError) as info:
        load_private_key(path)
    assert str(info.value) == f"{path}: cannot read key file: No such file or directory"


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as info:
        load_private_key(tmp_path)
    assert str(info.value) == f"{tmp_path}: not a regular file"


@pytest.mark.timeout(10)
def test_load_fifo_does_not_hang(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    os.mkfifo(path, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_private_key(path)


def _two_keys() -> str:
    return f"{PrivateKey.generate().to_base64()}\n{PrivateKey.generate().to_base64()}\n"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "found 0"),
        ("# only a comment\n\n", "found 0"),
        (_two_keys(), "found 2"),
        ("not!base64\n", "not valid base64"),
        (base64.b64encode(bytes(16)).decode() + "\n", "got 16 bytes"),
        ("\xe9t\xe9\n", "not ASCII"),
        ("A" * 5000, "too big"),
    ],
)
def test_load_malformed(tmp_path: Path, content: str, reason: str) -> None:
    path = write(tmp_path / "agent.key", content)
    with pytest.raises(KeyFileError, match=reason) as info:
        load_private_key(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    for line in content.splitlines():
        if len(line) > 8:
            assert line not in message


def test_key_material_not_in_traceback(tmp_path: Path) -> None:
    """
    The whole traceback, chained exceptions included, holds no key text.
    """
    content = _two_keys()
    path = write(tmp_path / "agent.key", content)
    with pytest.raises(KeyFileError) as info:
        load_private_key(path)
    text = "".join(traceback.format_exception(info.value))
    for line in content.splitlines():
        assert line not in text


def test_rendezvous_key_same_at_both_ends() -> None:
    agent, server = PrivateKey.generate(), PrivateKey.generate()
    at_agent = derive_rendezvous_key(agent, server.public_key(), "alice")
    at_server = derive_rendezvous_key(server, agent.public_key(), "alice")
    assert at_agent == at_server
    assert len(at_agent) == 32


def test_rendezvous_key_bound_to_name() -> None:
    agent, server = PrivateKey.generate(), PrivateKey.generate()
    assert derive_rendezvous_key(agent, server.public_key(), "alice") != derive_rendezvous_key(
        agent, server.public_key(), "alice2"
    )


def test_rendezvous_key_known_answer() -> None:
    alice, bob = PrivateKey(ALICE_PRIVATE), PrivateKey(BOB_PRIVATE)
    expected = rfc5869_hkdf_sha256(SHARED, b"", b"punchd v1 rendezvous" + b"b\xc3\xb8b", 32)
    assert derive_rendezvous_key(alice, bob.public_key(), "b\u00f8b") == expected


def test_tunnel_key_same_at_both_ends() -> None:
    alice, bob = PrivateKey.generate(), PrivateKey.generate()
    at_alice = derive_tunnel_key(alice, bob.public_key(), TUNNEL_ID, NONCE)
    assert at_alice == derive_tunnel_key(bob, alice.public_key(), TUNNEL_ID, NONCE)
    assert len(at_alice) == 32


def test_tunnel_key_differs_per_tunnel_and_per_introduction() -> None:
    alice, bob = PrivateKey.generate(), PrivateKey.generate()
    other = bytes(15) + b"\x01"
    key = derive_tunnel_key(alice, bob.public_key(), TUNNEL_ID, NONCE)
    assert key != derive_tunnel_key(alice, bob.public_key(), other, NONCE)
    # A replayed introduction (same tunnel id) gets a fresh responder nonce.
    assert key != derive_tunnel_key(alice, bob.public_key(), TUNNEL_ID, other)


def test_tunnel_key_differs_from_rendezvous_key() -> None:
    alice, bob = PrivateKey.generate(), PrivateKey.generate()
    assert derive_tunnel_key(alice, bob.public_key(), TUNNEL_ID, NONCE) != derive_rendezvous_key(
        alice, bob.public_key(), ""
    )


def test_tunnel_key_known_answer() -> None:
    alice, bob = PrivateKey(ALICE_PRIVATE), PrivateKey(BOB_PRIVATE)
    expected = rfc5869_hkdf_sha256(SHARED, TUNNEL_ID + NONCE, b"punchd v1 tunnel", 32)
    assert derive_tunnel_key(bob, alice.public_key(), TUNNEL_ID, NONCE) == expected


@pytest.mark.parametrize("length", [0, 15, 17, 32])
def test_tunnel_id_and_nonce_lengths_checked(length: int) -> None:
    """
    A short salt would let two tunnels between two agents share a key.
    """
    alice, bob = PrivateKey.generate(), PrivateKey.generate()
    with pytest.raises(ValueError, match="16 bytes"):
        derive_tunnel_key(alice, bob.public_key(), bytes(length), NONCE)
    with pytest.raises(ValueError, match="16 bytes"):
        derive_tunnel_key(alice, bob.public_key(), TUNNEL_ID, bytes(length))


def test_derivations_reject_low_order_peer() -> None:
    key = PrivateKey.generate()
    with pytest.raises(ValueError, match="low-order"):
        derive_rendezvous_key(key, PublicKey(bytes(32)), "alice")
    with pytest.raises(ValueError, match="low-order"):
        derive_tunnel_key(key, PublicKey(bytes(32)), TUNNEL_ID, NONCE)


def test_a_key_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    path = tmp_path / "k.key"
    write_private_key(path, PrivateKey.generate())
    os.chown(path, 65534, 65534)
    with pytest.raises(KeyFileError, match="belongs to uid 65534"):
        load_private_key(path)
    os.chown(path, 0, 0)
    load_private_key(path)

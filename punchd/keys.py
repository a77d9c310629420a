"""
X25519 key pairs, key files, and HKDF-SHA256 key derivation.

Keys travel as text the way WireGuard writes them: standard base64 of the 32
raw bytes.  Private key material never appears in a repr, an exception or a
log line, so that a traceback or a debug dump cannot leak it.  The
derivations follow docs/protocol.rst ("Keys and authentication").
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import stat
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: Bytes in an X25519 key, public or private.
KEY_LENGTH = 32
#: Bytes in a tunnel id and in the responder's tunnel nonce, both salt for the tunnel key.
TUNNEL_ID_LENGTH = 16

_RENDEZVOUS_INFO = b"punchd v1 rendezvous"
_TUNNEL_INFO = b"punchd v1 tunnel"
# A key file is one line of 44 characters; anything much bigger is not one,
# and reading it whole would only waste memory.
_MAX_KEY_FILE = 4096


class KeyFileError(ValueError):
    """
    A key file cannot be written or used; the message names the file and
    says what to do, and never contains key material.
    """


def _decode_key(text: str, what: str) -> bytes:
    """
    Decode canonical base64 of exactly 32 bytes.

    Only the canonical spelling is accepted so that one key has exactly one
    text form, which admins grep for.  The input is never echoed: it may be a
    private key.
    """
    text = text.strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    if len(raw) != KEY_LENGTH:
        raise ValueError(
            f"{what} must be {KEY_LENGTH} bytes of base64 (44 characters), got {len(raw)} bytes"
        )
    if base64.b64encode(raw).decode("ascii") != text:
        raise ValueError(f"{what} is not canonical base64")
    return raw


@dataclass(frozen=True)
class PublicKey:
    """
    An X25519 public key: an identity, safe to show and log.
    """

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != KEY_LENGTH:
            raise ValueError(f"a public key is {KEY_LENGTH} bytes")

    @classmethod
    def from_base64(cls, text: str) -> PublicKey:
        return cls(_decode_key(text, "public key"))

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    def __str__(self) -> str:
        return self.to_base64()

    def __repr__(self) -> str:
        return f"PublicKey({self.to_base64()!r})"


@dataclass(frozen=True)
class PrivateKey:
    """
    An X25519 private key.  Its repr shows the public half only, so a config
    object or a failing assertion can be printed without leaking the secret.
    """

    raw: bytes = field(repr=False)
    _key: X25519PrivateKey = field(init=False, repr=False, compare=False)
    _public: PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != KEY_LENGTH:
            raise ValueError(f"a private key is {KEY_LENGTH} bytes")
        key = X25519PrivateKey.from_private_bytes(self.raw)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_public", PublicKey(key.public_key().public_bytes_raw()))

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(os.urandom(KEY_LENGTH))

    @classmethod
    def from_base64(cls, text: str) -> PrivateKey:
        return cls(_decode_key(text, "private key"))

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    def public_key(self) -> PublicKey:
        return self._public

    def exchange(self, peer: PublicKey) -> bytes:
        """
        The X25519 shared secret with C{peer}.

        A low-order peer key yields the all-zero secret, which anybody could
        compute: a peer sending one would get messages "authenticated" with a
        public value, so it is refused with L{ValueError}.
        """
        try:
            secret = self._key.exchange(X25519PublicKey.from_public_bytes(peer.raw))
        except ValueError:  # OpenSSL already refuses some low-order points itself
            secret = bytes(KEY_LENGTH)
        if hmac.compare_digest(secret, bytes(KEY_LENGTH)):
            raise ValueError("peer public key is a low-order point (all-zero shared secret)")
        return secret

    def __repr__(self) -> str:
        return f"PrivateKey(public={self._public.to_base64()!r})"

    __str__ = __repr__


def write_private_key(path: str | os.PathLike[str], key: PrivateKey) -> None:
    """
    Create C{path} holding C{key}, mode 0600.

    The file is created exclusively so an existing key (perhaps the only copy
    of an identity that peers files trust) is never clobbered, and it is
    never readable by others, not even for a moment.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{name}: already exists; refusing to overwrite a key file") from None
    except OSError as e:
        raise KeyFileError(f"{name}: cannot create key file: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(key.to_base64() + "\n")
    except OSError as e:
        os.unlink(name)
        raise KeyFileError(f"{name}: cannot write key file: {e.strerror}") from None


def _describe_access(mode: int) -> str:
    """
    Say who may touch the file, e.g. "readable by group, writable by others".
    """
    parts = []
    for who, shift in (("group", 3), ("others", 0)):
        rights = [
            verb
            for verb, bit in (("readable", 4), ("writable", 2), ("executable", 1))
            if mode >> shift & bit
        ]
        if rights:
            parts.append(" and ".join(rights) + " by " + who)
    return ", ".join(parts)


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """
    Read a private key file written by L{write_private_key} (or by hand).

    Blank lines and C{#} comment lines are ignored.  A file that group or
    others can access is refused, as ssh does, because a key others could
    read is no longer an identity.
    """
    name = os.fspath(path)
    try:
        # O_NONBLOCK: a FIFO or device put in place of the file must not hang
        # the daemon's start; it is refused below as not a regular file.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise KeyFileError(f"{name}: cannot read key file: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{name}: not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"{name}: private key file is {_describe_access(mode)} (mode {mode:04o});"
                f" run chmod 600 {name}"
            )
        if st.st_uid not in (os.geteuid(), 0):
            # As ssh does: a key someone else owns could be swapped under us.
            raise KeyFileError(
                f"{name}: private key file belongs to uid {st.st_uid}, not to this user;"
                f" run chown {os.geteuid()} {name}"
            )
        data = os.read(fd, _MAX_KEY_FILE + 1)
    except OSError as e:
        raise KeyFileError(f"{name}: cannot read key file: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"{name}: too big to be a key file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{name}: not a key file (not ASCII text)") from None
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    if len(lines) != 1:
        raise KeyFileError(
            f"{name}: expected exactly one line holding a base64 private key, found {len(lines)}"
        )
    try:
        return PrivateKey.from_base64(lines[0])
    except ValueError as e:
        raise KeyFileError(f"{name}: {e}") from None


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=32, salt=salt, info=info).derive(ikm)


def derive_rendezvous_key(own: PrivateKey, other: PublicKey, agent_name: str) -> bytes:
    """
    The 32-byte message key between agent C{agent_name} and the rendezvous.

    Both ends compute the same value (X25519 is symmetric); binding the agent
    name into it means a key registered under one name cannot speak for
    another.
    """
    return _hkdf(own.exchange(other), b"", _RENDEZVOUS_INFO + agent_name.encode("utf-8"))


def derive_tunnel_key(
    own: PrivateKey, peer: PublicKey, tunnel_id: bytes, responder_nonce: bytes
) -> bytes:
    """
    The 32-byte probe key for one tunnel between two agents.

    Salted with the initiator's tunnel id and a nonce the responder draws
    for each introduction, so that every tunnel has its own key and a
    replayed introduction cannot bring an old tunnel's probes back to life.
    Both must be the protocol's 16 bytes: a short salt would let keys repeat.
    """
    if len(tunnel_id) != TUNNEL_ID_LENGTH:
        raise ValueError(f"tunnel id must be {TUNNEL_ID_LENGTH} bytes, got {len(tunnel_id)}")
    if len(responder_nonce) != TUNNEL_ID_LENGTH:
        raise ValueError(f"nonce must be {TUNNEL_ID_LENGTH} bytes, got {len(responder_nonce)}")
    return _hkdf(own.exchange(peer), tunnel_id + responder_nonce, _TUNNEL_INFO)

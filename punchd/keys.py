"""
X25519 key pairs, key files, and HKDF-SHA256 key derivation.

# API CONTRACT (implementation pending) -- see docs/protocol.rst
#
# class KeyError_(ValueError) -> name it `KeyFileError(ValueError)`: clear message naming the file.
#
# @dataclass(frozen=True) class PrivateKey:
#     raw: bytes (32)                       repr() must NOT show the key
#     @classmethod generate() -> PrivateKey
#     @classmethod from_base64(text: str) -> PrivateKey    (raises ValueError, clear message)
#     def public_key(self) -> PublicKey
#     def exchange(self, peer: PublicKey) -> bytes        (X25519 shared secret; rejects all-zero)
#     def to_base64(self) -> str
# @dataclass(frozen=True) class PublicKey:
#     raw: bytes (32); @classmethod from_base64(text) -> PublicKey; to_base64() -> str; __str__ = base64
#
# def write_private_key(path: str | os.PathLike, key: PrivateKey) -> None
#     creates with mode 0600 (O_CREAT|O_EXCL, refuses to overwrite an existing file)
# def load_private_key(path) -> PrivateKey
#     KeyFileError if missing/unreadable/malformed, or if group/other can read it
#     ("... is readable by others (mode 0644); run chmod 600 FILE")
# def derive_rendezvous_key(own: PrivateKey, other: PublicKey, agent_name: str) -> bytes
#     HKDF-SHA256(ikm=X25519, salt=b"", info=b"punchd v1 rendezvous" + name utf-8), 32 bytes
# def derive_tunnel_key(own: PrivateKey, peer: PublicKey, tunnel_id: bytes) -> bytes
#     HKDF-SHA256(ikm=X25519, salt=tunnel_id, info=b"punchd v1 tunnel"), 32 bytes
"""

"""
The messages two agents exchange on a tunnel socket, signed with the tunnel key.

Checks, their answers, Confirm and Abandon all carry USERNAME
C{<tunnel id>:<a|b>} (a: the initiator, b: the responder) and
MESSAGE-INTEGRITY-SHA256 under a key derived from both agents' static keys,
the tunnel id and the responder's nonce, so neither the rendezvous nor a
replayed introduction can forge one (docs/protocol.rst).
"""

from __future__ import annotations

from dataclasses import dataclass

from punchd import stun, wire
from punchd.keys import PrivateKey, PublicKey, derive_tunnel_key
from punchd.stun import Attr, MessageClass, Method
from punchd.wire import CandidateKind

Address = tuple[str, int]


@dataclass(frozen=True)
class TunnelSigner:
    """
    Builds and verifies one tunnel's messages once the tunnel key is known.
    """

    key: bytes
    own_username: bytes
    peer_username: bytes

    @classmethod
    def derive(
        cls,
        own_key: PrivateKey,
        peer_key: PublicKey,
        tunnel_id: bytes,
        nonce: bytes,
        initiator: bool,
    ) -> TunnelSigner:
        id_hex = tunnel_id.hex()
        own, peer = ("a", "b") if initiator else ("b", "a")
        return cls(
            derive_tunnel_key(own_key, peer_key, tunnel_id, nonce),
            f"{id_hex}:{own}".encode("ascii"),
            f"{id_hex}:{peer}".encode("ascii"),
        )

    def _ours(
        self, method: int, cls: MessageClass, transaction_id: bytes, *extra: tuple[int, bytes]
    ) -> bytes:
        return wire.signed(
            method, cls, transaction_id, [(Attr.USERNAME, self.own_username), *extra], self.key
        )

    def check(self, transaction_id: bytes, nominate: bool) -> bytes:
        priority = (Attr.PRIORITY, stun.encode_u32(CandidateKind.PRFLX.preference << 24))
        use = [(Attr.USE_CANDIDATE, b"")] if nominate else []
        return self._ours(Method.BINDING, MessageClass.REQUEST, transaction_id, priority, *use)

    def answer(self, transaction_id: bytes, source: Address) -> bytes:
        mapped = stun.encode_xor_address(*source, transaction_id)
        return wire.signed(
            Method.BINDING,
            MessageClass.SUCCESS,
            transaction_id,
            [(Attr.XOR_MAPPED_ADDRESS, mapped)],
            self.key,
        )

    def confirm(self) -> bytes:
        return self._ours(Method.CONFIRM, MessageClass.INDICATION, stun.new_transaction_id())

    def abandon(self) -> bytes:
        return self._ours(Method.ABANDON, MessageClass.INDICATION, stun.new_transaction_id())

    def from_peer(self, message: stun.Message) -> bool:
        """
        Is C{message} a request or indication the peer's agent signed?
        """
        return message.get(Attr.USERNAME) == self.peer_username and (
            stun.verify_integrity_sha256(message, self.key)
        )

    def answered_by_peer(self, message: stun.Message) -> bool:
        """
        Is C{message} an answer to one of our checks, signed by the peer?
        """
        return message.cls == MessageClass.SUCCESS and stun.verify_integrity_sha256(
            message, self.key
        )

"""
STUN (RFC 8489) message codec: pure functions and classes, no I/O.

Parsing is strict: every rejection raises a subclass of L{StunError} saying
why, and nothing else ever escapes L{parse}, whatever bytes it is given.
"""

# API CONTRACT (implementation pending) -- see docs/protocol.rst
#
# MAGIC_COOKIE: int = 0x2112A442
# HEADER_LENGTH = 20
#
# class MessageClass(enum.IntEnum): REQUEST=0, INDICATION=1, SUCCESS=2, ERROR=3
# class Method(enum.IntEnum): BINDING=0x001, REGISTER=0x801, PEERS=0x802,
#     CONNECT=0x803, INCOMING=0x804, CONFIRM=0x805
# class Attr(enum.IntEnum): MAPPED_ADDRESS=0x0001, USERNAME=0x0006,
#     MESSAGE_INTEGRITY=0x0008, ERROR_CODE=0x0009, UNKNOWN_ATTRIBUTES=0x000A,
#     REALM=0x0014, NONCE=0x0015, MESSAGE_INTEGRITY_SHA256=0x001C,
#     XOR_MAPPED_ADDRESS=0x0020, PRIORITY=0x0024, USE_CANDIDATE=0x0025,
#     SOFTWARE=0x8022, FINGERPRINT=0x8028, ICE_CONTROLLED=0x8029,
#     ICE_CONTROLLING=0x802A,
#     SEQUENCE=0x4D01, SERVICE=0x4D02, PEER=0x4D03, TUNNEL_ID=0x4D04,
#     CANDIDATE=0x4D05, PUBLIC_KEY=0x4D06, LIFETIME=0x4D07, MORE=0x4D08
#
# class StunError(Exception)            base; str() says why
#   NotStun(StunError)                  leading bits / cookie / too short: not STUN at all
#   BadLength(StunError)                header length vs datagram, attribute overruns, padding
#   BadAttribute(StunError)             an attribute value is malformed (.attr_type)
#   BadOrdering(StunError)              attributes after MI/MI-SHA256/FINGERPRINT break RFC 8489 14.5-14.7
#   BadFingerprint(StunError)
#
# @dataclass(frozen=True, slots=True)
# class Message:
#     method: int                # 12-bit method
#     cls: MessageClass
#     transaction_id: bytes      # 12 bytes
#     attributes: tuple[tuple[int, bytes], ...]   # (type, value) in wire order,
#                                                 # INCLUDING integrity and fingerprint
#     raw: bytes                 # the exact datagram parsed (b"" for built messages)
#     def get(self, attr_type: int) -> bytes | None        # first value of that type
#     def get_all(self, attr_type: int) -> list[bytes]
#     def has(self, attr_type: int) -> bool
#     def unknown_required(self, known: Container[int]) -> list[int]
#                                # comprehension-required (< 0x8000) types not in known
#
# def parse(data: bytes) -> Message
#     Validates: >= 20 bytes, two leading zero bits, cookie, length multiple of 4
#     and equal to len(data)-20, each attribute fits, padding present (padding
#     bytes' values are ignored as RFC 8489 says), ordering: after
#     MESSAGE-INTEGRITY only MESSAGE-INTEGRITY-SHA256 or FINGERPRINT; after
#     MESSAGE-INTEGRITY-SHA256 only FINGERPRINT; after FINGERPRINT nothing.
#     FINGERPRINT, when present, must be correct (BadFingerprint).
#     MESSAGE-INTEGRITY value must be 20 bytes; MESSAGE-INTEGRITY-SHA256 16..32
#     bytes, multiple of 4.  Integrity is NOT checked here (needs a key).
#
# def verify_integrity_sha256(message: Message, key: bytes) -> bool
# def verify_integrity_sha1(message: Message, key: bytes) -> bool
#     Recompute over raw bytes up to the attribute with the header length
#     adjusted as RFC 8489 14.5/14.6 say; constant-time compare.
#     False when the attribute is absent.
#
# def build(method: int, cls: MessageClass, transaction_id: bytes,
#           attributes: Iterable[tuple[int, bytes]] = (), *,
#           integrity_sha256: bytes | None = None,
#           integrity_sha1: bytes | None = None,
#           fingerprint: bool = False) -> bytes
#     Pads attributes, appends MESSAGE-INTEGRITY (sha1) then
#     MESSAGE-INTEGRITY-SHA256 (full 32-byte HMAC) then FINGERPRINT as asked.
#
# def new_transaction_id() -> bytes           # os.urandom(12)
# def encode_xor_address(host: str, port: int, transaction_id: bytes) -> bytes
# def decode_xor_address(value: bytes, transaction_id: bytes) -> tuple[str, int]
#     IPv4 and IPv6; hosts as text (ipaddress compressed form); raises BadAttribute
# def encode_address(host, port) / decode_address(value)  (plain MAPPED-ADDRESS)
# def encode_error_code(code: int, reason: str) -> bytes
# def decode_error_code(value: bytes) -> tuple[int, str]
# def encode_unknown_attributes(types: Sequence[int]) -> bytes
# def decode_unknown_attributes(value: bytes) -> list[int]
# def encode_candidate(kind: int, host: str, port: int, transaction_id: bytes) -> bytes
# def decode_candidate(value: bytes, transaction_id: bytes) -> tuple[int, str, int]
# def encode_u32(n) / decode_u32(b), encode_u64(n) / decode_u64(b)
# def binding_response(request: bytes, host: str, port: int) -> bytes | None
#     FAST PATH for the rendezvous: given a raw datagram that is a well-formed
#     Binding request (no comprehension-required attributes other than ones a
#     plain Binding may carry), return the success response with
#     XOR-MAPPED-ADDRESS (+FINGERPRINT iff the request had one).  None when
#     the datagram is not a Binding request.  A Binding request carrying
#     unknown comprehension-required attributes gets a 420 error response with
#     UNKNOWN-ATTRIBUTES instead.  Must be fast (benchmarked at
#     ~100k/s): avoid building Message objects on this path.

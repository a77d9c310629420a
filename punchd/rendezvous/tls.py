"""
The rendezvous's TLS port, for agents on networks that let no UDP out: its
certificate, its listening socket, and the service that serves it
(docs/protocol.rst, "TLS").

Everything that can be wrong with the certificate or the port is found
while the daemon is being made, and said in one line (L{TLSSetupError}),
before anything listens.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.application import service
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger

from punchd.rendezvous.stream import StreamFactory, TLSStreamFactory

__all__ = ["TLSPortService", "TLSSetupError", "bind_tcp", "server_options"]

log = Logger()

#: Connections the kernel holds for us while the reactor is busy.
BACKLOG = 128


class TLSSetupError(Exception):
    """
    The TLS port cannot be served; C{str()} is one line saying why.
    """


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSSetupError(f"{what} {path}: cannot read: {e.strerror or e}") from None


def _private_key(path: str) -> tuple[crypto.PKey, bytes]:
    """
    The key, and its public half (DER) to match against the certificate's.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise TLSSetupError(f"tls_private_key {path}: cannot read: {e.strerror or e}") from None
    if mode & 0o007:
        raise TLSSetupError(f"tls_private_key {path}: readable by others (chmod o-rwx)")
    data = _read(path, "tls_private_key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSSetupError(f"tls_private_key {path}: encrypted; give it unencrypted") from None
    except ValueError:
        raise TLSSetupError(f"tls_private_key {path}: not a PEM private key") from None
    try:
        return crypto.PKey.from_cryptography_key(key), _public(key.public_key())  # type: ignore[arg-type]
    except (TypeError, AttributeError):
        raise TLSSetupError(f"tls_private_key {path}: not a key a certificate can hold") from None


def _certificates(path: str) -> list[x509.Certificate]:
    data = _read(path, "tls_certificate")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        chain = []
    if not chain:
        raise TLSSetupError(f"tls_certificate {path}: no PEM certificate in it")
    return chain


def _public(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def server_options(certificate: str, private_key: str, clock: IReactorTime) -> CertificateOptions:
    """
    TLS 1.2 or later, serving C{certificate} (a PEM file: the server's
    certificate first, then any intermediates) with C{private_key}; or
    L{TLSSetupError} for a file that is missing, unreadable, not PEM, or a
    key that is not the certificate's.
    """
    key, public = _private_key(private_key)
    chain = _certificates(certificate)
    if _public(chain[0].public_key()) != public:
        raise TLSSetupError(
            f"tls_private_key {private_key}: not the key of the certificate in {certificate}"
        )
    expires = chain[0].not_valid_after_utc.timestamp()
    if expires < clock.seconds():
        log.warn(
            "the TLS certificate in {path} expired on {date}",
            path=certificate,
            date=datetime.datetime.fromtimestamp(expires, datetime.UTC).isoformat(),
        )
    options = CertificateOptions(
        privateKey=key,
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    try:
        options.getContext()  # now, so that OpenSSL's objections come before listening
    except SSL.Error as e:
        raise TLSSetupError(f"{certificate}: OpenSSL refuses it: {e}") from None
    return options


def bind_tcp(interface: str, port: int, shared: bool = False) -> socket.socket:
    """
    The TLS port's socket, bound and listening at once, on the UDP port's
    interface (C{""}: all IPv4 interfaces; an IPv6 address as for UDP).
    C{shared} lets this rendezvous's other workers listen on it too.
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class TLSPortService(service.Service):
    """
    Serves TLS streams on an already listening socket while running (bound
    when the daemon is made, as the UDP port is, so that a port in use
    stops it with one line).
    """

    def __init__(
        self, sock: socket.socket, options: CertificateOptions, streams: StreamFactory, reactor: Any
    ) -> None:
        self._socket = sock
        self._factory = TLSStreamFactory(options, False, streams, reactor)
        self.streams = streams
        self._reactor = reactor
        self._port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._port = self._reactor.adoptStreamPort(
            self._socket.fileno(), self._socket.family, self._factory
        )
        self._socket.close()  # the port holds its own duplicate

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self._port = self._port, None
        self.streams.close_all()
        return None if port is None else port.stopListening()

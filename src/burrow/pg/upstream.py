"""The database leg of pgproxy: always TLS, verified against a pinned CA bundle and the
database's name (pgproxy's rule: clients need no TLS set-up of their own, and libpq's default
``sslmode=prefer`` would not verify anything). Either PostgreSQL's SSLRequest negotiation or,
for PostgreSQL 17+, direct TLS with ALPN ``postgresql``.

Also the registry of cancel keys: a CancelRequest is forwarded only with a key the database
issued on a connection that is live through this upstream.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import ssl
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from burrow.errors import ConfigError
from burrow.events import format_hostport
from burrow.pg.codec import encode_ssl_request
from burrow.pg.endpoint import Endpoint
from burrow.pg.errors import UpstreamFailed

__all__ = [
    "ALPN",
    "CONNECT_TIMEOUT",
    "CancelKeys",
    "PgUpstream",
    "open_upstream",
    "tls_context",
]

ALPN: Final = "postgresql"
CONNECT_TIMEOUT: Final = 10.0
"""Dial plus TLS handshake; pgproxy uses the same."""
MAX_CANCEL_KEYS: Final = 65536
_VERIFY_HINT: Final = (
    "pass the database's CA bundle with --upstream-ca (the RDS global bundle for RDS) and the "
    "name in its certificate with --upstream-name"
)


class CancelKeys:
    """BackendKeyData of the live connections through one upstream. Bounded: past
    ``limit`` keys the oldest is forgotten (its session can no longer be cancelled)."""

    def __init__(self, limit: int = MAX_CANCEL_KEYS) -> None:
        self.limit = limit
        self._keys: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._serial = 0

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, process_id: int, secret_key: bytes) -> tuple[int, int]:
        """Remember a key; returns the handle to ``discard`` it with."""
        self._serial += 1
        handle = (process_id, self._serial)
        self._keys[handle] = secret_key
        while len(self._keys) > self.limit:
            self._keys.popitem(last=False)
        return handle

    def discard(self, handle: tuple[int, int]) -> None:
        self._keys.pop(handle, None)

    def known(self, process_id: int, secret_key: bytes) -> bool:
        """Whether a live connection holds this key (compared in constant time)."""
        found = False
        for (pid, _), key in self._keys.items():
            if pid == process_id and hmac.compare_digest(key, secret_key):
                found = True
        return found


@dataclass(frozen=True, eq=False)
class PgUpstream:
    """Where a PostgreSQL service's connections go, and how they are secured. Build it with
    ``create`` (which loads the CA bundle once); one per service, shared by its connections,
    since its ``cancel_keys`` must see every connection's key."""

    host: str
    port: int
    tls: ssl.SSLContext
    server_name: str
    direct_tls: bool = False
    connect_timeout: float = CONNECT_TIMEOUT
    cancel_keys: CancelKeys = field(default_factory=CancelKeys)

    @classmethod
    def create(
        cls,
        address: tuple[str, int],
        *,
        ca: Path | None = None,
        name: str | None = None,
        insecure: bool = False,
        direct_tls: bool = False,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> PgUpstream:
        """Raises ``ConfigError`` for a CA bundle that cannot be loaded or contradictory
        options, so a CLI can refuse at start."""
        if insecure and ca is not None:
            raise ConfigError("--upstream-insecure and --upstream-ca contradict each other")
        host, port = address
        return cls(
            host=host,
            port=port,
            tls=tls_context(ca, insecure=insecure),
            server_name=name or host,
            direct_tls=direct_tls,
            connect_timeout=connect_timeout,
        )

    @property
    def address(self) -> str:
        return format_hostport(self.host, self.port)

    @property
    def insecure(self) -> bool:
        return self.tls.verify_mode == ssl.CERT_NONE

    def warnings(self) -> list[str]:
        """What a user must be told when starting a service on this upstream."""
        if self.insecure:
            return [
                f"the certificate of the database at {self.address} is not verified "
                "(--upstream-insecure): anyone on the path can read and change the traffic"
            ]
        return []


def tls_context(ca: Path | None, *, insecure: bool = False) -> ssl.SSLContext:
    """TLS 1.2+, ALPN ``postgresql``; trusting only ``ca`` when given (else the system's
    roots), and verifying the name unless ``insecure``."""
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (OSError, ssl.SSLError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"--upstream-ca {str(ca)!r}: cannot load it as a PEM CA bundle: {detail}"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([ALPN])
    return context


async def open_upstream(upstream: PgUpstream) -> Endpoint:
    """A TLS connection to the database, ready for a StartupMessage or a CancelRequest.
    Raises ``UpstreamFailed`` with a message that names the cause and what to check."""
    where = f"the database at {upstream.address}"
    try:
        async with asyncio.timeout(upstream.connect_timeout):
            return await _open(upstream, where)
    except UpstreamFailed:
        raise
    except ssl.SSLCertVerificationError as exc:
        detail = str(exc.verify_message or exc).rstrip(".")
        if upstream.server_name not in detail:
            detail += f" (expected name {upstream.server_name!r})"
        raise UpstreamFailed(
            f"burrow: {where} failed TLS verification: {detail}",
            hint=_VERIFY_HINT,
            reason="upstream_tls",
        ) from None
    except ssl.SSLError as exc:
        raise UpstreamFailed(
            f"burrow: the TLS handshake with {where} failed: {exc.reason or exc}",
            reason="upstream_tls",
        ) from None
    except TimeoutError:
        raise UpstreamFailed(
            f"burrow: {where} did not answer within {upstream.connect_timeout:g} s"
        ) from None
    except ConnectionRefusedError:
        raise UpstreamFailed(f"burrow: {where} refused the connection") from None
    except socket.gaierror:
        raise UpstreamFailed(f"burrow: the name {upstream.host!r} does not resolve") from None
    except OSError as exc:
        raise UpstreamFailed(f"burrow: cannot reach {where}: {exc.strerror or exc}") from None


async def _open(upstream: PgUpstream, where: str) -> Endpoint:
    loop = asyncio.get_running_loop()
    server_hostname = upstream.server_name
    if upstream.direct_tls:
        _, endpoint = await loop.create_connection(
            Endpoint,
            upstream.host,
            upstream.port,
            ssl=upstream.tls,
            server_hostname=server_hostname,
        )
        ssl_object = endpoint.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN:
            endpoint.abort()
            raise UpstreamFailed(
                f"burrow: {where} did not agree to ALPN {ALPN!r}: direct TLS needs "
                "PostgreSQL 17 or later",
                hint="drop --direct-tls to negotiate TLS with an SSLRequest",
                reason="upstream_tls",
            )
        return endpoint
    sock = await _dial(upstream.host, upstream.port)
    try:
        await loop.sock_sendall(sock, encode_ssl_request())
        # Read at most two bytes: anything after 'S' was not protected by TLS and must not
        # be taken as the server's (CVE-2021-23222).
        answer = await loop.sock_recv(sock, 2)
        if answer != b"S":
            raise UpstreamFailed(_no_tls(where, answer), reason="upstream_tls")
        _, endpoint = await loop.create_connection(
            Endpoint, sock=sock, ssl=upstream.tls, server_hostname=server_hostname
        )
        return endpoint
    except BaseException:
        sock.close()
        raise


def _no_tls(where: str, answer: bytes) -> str:
    if answer == b"N":
        return f"burrow: {where} does not accept TLS (it answered N to SSLRequest)"
    if answer == b"":
        return f"burrow: {where} closed the connection at the TLS request"
    if answer.startswith(b"E"):
        # An error before TLS is unauthenticated; its text must not be shown (CVE-2024-10977).
        return f"burrow: {where} refused the TLS request with an error"
    if answer.startswith(b"S"):
        return f"burrow: {where} sent data after agreeing to TLS (a man in the middle?)"
    return f"burrow: {where} answered the TLS request with {answer!r}: is it PostgreSQL?"


async def _dial(host: str, port: int) -> socket.socket:
    """A connected non-blocking socket, trying each address in turn."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error or OSError(f"no address for {host}")

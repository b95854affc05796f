"""What agents and connectors share: one session to a relay, kept up.

The first connection is bounded (``connect_timeout``; retries while the relay refuses, since
it may start later); after that the session is supervised: when it ends the client reconnects
with exponential backoff and jitter (capped at 30 s) and calls ``on_session`` again, so a
subclass re-registers what it offers. Refusals that retrying cannot fix (secret, certificate,
token) end the client: ``wait_failed()`` returns the error.

A client may be given several relays (the nodes of a cluster, ``--to a:7835,b:7835``, or one
name with several addresses): it connects to the first that answers and, when that session
dies, to another, the one it lost tried last. Its leases follow its identity, so the node it
lands on gives its ports and names back at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from burrow.errors import (
    AuthError,
    BurrowError,
    ConnectError,
    RelayUnavailable,
    TLSVerifyError,
    TunnelError,
)
from burrow.events import EventSink, emit, format_hostport
from burrow.net.connection import SessionConnection, new_session
from burrow.version import __version__
from burrow.wire.errors import HandshakeRejected
from burrow.wire.session import Role

log = logging.getLogger("burrow.client")

CONNECT_TIMEOUT = 10.0
#: With several relays (or addresses), the most one of them may take before the next is tried.
PER_RELAY_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0


@dataclass
class ClientConfig:
    relay: tuple[str, int]
    secret: str | None = None
    token: str | None = None  # a scoped token (``burrow token issue``)
    trust: Any = None  # burrow.net.tls.TrustPolicy; None means plaintext (--insecure)
    identity_key: Ed25519PrivateKey | None = None
    connect_timeout: float = CONNECT_TIMEOUT
    retry_forever: bool = False
    #: Every relay to try, in order (``relay`` first); empty means ``relay`` alone.
    relays: tuple[tuple[str, int], ...] = ()


class RelayClient:
    """A supervised session to one relay; subclasses say what to do on it."""

    role_name = "client"

    def __init__(self, config: ClientConfig, *, on_event: EventSink | None = None) -> None:
        self.client_config = config
        self.on_event = on_event
        #: Agents prove an identity (their leases follow it); connectors need none.
        self.identity: Ed25519PrivateKey | None = config.identity_key
        self.conn: SessionConnection | None = None
        self.failed: asyncio.Future[BurrowError] | None = None
        self._requests: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_request = 1
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._candidates: tuple[tuple[str, int], ...] = config.relays or (config.relay,)
        self._first = 0  # the candidate tried first on the next connect
        self._current = 0  # the candidate of the current (or last) session
        self._avoid: str | None = None  # the address whose session died: tried last
        #: HOST:PORT of the relay the current session is with.
        self.connected_relay: str | None = None
        self._token_prover: Callable[[bytes], tuple[str, str]] | None = None
        if config.token is not None:
            from burrow.tokens import parse_token, token_proof

            parse_token(config.token)  # a malformed token is the user's error, said now
            token = config.token
            self._token_prover = lambda transcript: token_proof(token, transcript)

    @property
    def relay_label(self) -> str:
        """The relay as the user named it (every one of them, when several)."""
        return ",".join(format_hostport(*relay) for relay in self._candidates)

    # --- hooks for subclasses ----------------------------------------------------------------

    async def on_session(self, conn: SessionConnection) -> None:
        """A session is up (first or after a reconnect): register what this client offers."""

    def on_stream(self, conn: SessionConnection, stream_id: int, info: dict[str, Any]) -> None:
        conn.reset(stream_id, "not_allowed", f"a {self.role_name} accepts no streams")

    def on_message(self, conn: SessionConnection, message: dict[str, Any]) -> None:
        """A control message that is not a reply to a request."""

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.failed = asyncio.get_running_loop().create_future()
        conn = await self._connect_first()
        try:
            await self.on_session(conn)
        except BaseException:
            conn.close("start-up failed")
            raise
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(conn))

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except (asyncio.CancelledError, Exception):
                pass
        await self.on_close()
        if self.conn is not None:
            self.conn.close(f"{self.role_name} shutting down")
            try:
                async with asyncio.timeout(2):
                    await asyncio.shield(self.conn.closed)
            except TimeoutError:
                self.conn.abort(f"{self.role_name} shutting down")

    async def on_close(self) -> None:
        """Subclasses stop what they run (listeners, streams) before the session closes."""

    async def wait_failed(self) -> BurrowError:
        """Wait until the client gives up for good (secret or certificate changed, ...)."""
        assert self.failed is not None
        return await self.failed

    async def ensure_session(self, timeout: float = CONNECT_TIMEOUT) -> SessionConnection:
        """The current session, checked with a ping round trip; reconnect if it is dead.

        For a process that may have been frozen (a Lambda sandbox between invocations): no
        timer ran while frozen, so the session may be a corpse nobody noticed yet.
        """
        conn = self.conn
        if conn is not None and conn.is_open and await conn.probe(min(2.0, timeout)):
            return conn
        if conn is not None:
            conn.abort("no answer to a ping after a pause")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.conn
            if current is not None and current is not conn and current.is_open:
                return current
            await asyncio.sleep(0.01)
        raise ConnectError(f"no session to relay {self.relay_label} within {timeout:.0f} s")

    # --- connecting --------------------------------------------------------------------------

    async def _connect_first(self) -> SessionConnection:
        """Connect, retrying refusals within ``connect_timeout`` (the relay may start later)."""
        config = self.client_config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.connect_timeout
        attempt = 0
        while True:
            remaining = deadline - loop.time()
            try:
                return await self._connect(
                    max(0.5, remaining) if not config.retry_forever else 10.0
                )
            except ConnectError as exc:
                if not exc.retryable:
                    raise
                attempt += 1
                delay = min(backoff(attempt), 1.0)
                if not config.retry_forever and loop.time() + delay >= deadline:
                    raise ConnectError(
                        f"{exc}; gave up after {config.connect_timeout:.0f} s"
                    ) from None
                self._reconnecting(attempt, delay, str(exc))
                await asyncio.sleep(delay)

    async def connect_once(self, timeout: float) -> SessionConnection:
        """One connection (each relay tried once), with no supervision: for node links."""
        return await self._connect(timeout)

    async def _connect(self, timeout: float) -> SessionConnection:
        """Connect to the first relay that answers, starting with ``_first``."""
        candidates = self._candidates
        if len(candidates) == 1:
            return await self._connect_to(candidates[0], timeout)
        failures: list[BurrowError] = []
        each = min(timeout, PER_RELAY_TIMEOUT)
        for offset in range(len(candidates)):
            index = (self._first + offset) % len(candidates)
            try:
                conn = await self._connect_to(candidates[index], each)
            except (ConnectError, AuthError, TLSVerifyError) as exc:
                failures.append(exc)
                if not exc.retryable:
                    emit(self.on_event, "warning", message=str(exc))
                continue
            self._current = index
            return conn
        fatal = [exc for exc in failures if not exc.retryable]
        if len(fatal) == len(failures):
            raise fatal[0]
        raise RelayUnavailable(
            "no relay answered: " + "; ".join(str(exc) for exc in failures if exc.retryable)
        )

    async def _addresses(self, host: str, port: int) -> list[str]:
        """``host``'s addresses in the resolver's order, the one whose session died last."""
        import ipaddress

        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            raise ConnectError(
                f"relay name {host!r} does not resolve; check --to / BURROW_RELAY"
            ) from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if self._avoid in addresses and len(addresses) > 1:
            addresses.remove(self._avoid)
            addresses.append(self._avoid)
        return addresses

    async def _connect_to(self, relay: tuple[str, int], timeout: float) -> SessionConnection:
        """Connect to one relay, trying each of its name's addresses in turn."""
        host, port = relay
        addresses = await self._addresses(host, port)
        if len(addresses) == 1:
            return await self._connect_address(relay, addresses[0], timeout)
        failure: BurrowError | None = None
        for address in addresses:
            try:
                return await self._connect_address(relay, address, min(timeout, PER_RELAY_TIMEOUT))
            except RelayUnavailable as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def _connect_address(
        self, relay: tuple[str, int], address: str, timeout: float
    ) -> SessionConnection:
        host, port = relay
        label = format_hostport(host, port)
        trust = self.client_config.trust
        context: ssl.SSLContext | None = trust.ssl_context() if trust is not None else None
        loop = asyncio.get_running_loop()
        session = new_session(
            Role.CLIENT,
            secret=self.client_config.secret,
            token_prover=self._token_prover,
            identity_key=self.identity,
            software=f"burrow/{__version__}",
        )

        def factory() -> SessionConnection:
            return SessionConnection(
                session, on_stream=self.on_stream, on_control=self._on_control, peer_label=label
            )

        try:
            async with asyncio.timeout(timeout):
                transport, conn = await loop.create_connection(
                    factory,
                    address,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                    ssl_handshake_timeout=timeout if context is not None else None,
                )
        except TimeoutError:
            raise RelayUnavailable(f"relay {label} did not answer within {timeout:.0f} s") from None
        except socket.gaierror:
            raise ConnectError(
                f"relay name {host!r} does not resolve; check --to / BURROW_RELAY"
            ) from None
        except ssl.SSLError as exc:
            from burrow.net.tls import describe_ssl_error

            raise describe_ssl_error(exc, label) from None
        except ConnectionRefusedError:
            raise RelayUnavailable(
                f"relay {label} refused the connection (is `burrow relay` running there?)"
            ) from None
        except OSError as exc:
            raise RelayUnavailable(f"cannot reach relay {label}: {exc.strerror or exc}") from None
        try:
            if context is not None:
                ssl_object = transport.get_extra_info("ssl_object")
                fingerprint = trust.verify(ssl_object, label, on_first_use=self._first_use)
                log.debug("relay %s certificate %s", label, fingerprint)
            conn.start_handshake()
            async with asyncio.timeout(timeout):
                await conn.handshake_done
        except HandshakeRejected as exc:
            conn.abort("rejected")
            if exc.code == "auth":
                raise AuthError(
                    f"relay {label} refused this {self.role_name}: {exc.message}"
                ) from None
            raise ConnectError(
                f"relay {label} refused this {self.role_name}: {exc.message}"
            ) from None
        except TimeoutError:
            conn.abort("handshake timeout")
            raise RelayUnavailable(
                f"relay {label} did not complete the handshake within {timeout:.0f} s"
            ) from None
        except ConnectionError as exc:
            hint = "" if context is not None else "; if the relay uses TLS, drop --insecure"
            raise RelayUnavailable(
                f"relay {label} closed the connection during the handshake ({exc}){hint}"
            ) from None
        except BaseException:
            conn.abort("failed")
            raise
        self.conn = conn
        self.connected_relay = label
        self._avoid = address
        emit(
            self.on_event,
            "connected",
            relay=label,
            session=session.session_id,
            tls=context is not None,
        )
        return conn

    def _first_use(self, relay_key: str, fingerprint: str) -> None:
        emit(
            self.on_event,
            "warning",
            message=f"trusting relay {relay_key} on first use: {fingerprint}",
        )

    async def _supervise(self, conn: SessionConnection) -> None:
        assert self.failed is not None
        attempt = 0
        while not self._closing:
            reason = await asyncio.shield(conn.closed)
            if self._closing:
                return
            # Another relay of several first; the address that died last among a name's.
            self._first = (self._current + 1) % len(self._candidates)
            emit(self.on_event, "session_lost", relay=self.connected_relay, reason=reason)
            while not self._closing:
                attempt += 1
                delay = backoff(attempt)
                self._reconnecting(attempt, delay, reason)
                await asyncio.sleep(delay)
                try:
                    conn = await self._connect(CONNECT_TIMEOUT)
                    await self.on_session(conn)
                except ConnectError as exc:
                    if exc.retryable:
                        reason = str(exc)
                        continue
                    self._fail(exc)
                    return
                except (AuthError, TLSVerifyError, TunnelError) as exc:
                    self._fail(exc)
                    return
                except (ConnectionError, TimeoutError) as exc:
                    reason = str(exc) or type(exc).__name__
                    continue
                attempt = 0
                break

    def _reconnecting(self, attempt: int, delay: float, reason: str) -> None:
        emit(
            self.on_event,
            "reconnecting",
            relay=self.relay_label,
            attempt=attempt,
            delay=round(delay, 2),
            reason=reason,
        )

    def _fail(self, exc: BurrowError) -> None:
        emit(self.on_event, "error", message=str(exc))
        if self.failed is not None and not self.failed.done():
            self.failed.set_result(exc)

    async def request(self, conn: SessionConnection, message: dict[str, Any]) -> dict[str, Any]:
        request_id = self._next_request
        self._next_request += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        try:
            conn.send_control({**message, "id": request_id})
            async with asyncio.timeout(REQUEST_TIMEOUT):
                waits: set[asyncio.Future[Any]] = {future, conn.closed}
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if future in done:
                return future.result()
            raise ConnectionError(f"session closed: {conn.closed.result()}")
        finally:
            self._requests.pop(request_id, None)

    def _on_control(self, conn: SessionConnection, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        future = self._requests.get(request_id) if isinstance(request_id, int) else None
        if future is not None and not future.done():
            future.set_result(message)
        else:
            self.on_message(conn, message)


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter, capped at 30 s."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * (2 ** min(attempt - 1, 16)))
    return random.uniform(ceiling / 2, ceiling)

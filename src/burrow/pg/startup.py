"""The startup phase of one proxied PostgreSQL connection, sans-I/O: from the client's first
packet to the server's first ReadyForQuery, after which the caller splices raw bytes.

The client leg is plaintext (SSLRequest and GSSENCRequest are answered ``N``); the caller dials
the database over TLS when asked (phase DIAL) and reports back. Authentication is relayed
message by message, with one change: the server's SCRAM-SHA-256-PLUS offer is withheld, since
its TLS session ends here and cannot be bound end to end (libpq refuses a PLUS offer over
plaintext; a client that insists on binding is told why).

    NEGOTIATE --StartupMessage--> DIAL --upstream_ready()--> AUTH --ReadyForQuery--> READY
        |                                                     |
        +--CancelRequest--> CANCEL          any failure ------+--> CLOSED (answer queued)

Methods raise a ``PgError`` after queueing its ErrorResponse for the client (when the client
can read one): flush ``data_to_client()`` and close.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final

from burrow.pg.codec import (
    BACKEND_LIMITS,
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendDecoder,
    BackendKeyData,
    CancelRequest,
    ErrorResponse,
    FrontendDecoder,
    GSSENCRequest,
    Message,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    ReadyForQuery,
    SSLRequest,
    StartupMessage,
    encode_authentication_sasl,
    encode_error_response,
    parse_backend,
    parse_sasl_initial_response,
    without_channel_binding,
)
from burrow.pg.errors import (
    ChannelBindingRefused,
    PgError,
    UnexpectedMessage,
)
from burrow.pg.policy import PgPolicy

__all__ = ["NO_ENCRYPTION", "Phase", "StartupRelay"]

NO_ENCRYPTION: Final = b"N"
"""The answer to SSLRequest and GSSENCRequest: go on in plaintext."""

_CHANNEL_BINDING_HINT: Final = (
    "the database's TLS session ends at burrow's proxy, so it cannot be bound to this client; "
    "connect with channel_binding=prefer (libpq's default) or disable"
)
_AUTH_NAMES: Final = {2: "kerberos", 7: "gss", 8: "gss", 9: "sspi"}


class Phase(enum.Enum):
    NEGOTIATE = "negotiate"  # reading the client's first packets
    DIAL = "dial"  # startup accepted: dial the database, then upstream_ready()
    AUTH = "auth"  # relaying authentication and the rest of startup
    READY = "ready"  # ReadyForQuery passed on: splice the rest
    CANCEL = "cancel"  # a CancelRequest arrived: forward it if its key is known, close
    CLOSED = "closed"  # over: flush data_to_client() and close


class StartupRelay:
    """One connection's startup. Feed each side's bytes to ``receive_client`` or
    ``receive_server`` (``waiting_for`` says which side is due) and write out
    ``data_to_client()`` / ``data_to_server()`` after every call."""

    def __init__(self, policy: PgPolicy) -> None:
        self.policy = policy
        self.phase = Phase.NEGOTIATE
        self.startup: StartupMessage | None = None
        self.cancel: CancelRequest | None = None
        self.backend_key: BackendKeyData | None = None
        self.server_error: ErrorResponse | None = None
        self.server_version: str | None = None
        self.protocol: int | None = None  # the version in use, once known
        self.auth_method: str | None = None
        self.withheld: tuple[str, ...] = ()  # mechanisms not passed on (SCRAM-SHA-256-PLUS)
        self._client = FrontendDecoder()
        self._server = BackendDecoder(BACKEND_LIMITS)
        self._to_client = bytearray()
        self._to_server = bytearray()
        self._startup_raw = b""
        self._negotiated: set[type] = set()
        self._awaiting_client = False  # an auth request is out and its answer is due
        self._offered: tuple[str, ...] = ()  # SASL mechanisms passed on, while one is chosen
        self._authenticated = False
        self.client_terminated = False  # the client sent Terminate during startup

    # --- outputs -------------------------------------------------------------------------

    @property
    def waiting_for(self) -> str | None:
        """``"client"`` or ``"server"``: whose bytes the relay needs next (None: neither)."""
        if self.phase is Phase.NEGOTIATE:
            return "client"
        if self.phase is Phase.AUTH:
            return "client" if self._awaiting_client else "server"
        return None

    def data_to_client(self) -> bytes:
        data = bytes(self._to_client)
        self._to_client.clear()
        return data

    def data_to_server(self) -> bytes:
        data = bytes(self._to_server)
        self._to_server.clear()
        return data

    def client_remainder(self) -> bytes:
        """Client bytes that arrived after its last startup message (pipelined queries), once
        READY: they go to the server before the splice starts."""
        return self._client.take_remainder()

    def server_remainder(self) -> bytes:
        """Server bytes after its ReadyForQuery, once READY: they go to the client first."""
        return self._server.take_remainder()

    # --- inputs --------------------------------------------------------------------------

    def receive_client(self, data: bytes) -> None:
        if self.phase not in (Phase.NEGOTIATE, Phase.AUTH):
            return
        self._client.feed(data)
        self._guard(self._process)

    def receive_server(self, data: bytes) -> None:
        if self.phase is not Phase.AUTH:
            return
        self._server.feed(data)
        self._guard(self._process)

    def upstream_ready(self) -> None:
        """The database is connected (TLS up): the client's StartupMessage goes to it."""
        if self.phase is not Phase.DIAL:
            raise RuntimeError(f"upstream_ready() in phase {self.phase.value}")
        self._to_server += self._startup_raw
        self.phase = Phase.AUTH
        # Messages the client pipelined after its StartupMessage wait for the server's turn.
        self._guard(self._process)

    def fail(self, error: PgError) -> None:
        """End the connection with ``error`` answered to the client (a dial that failed)."""
        self._refuse(error)

    # --- internals -----------------------------------------------------------------------

    def _guard(self, step: Callable[[], None]) -> None:
        try:
            step()
        except PgError as exc:
            self._refuse(exc)
            raise

    def _refuse(self, error: PgError) -> None:
        if error.answer and self.phase is not Phase.CLOSED:
            self._to_client += encode_error_response(
                "FATAL", error.sqlstate, error.message, hint=error.hint
            )
        self.phase = Phase.CLOSED

    def _process(self) -> None:
        """Take turns until neither side's buffered bytes can move the conversation on (a
        side may have sent ahead: its messages wait for their turn, then go at once)."""
        while True:
            state = (
                self.phase,
                self._awaiting_client,
                self._client.buffered,
                self._server.buffered,
            )
            self._client_messages()
            self._server_messages()
            if state == (
                self.phase,
                self._awaiting_client,
                self._client.buffered,
                self._server.buffered,
            ):
                return

    def _client_messages(self) -> None:
        while self.phase is Phase.NEGOTIATE or (self.phase is Phase.AUTH and self._awaiting_client):
            item = self._client.next()
            if item is None:
                return
            packet, raw = item
            if self.phase is Phase.NEGOTIATE:
                self._negotiate(packet, raw)
            else:
                assert isinstance(packet, Message)
                self._client_auth(packet, raw)

    def _negotiate(self, packet: object, raw: bytes) -> None:
        if isinstance(packet, SSLRequest | GSSENCRequest):
            if type(packet) in self._negotiated:
                raise UnexpectedMessage(f"a second {type(packet).__name__} on one connection")
            self._negotiated.add(type(packet))
            self._to_client += NO_ENCRYPTION
        elif isinstance(packet, CancelRequest):
            self.cancel = packet
            self.phase = Phase.CANCEL
        elif isinstance(packet, StartupMessage):
            self.startup = packet
            self.protocol = packet.version
            self.policy.check(packet)
            self._startup_raw = raw
            self.phase = Phase.DIAL
        else:  # pragma: no cover - the decoder yields only startup packets here
            raise UnexpectedMessage(f"unexpected {type(packet).__name__} before startup")

    def _client_auth(self, message: Message, raw: bytes) -> None:
        if message.kind == "X":
            self.client_terminated = True
            self.phase = Phase.CLOSED  # the client gave up (psql does, to prompt for a password)
            return
        if self._offered:
            initial = parse_sasl_initial_response(message.body)
            binding = initial.gs2_flag
            if initial.mechanism not in self._offered or binding == "p":
                raise ChannelBindingRefused(
                    f"burrow: SASL mechanism {initial.mechanism} with channel binding "
                    "is not possible through this proxy",
                    hint=_CHANNEL_BINDING_HINT,
                )
            if binding == "y":
                # The server supports binding, so it would refuse "y" as a downgrade attack.
                raise ChannelBindingRefused(
                    "burrow: the client announced SCRAM channel binding support, which the "
                    "database refuses through a proxy",
                    hint=_CHANNEL_BINDING_HINT,
                )
            self.auth_method = initial.mechanism
            self._offered = ()
        self._to_server += raw
        self._awaiting_client = False

    def _server_messages(self) -> None:
        while self.phase is Phase.AUTH and not self._awaiting_client:
            message = self._server.next()
            if message is None:
                return
            self._server_message(message)

    def _server_message(self, message: Message) -> None:
        parsed = parse_backend(message)
        forward = True
        if isinstance(parsed, AuthenticationSASL):
            offered = without_channel_binding(parsed.mechanisms)
            self.withheld = tuple(m for m in parsed.mechanisms if m not in offered)
            if not offered:
                raise ChannelBindingRefused(
                    "burrow: the database offers only SASL mechanisms with channel binding "
                    f"({', '.join(parsed.mechanisms)}), which cannot work through this proxy",
                    hint="allow SCRAM-SHA-256 without channel binding on the database",
                )
            self._to_client += encode_authentication_sasl(offered)
            self._offered = offered
            self._awaiting_client = True
            forward = False
        elif isinstance(parsed, AuthenticationOk):
            self._authenticated = True
            self.auth_method = self.auth_method or "trust"
        elif isinstance(parsed, AuthenticationCleartextPassword):
            self.auth_method = "password"
            self._awaiting_client = True
        elif isinstance(parsed, AuthenticationMD5Password):
            self.auth_method = "md5"
            self._awaiting_client = True
        elif isinstance(parsed, AuthenticationSASLContinue):
            self._awaiting_client = True
        elif isinstance(parsed, AuthenticationSASLFinal):
            pass
        elif isinstance(parsed, AuthenticationOther):
            self.auth_method = _AUTH_NAMES.get(parsed.code, f"auth-{parsed.code}")
            self._awaiting_client = parsed.needs_response
        elif isinstance(parsed, ErrorResponse):
            self.server_error = parsed
            self._to_client += message.encode()
            self.phase = Phase.CLOSED  # every error during startup is fatal
            return
        elif isinstance(parsed, NegotiateProtocolVersion):
            self.protocol = parsed.version
        elif isinstance(parsed, ParameterStatus):
            if parsed.name == "server_version":
                self.server_version = parsed.value
        elif isinstance(parsed, BackendKeyData):
            self.backend_key = parsed
        elif isinstance(parsed, ReadyForQuery):
            if not self._authenticated:
                raise UnexpectedMessage("ReadyForQuery from the server before AuthenticationOk")
            self.phase = Phase.READY
        elif isinstance(parsed, NoticeResponse):
            pass
        else:  # pragma: no cover - BACKEND_LIMITS admits only the types above
            raise UnexpectedMessage(f"unexpected message {message.kind!r} during startup")
        if forward:
            self._to_client += message.encode()

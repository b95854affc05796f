"""Errors of burrow's PostgreSQL layer. Each carries the SQLSTATE a PostgreSQL client should be
answered with (in an ErrorResponse), so a refusal reads like the server's own in psql.

    PgError                    sqlstate  (answer)
    ├── PgWireError            08P01     a peer broke the wire protocol
    │   ├── MalformedMessage             a length or a field does not parse
    │   ├── MessageTooLarge              a header announces more than the limit for its type
    │   ├── UnexpectedMessage            a message the current phase does not allow
    │   ├── UnsupportedProtocol  0A000   a StartupMessage version other than 3.x
    │   └── DirectTLSFromClient          a TLS ClientHello where a packet was due (no answer)
    ├── PolicyRefused          28000     the service's allow-list refuses this user or database
    ├── ChannelBindingRefused  28000     the client asked for SCRAM channel binding
    └── UpstreamFailed         08001     the database cannot be reached or failed TLS checks
"""

from __future__ import annotations

__all__ = [
    "DOCUMENTED_ERRORS",
    "ChannelBindingRefused",
    "DirectTLSFromClient",
    "MalformedMessage",
    "MessageTooLarge",
    "PgError",
    "PgWireError",
    "PolicyRefused",
    "UnexpectedMessage",
    "UnsupportedProtocol",
    "UpstreamFailed",
]


class PgError(Exception):
    """A failure a PostgreSQL client is told about: ``str(err)`` is the ErrorResponse message,
    ``sqlstate`` its code and ``hint`` its optional HINT field. ``reason`` names the failure in
    the ``pg_connection`` event (``ended``)."""

    sqlstate = "XX000"
    reason = "error"
    #: False when the peer cannot read an ErrorResponse (it is speaking TLS, say): just close.
    answer = True

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class PgWireError(PgError):
    """A peer broke the PostgreSQL protocol; the connection must end."""

    sqlstate = "08P01"  # protocol_violation
    reason = "protocol_error"


class MalformedMessage(PgWireError):
    pass


class MessageTooLarge(PgWireError):
    pass


class UnexpectedMessage(PgWireError):
    pass


class UnsupportedProtocol(PgWireError):
    sqlstate = "0A000"  # feature_not_supported, as the server answers an unknown version


class DirectTLSFromClient(PgWireError):
    """The client began TLS at once (``sslnegotiation=direct``); a plaintext ErrorResponse
    would only be TLS garbage to it, so nothing is sent."""

    reason = "client_direct_tls"
    answer = False


class PolicyRefused(PgError):
    sqlstate = "28000"  # invalid_authorization_specification, as a pg_hba.conf reject
    reason = "refused"


class ChannelBindingRefused(PgError):
    sqlstate = "28000"
    reason = "channel_binding"


class UpstreamFailed(PgError):
    """``reason`` is ``upstream_unreachable`` or ``upstream_tls``."""

    sqlstate = "08001"  # sqlclient_unable_to_establish_sqlconnection

    def __init__(
        self, message: str, *, hint: str | None = None, reason: str = "upstream_unreachable"
    ) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


DOCUMENTED_ERRORS: tuple[type[Exception], ...] = (PgWireError,)
"""What the decoders may raise on any input (the hypothesis tests hold this)."""

"""Errors that reach a user: each carries a one-line message that says what went wrong and,
where there is one, what to do about it. The bottom of the layers: every module may import it.

    BurrowError
    ├── ConfigError          bad flag, bad address, bad config file (exit 2)
    ├── ConnectError         relay unreachable, name does not resolve
    │   └── RelayUnavailable     the same, but worth retrying (refused, timed out, dropped)
    ├── TLSVerifyError       certificate or pinned fingerprint mismatch
    ├── AuthError            wrong or missing secret (burrow.tokens.TokenError for tokens)
    ├── TunnelError          relay refused a tunnel (port in use, outside the range, ...)
    ├── ProtocolError        the peer broke the wire protocol (burrow.wire.errors has the tree)
    └── HandshakeRejected    the peer refused the handshake (burrow.wire.errors)
"""

from __future__ import annotations


class BurrowError(Exception):
    """Base of every error burrow reports to a user; ``str(err)`` is the one-line message."""

    exit_code = 1
    #: Whether trying again later may succeed (a relay that is restarting, say).
    retryable = False


class ConfigError(BurrowError):
    """The user's input (flag, address, config file) is not valid."""

    exit_code = 2


class ConnectError(BurrowError):
    """The relay could not be reached (refused, timed out, name does not resolve)."""


class RelayUnavailable(ConnectError):
    """The relay could not be reached now, in a way that may pass (refused, timed out)."""

    retryable = True


class TLSVerifyError(BurrowError):
    """The relay's certificate did not verify against the CA, the pin or the known-relays file."""


class AuthError(BurrowError):
    """The relay and the client disagree about the secret."""


class TunnelError(BurrowError):
    """The relay refused to open a tunnel; ``code`` is the wire error code."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code

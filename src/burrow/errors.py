"""Errors that reach a user: each carries a one-line message that says what went wrong and,
where there is one, what to do about it.

    BurrowError
    ├── ConfigError          bad flag, bad address, bad config file
    ├── ConnectError         relay unreachable, name does not resolve
    ├── TLSVerifyError       certificate or pinned fingerprint mismatch
    ├── AuthError            wrong or missing secret
    ├── TunnelError          relay refused a tunnel (port in use, outside the range, ...)
    └── ProtocolError        the peer broke the wire protocol (see burrow.wire.errors)
"""

from __future__ import annotations


class BurrowError(Exception):
    """Base of every error burrow reports to a user; ``str(err)`` is the one-line message."""

    exit_code = 1


class ConfigError(BurrowError):
    """The user's input (flag, address, config file) is not valid."""

    exit_code = 2


class ConnectError(BurrowError):
    """The relay could not be reached (refused, timed out, name does not resolve)."""


class TLSVerifyError(BurrowError):
    """The relay's certificate did not verify against the CA, the pin or the known-relays file."""


class AuthError(BurrowError):
    """The relay and the client disagree about the secret."""


class TunnelError(BurrowError):
    """The relay refused to open a tunnel; ``code`` is the wire error code."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code

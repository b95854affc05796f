"""The few PostgreSQL protocol 3.0 packets the doctor speaks, sans-I/O (bytes in, messages out).

The client's side of what ``burrow.pg.codec`` (the proxy's, strict) defines: its constants,
framing and error fields are the codec's, while parsing here stays lenient, since a doctor must
describe odd servers rather than refuse them. Every backend message is ``type:1 length:4
body``; the decoder checks the length against a limit per type as soon as the 5-byte header
is in, so memory is bounded by the largest message allowed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from burrow.pg import codec
from burrow.pg.codec import PROTOCOL_3_0

SSL_REQUEST: Final = codec.encode_ssl_request()

#: Largest body the doctor accepts per backend message type; DataRow carries the payload ladder.
MAX_ROW: Final = (1 << 20) + 4096
DEFAULT_LIMIT: Final = 16 * 1024
_LIMITS: Final[Mapping[bytes, int]] = {
    b"D": MAX_ROW,  # DataRow
    b"E": 16 * 1024,  # ErrorResponse
    b"N": 16 * 1024,  # NoticeResponse
    b"R": 8 * 1024,  # Authentication* (a SASL message is small)
    b"T": 16 * 1024,  # RowDescription
    b"S": 4 * 1024,  # ParameterStatus
    b"K": 4 + 256,  # BackendKeyData: pid + a key of up to 256 bytes (3.2)
    b"Z": 1,  # ReadyForQuery
    b"C": 1024,  # CommandComplete
    b"A": 16 * 1024,  # NotificationResponse
    b"v": 4 * 1024,  # NegotiateProtocolVersion
}
#: Backend message types of protocol 3.x; anything else is not PostgreSQL speaking.
KNOWN_TYPES: Final = frozenset(b"123ACDEGHIKNRSTVWZcdnstv")

AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12
AUTH_NAMES: Final[Mapping[int, str]] = {
    0: "trust",
    2: "Kerberos V5",
    3: "cleartext password",
    5: "md5",
    6: "SCM credentials",
    7: "GSSAPI",
    9: "SSPI",
    10: "SASL",
}


class PgWireError(Exception):
    """The peer sent something that is not a well-formed PostgreSQL backend message."""


class MessageTooLarge(PgWireError):
    """A message announced a body larger than the limit for its type."""


class NotPostgres(PgWireError):
    """The bytes cannot be a PostgreSQL backend: unknown type or impossible length."""


@dataclass(frozen=True, slots=True)
class Message:
    type: bytes  # one byte, e.g. b"R"
    body: bytes


class BackendReader:
    """Splits the server's byte stream into messages; holds at most one incomplete message."""

    def __init__(self, limits: Mapping[bytes, int] = _LIMITS) -> None:
        self._buf = bytearray()
        self._limits = limits

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next(self) -> Message | None:
        """The next complete message, or None until more bytes arrive."""
        if len(self._buf) < 5:
            return None
        kind = bytes(self._buf[:1])
        if kind[0] not in KNOWN_TYPES:
            raise NotPostgres(f"unknown message type {kind!r}")
        (length,) = struct.unpack_from("!i", self._buf, 1)
        if length < 4:
            raise NotPostgres(f"impossible length {length} for message {kind!r}")
        if length - 4 > self._limits.get(kind, DEFAULT_LIMIT):
            raise MessageTooLarge(f"message {kind!r} of {length - 4} bytes is over the limit")
        if len(self._buf) < 1 + length:
            return None
        body = bytes(self._buf[5 : 1 + length])
        del self._buf[: 1 + length]
        return Message(kind, body)


# --- client messages -----------------------------------------------------------------------


def startup_message(params: Mapping[str, str]) -> bytes:
    """StartupMessage 3.0; ``params`` must hold ``user``."""
    body = struct.pack("!i", PROTOCOL_3_0)
    for key, value in params.items():
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def password_message(password: bytes) -> bytes:
    return codec.encode_message("p", password + b"\0")


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """``"md5" + md5(md5(password + user) + salt)`` in hex, as the server expects."""
    import hashlib

    inner = hashlib.md5(password.encode() + user.encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return codec.encode_message(
        "p", mechanism.encode() + b"\0" + struct.pack("!i", len(data)) + data
    )


def sasl_response(data: bytes) -> bytes:
    return codec.encode_message("p", data)


def query(sql: str) -> bytes:
    """A simple Query; the reply ends with ReadyForQuery."""
    return codec.encode_message("Q", sql.encode() + b"\0")


def terminate() -> bytes:
    return codec.encode_message("X")


# --- backend message bodies ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthRequest:
    code: int
    data: bytes = b""

    @property
    def mechanisms(self) -> list[str]:
        """SASL mechanism names (code 10)."""
        return [m.decode("utf-8", "replace") for m in self.data.split(b"\0") if m]


def parse_auth(body: bytes) -> AuthRequest:
    if len(body) < 4:
        raise PgWireError("short Authentication message")
    (code,) = struct.unpack_from("!i", body)
    return AuthRequest(code, body[4:])


#: ErrorResponse / NoticeResponse field codes the doctor reports.
FIELD_NAMES: Final[Mapping[str, str]] = {
    "S": "severity",
    "V": "severity_v",
    "C": "sqlstate",
    "M": "message",
    "D": "detail",
    "H": "hint",
}


@dataclass(frozen=True, slots=True)
class ServerError(codec.ErrorResponse):
    """An ErrorResponse (or NoticeResponse), read leniently: the codec's fields and names."""

    def describe(self) -> str:
        """``SQLSTATE 28P01: password authentication failed for user "app"`` (+ detail/hint)."""
        text = f"SQLSTATE {self.sqlstate or '?????'}: {self.message or '(no message)'}"
        for code in ("D", "H"):
            if self.fields.get(code):
                text += f" ({self.fields[code]})"
        return text


def parse_error(body: bytes) -> ServerError:
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return ServerError(fields)


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    parts = body.split(b"\0")
    if len(parts) < 2:
        raise PgWireError("malformed ParameterStatus")
    return parts[0].decode("utf-8", "replace"), parts[1].decode("utf-8", "replace")


def parse_backend_key(body: bytes) -> tuple[int, bytes]:
    """(process id, secret key); the key is 4 bytes in 3.0 and up to 256 in 3.2."""
    if len(body) < 8:
        raise PgWireError("short BackendKeyData")
    (pid,) = struct.unpack_from("!i", body)
    return pid, body[4:]


def parse_data_row(body: bytes) -> list[bytes | None]:
    if len(body) < 2:
        raise PgWireError("short DataRow")
    (count,) = struct.unpack_from("!h", body)
    values: list[bytes | None] = []
    offset = 2
    for _ in range(max(count, 0)):
        if offset + 4 > len(body):
            raise PgWireError("truncated DataRow")
        (size,) = struct.unpack_from("!i", body, offset)
        offset += 4
        if size < 0:
            values.append(None)
            continue
        if offset + size > len(body):
            raise PgWireError("truncated DataRow value")
        values.append(body[offset : offset + size])
        offset += size
    return values


def parameters_text(params: Iterable[tuple[str, str]], keys: Iterable[str]) -> str:
    """``server_version=15.2 TimeZone=UTC`` for the named keys present."""
    have = dict(params)
    return " ".join(f"{k}={have[k]}" for k in keys if k in have)

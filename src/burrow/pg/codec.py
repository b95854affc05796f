"""The PostgreSQL wire protocol (3.0 and 3.2), sans-I/O: decoders that turn bytes into typed
messages and encoders for what a proxy or a probe sends. No sockets, no clock.

Framing (PostgreSQL docs, "Message Formats"): every message is ``Byte1 type``, ``Int32 length``
(counting itself, not the type byte), then the body, big-endian. The client's first packets
have no type byte: ``Int32 length``, ``Int32 code``, body. Every decoder refuses an oversized
message as soon as its header is in (a limit per message type), so memory is bounded by the
largest message allowed for the one being read, never by what a peer announces.

    client                                         server
    SSLRequest / GSSENCRequest (8 bytes)  ->
                                          <-       'S' | 'N' | 'G' (one byte)
    StartupMessage (3.0 or 3.2)           ->
                                          <-       'v' NegotiateProtocolVersion (optional)
                                          <-       'R' Authentication* (SASL list, ...)
    'p' password / SASL response          ->       (as many rounds as the method needs)
                                          <-       'R' AuthenticationOk, 'S'..., 'K', 'Z'
    CancelRequest (on a new connection)   ->       (no reply: the server closes)
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from burrow.pg.errors import (
    DirectTLSFromClient,
    MalformedMessage,
    MessageTooLarge,
    UnexpectedMessage,
    UnsupportedProtocol,
)

__all__ = [
    "BACKEND_LIMITS",
    "CANCEL_REQUEST_CODE",
    "FRONTEND_LIMITS",
    "GSSENC_REQUEST_CODE",
    "MAX_CANCEL_KEY",
    "MAX_STARTUP_PACKET",
    "MIN_CANCEL_KEY",
    "PROTOCOL_3_0",
    "PROTOCOL_3_2",
    "SSL_REQUEST_CODE",
    "TERMINATE",
    "AuthenticationCleartextPassword",
    "AuthenticationMD5Password",
    "AuthenticationOk",
    "AuthenticationOther",
    "AuthenticationSASL",
    "AuthenticationSASLContinue",
    "AuthenticationSASLFinal",
    "BackendDecoder",
    "BackendKeyData",
    "BackendMessage",
    "CancelRequest",
    "ErrorResponse",
    "FrontendDecoder",
    "GSSENCRequest",
    "Message",
    "NegotiateProtocolVersion",
    "NoticeResponse",
    "ParameterStatus",
    "ReadyForQuery",
    "SASLInitialResponse",
    "SSLRequest",
    "StartupMessage",
    "StartupPacket",
    "encode_authentication",
    "encode_authentication_sasl",
    "encode_backend_key_data",
    "encode_cancel_request",
    "encode_error_response",
    "encode_gssenc_request",
    "encode_message",
    "encode_negotiate_protocol_version",
    "encode_parameter_status",
    "encode_ready_for_query",
    "encode_sasl_initial_response",
    "encode_ssl_request",
    "encode_startup_message",
    "format_version",
    "parse_backend",
    "parse_error_fields",
    "parse_sasl_initial_response",
    "parse_startup_packet",
    "without_channel_binding",
]

# --- constants -------------------------------------------------------------------------------

SSL_REQUEST_CODE: Final = 80877103  # 1234 << 16 | 5679
GSSENC_REQUEST_CODE: Final = 80877104  # 1234 << 16 | 5680
CANCEL_REQUEST_CODE: Final = 80877102  # 1234 << 16 | 5678
PROTOCOL_3_0: Final = 3 << 16
PROTOCOL_3_2: Final = 3 << 16 | 2  # PostgreSQL 18: longer cancel keys

MAX_STARTUP_PACKET: Final = 10_000
"""The server's own limit (MAX_STARTUP_PACKET_LENGTH) on a length-prefixed first packet."""
MIN_CANCEL_KEY: Final = 4
MAX_CANCEL_KEY: Final = 256
"""Cancel key sizes: 4 bytes in 3.0; 4 to 256 in 3.2 (PostgreSQL 18 sends 32)."""

TERMINATE: Final = b"X\x00\x00\x00\x04"

_INT32: Final = struct.Struct("!i")
_UINT32: Final = struct.Struct("!I")
_HEADER: Final = struct.Struct("!cI")  # type byte, length (counts itself)
_PACKET_HEAD: Final = struct.Struct("!Ii")  # length, code
_TLS_HANDSHAKE: Final = 0x16  # first byte of a TLS record carrying a ClientHello

#: Largest body of each message a server sends during startup. Unknown types are refused by
#: the startup decoder; a decoder for later phases passes ``default_limit``.
BACKEND_LIMITS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "R": 64 * 1024,  # Authentication*: SASL rounds are small; GSS tokens can be tens of KiB
        "S": 64 * 1024,  # ParameterStatus
        "K": 4 + MAX_CANCEL_KEY,  # BackendKeyData: pid + key
        "E": 256 * 1024,  # ErrorResponse
        "N": 256 * 1024,  # NoticeResponse
        "Z": 1,  # ReadyForQuery
        "v": 64 * 1024,  # NegotiateProtocolVersion
    }
)
#: Largest body of each message a client sends after its StartupMessage and before
#: ReadyForQuery: password and SASL messages (the server's PG_MAX_AUTH_TOKEN_LENGTH is 65535,
#: plus the mechanism name and length of a SASLInitialResponse) and Terminate.
FRONTEND_LIMITS: Final[Mapping[str, int]] = MappingProxyType({"p": 65535 + 256, "X": 0})


# --- messages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One typed message as framed on the wire: ``kind`` is its type character."""

    kind: str
    body: bytes

    def encode(self) -> bytes:
        return encode_message(self.kind, self.body)


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """``secret_key`` is 4 bytes in 3.0, up to 256 in 3.2."""

    process_id: int
    secret_key: bytes


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """``version`` is major << 16 | minor; ``parameters`` in the order the client sent them."""

    version: int
    parameters: Mapping[str, str]

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        """The database the server will open: ``database``, defaulting to the user name."""
        return self.parameters.get("database") or self.user

    @property
    def replication(self) -> str | None:
        """``replication`` as sent (true/database/...), None for a normal connection."""
        return self.parameters.get("replication")


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


@dataclass(frozen=True, slots=True)
class AuthenticationOk:
    needs_response = False


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword:
    needs_response = True


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password:
    salt: bytes
    needs_response = True


@dataclass(frozen=True, slots=True)
class AuthenticationSASL:
    mechanisms: tuple[str, ...]
    needs_response = True


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue:
    data: bytes
    needs_response = True


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal:
    data: bytes
    needs_response = False


@dataclass(frozen=True, slots=True)
class AuthenticationOther:
    """KerberosV5 (2), GSS (7), GSSContinue (8), SSPI (9), or a code this module does not
    know; every one but 2 is answered by the client."""

    code: int
    data: bytes

    @property
    def needs_response(self) -> bool:
        return self.code in (7, 8, 9)


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    process_id: int
    secret_key: bytes


@dataclass(frozen=True, slots=True)
class _Fields:
    """ErrorResponse and NoticeResponse: one-letter codes to values (unknown codes kept)."""

    fields: Mapping[str, str] = field(default_factory=dict)

    @property
    def severity(self) -> str:
        """The non-localised severity (``V``, PostgreSQL 9.6+), else the localised ``S``."""
        return self.fields.get("V") or self.fields.get("S", "")

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Fields):
    pass


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Fields):
    pass


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    """``status``: I idle, T in a transaction, E in a failed transaction."""

    status: str


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    """The server's newest version for the major version asked (major << 16 | minor) and the
    ``_pq_.`` options it did not recognise."""

    version: int
    unrecognized: tuple[str, ...]


BackendMessage = (
    AuthenticationOk
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
    | AuthenticationOther
    | ParameterStatus
    | BackendKeyData
    | ErrorResponse
    | NoticeResponse
    | ReadyForQuery
    | NegotiateProtocolVersion
    | Message
)


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    """The client's first SASL message; ``data`` is None when the client sent length -1."""

    mechanism: str
    data: bytes | None

    @property
    def gs2_flag(self) -> str | None:
        """The SCRAM GS2 channel-binding flag (RFC 5802 §7): ``n`` (client does not support
        binding), ``y`` (it does, but thinks the server does not), ``p`` (binding in use), or
        None when the data is not a SCRAM client-first message."""
        if not self.data:
            return None
        flag = chr(self.data[0])
        if flag in "ny" and self.data[1:2] == b",":
            return flag
        if flag == "p" and self.data[1:2] == b"=":
            return flag
        return None


# --- small readers ---------------------------------------------------------------------------


def _cstring(body: bytes, start: int, what: str) -> tuple[str, int]:
    """The NUL-terminated string at ``start`` and the offset after its NUL."""
    end = body.find(b"\x00", start)
    if end < 0:
        raise MalformedMessage(f"{what}: a string is not NUL-terminated")
    return body[start:end].decode("utf-8", "surrogateescape"), end + 1


def _int32(body: bytes, start: int, what: str) -> int:
    if len(body) < start + 4:
        raise MalformedMessage(f"{what}: truncated (need an Int32 at offset {start})")
    return int(_INT32.unpack_from(body, start)[0])


def _string_list(body: bytes, start: int, what: str) -> tuple[str, ...]:
    """Strings each NUL-terminated, the list ended by an empty one (a lone NUL)."""
    items: list[str] = []
    offset = start
    while True:
        if offset >= len(body):
            raise MalformedMessage(f"{what}: the list is not terminated")
        if body[offset] == 0:
            if offset + 1 != len(body):
                raise MalformedMessage(f"{what}: bytes after the end of the list")
            return tuple(items)
        item, offset = _cstring(body, offset, what)
        items.append(item)


def parse_error_fields(body: bytes, what: str = "ErrorResponse") -> dict[str, str]:
    """ErrorResponse/NoticeResponse fields: ``code`` byte + string, until a NUL code."""
    fields: dict[str, str] = {}
    offset = 0
    while True:
        if offset >= len(body):
            raise MalformedMessage(f"{what}: the field list is not terminated")
        code = body[offset]
        if code == 0:
            if offset + 1 != len(body):
                raise MalformedMessage(f"{what}: bytes after the last field")
            return fields
        value, offset = _cstring(body, offset + 1, what)
        fields[chr(code)] = value


# --- frontend --------------------------------------------------------------------------------


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """One whole untyped first packet (its length word included)."""
    if len(packet) < 8:
        raise MalformedMessage(f"invalid length of startup packet ({len(packet)} bytes)")
    length, code = _PACKET_HEAD.unpack_from(packet)
    if length != len(packet):
        raise MalformedMessage("startup packet length does not match its size")
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if length != 8:
            raise MalformedMessage("SSLRequest and GSSENCRequest are exactly 8 bytes")
        return SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        key = packet[12:]
        if len(packet) < 12 or not MIN_CANCEL_KEY <= len(key) <= MAX_CANCEL_KEY:
            raise MalformedMessage(f"CancelRequest of {length} bytes has no valid key")
        return CancelRequest(_INT32.unpack_from(packet, 8)[0], bytes(key))
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise UnsupportedProtocol(
            f"unsupported frontend protocol {major}.{minor}: "
            "this proxy speaks 3.0 to 3.2 (PostgreSQL 7.4 and later)"
        )
    body = packet[8:]
    parameters: dict[str, str] = {}
    offset = 0
    while True:
        if offset >= len(body):
            raise MalformedMessage("StartupMessage: the parameter list is not terminated")
        if body[offset] == 0:
            if offset + 1 != len(body):
                raise MalformedMessage("StartupMessage: bytes after the parameter list")
            break
        name, offset = _cstring(body, offset, "StartupMessage")
        value, offset = _cstring(body, offset, "StartupMessage")
        parameters[name] = value
    return StartupMessage(code, MappingProxyType(parameters))


def parse_sasl_initial_response(body: bytes) -> SASLInitialResponse:
    """A ``p`` message sent in answer to AuthenticationSASL."""
    mechanism, offset = _cstring(body, 0, "SASLInitialResponse")
    length = _int32(body, offset, "SASLInitialResponse")
    offset += 4
    if length == -1:
        if offset != len(body):
            raise MalformedMessage("SASLInitialResponse: data after a -1 length")
        return SASLInitialResponse(mechanism, None)
    if length < 0 or offset + length != len(body):
        raise MalformedMessage("SASLInitialResponse: data length does not match the message")
    return SASLInitialResponse(mechanism, body[offset:])


class FrontendDecoder:
    """The client's side of a connection up to ReadyForQuery: untyped first packets
    (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage), then typed messages limited by
    ``FRONTEND_LIMITS``. Returns ``(packet, raw bytes)`` so a proxy can pass on the original."""

    __slots__ = ("_buffer", "_typed")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._typed = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def take_remainder(self) -> bytes:
        """Hand over what is buffered (the caller now splices raw bytes)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def next(self) -> tuple[StartupPacket | Message, bytes] | None:
        """The next whole packet or message, or None until more bytes arrive."""
        if self._typed:
            message = _next_typed(self._buffer, FRONTEND_LIMITS, None, "client")
            return None if message is None else (message, message.encode())
        buf = self._buffer
        if buf and buf[0] == _TLS_HANDSHAKE:
            raise DirectTLSFromClient(
                "the client started TLS directly (sslnegotiation=direct); "
                "this proxy's client side is plaintext"
            )
        if len(buf) < 4:
            return None
        (length,) = _UINT32.unpack_from(buf)
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise MalformedMessage(f"invalid length of startup packet ({length} bytes)")
        if len(buf) < length:
            return None
        raw = bytes(buf[:length])
        del buf[:length]
        packet = parse_startup_packet(raw)
        if isinstance(packet, StartupMessage):
            self._typed = True
        return packet, raw


# --- backend ---------------------------------------------------------------------------------


def _next_typed(
    buf: bytearray, limits: Mapping[str, int], default_limit: int | None, side: str
) -> Message | None:
    if len(buf) < 5:
        if buf and default_limit is None and chr(buf[0]) not in limits:
            raise UnexpectedMessage(f"unexpected message type {chr(buf[0])!r} from the {side}")
        return None
    kind_byte, length = _HEADER.unpack_from(buf)
    kind = kind_byte.decode("latin-1")
    limit = limits.get(kind, default_limit)
    if limit is None:
        raise UnexpectedMessage(f"unexpected message type {kind!r} from the {side}")
    if length < 4:
        raise MalformedMessage(f"message {kind!r} from the {side} has length {length} < 4")
    if length - 4 > limit:
        raise MessageTooLarge(
            f"message {kind!r} from the {side} announces {length - 4} bytes; the limit is {limit}"
        )
    end = 1 + length
    if len(buf) < end:
        return None
    body = bytes(buf[5:end])
    del buf[:end]
    return Message(kind, body)


class BackendDecoder:
    """Typed messages from a server. With ``default_limit`` None (the startup phase) only the
    types in ``limits`` are accepted; give one to read any message (a probe after startup)."""

    __slots__ = ("_buffer", "default_limit", "limits")

    def __init__(
        self, limits: Mapping[str, int] = BACKEND_LIMITS, default_limit: int | None = None
    ) -> None:
        self._buffer = bytearray()
        self.limits = limits
        self.default_limit = default_limit

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def take_remainder(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def next(self) -> Message | None:
        """The next whole message (untyped), or None until more bytes arrive."""
        return _next_typed(self._buffer, self.limits, self.default_limit, "server")


def parse_backend(message: Message) -> BackendMessage:
    """The typed form of a server message; types this module does not model come back as
    the ``Message`` itself."""
    kind, body = message.kind, message.body
    if kind == "R":
        code = _int32(body, 0, "Authentication")
        data = body[4:]
        if code == 0:
            _exact(data, 0, "AuthenticationOk")
            return AuthenticationOk()
        if code == 3:
            _exact(data, 0, "AuthenticationCleartextPassword")
            return AuthenticationCleartextPassword()
        if code == 5:
            _exact(data, 4, "AuthenticationMD5Password")
            return AuthenticationMD5Password(data)
        if code == 10:
            mechanisms = _string_list(data, 0, "AuthenticationSASL")
            if not mechanisms:
                raise MalformedMessage("AuthenticationSASL lists no mechanism")
            return AuthenticationSASL(mechanisms)
        if code == 11:
            return AuthenticationSASLContinue(data)
        if code == 12:
            return AuthenticationSASLFinal(data)
        return AuthenticationOther(code, data)
    if kind == "S":
        name, offset = _cstring(body, 0, "ParameterStatus")
        value, offset = _cstring(body, offset, "ParameterStatus")
        if offset != len(body):
            raise MalformedMessage("ParameterStatus: bytes after the value")
        return ParameterStatus(name, value)
    if kind == "K":
        key = body[4:]
        if len(body) < 4 or not MIN_CANCEL_KEY <= len(key) <= MAX_CANCEL_KEY:
            raise MalformedMessage(f"BackendKeyData with a {max(0, len(key))}-byte key")
        return BackendKeyData(_INT32.unpack_from(body)[0], key)
    if kind == "E":
        return ErrorResponse(MappingProxyType(parse_error_fields(body)))
    if kind == "N":
        return NoticeResponse(MappingProxyType(parse_error_fields(body, "NoticeResponse")))
    if kind == "Z":
        _exact(body, 1, "ReadyForQuery")
        status = chr(body[0])
        if status not in "ITE":
            raise MalformedMessage(f"ReadyForQuery with status {status!r}")
        return ReadyForQuery(status)
    if kind == "v":
        version = _int32(body, 0, "NegotiateProtocolVersion")
        count = _int32(body, 4, "NegotiateProtocolVersion")
        options: list[str] = []
        offset = 8
        if count < 0 or count > len(body):
            raise MalformedMessage(f"NegotiateProtocolVersion lists {count} options")
        for _ in range(count):
            option, offset = _cstring(body, offset, "NegotiateProtocolVersion")
            options.append(option)
        if offset != len(body):
            raise MalformedMessage("NegotiateProtocolVersion: bytes after the options")
        return NegotiateProtocolVersion(version, tuple(options))
    return message


def _exact(data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise MalformedMessage(f"{what} carries {len(data)} bytes, not {size}")


def without_channel_binding(mechanisms: Iterable[str]) -> tuple[str, ...]:
    """The SASL mechanisms minus the channel-binding ones (``-PLUS``): a TLS session that ends
    at a proxy cannot be bound end to end, and libpq refuses a PLUS offer over plaintext."""
    return tuple(m for m in mechanisms if not m.upper().endswith("-PLUS"))


def format_version(version: int) -> str:
    return f"{version >> 16}.{version & 0xFFFF}"


# --- encoders --------------------------------------------------------------------------------


def _cstr(text: str) -> bytes:
    data = text.encode("utf-8", "surrogateescape")
    if b"\x00" in data:
        raise ValueError(f"{text!r} contains NUL")
    return data + b"\x00"


def encode_message(kind: str, body: bytes = b"") -> bytes:
    return _HEADER.pack(kind.encode("latin-1"), len(body) + 4) + body


def encode_ssl_request() -> bytes:
    return _PACKET_HEAD.pack(8, SSL_REQUEST_CODE)


def encode_gssenc_request() -> bytes:
    return _PACKET_HEAD.pack(8, GSSENC_REQUEST_CODE)


def encode_cancel_request(process_id: int, secret_key: bytes) -> bytes:
    if not MIN_CANCEL_KEY <= len(secret_key) <= MAX_CANCEL_KEY:
        raise ValueError(f"a cancel key is {MIN_CANCEL_KEY} to {MAX_CANCEL_KEY} bytes")
    return (
        _PACKET_HEAD.pack(12 + len(secret_key), CANCEL_REQUEST_CODE)
        + _INT32.pack(process_id)
        + secret_key
    )


def encode_startup_message(parameters: Mapping[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = b"".join(_cstr(k) + _cstr(v) for k, v in parameters.items()) + b"\x00"
    return _PACKET_HEAD.pack(8 + len(body), version) + body


def encode_authentication(code: int, data: bytes = b"") -> bytes:
    return encode_message("R", _INT32.pack(code) + data)


def encode_authentication_sasl(mechanisms: Iterable[str]) -> bytes:
    """AuthenticationSASL listing ``mechanisms`` (e.g. the server's list without -PLUS)."""
    names = list(mechanisms)
    if not names:
        raise ValueError("AuthenticationSASL needs at least one mechanism")
    return encode_authentication(10, b"".join(_cstr(m) for m in names) + b"\x00")


def encode_sasl_initial_response(mechanism: str, data: bytes | None) -> bytes:
    length = -1 if data is None else len(data)
    return encode_message("p", _cstr(mechanism) + _INT32.pack(length) + (data or b""))


def encode_parameter_status(name: str, value: str) -> bytes:
    return encode_message("S", _cstr(name) + _cstr(value))


def encode_backend_key_data(process_id: int, secret_key: bytes) -> bytes:
    return encode_message("K", _INT32.pack(process_id) + secret_key)


def encode_ready_for_query(status: str = "I") -> bytes:
    return encode_message("Z", status.encode("ascii"))


def encode_negotiate_protocol_version(version: int, unrecognized: Iterable[str] = ()) -> bytes:
    options = list(unrecognized)
    body = _INT32.pack(version) + _INT32.pack(len(options)) + b"".join(_cstr(o) for o in options)
    return encode_message("v", body)


def encode_error_response(
    severity: str,
    sqlstate: str,
    message: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
    notice: bool = False,
) -> bytes:
    """An ErrorResponse (or NoticeResponse) as the server writes one: severity both localised
    (``S``) and not (``V``), SQLSTATE, message, then optional detail and hint."""
    if len(sqlstate) != 5 or not sqlstate.isascii() or not sqlstate.isalnum():
        raise ValueError(f"SQLSTATE {sqlstate!r} is not five characters")
    fields = [("S", severity), ("V", severity), ("C", sqlstate), ("M", message)]
    if detail is not None:
        fields.append(("D", detail))
    if hint is not None:
        fields.append(("H", hint))
    body = b"".join(code.encode("ascii") + _cstr(value) for code, value in fields) + b"\x00"
    return encode_message("N" if notice else "E", body)

"""SOCKS5 server side (RFC 1928, CONNECT only; RFC 1929 username/password), sans-I/O.

Bytes from the client go in through ``receive_data``, events come out, and the bytes to write
back come from ``data_to_send``. The CONNECT reply is not sent when the request arrives: the
caller opens the upstream first and then calls ``reply`` with the precise REP code, so a client
sees "connection refused" rather than the "general failure" most servers report for every
dial error.

    client                              server
      05 n m1..mn                 ->
                                  <-    05 m          (00 no auth, 02 user/pass, FF none)
      01 ulen user plen pass      ->                  (method 02 only)
                                  <-    01 00 | 01 01 (success | failure, then close)
      05 01 00 atyp addr port     ->    ConnectRequest
                    ... caller dials the target ...
                                  <-    05 rep 00 atyp bnd.addr bnd.port

Errors (each queues its reply, if any, before it is raised: flush ``data_to_send`` and close):

    SocksError
    ├── SocksVersionError          not SOCKS5 (or not RFC 1929 auth): closed without a reply
    ├── NoAcceptableMethod         05 FF: the client offers no method this server allows
    ├── CommandNotSupported        REP 07: BIND or UDP ASSOCIATE
    ├── AddressTypeNotSupported    REP 08: an ATYP other than 01, 03, 04
    ├── BadRequest                 REP 01: an empty or non-ASCII domain name
    └── EarlyDataTooLarge          REP 01: too many bytes sent before the reply
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal, NoReturn

__all__ = [
    "ADDRESS_TYPE_NOT_SUPPORTED",
    "COMMAND_NOT_SUPPORTED",
    "CONNECTION_REFUSED",
    "GENERAL_FAILURE",
    "HOST_UNREACHABLE",
    "MAX_EARLY_DATA",
    "MAX_HANDSHAKE_BUFFER",
    "NETWORK_UNREACHABLE",
    "NOT_ALLOWED",
    "REPLY_FOR_RESET",
    "SUCCEEDED",
    "TTL_EXPIRED",
    "AddressType",
    "AddressTypeNotSupported",
    "AuthFailed",
    "BadRequest",
    "CommandNotSupported",
    "ConnectRequest",
    "EarlyDataTooLarge",
    "NoAcceptableMethod",
    "SocksError",
    "SocksEvent",
    "SocksServer",
    "SocksState",
    "SocksStateError",
    "SocksVersionError",
    "encode_reply",
    "reply_code_for_reset",
]

# REP codes, RFC 1928 §6.
SUCCEEDED: Final = 0x00
GENERAL_FAILURE: Final = 0x01
NOT_ALLOWED: Final = 0x02  # "connection not allowed by ruleset"
NETWORK_UNREACHABLE: Final = 0x03
HOST_UNREACHABLE: Final = 0x04
CONNECTION_REFUSED: Final = 0x05
TTL_EXPIRED: Final = 0x06  # clients print it as "TTL expired" or "timed out"
COMMAND_NOT_SUPPORTED: Final = 0x07
ADDRESS_TYPE_NOT_SUPPORTED: Final = 0x08

REPLY_FOR_RESET: Final[Mapping[str, int]] = MappingProxyType(
    {
        "refused": CONNECTION_REFUSED,
        "unreachable": HOST_UNREACHABLE,
        "network_unreachable": NETWORK_UNREACHABLE,
        "timeout": TTL_EXPIRED,
        "not_allowed": NOT_ALLOWED,
        "no_such_tunnel": HOST_UNREACHABLE,
    }
)
"""REP code for each burrow stream reset code; anything else is GENERAL_FAILURE."""

MAX_HANDSHAKE_BUFFER: Final = 1024
"""Most bytes held for an incomplete greeting, auth or request. Every one of those messages is
length-prefixed and at most 513 bytes, so a parse step never waits on more than this."""

MAX_EARLY_DATA: Final = 64 * 1024
"""Most bytes a client may send after its request and before the reply (optimistic data such
as a TLS ClientHello); past this it is flooding, not pipelining."""

_VERSION: Final = 0x05
_AUTH_VERSION: Final = 0x01  # RFC 1929 sub-negotiation version
_NO_AUTH: Final = 0x00
_USER_PASS: Final = 0x02
_NO_ACCEPTABLE: Final = 0xFF
_CMD_CONNECT: Final = 0x01
_CMD_NAMES: Final = {0x02: "BIND", 0x03: "UDP ASSOCIATE"}
_ATYP_IPV4: Final = 0x01
_ATYP_DOMAIN: Final = 0x03
_ATYP_IPV6: Final = 0x04

AddressType = Literal["ipv4", "ipv6", "domain"]


def reply_code_for_reset(code: str) -> int:
    """The REP code to answer a CONNECT whose upstream stream was reset with ``code``."""
    return REPLY_FOR_RESET.get(code, GENERAL_FAILURE)


# --- events and errors ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """The client asked to CONNECT; answer with ``SocksServer.reply`` once the dial is done.
    ``username`` is the RFC 1929 user that authenticated, None without auth."""

    host: str
    port: int
    address_type: AddressType
    username: str | None = None


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """The credentials were refused; status 01 is queued and the connection must close."""

    username: str


SocksEvent = ConnectRequest | AuthFailed


class SocksError(Exception):
    """The client broke SOCKS5 or asked for something unsupported. ``reply_code`` is the REP
    code already queued in ``data_to_send`` (None when nothing or a method reply is queued)."""

    reply_code: int | None = GENERAL_FAILURE


class SocksVersionError(SocksError):
    reply_code = None


class NoAcceptableMethod(SocksError):
    reply_code = None  # the reply is the method-selection message 05 FF


class CommandNotSupported(SocksError):
    reply_code = COMMAND_NOT_SUPPORTED


class AddressTypeNotSupported(SocksError):
    reply_code = ADDRESS_TYPE_NOT_SUPPORTED


class BadRequest(SocksError):
    reply_code = GENERAL_FAILURE


class EarlyDataTooLarge(SocksError):
    reply_code = GENERAL_FAILURE


class SocksStateError(RuntimeError):
    """The caller used the server out of order (e.g. ``reply`` twice); a bug, not the peer's."""


class SocksState(enum.Enum):
    GREETING = "greeting"
    AUTH = "auth"
    REQUEST = "request"
    CONNECTING = "connecting"  # request received, waiting for the caller's reply
    OPEN = "open"  # success sent: the connection is now a byte pipe
    CLOSED = "closed"  # a refusal was queued: flush data_to_send and close


# --- encoding ------------------------------------------------------------------------------


def encode_reply(code: int, bound: tuple[str, int] = ("0.0.0.0", 0)) -> bytes:
    """A CONNECT reply: ``05 rep 00 atyp addr port``. ``bound`` is an IP or a domain name;
    clients rarely use it, so failures conventionally send 0.0.0.0:0."""
    if not 0 <= code <= 0xFF:
        raise ValueError(f"REP code {code} is not a byte")
    host, port = bound
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"bound port {port} out of range")
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        try:
            name = host.encode("idna")
        except UnicodeError:
            name = b""
        if not 1 <= len(name) <= 255:
            raise ValueError(f"bound address {host!r} is not an IP or a domain name") from None
        address = bytes((_ATYP_DOMAIN, len(name))) + name
    else:
        atyp = _ATYP_IPV4 if ip.version == 4 else _ATYP_IPV6
        address = bytes((atyp,)) + ip.packed
    return bytes((_VERSION, code, 0x00)) + address + struct.pack("!H", port)


# --- the state machine ---------------------------------------------------------------------


class SocksServer:
    """One client connection's SOCKS5 negotiation.

    ``auth`` checks RFC 1929 credentials; with it, clients must use method 02, and without it
    only method 00 (no auth) is accepted, so a configured password cannot be skipped.
    """

    __slots__ = ("_auth", "_buffer", "_out", "_username", "state")

    def __init__(self, auth: Callable[[str, str], bool] | None = None) -> None:
        self._auth = auth
        self._buffer = bytearray()
        self._out = bytearray()
        self._username: str | None = None
        self.state = SocksState.GREETING

    @property
    def should_close(self) -> bool:
        """True once the negotiation failed: send ``data_to_send()``, then close."""
        return self.state is SocksState.CLOSED

    @property
    def buffered(self) -> int:
        """Bytes held from the client: an incomplete message (at most MAX_HANDSHAKE_BUFFER) or,
        once the request is in, early data (at most MAX_EARLY_DATA)."""
        return len(self._buffer)

    def data_to_send(self) -> bytes:
        """Bytes to write to the client, emptied by the call."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def trailing_data(self) -> bytes:
        """Bytes the client sent after its request; valid after a successful ``reply``, when
        they belong to the upstream. Emptied by the call."""
        if self.state is not SocksState.OPEN:
            raise SocksStateError("trailing data is only defined after a successful reply")
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def receive_data(self, data: bytes) -> list[SocksEvent]:
        """Feed bytes from the client. Raises a SocksError (its reply already queued) when the
        client must be dropped; after a failure further bytes are ignored."""
        if self.state is SocksState.CLOSED:
            return []
        if self.state is SocksState.OPEN:
            raise SocksStateError("the SOCKS handshake is over; forward the bytes instead")
        self._buffer += data
        if self.state is SocksState.CONNECTING:
            self._check_early_data()
            return []
        events: list[SocksEvent] = []
        try:
            while self.state in (SocksState.GREETING, SocksState.AUTH, SocksState.REQUEST):
                event, done = self._step()
                if event is not None:
                    events.append(event)
                if not done:
                    break
        except SocksError:
            self.state = SocksState.CLOSED
            self._buffer.clear()
            raise
        self._check_early_data()
        return events

    def reply(self, code: int, bound: tuple[str, int] = ("0.0.0.0", 0)) -> None:
        """Answer the pending CONNECT. SUCCEEDED opens the pipe (see ``trailing_data``); any
        other code queues the refusal and the connection must close after it is sent."""
        if self.state is not SocksState.CONNECTING:
            raise SocksStateError(f"no CONNECT is waiting for a reply (state {self.state.value})")
        self._out += encode_reply(code, bound)
        if code == SUCCEEDED:
            self.state = SocksState.OPEN
        else:
            self.state = SocksState.CLOSED
            self._buffer.clear()

    # --- parsing ---------------------------------------------------------------------------

    def _check_early_data(self) -> None:
        if self.state is SocksState.CONNECTING and len(self._buffer) > MAX_EARLY_DATA:
            self._fail_request(
                EarlyDataTooLarge(
                    f"client sent more than {MAX_EARLY_DATA} bytes before the CONNECT reply"
                )
            )

    def _fail_request(self, error: SocksError) -> NoReturn:
        """Queue the reply an error carries, close, and raise it."""
        if error.reply_code is not None:
            self._out += encode_reply(error.reply_code)
        self.state = SocksState.CLOSED
        self._buffer.clear()
        raise error

    def _step(self) -> tuple[SocksEvent | None, bool]:
        """Parse one message from the buffer: ``(event, consumed)``; consumed is False when
        more bytes are needed."""
        if self.state is SocksState.GREETING:
            return None, self._greeting()
        if self.state is SocksState.AUTH:
            return self._user_pass()
        return self._request()

    def _greeting(self) -> bool:
        buf = self._buffer
        if not buf:
            return False
        if buf[0] != _VERSION:
            # Could be SOCKS4, HTTP or TLS: RFC 1928 has no reply for it, so just close.
            raise SocksVersionError(f"not a SOCKS5 client (first byte 0x{buf[0]:02x})")
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return False
        methods = bytes(buf[2 : 2 + buf[1]])
        del buf[: 2 + buf[1]]
        wanted = _NO_AUTH if self._auth is None else _USER_PASS
        if wanted not in methods:
            self._out += bytes((_VERSION, _NO_ACCEPTABLE))
            offered = ", ".join(f"0x{m:02x}" for m in methods) or "none"
            need = "no auth (0x00)" if self._auth is None else "username/password (0x02)"
            raise NoAcceptableMethod(f"client offers methods {offered}; this server needs {need}")
        self._out += bytes((_VERSION, wanted))
        self.state = SocksState.AUTH if wanted == _USER_PASS else SocksState.REQUEST
        return True

    def _user_pass(self) -> tuple[SocksEvent | None, bool]:
        buf = self._buffer
        if not buf:
            return None, False
        if buf[0] != _AUTH_VERSION:
            raise SocksVersionError(f"unknown username/password version 0x{buf[0]:02x}")
        if len(buf) < 2:
            return None, False
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return None, False
        plen = buf[2 + ulen]
        end = 3 + ulen + plen
        if len(buf) < end:
            return None, False
        # surrogateescape keeps arbitrary bytes distinct, so two passwords never compare equal
        # after decoding unless their bytes are equal.
        username = bytes(buf[2 : 2 + ulen]).decode("utf-8", "surrogateescape")
        password = bytes(buf[3 + ulen : end]).decode("utf-8", "surrogateescape")
        del buf[:end]
        assert self._auth is not None  # AUTH is only entered with an auth callback
        if not self._auth(username, password):
            self._out += bytes((_AUTH_VERSION, 0x01))
            self.state = SocksState.CLOSED
            buf.clear()
            return AuthFailed(username), True
        self._out += bytes((_AUTH_VERSION, 0x00))
        self._username = username
        self.state = SocksState.REQUEST
        return None, True

    def _request(self) -> tuple[SocksEvent | None, bool]:
        buf = self._buffer
        if not buf:
            return None, False
        if buf[0] != _VERSION:
            raise SocksVersionError(f"request version 0x{buf[0]:02x} is not SOCKS5")
        if len(buf) < 2:
            return None, False
        cmd = buf[1]
        if cmd != _CMD_CONNECT:
            name = _CMD_NAMES.get(cmd, f"command 0x{cmd:02x}")
            self._fail_request(CommandNotSupported(f"{name} is not supported; only CONNECT is"))
        if len(buf) < 4:
            return None, False
        # buf[2] is RSV; RFC 1928 says 00 but nothing depends on it, so it is not checked.
        atyp = buf[3]
        host: str
        kind: AddressType
        if atyp == _ATYP_IPV4:
            end = 4 + 4
            if len(buf) < end + 2:
                return None, False
            host, kind = str(ipaddress.IPv4Address(bytes(buf[4:end]))), "ipv4"
        elif atyp == _ATYP_IPV6:
            end = 4 + 16
            if len(buf) < end + 2:
                return None, False
            host, kind = str(ipaddress.IPv6Address(bytes(buf[4:end]))), "ipv6"
        elif atyp == _ATYP_DOMAIN:
            if len(buf) < 5:
                return None, False
            end = 5 + buf[4]
            if len(buf) < end + 2:
                return None, False
            host, kind = self._domain(bytes(buf[5:end])), "domain"
        else:
            self._fail_request(
                AddressTypeNotSupported(f"address type 0x{atyp:02x} is not supported")
            )
        (port,) = struct.unpack_from("!H", buf, end)
        del buf[: end + 2]
        self.state = SocksState.CONNECTING
        return ConnectRequest(host, port, kind, self._username), True

    def _domain(self, raw: bytes) -> str:
        # Names are ASCII on the wire (IDNA); control bytes or NUL would only be mischief.
        if not raw or not all(0x21 <= b <= 0x7E for b in raw):
            self._fail_request(BadRequest(f"invalid domain name {raw!r} in CONNECT request"))
        return raw.decode("ascii")

"""HTTP CONNECT proxy requests (RFC 9110 §9.3.6), server side, sans-I/O.

``ConnectParser`` takes the client's bytes and yields one ``ConnectRequest`` once the head is
complete; the bytes after the head (a client that does not wait for the 200) are kept for the
caller to forward. The reply builders put burrow's reason in a ``Burrow-Error`` header so a
client sees why the dial failed (refused, timeout, not allowed) instead of a bare 502, the way
Tailscale's proxy reports ``Tailscale-Connect-Error``.

Errors carry the response to send (``err.response()``); send it, then close:

    ConnectProxyError
    ├── BadRequest               400: not HTTP, bad target, bad header, bare LF
    ├── MethodNotAllowed         405: GET, POST, ...: this is a CONNECT-only proxy
    ├── HeadTooLarge             431: head over MAX_HEAD bytes or MAX_HEADERS lines
    ├── VersionNotSupported      505: not HTTP/1.0 or HTTP/1.1
    └── EarlyDataTooLarge        400: too many bytes after the head before the reply
"""

from __future__ import annotations

import base64
import binascii
import http
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

__all__ = [
    "MAX_EARLY_DATA",
    "MAX_HEAD",
    "MAX_HEADERS",
    "STATUS_FOR_RESET",
    "BadRequest",
    "ConnectParser",
    "ConnectProxyError",
    "ConnectRequest",
    "ConnectStateError",
    "EarlyDataTooLarge",
    "HeadTooLarge",
    "MethodNotAllowed",
    "VersionNotSupported",
    "connect_error",
    "connect_ok",
    "proxy_auth_required",
    "reset_response",
    "status_for_reset",
]

MAX_HEAD: Final = 8 * 1024
"""Most bytes in a request head, blank line included; real CONNECT heads are a few hundred."""

MAX_HEADERS: Final = 100
MAX_EARLY_DATA: Final = 64 * 1024
"""Most bytes a client may send after the head before the reply (e.g. a TLS ClientHello)."""

MAX_MESSAGE: Final = 512
"""Longest ``Burrow-Error`` message; longer ones are cut, they are for humans."""

STATUS_FOR_RESET: Final[Mapping[str, int]] = MappingProxyType(
    {
        "not_allowed": 403,
        "refused": 502,
        "unreachable": 502,
        "network_unreachable": 502,
        # 502, not 404: the proxy could not reach an upstream; 404 would claim an origin said so.
        "no_such_tunnel": 502,
        "timeout": 504,
    }
)
"""HTTP status for each burrow stream reset code; anything else is 502."""

_TOKEN_RE: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOST_RE: Final = re.compile(r"[A-Za-z0-9._~-]{1,255}")
_BARE_LF_RE: Final = re.compile(rb"(?<!\r)\n")
_BARE_CR_RE: Final = re.compile(rb"\r(?=[^\n])")  # a CR at the end may await its LF
_CTL_RE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION_RE: Final = re.compile(r"HTTP/(\d)\.(\d)")
_CODE_RE: Final = re.compile(r"[^A-Za-z0-9_.-]")


def status_for_reset(code: str) -> int:
    """The HTTP status to answer a CONNECT whose upstream stream was reset with ``code``."""
    return STATUS_FOR_RESET.get(code, 502)


# --- replies -------------------------------------------------------------------------------


def connect_ok() -> bytes:
    """The 200 that turns the connection into a byte pipe."""
    return b"HTTP/1.1 200 Connection established\r\n\r\n"


def _header_value(text: str, limit: int = MAX_MESSAGE) -> str:
    """Make ``text`` safe in a header: no CR/LF (no injected headers), ASCII only, bounded."""
    text = _CTL_RE.sub(" ", text).encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def connect_error(
    status: int, code: str, message: str, *, headers: Iterable[tuple[str, str]] = ()
) -> bytes:
    """A refusal: ``Burrow-Error: <code>: <message>``, no body, and ``Connection: close``,
    because the client must open a new connection to try again."""
    if not 400 <= status <= 599:
        raise ValueError(f"status {status} is not an error status")
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    code = _CODE_RE.sub("_", code)[:64] or "error"
    lines = [f"HTTP/1.1 {status} {reason}", f"Burrow-Error: {code}: {_header_value(message)}"]
    lines += [f"{name}: {_header_value(value)}" for name, value in headers]
    lines += ["Content-Length: 0", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("ascii")


def reset_response(code: str, message: str) -> bytes:
    """The refusal for an upstream stream reset with ``code`` (see ``STATUS_FOR_RESET``)."""
    return connect_error(status_for_reset(code), code, message)


def proxy_auth_required(
    message: str = "this proxy needs credentials; put user:password in the proxy URL",
    realm: str = "burrow",
) -> bytes:
    """407, sent when credentials are missing or wrong; the challenge makes curl and browsers
    retry with Basic credentials."""
    realm = _header_value(realm, 64).replace('"', "'")
    return connect_error(
        407, "auth_required", message, headers=[("Proxy-Authenticate", f'Basic realm="{realm}"')]
    )


# --- errors --------------------------------------------------------------------------------


class ConnectProxyError(Exception):
    """The client's request cannot be served; ``response()`` is what to send before closing."""

    status = 400
    code = "bad_request"

    def response(self) -> bytes:
        return connect_error(self.status, self.code, str(self))


class BadRequest(ConnectProxyError):
    pass


class MethodNotAllowed(ConnectProxyError):
    status = 405
    code = "method_not_allowed"

    def response(self) -> bytes:
        return connect_error(self.status, self.code, str(self), headers=[("Allow", "CONNECT")])


class HeadTooLarge(ConnectProxyError):
    status = 431
    code = "head_too_large"


class VersionNotSupported(ConnectProxyError):
    status = 505
    code = "version_not_supported"


class EarlyDataTooLarge(ConnectProxyError):
    code = "early_data_too_large"


class ConnectStateError(RuntimeError):
    """The caller used the parser out of order; a bug, not the peer's."""


# --- parsing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A complete CONNECT head. ``host`` has no brackets (``::1``, not ``[::1]``);
    ``credentials`` is the Basic ``(user, password)`` from Proxy-Authorization, if any. That
    header is not in ``headers`` and credentials are not in the repr, so logging a request
    never logs a password."""

    host: str
    port: int
    http_version: str
    headers: tuple[tuple[str, str], ...] = ()
    credentials: tuple[str, str] | None = field(default=None, repr=False)

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (any case), or None."""
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


class ConnectParser:
    """One client connection's CONNECT head. Feed bytes until ``receive_data`` returns the
    request; a ConnectProxyError means send ``err.response()`` and close."""

    __slots__ = ("_buffer", "_failed", "_line", "request")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failed = False
        self._line: tuple[str, int, str] | None = None
        self.request: ConnectRequest | None = None

    @property
    def buffered(self) -> int:
        """Bytes held from the client: the head so far (under MAX_HEAD) or, once the request
        is parsed, early data (at most MAX_EARLY_DATA)."""
        return len(self._buffer)

    def trailing_data(self) -> bytes:
        """Bytes the client sent after the head; they belong to the upstream. Emptied by the
        call."""
        if self.request is None:
            raise ConnectStateError("no request has been parsed yet")
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def receive_data(self, data: bytes) -> ConnectRequest | None:
        """Feed bytes; returns the request once, when its head is complete, else None.
        Bytes after that are kept for ``trailing_data``; after an error they are ignored."""
        if self._failed:
            return None
        self._buffer += data
        try:
            if self.request is not None:
                if len(self._buffer) > MAX_EARLY_DATA:
                    raise EarlyDataTooLarge(
                        f"client sent more than {MAX_EARLY_DATA} bytes before the CONNECT reply"
                    )
                return None
            return self._parse()
        except ConnectProxyError:
            self._failed = True
            self._buffer.clear()
            raise

    def _parse(self) -> ConnectRequest | None:
        buf = self._buffer
        head_end = buf.find(b"\r\n\r\n", 0, MAX_HEAD)
        scan = buf if head_end < 0 else buf[: head_end + 4]
        _check_first_bytes(scan)
        if self._line is None:
            line_end = buf.find(b"\r\n", 0, MAX_HEAD)
            if line_end >= 0:
                # Answer a GET or a bad target now, without waiting for the headers.
                self._line = _parse_request_line(bytes(buf[:line_end]))
        if _BARE_LF_RE.search(scan) or _BARE_CR_RE.search(scan):
            raise BadRequest("request lines must end with CRLF")
        if head_end < 0 or self._line is None:
            if len(buf) >= MAX_HEAD:
                raise HeadTooLarge(f"request head is longer than {MAX_HEAD} bytes")
            return None
        host, port, version = self._line
        lines = bytes(buf[:head_end]).split(b"\r\n")
        del buf[: head_end + 4]
        headers = _parse_headers(lines[1:])
        auth = [value for name, value in headers if name.lower() == "proxy-authorization"]
        if len(auth) > 1:
            raise BadRequest("more than one Proxy-Authorization header")
        credentials = _basic_credentials(auth[0]) if auth else None
        headers = tuple((k, v) for k, v in headers if k.lower() != "proxy-authorization")
        self.request = ConnectRequest(host, port, version, headers, credentials)
        if len(buf) > MAX_EARLY_DATA:
            raise EarlyDataTooLarge(
                f"client sent more than {MAX_EARLY_DATA} bytes before the CONNECT reply"
            )
        return self.request


def _check_first_bytes(buf: bytes | bytearray) -> None:
    """Fail fast on a client speaking TLS or SOCKS to this port: the method must be a token,
    so anything else before the first space is not HTTP."""
    space = buf.find(b" ")
    method = buf if space < 0 else buf[:space]
    if space == 0 or (method and not _TOKEN_RE.fullmatch(method)):
        bad = next((b for b in method if not _TOKEN_RE.fullmatch(bytes((b,)))), 0x20)
        raise BadRequest(
            f"not an HTTP request (byte 0x{bad:02x} in the method); is the client speaking TLS "
            "or SOCKS to the HTTP proxy port?"
        )


def _parse_request_line(raw: bytes) -> tuple[str, int, str]:
    try:
        line = raw.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("request line is not ASCII") from None
    parts = line.split(" ")
    if len(parts) != 3:
        raise BadRequest(f"malformed request line {_header_value(line, 80)!r}")
    method, target, version = parts
    if method != "CONNECT":
        raise MethodNotAllowed(
            f"this is a CONNECT-only proxy and cannot serve {_header_value(method, 32)}; "
            "set it as the client's proxy (HTTPS_PROXY) instead of requesting it directly"
        )
    match = _VERSION_RE.fullmatch(version)
    if match is None:
        raise BadRequest(f"malformed HTTP version {_header_value(version, 32)!r}")
    if match[1] != "1":
        raise VersionNotSupported(f"HTTP version {version} is not supported; use HTTP/1.1")
    host, port = _parse_target(target)
    return host, port, version


def _parse_target(target: str) -> tuple[str, int]:
    """Authority form only (``host:port``, ``[v6]:port``), as RFC 9110 requires for CONNECT."""
    shown = _header_value(target, 80)
    if target.startswith("["):
        inside, bracket, rest = target[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise BadRequest(f"CONNECT target {shown!r} is not [ipv6]:port")
        try:
            if "%" in inside:
                raise ValueError("zone")
            host = str(ipaddress.IPv6Address(inside))
        except ValueError:
            raise BadRequest(f"CONNECT target {shown!r} has an invalid IPv6 address") from None
        port_text = rest[1:]
    else:
        host, colon, port_text = target.rpartition(":")
        if not colon or not host:
            raise BadRequest(f"CONNECT target {shown!r} is not host:port")
        if ":" in host:
            raise BadRequest(f"IPv6 addresses go in brackets, e.g. [::1]:443 (got {shown!r})")
        if not _HOST_RE.fullmatch(host):
            raise BadRequest(f"CONNECT target {shown!r} has an invalid host name")
    if not (1 <= len(port_text) <= 5 and port_text.isdigit() and port_text.isascii()):
        raise BadRequest(f"CONNECT target {shown!r} has an invalid port")
    port = int(port_text)
    if not 1 <= port <= 0xFFFF:
        raise BadRequest(f"CONNECT target {shown!r} has port {port}, outside 1-65535")
    return host, port


def _parse_headers(lines: list[bytes]) -> tuple[tuple[str, str], ...]:
    if len(lines) > MAX_HEADERS:
        raise HeadTooLarge(f"request has more than {MAX_HEADERS} header lines")
    headers: list[tuple[str, str]] = []
    for raw in lines:
        if raw[:1] in (b" ", b"\t"):
            raise BadRequest("folded header lines are not allowed")
        name, colon, value = raw.partition(b":")
        if not colon or not _TOKEN_RE.fullmatch(name):
            raise BadRequest(f"malformed header line {_header_value(raw.decode('latin-1'), 80)!r}")
        text = value.decode("latin-1").strip(" \t")
        if _CTL_RE.search(text):
            raise BadRequest(f"header {name.decode('ascii')} has a control character")
        headers.append((name.decode("ascii"), text))
    return tuple(headers)


def _basic_credentials(value: str) -> tuple[str, str] | None:
    """``Basic base64(user:password)`` (RFC 7617); other schemes are not ours, so they count
    as no credentials and earn a 407 if the caller needs some."""
    scheme, _, param = value.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(param.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("Proxy-Authorization Basic credentials are not base64") from None
    # surrogateescape: arbitrary bytes stay distinct, so no two passwords decode alike.
    user, colon, password = raw.decode("utf-8", "surrogateescape").partition(":")
    if not colon:
        raise BadRequest("Proxy-Authorization Basic credentials lack the ':' after the user")
    return user, password

"""Client halves of SOCKS5 (RFC 1928, RFC 1929) and HTTP CONNECT, sans-I/O.

The doctor reports a proxy's exact answer, so these keep the reply code and its meaning rather
than folding every failure into "proxy error" as general-purpose clients do.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

SOCKS_REPLIES: Final[Mapping[int, str]] = {
    0x00: "succeeded",
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired (timed out)",
    0x07: "command not supported",
    0x08: "address type not supported",
}
MAX_HEAD: Final = 16 * 1024


class ProxyWireError(Exception):
    """The proxy's answer is malformed (not a SOCKS5 or HTTP proxy, or a broken one)."""


class SocksRefused(Exception):
    """The SOCKS server answered with a failure; ``code`` is the REP byte."""

    def __init__(self, code: int, stage: str = "connect") -> None:
        self.code = code
        self.stage = stage
        meaning = SOCKS_REPLIES.get(code, "unassigned reply code")
        super().__init__(f"SOCKS reply 0x{code:02x} ({meaning})")


def socks_meaning(code: int) -> str:
    return SOCKS_REPLIES.get(code, "unassigned reply code")


class SocksClient:
    """Greeting, optional user/password, CONNECT by name (the proxy resolves it).

    ``receive(data)`` consumes bytes and returns what to send next; ``done`` is set once the
    CONNECT succeeded (``trailing`` holds any bytes the target already sent)."""

    def __init__(self, host: str, port: int, credentials: tuple[str, str] | None = None) -> None:
        self.host = host
        self.port = port
        self.credentials = credentials
        self.done = False
        self.bound: tuple[str, int] | None = None
        self.trailing = b""
        self._state = "greeting"
        self._buf = bytearray()

    def start(self) -> bytes:
        methods = b"\x00\x02" if self.credentials else b"\x00"
        return bytes((5, len(methods))) + methods

    def _request(self) -> bytes:
        try:
            ip = ipaddress.ip_address(self.host.strip("[]"))
        except ValueError:
            name = self.host.encode("idna")
            if len(name) > 255:
                raise ProxyWireError("host name too long for SOCKS5") from None
            address = b"\x03" + bytes((len(name),)) + name
        else:
            address = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
        return b"\x05\x01\x00" + address + struct.pack("!H", self.port)

    def receive(self, data: bytes) -> bytes:
        self._buf += data
        if len(self._buf) > MAX_HEAD:
            raise ProxyWireError("SOCKS reply too long")
        out = b""
        while True:
            step = self._step()
            if step is None:
                return out
            out += step
            if self.done:
                return out

    def _step(self) -> bytes | None:
        buf = self._buf
        if self._state == "greeting":
            if len(buf) < 2:
                return None
            if buf[0] != 5:
                raise ProxyWireError(f"not a SOCKS5 proxy (first byte 0x{buf[0]:02x})")
            method = buf[1]
            del buf[:2]
            if method == 0x00:
                self._state = "reply"
                return self._request()
            if method == 0x02 and self.credentials:
                user, password = (s.encode() for s in self.credentials)
                self._state = "auth"
                return bytes((1, len(user))) + user + bytes((len(password),)) + password
            if method == 0xFF:
                raise ProxyWireError(
                    "the SOCKS proxy accepts none of our methods"
                    + ("" if self.credentials else " (it wants a user and password)")
                )
            raise ProxyWireError(f"the SOCKS proxy chose method 0x{method:02x}")
        if self._state == "auth":
            if len(buf) < 2:
                return None
            status = buf[1]
            del buf[:2]
            if status != 0:
                raise SocksRefused(status, stage="auth")
            self._state = "reply"
            return self._request()
        if self._state == "reply":
            if len(buf) < 5:
                return None
            if buf[0] != 5:
                raise ProxyWireError("malformed SOCKS5 reply")
            code, atyp = buf[1], buf[3]
            size = {1: 4, 4: 16}.get(atyp)
            if size is None:
                if atyp != 3:
                    raise ProxyWireError(f"unknown address type 0x{atyp:02x} in SOCKS reply")
                size = 1 + buf[4]
            total = 4 + size + 2
            if len(buf) < total:
                return None
            if code != 0:
                raise SocksRefused(code)
            raw = bytes(buf[4 : 4 + size])
            host = (
                raw[1:].decode("ascii", "replace") if atyp == 3 else str(ipaddress.ip_address(raw))
            )
            (port,) = struct.unpack_from("!H", buf, 4 + size)
            self.bound = (host, port)
            self.trailing = bytes(buf[total:])
            del buf[:]
            self.done = True
            return b""
        return None


@dataclass
class ConnectResponse:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    trailing: bytes = b""

    def error_header(self) -> str | None:
        """The proxy's own error text: burrow's, Tailscale's (two spellings)."""
        for name in ("burrow-error", "tailscale-connect-error", "connect-error"):
            if name in self.headers:
                return self.headers[name]
        return None


def connect_request(host: str, port: int, credentials: tuple[str, str] | None = None) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if credentials:
        import base64

        token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_connect_response(data: bytes) -> ConnectResponse | None:
    """The proxy's head once complete (None until then); the body is not read."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > MAX_HEAD:
            raise ProxyWireError("HTTP proxy answer head too long")
        if data and not b"HTTP/".startswith(data[:5]):
            raise ProxyWireError("not an HTTP proxy answer")
        return None
    lines = data[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ProxyWireError(f"not an HTTP proxy answer: {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return ConnectResponse(
        int(parts[1]), parts[2] if len(parts) > 2 else "", headers, data[end + 4 :]
    )

"""PROXY protocol headers (HAProxy spec, versions 1 and 2), sans-I/O.

The agent prepends one of these to each stream it hands to a local service so the service sees
the real client address; the relay parses them when it sits behind a load balancer that sends
one. Nothing here touches a socket: encoders return bytes, the parser consumes a buffer.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "V1_MAX_LENGTH",
    "V2_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "encode",
    "encode_v1",
    "encode_v2",
    "parse",
]

V1_MAX_LENGTH = 107
"""Longest v1 line the spec allows, CRLF included ("PROXY TCP6" with two full IPv6 addresses)."""

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_LENGTH = 4096
"""Cap on the v2 address+TLV block; the spec allows 65535 but real senders use a few hundred."""

_V1_PREFIX = b"PROXY "
_V2_FIXED = 16  # signature + ver/cmd + family + length
_V2_CMD_LOCAL = 0x20
_V2_CMD_PROXY = 0x21
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
_V2_INET_LEN = 12  # 4 + 4 + 2 + 2
_V2_INET6_LEN = 36  # 16 + 16 + 2 + 2
_V2_UNIX_LEN = 216  # 108 + 108
_V2_ADDR_LEN = {0x1: _V2_INET_LEN, 0x2: _V2_INET6_LEN, 0x3: _V2_UNIX_LEN}

Address = tuple[str, int]
Family = Literal["TCP4", "TCP6", "UNKNOWN"]


class ProxyProtocolError(ValueError):
    """A PROXY header is malformed or too long; the connection should be dropped."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY header; ``src``/``dst`` are None when the sender gave no usable address
    (v1 UNKNOWN, v2 LOCAL, or a v2 family burrow does not route such as UNIX or UDP)."""

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    family: Family
    src: Address | None
    dst: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


# --- encoding ------------------------------------------------------------------------------


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip_or_none(host: str) -> _IP | None:
    """Parse ``host`` as an IP literal, dropping an IPv6 zone (it has no meaning to the peer)."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    return ip


def _resolve(src: Address, dst: Address) -> tuple[Family, _IP, _IP] | tuple[Family, None, None]:
    """Pick the family for an address pair; a mixed v4/v6 pair is sent as v4-mapped IPv6,
    as HAProxy does, rather than losing the address. A pair that cannot be represented (not IP,
    port out of range) is UNKNOWN: the addresses come from the peer, and a bad one should cost
    the service the client address, not the stream."""
    s, d = _ip_or_none(src[0]), _ip_or_none(dst[0])
    if s is None or d is None or not (0 <= src[1] <= 0xFFFF and 0 <= dst[1] <= 0xFFFF):
        return "UNKNOWN", None, None
    if s.version == d.version:
        return ("TCP4" if s.version == 4 else "TCP6"), s, d

    def mapped(ip: _IP) -> ipaddress.IPv6Address:
        return (
            ip
            if isinstance(ip, ipaddress.IPv6Address)
            else ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
        )

    return "TCP6", mapped(s), mapped(d)


def encode_v1(src: Address, dst: Address) -> bytes:
    """Text header, e.g. ``PROXY TCP4 1.2.3.4 5.6.7.8 111 222\\r\\n``; ``PROXY UNKNOWN\\r\\n``
    when either side is not an IP address and port."""
    family, s, d = _resolve(src, dst)
    if s is None or d is None:
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY {family} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")


def encode_v2(src: Address, dst: Address) -> bytes:
    """Binary header: PROXY over TCP4/TCP6, or LOCAL with family 0 when an address is not an
    IP and port, which tells the receiver to use the connection's own endpoints."""
    family, s, d = _resolve(src, dst)
    if s is None or d is None:
        return V2_SIGNATURE + bytes((_V2_CMD_LOCAL, 0x00)) + b"\x00\x00"
    fam = _V2_TCP4 if family == "TCP4" else _V2_TCP6
    body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    return V2_SIGNATURE + struct.pack("!BBH", _V2_CMD_PROXY, fam, len(body)) + body


def encode(version: Literal["v1", "v2"], src: Address, dst: Address) -> bytes:
    """Encode with the version named in a tunnel's ``proxy_protocol`` setting."""
    if version == "v1":
        return encode_v1(src, dst)
    if version == "v2":
        return encode_v2(src, dst)
    raise ValueError(f"unknown PROXY protocol version {version!r}; expected 'v1' or 'v2'")


# --- parsing -------------------------------------------------------------------------------


def parse(data: bytes) -> tuple[ProxyHeader | None, int]:
    """Parse a header at the start of ``data``: ``(header, bytes consumed)``, or ``(None, 0)``
    when more bytes are needed. Raises ProxyProtocolError if ``data`` cannot begin a valid
    header, so a caller never waits past V1_MAX_LENGTH / 16 + V2_MAX_LENGTH bytes."""
    n = min(len(data), len(V2_SIGNATURE))
    if n == 0:
        return None, 0
    if data[:n] == V2_SIGNATURE[:n]:
        return _parse_v2(data) if n == len(V2_SIGNATURE) else (None, 0)
    n = min(len(data), len(_V1_PREFIX))
    if data[:n] == _V1_PREFIX[:n]:
        return _parse_v1(data) if n == len(_V1_PREFIX) else (None, 0)
    raise ProxyProtocolError("data does not start with a PROXY protocol signature")


def _parse_port(text: str) -> int:
    if not (1 <= len(text) <= 5 and text.isascii() and text.isdigit()):
        raise ProxyProtocolError(f"invalid port {text!r} in PROXY v1 header")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyProtocolError(f"port {port} out of range in PROXY v1 header")
    return port


def _parse_v1(data: bytes) -> tuple[ProxyHeader | None, int]:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyProtocolError("PROXY v1 line has a stray CR or LF")
        return None, 0
    raw = data[:end]
    if b"\r" in raw or b"\n" in raw or b"\x00" in raw:
        raise ProxyProtocolError("PROXY v1 line has a stray CR, LF or NUL")
    try:
        line = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    consumed = end + 2
    if parts[1] == "UNKNOWN":
        # The spec lets the sender put anything after UNKNOWN; the receiver ignores it.
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None), consumed
    if parts[1] not in ("TCP4", "TCP6") or len(parts) != 6:
        raise ProxyProtocolError("PROXY v1 line is not 'PROXY TCP4|TCP6 SRC DST SPORT DPORT'")
    family: Family = "TCP4" if parts[1] == "TCP4" else "TCP6"
    cls = ipaddress.IPv4Address if family == "TCP4" else ipaddress.IPv6Address
    try:
        if "%" in parts[2] or "%" in parts[3]:
            raise ValueError("zone")
        s, d = cls(parts[2]), cls(parts[3])
    except ValueError:
        raise ProxyProtocolError(f"invalid {family} address in PROXY v1 header") from None
    src = (str(s), _parse_port(parts[4]))
    dst = (str(d), _parse_port(parts[5]))
    return ProxyHeader(1, "PROXY", family, src, dst), consumed


def _parse_tlvs(block: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    i = 0
    while i < len(block):
        if i + 3 > len(block):
            raise ProxyProtocolError("truncated TLV in PROXY v2 header")
        kind, size = block[i], int.from_bytes(block[i + 1 : i + 3], "big")
        if i + 3 + size > len(block):
            raise ProxyProtocolError("TLV runs past the end of the PROXY v2 header")
        tlvs.append((kind, block[i + 3 : i + 3 + size]))
        i += 3 + size
    return tuple(tlvs)


def _parse_v2(data: bytes) -> tuple[ProxyHeader | None, int]:
    if len(data) < _V2_FIXED:
        return None, 0
    ver_cmd, fam, length = struct.unpack_from("!BBH", data, len(V2_SIGNATURE))
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"unsupported PROXY header version {ver_cmd >> 4}")
    if ver_cmd not in (_V2_CMD_LOCAL, _V2_CMD_PROXY):
        raise ProxyProtocolError(f"unknown PROXY v2 command {ver_cmd & 0xF}")
    af, proto = fam >> 4, fam & 0xF
    if af > 3 or proto > 2:
        raise ProxyProtocolError(f"invalid PROXY v2 address family byte 0x{fam:02x}")
    if length > V2_MAX_LENGTH:
        raise ProxyProtocolError(f"PROXY v2 header longer than {V2_MAX_LENGTH} bytes")
    addr_len = _V2_ADDR_LEN.get(af, 0) if proto != 0 else 0
    if length < addr_len:
        raise ProxyProtocolError("PROXY v2 length too short for its address family")
    total = _V2_FIXED + length
    if len(data) < total:
        return None, 0
    block = data[_V2_FIXED:total]
    tlvs = _parse_tlvs(block[addr_len:])
    if ver_cmd == _V2_CMD_LOCAL:
        return ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, tlvs), total
    if fam == _V2_TCP4:
        s4, d4 = ipaddress.IPv4Address(block[0:4]), ipaddress.IPv4Address(block[4:8])
        sport, dport = struct.unpack_from("!HH", block, 8)
        return ProxyHeader(2, "PROXY", "TCP4", (str(s4), sport), (str(d4), dport), tlvs), total
    if fam == _V2_TCP6:
        s6, d6 = ipaddress.IPv6Address(block[0:16]), ipaddress.IPv6Address(block[16:32])
        sport, dport = struct.unpack_from("!HH", block, 32)
        return ProxyHeader(2, "PROXY", "TCP6", (str(s6), sport), (str(d6), dport), tlvs), total
    # UNSPEC, UNIX or UDP: the spec says to accept it and fall back to the real endpoints.
    return ProxyHeader(2, "PROXY", "UNKNOWN", None, None, tlvs), total

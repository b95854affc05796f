"""PROXY protocol encoding and parsing against byte literals from HAProxy's spec."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from burrow.wire.proxyproto import (
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode,
    encode_v1,
    encode_v2,
    parse,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def test_signature_constant() -> None:
    assert V2_SIGNATURE == SIG and len(SIG) == 12


# --- v1 ------------------------------------------------------------------------------------


def test_v1_tcp4_exact_bytes() -> None:
    assert (
        encode_v1(("1.2.3.4", 111), ("5.6.7.8", 222)) == b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222\r\n"
    )


def test_v1_tcp6_exact_bytes() -> None:
    got = encode_v1(("2001:db8::1", 56324), ("::1", 443))
    assert got == b"PROXY TCP6 2001:db8::1 ::1 56324 443\r\n"


def test_v1_unknown_for_non_ip() -> None:
    assert encode_v1(("localhost", 1), ("5.6.7.8", 2)) == b"PROXY UNKNOWN\r\n"
    assert encode_v1(("", 0), ("", 0)) == b"PROXY UNKNOWN\r\n"


def test_v1_mixed_families_use_v4_mapped_v6() -> None:
    got = encode_v1(("1.2.3.4", 1), ("::1", 2))
    # str() of a v4-mapped address changed in Python 3.13, so compare with what it gives here.
    mapped = ipaddress.IPv6Address("::ffff:1.2.3.4")
    assert got == f"PROXY TCP6 {mapped} ::1 1 2\r\n".encode()
    assert encode_v2(("1.2.3.4", 1), ("::1", 2))[16:32] == mapped.packed


def test_v1_drops_ipv6_zone() -> None:
    assert encode_v1(("fe80::1%eth0", 1), ("fe80::2", 2)) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


@pytest.mark.parametrize(
    ("line", "header"),
    [
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222\r\n",
            ProxyHeader(1, "PROXY", "TCP4", ("1.2.3.4", 111), ("5.6.7.8", 222)),
        ),
        (
            b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\n",
            ProxyHeader(1, "PROXY", "TCP6", ("2001:db8::1", 0), ("::1", 65535)),
        ),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(1, "PROXY", "UNKNOWN", None, None)),
        (b"PROXY UNKNOWN whatever follows\r\n", ProxyHeader(1, "PROXY", "UNKNOWN", None, None)),
    ],
)
def test_v1_parse(line: bytes, header: ProxyHeader) -> None:
    assert parse(line + b"GET / HTTP/1.1\r\n") == (header, len(line))


def test_v1_round_trip() -> None:
    for src, dst in [(("10.0.0.1", 5000), ("10.0.0.2", 80)), (("::1", 1), ("fe80::9", 65535))]:
        header, n = parse(encode_v1(src, dst))
        assert header is not None and (header.src, header.dst) == (src, dst)
        assert n == len(encode_v1(src, dst))


def test_v1_line_length_limit() -> None:
    a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    header, _ = parse(f"PROXY TCP6 {a} {a} 65535 65535\r\n".encode())
    assert header is not None and header.family == "TCP6"
    longest = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(longest) == V1_MAX_LENGTH
    assert parse(longest) == (ProxyHeader(1, "PROXY", "UNKNOWN", None, None), V1_MAX_LENGTH)
    with pytest.raises(ProxyProtocolError):
        parse(b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15) + b"\r\n")
    with pytest.raises(ProxyProtocolError):  # no CRLF yet, but already past the limit
        parse(b"PROXY UNKNOWN " + b"x" * V1_MAX_LENGTH)


def test_v1_needs_more_bytes() -> None:
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222\r\n"
    for i in range(len(line)):
        assert parse(line[:i]) == (None, 0), line[:i]


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 111\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222 333\r\n",
        b"PROXY TCP4  1.2.3.4 5.6.7.8 111 222\r\n",
        b"PROXY TCP4 ::1 5.6.7.8 111 222\r\n",
        b"PROXY TCP6 1.2.3.4 ::1 111 222\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 111 222\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 111 65536\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +11 222\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1_1 222\r\n",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 111 222\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 111 222\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222\n",
        b"PROXY TCP4 1.2.3.4\r5.6.7.8 111 222\r\n",
        b"PROXY TCP4 1.2.3.\xc3\xa9 5.6.7.8 111 222\r\n",
        b"PROXY " + b"A" * 200,
        b"GET / HTTP/1.1\r\n",
        b"proxy TCP4 1.2.3.4 5.6.7.8 111 222\r\n",
    ],
)
def test_v1_malformed(line: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(line)


# --- v2 ------------------------------------------------------------------------------------

V2_TCP4 = (
    SIG
    + b"\x21\x11\x00\x0c"
    + bytes([1, 2, 3, 4])
    + bytes([5, 6, 7, 8])
    + (111).to_bytes(2, "big")
    + (222).to_bytes(2, "big")
)


def test_v2_tcp4_exact_bytes() -> None:
    assert encode_v2(("1.2.3.4", 111), ("5.6.7.8", 222)) == V2_TCP4
    assert V2_TCP4.hex() == "0d0a0d0a000d0a515549540a2111000c0102030405060708006f00de"


def test_v2_tcp6_exact_bytes() -> None:
    got = encode_v2(("2001:db8::1", 1), ("::1", 2))
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes(15) + b"\x01"
    assert got == SIG + b"\x21\x21\x00\x24" + src + dst + b"\x00\x01\x00\x02"


def test_v2_unknown_is_local() -> None:
    assert encode_v2(("unix", 0), ("1.2.3.4", 1)) == SIG + b"\x20\x00\x00\x00"
    assert parse(SIG + b"\x20\x00\x00\x00") == (
        ProxyHeader(2, "LOCAL", "UNKNOWN", None, None),
        16,
    )


def test_v2_parse_tcp4_with_trailing_data() -> None:
    assert parse(V2_TCP4 + b"payload") == (
        ProxyHeader(2, "PROXY", "TCP4", ("1.2.3.4", 111), ("5.6.7.8", 222)),
        len(V2_TCP4),
    )


def test_v2_round_trip() -> None:
    for src, dst in [(("10.0.0.1", 0), ("10.0.0.2", 65535)), (("2001:db8::7", 9), ("::", 8))]:
        raw = encode_v2(src, dst)
        header, n = parse(raw)
        assert n == len(raw)
        assert header is not None and header.command == "PROXY"
        assert (header.src, header.dst) == (src, dst)


def test_v2_tlvs_are_returned() -> None:
    tlvs = b"\x04\x00\x02hi" + b"\x30\x00\x00"
    raw = SIG + b"\x21\x11" + (12 + len(tlvs)).to_bytes(2, "big") + V2_TCP4[16:] + tlvs
    header, n = parse(raw)
    assert header is not None and n == len(raw)
    assert header.tlvs == ((0x04, b"hi"), (0x30, b""))


def test_v2_unix_and_udp_fall_back_to_unknown() -> None:
    unix = SIG + b"\x21\x31" + (216).to_bytes(2, "big") + bytes(216)
    assert parse(unix) == (ProxyHeader(2, "PROXY", "UNKNOWN", None, None), len(unix))
    udp = SIG + b"\x21\x12\x00\x0c" + V2_TCP4[16:]
    assert parse(udp) == (ProxyHeader(2, "PROXY", "UNKNOWN", None, None), len(udp))


def test_v2_needs_more_bytes() -> None:
    for i in range(len(V2_TCP4)):
        assert parse(V2_TCP4[:i]) == (None, 0)


@pytest.mark.parametrize(
    "raw",
    [
        SIG + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 frame
        SIG + b"\x22\x11\x00\x0c" + bytes(12),  # unknown command
        SIG + b"\x21\x41\x00\x0c" + bytes(12),  # unknown family
        SIG + b"\x21\x13\x00\x0c" + bytes(12),  # unknown transport
        SIG + b"\x21\x11\x00\x0b" + bytes(11),  # too short for TCP4
        SIG + b"\x21\x21\x00\x0c" + bytes(12),  # too short for TCP6
        SIG + b"\x21\x11\x00\x0e" + bytes(12) + b"\x01\x00",  # truncated TLV
        SIG + b"\x21\x11\x00\x10" + bytes(12) + b"\x01\x00\x09\x00",  # TLV past the end
        SIG + b"\x21\x11" + (V2_MAX_LENGTH + 1).to_bytes(2, "big"),  # too long
        b"\r\n\r\n\x00\r\nQUITX",
    ],
)
def test_v2_malformed(raw: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(raw)


def test_encode_dispatch() -> None:
    src, dst = ("1.2.3.4", 111), ("5.6.7.8", 222)
    assert encode("v1", src, dst) == encode_v1(src, dst)
    assert encode("v2", src, dst) == encode_v2(src, dst)
    with pytest.raises(ValueError):
        encode("v3", src, dst)  # type: ignore[arg-type]


def test_encode_bad_port_is_unknown() -> None:
    assert encode_v1(("1.2.3.4", 70000), ("5.6.7.8", 1)) == b"PROXY UNKNOWN\r\n"
    assert encode_v2(("1.2.3.4", -1), ("5.6.7.8", 1)) == SIG + b"\x20\x00\x00\x00"


# --- properties ----------------------------------------------------------------------------

_prefixes = st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", SIG, SIG + b"\x21"])


@given(prefix=_prefixes, tail=st.binary(max_size=300))
def test_random_bytes_never_raise_anything_else(prefix: bytes, tail: bytes) -> None:
    data = prefix + tail
    try:
        header, n = parse(data)
    except ProxyProtocolError:
        return
    if header is None:
        assert n == 0
    else:
        assert 0 < n <= len(data)


@st.composite
def _addr_pairs(draw: st.DrawFn) -> tuple[tuple[str, int], tuple[str, int]]:
    v6 = draw(st.booleans())
    ips = st.ip_addresses(v=6 if v6 else 4).map(str)
    ports = st.integers(0, 65535)
    return (draw(ips), draw(ports)), (draw(ips), draw(ports))


@given(pair=_addr_pairs(), version=st.sampled_from(["v1", "v2"]))
def test_round_trip_property(pair: tuple[tuple[str, int], tuple[str, int]], version: str) -> None:
    src, dst = pair
    raw = encode("v1" if version == "v1" else "v2", src, dst)
    header, n = parse(raw + b"rest")
    assert n == len(raw)
    assert header is not None and (header.src, header.dst) == (src, dst)

"""SOCKS5 server state machine against byte literals from RFC 1928 and RFC 1929."""

from __future__ import annotations

import ipaddress
import struct
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from burrow.wire.socks import (
    ADDRESS_TYPE_NOT_SUPPORTED,
    COMMAND_NOT_SUPPORTED,
    CONNECTION_REFUSED,
    GENERAL_FAILURE,
    HOST_UNREACHABLE,
    MAX_EARLY_DATA,
    MAX_HANDSHAKE_BUFFER,
    NETWORK_UNREACHABLE,
    NOT_ALLOWED,
    SUCCEEDED,
    TTL_EXPIRED,
    AddressType,
    AddressTypeNotSupported,
    AuthFailed,
    BadRequest,
    CommandNotSupported,
    ConnectRequest,
    EarlyDataTooLarge,
    NoAcceptableMethod,
    SocksError,
    SocksServer,
    SocksState,
    SocksStateError,
    SocksVersionError,
    encode_reply,
    reply_code_for_reset,
)

NO_AUTH_GREETING = b"\x05\x01\x00"
CONNECT_IPV4 = b"\x05\x01\x00\x01\x0a\x00\x00\x05\x15\x38"  # 10.0.0.5:5432
CONNECT_IPV6 = b"\x05\x01\x00\x04" + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01" + b"\x01\xbb"
CONNECT_DOMAIN = b"\x05\x01\x00\x03\x0bdb.internal\x15\x38"
FAILURE_TAIL = b"\x00\x01\x00\x00\x00\x00\x00\x00"  # RSV, ATYP IPv4, 0.0.0.0, port 0


def check_password(user: str, password: str) -> bool:
    return (user, password) == ("alice", "s3cret")


def opened(request: bytes = CONNECT_IPV4) -> tuple[SocksServer, ConnectRequest]:
    server = SocksServer()
    assert server.receive_data(NO_AUTH_GREETING) == []
    assert server.data_to_send() == b"\x05\x00"
    events = server.receive_data(request)
    assert len(events) == 1 and isinstance(events[0], ConnectRequest)
    assert server.state is SocksState.CONNECTING
    assert server.data_to_send() == b""  # nothing until the caller knows the outcome
    return server, events[0]


# --- targets -------------------------------------------------------------------------------


def test_ipv4_connect_exact_bytes() -> None:
    server, request = opened(CONNECT_IPV4)
    assert request == ConnectRequest("10.0.0.5", 5432, "ipv4")
    server.reply(SUCCEEDED, ("127.0.0.1", 40000))
    assert server.data_to_send() == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x9c\x40"
    assert server.state is SocksState.OPEN and not server.should_close
    assert server.trailing_data() == b""


def test_ipv6_connect_exact_bytes() -> None:
    server, request = opened(CONNECT_IPV6)
    assert request == ConnectRequest("2001:db8::1", 443, "ipv6")
    server.reply(SUCCEEDED, ("::1", 1))
    assert server.data_to_send() == b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01" + b"\x00\x01"


def test_domain_connect_exact_bytes() -> None:
    server, request = opened(CONNECT_DOMAIN)
    assert request == ConnectRequest("db.internal", 5432, "domain")
    server.reply(SUCCEEDED)
    assert server.data_to_send() == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


def test_domain_of_255_bytes() -> None:
    name = b"a" * 255
    _, request = opened(b"\x05\x01\x00\x03\xff" + name + b"\x00\x50")
    assert request.host == name.decode() and request.port == 80


def test_byte_at_a_time_gives_the_same_events() -> None:
    server = SocksServer()
    events = []
    for byte in NO_AUTH_GREETING + CONNECT_DOMAIN:
        events += server.receive_data(bytes((byte,)))
    assert events == [ConnectRequest("db.internal", 5432, "domain")]
    assert server.data_to_send() == b"\x05\x00"


def test_client_offering_several_methods_gets_no_auth() -> None:
    server = SocksServer()
    server.receive_data(b"\x05\x03\x02\x01\x00")
    assert server.data_to_send() == b"\x05\x00"


# --- failure replies -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        GENERAL_FAILURE,
        NOT_ALLOWED,
        NETWORK_UNREACHABLE,
        HOST_UNREACHABLE,
        CONNECTION_REFUSED,
        TTL_EXPIRED,
    ],
)
def test_failure_reply_closes(code: int) -> None:
    server, _ = opened()
    server.receive_data(b"early")
    server.reply(code)
    assert server.data_to_send() == bytes((0x05, code)) + FAILURE_TAIL
    assert server.should_close and server.buffered == 0
    with pytest.raises(SocksStateError):
        server.trailing_data()
    assert server.receive_data(b"more") == []


@pytest.mark.parametrize(
    ("reset", "code"),
    [
        ("refused", 0x05),
        ("unreachable", 0x04),
        ("network_unreachable", 0x03),
        ("timeout", 0x06),
        ("not_allowed", 0x02),
        ("no_such_tunnel", 0x04),
        ("protocol", 0x01),
        ("", 0x01),
    ],
)
def test_reply_code_for_reset(reset: str, code: int) -> None:
    assert reply_code_for_reset(reset) == code


def test_encode_reply_with_domain_bound() -> None:
    assert encode_reply(SUCCEEDED, ("relay.example", 80)) == (
        b"\x05\x00\x00\x03\x0drelay.example\x00\x50"
    )


@pytest.mark.parametrize(
    ("code", "bound"),
    [(256, ("0.0.0.0", 0)), (-1, ("0.0.0.0", 0)), (0, ("0.0.0.0", 70000)), (0, ("", 1))],
)
def test_encode_reply_rejects_bad_arguments(code: int, bound: tuple[str, int]) -> None:
    with pytest.raises(ValueError):
        encode_reply(code, bound)


def test_encode_reply_rejects_overlong_name() -> None:
    with pytest.raises(ValueError):
        encode_reply(SUCCEEDED, ("a" * 256, 1))
    with pytest.raises(ValueError):
        encode_reply(SUCCEEDED, ("a..b", 1))


# --- username/password (RFC 1929) ----------------------------------------------------------


def test_username_password_success() -> None:
    server = SocksServer(check_password)
    server.receive_data(b"\x05\x02\x00\x02")
    assert server.data_to_send() == b"\x05\x02"
    assert server.state is SocksState.AUTH
    assert server.receive_data(b"\x01\x05alice\x06s3cret") == []
    assert server.data_to_send() == b"\x01\x00"
    events = server.receive_data(CONNECT_DOMAIN)
    assert events == [ConnectRequest("db.internal", 5432, "domain", username="alice")]


def test_username_password_failure_sends_01_then_closes() -> None:
    server = SocksServer(check_password)
    server.receive_data(b"\x05\x01\x02")
    assert server.data_to_send() == b"\x05\x02"
    events = server.receive_data(b"\x01\x05alice\x05wrong" + CONNECT_IPV4)
    assert events == [AuthFailed("alice")]
    assert server.data_to_send() == b"\x01\x01"
    assert server.should_close and server.buffered == 0
    assert server.receive_data(CONNECT_IPV4) == []
    assert server.data_to_send() == b""


def test_credentials_are_decoded_losslessly() -> None:
    seen: list[tuple[str, str]] = []

    def record(user: str, password: str) -> bool:
        seen.append((user, password))
        return False

    for password in (b"\xff", b"\xfe"):
        server = SocksServer(record)
        server.receive_data(b"\x05\x01\x02\x01\x00\x01" + password)
    # Two different byte strings must not decode to the same password.
    assert seen[0] != seen[1]
    assert seen[0][1].encode("utf-8", "surrogateescape") == b"\xff"


def test_auth_configured_rejects_no_auth_client() -> None:
    server = SocksServer(check_password)
    with pytest.raises(NoAcceptableMethod, match="username/password"):
        server.receive_data(NO_AUTH_GREETING)
    assert server.data_to_send() == b"\x05\xff"
    assert server.should_close


def test_no_auth_server_rejects_password_only_client() -> None:
    server = SocksServer()
    with pytest.raises(NoAcceptableMethod) as info:
        server.receive_data(b"\x05\x01\x02")
    assert info.value.reply_code is None
    assert server.data_to_send() == b"\x05\xff"


def test_greeting_with_no_methods() -> None:
    server = SocksServer()
    with pytest.raises(NoAcceptableMethod, match="none"):
        server.receive_data(b"\x05\x00")
    assert server.data_to_send() == b"\x05\xff"


def test_bad_auth_version_closes_without_reply() -> None:
    server = SocksServer(check_password)
    server.receive_data(b"\x05\x01\x02")
    server.data_to_send()
    with pytest.raises(SocksVersionError):
        server.receive_data(b"\x05\x05alice\x06s3cret")
    assert server.data_to_send() == b""


def test_max_length_credentials() -> None:
    user, password = "u" * 255, "p" * 255
    server = SocksServer(lambda u, p: (u, p) == (user, password))
    server.receive_data(b"\x05\x01\x02")
    server.receive_data(b"\x01\xff" + user.encode() + b"\xff" + password.encode())
    assert server.data_to_send() == b"\x05\x02\x01\x00"
    assert server.state is SocksState.REQUEST


# --- protocol errors -----------------------------------------------------------------------


@pytest.mark.parametrize("first", [b"\x04\x01\x00\x50", b"CONNECT ", b"\x16\x03\x01"])
def test_not_socks5_closes_without_reply(first: bytes) -> None:
    server = SocksServer()
    with pytest.raises(SocksVersionError) as info:
        server.receive_data(first)
    assert info.value.reply_code is None
    assert server.data_to_send() == b""
    assert server.should_close
    assert server.receive_data(b"anything") == []


def test_request_with_wrong_version() -> None:
    server = SocksServer()
    server.receive_data(NO_AUTH_GREETING)
    with pytest.raises(SocksVersionError):
        server.receive_data(b"\x04" + CONNECT_IPV4[1:])


@pytest.mark.parametrize(("cmd", "name"), [(0x02, "BIND"), (0x03, "UDP ASSOCIATE"), (0x09, "0x09")])
def test_unsupported_command_replies_07(cmd: int, name: str) -> None:
    server = SocksServer()
    server.receive_data(NO_AUTH_GREETING)
    server.data_to_send()
    with pytest.raises(CommandNotSupported, match=name) as info:
        server.receive_data(bytes((0x05, cmd)) + CONNECT_IPV4[2:])
    assert info.value.reply_code == COMMAND_NOT_SUPPORTED
    assert server.data_to_send() == b"\x05\x07" + FAILURE_TAIL
    assert server.should_close


def test_unsupported_address_type_replies_08() -> None:
    server = SocksServer()
    server.receive_data(NO_AUTH_GREETING)
    server.data_to_send()
    with pytest.raises(AddressTypeNotSupported) as info:
        server.receive_data(b"\x05\x01\x00\x02\x00")
    assert info.value.reply_code == ADDRESS_TYPE_NOT_SUPPORTED
    assert server.data_to_send() == b"\x05\x08" + FAILURE_TAIL


@pytest.mark.parametrize("name", [b"", b"db\x00", b"a b", "d\u00e9".encode()])
def test_bad_domain_replies_general_failure(name: bytes) -> None:
    server = SocksServer()
    server.receive_data(NO_AUTH_GREETING)
    server.data_to_send()
    with pytest.raises(BadRequest):
        server.receive_data(b"\x05\x01\x00\x03" + bytes((len(name),)) + name + b"\x00\x50")
    assert server.data_to_send() == b"\x05\x01" + FAILURE_TAIL


# --- pipelining and trailing data ----------------------------------------------------------


def test_pipelined_data_appears_in_trailing_data() -> None:
    server = SocksServer()
    events = server.receive_data(NO_AUTH_GREETING + CONNECT_DOMAIN + b"\x00\x00\x00\x08\x04\xd2")
    assert events == [ConnectRequest("db.internal", 5432, "domain")]
    assert server.receive_data(b"\x16\x2f") == []  # still waiting for the caller's reply
    assert server.buffered == 8
    server.reply(SUCCEEDED)
    assert server.data_to_send() == b"\x05\x00\x05\x00\x00\x01" + b"\x00" * 6
    assert server.trailing_data() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert server.trailing_data() == b""


def test_pipelined_greeting_auth_request_and_data() -> None:
    server = SocksServer(check_password)
    events = server.receive_data(
        b"\x05\x01\x02" + b"\x01\x05alice\x06s3cret" + CONNECT_IPV4 + b"payload"
    )
    assert events == [ConnectRequest("10.0.0.5", 5432, "ipv4", username="alice")]
    assert server.data_to_send() == b"\x05\x02\x01\x00"
    server.reply(SUCCEEDED)
    assert server.trailing_data() == b"payload"


def test_data_after_open_is_a_caller_bug() -> None:
    server, _ = opened()
    server.reply(SUCCEEDED)
    with pytest.raises(SocksStateError):
        server.receive_data(b"x")


def test_reply_out_of_order() -> None:
    server = SocksServer()
    with pytest.raises(SocksStateError):
        server.reply(SUCCEEDED)
    with pytest.raises(SocksStateError):
        server.trailing_data()
    server, _ = opened()
    server.reply(SUCCEEDED)
    with pytest.raises(SocksStateError):
        server.reply(SUCCEEDED)


def test_early_data_is_bounded() -> None:
    server, _ = opened()
    server.receive_data(b"x" * MAX_EARLY_DATA)
    with pytest.raises(EarlyDataTooLarge):
        server.receive_data(b"x")
    assert server.data_to_send() == b"\x05\x01" + FAILURE_TAIL
    assert server.should_close and server.buffered == 0


def test_early_data_in_the_request_chunk_is_bounded() -> None:
    server = SocksServer()
    with pytest.raises(EarlyDataTooLarge):
        server.receive_data(NO_AUTH_GREETING + CONNECT_IPV4 + b"x" * (MAX_EARLY_DATA + 1))
    assert server.data_to_send() == b"\x05\x00\x05\x01" + FAILURE_TAIL


# --- properties ----------------------------------------------------------------------------


def encode_request(host: str, kind: str, port: int) -> bytes:
    if kind == "domain":
        raw = host.encode()
        address = b"\x03" + bytes((len(raw),)) + raw
    else:
        ip = ipaddress.ip_address(host)
        address = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    return b"\x05\x01\x00" + address + struct.pack("!H", port)


targets = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.just("ipv4")),
    st.tuples(st.ip_addresses(v=6).map(str), st.just("ipv6")),
    st.tuples(
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255),
        st.just("domain"),
    ),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(
    target=targets,
    port=st.integers(0, 0xFFFF),
    trailing=st.binary(max_size=64),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
    with_auth=st.booleans(),
)
def test_any_valid_request_round_trips(
    target: tuple[str, str], port: int, trailing: bytes, cuts: list[int], with_auth: bool
) -> None:
    host, kind = target
    if with_auth:
        server = SocksServer(check_password)
        wire = b"\x05\x01\x02\x01\x05alice\x06s3cret"
    else:
        server = SocksServer()
        wire = NO_AUTH_GREETING
    wire += encode_request(host, kind, port) + trailing
    events = []
    for chunk in split(wire, cuts):
        events += server.receive_data(chunk)
    expected = ConnectRequest(host, port, cast(AddressType, kind), "alice" if with_auth else None)
    assert events == [expected]
    server.reply(SUCCEEDED)
    assert server.trailing_data() == trailing


@settings(max_examples=500)
@given(
    chunks=st.lists(st.binary(max_size=600), max_size=8),
    with_auth=st.booleans(),
    prefix=st.sampled_from([b"", b"\x05", b"\x05\x01\x00", b"\x05\x01\x02", b"\x05\x01\x02\x01"]),
)
def test_random_bytes_raise_only_socks_errors(
    chunks: list[bytes], with_auth: bool, prefix: bytes
) -> None:
    server = SocksServer(check_password if with_auth else None)
    chunks = [prefix, *chunks]
    try:
        for chunk in chunks:
            server.receive_data(chunk)
            if server.state in (SocksState.GREETING, SocksState.AUTH, SocksState.REQUEST):
                assert server.buffered <= MAX_HANDSHAKE_BUFFER
            else:
                assert server.buffered <= MAX_EARLY_DATA
    except SocksError:
        assert server.should_close and server.buffered == 0
    assert len(server.data_to_send()) <= 2 + 2 + 262

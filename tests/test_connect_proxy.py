"""HTTP CONNECT request parsing and replies against byte literals."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from burrow.wire.connect_proxy import (
    MAX_EARLY_DATA,
    MAX_HEAD,
    MAX_HEADERS,
    BadRequest,
    ConnectParser,
    ConnectProxyError,
    ConnectRequest,
    ConnectStateError,
    EarlyDataTooLarge,
    HeadTooLarge,
    MethodNotAllowed,
    VersionNotSupported,
    connect_error,
    connect_ok,
    proxy_auth_required,
    reset_response,
    status_for_reset,
)

CURL_HEAD = (
    b"CONNECT db.internal:5432 HTTP/1.1\r\n"
    b"Host: db.internal:5432\r\n"
    b"User-Agent: curl/8.5.0\r\n"
    b"Proxy-Connection: Keep-Alive\r\n"
    b"\r\n"
)


def parse(data: bytes) -> ConnectRequest:
    parser = ConnectParser()
    request = parser.receive_data(data)
    assert request is not None
    return request


def basic(user_pass: bytes) -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(user_pass) + b"\r\n"


# --- requests ------------------------------------------------------------------------------


def test_curl_request() -> None:
    request = parse(CURL_HEAD)
    assert request == ConnectRequest(
        "db.internal",
        5432,
        "HTTP/1.1",
        (
            ("Host", "db.internal:5432"),
            ("User-Agent", "curl/8.5.0"),
            ("Proxy-Connection", "Keep-Alive"),
        ),
        None,
    )
    assert request.header("user-agent") == "curl/8.5.0"
    assert request.header("X-Missing") is None


def test_no_headers_and_http_1_0() -> None:
    assert parse(b"CONNECT 10.0.0.5:443 HTTP/1.0\r\n\r\n") == ConnectRequest(
        "10.0.0.5", 443, "HTTP/1.0"
    )


@pytest.mark.parametrize(
    ("target", "host"),
    [(b"[2001:db8::1]", "2001:db8::1"), (b"[::1]", "::1"), (b"[2001:DB8:0:0::1]", "2001:db8::1")],
)
def test_ipv6_in_brackets(target: bytes, host: str) -> None:
    request = parse(b"CONNECT " + target + b":443 HTTP/1.1\r\n\r\n")
    assert (request.host, request.port) == (host, 443)


def test_byte_at_a_time() -> None:
    parser = ConnectParser()
    results = [parser.receive_data(bytes((b,))) for b in CURL_HEAD + b"\x16"]
    assert results[:-2] == [None] * (len(CURL_HEAD) - 1)
    assert results[-2] == parse(CURL_HEAD) and results[-1] is None
    assert parser.trailing_data() == b"\x16"


def test_trailing_bytes_after_the_head() -> None:
    parser = ConnectParser()
    assert parser.receive_data(CURL_HEAD + b"\x16\x03\x01") is not None
    assert parser.receive_data(b"\x02\x00") is None
    assert parser.buffered == 5
    assert parser.trailing_data() == b"\x16\x03\x01\x02\x00"
    assert parser.trailing_data() == b""


def test_head_of_exactly_max_head_bytes() -> None:
    prefix = b"CONNECT a:1 HTTP/1.1\r\nX: "
    value = b"v" * (MAX_HEAD - len(prefix) - 4)
    head = prefix + value + b"\r\n\r\n"
    assert len(head) == MAX_HEAD
    assert parse(head).header("x") == value.decode()
    with pytest.raises(HeadTooLarge):
        ConnectParser().receive_data(prefix + value + b"v\r\n\r\n")


# --- Proxy-Authorization -------------------------------------------------------------------


def test_basic_credentials() -> None:
    head = b"CONNECT db:5432 HTTP/1.1\r\n" + basic(b"alice:s3:cret") + b"X: y\r\n\r\n"
    request = parse(head)
    assert request.credentials == ("alice", "s3:cret")
    # Consumed into credentials, and kept out of headers and repr so logs hold no password.
    assert request.headers == (("X", "y"),)
    assert "s3:cret" not in repr(request) and "YWxp" not in repr(request)


def test_basic_scheme_is_case_insensitive_and_password_may_be_empty() -> None:
    head = b"CONNECT db:5432 HTTP/1.1\r\nproxy-authorization: BASIC YWxpY2U6\r\n\r\n"
    assert parse(head).credentials == ("alice", "")


def test_other_schemes_are_no_credentials() -> None:
    head = b"CONNECT db:5432 HTTP/1.1\r\nProxy-Authorization: Bearer abc\r\n\r\n"
    assert parse(head).credentials is None


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b"Proxy-Authorization: Basic !!!!\r\n", "not base64"),
        (basic(b"no-colon"), "':'"),
        (basic(b"a:b") + basic(b"c:d"), "more than one"),
    ],
)
def test_bad_credentials(header: bytes, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        ConnectParser().receive_data(b"CONNECT db:5432 HTTP/1.1\r\n" + header + b"\r\n")


# --- refusals ------------------------------------------------------------------------------


def test_get_is_refused_with_405_as_soon_as_the_line_ends() -> None:
    parser = ConnectParser()
    with pytest.raises(MethodNotAllowed, match="CONNECT-only") as info:
        parser.receive_data(b"GET http://example.com/ HTTP/1.1\r\nHost: exa")
    assert info.value.response() == (
        b"HTTP/1.1 405 Method Not Allowed\r\n"
        b"Burrow-Error: method_not_allowed: this is a CONNECT-only proxy and cannot serve GET; "
        b"set it as the client's proxy (HTTPS_PROXY) instead of requesting it directly\r\n"
        b"Allow: CONNECT\r\n"
        b"Content-Length: 0\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )
    assert parser.receive_data(b"more") is None  # a failed parser ignores the rest


@pytest.mark.parametrize("first", [b"\x16\x03\x01\x02\x00", b"\x05\x01\x00", b" CONNECT"])
def test_tls_or_socks_on_the_http_port_fails_fast(first: bytes) -> None:
    with pytest.raises(BadRequest, match="not an HTTP request"):
        ConnectParser().receive_data(first)


@pytest.mark.parametrize(
    ("target", "match"),
    [
        (b"db", "not host:port"),
        (b":5432", "not host:port"),
        (b"::1:443", "brackets"),
        (b"[::1]443", r"not \[ipv6\]:port"),
        (b"[::1", r"not \[ipv6\]:port"),
        (b"[zzz::1]:443", "invalid IPv6"),
        (b"[fe80::1%25eth0]:443", "invalid IPv6"),
        (b"db:0", "outside 1-65535"),
        (b"db:65536", "outside 1-65535"),
        (b"db:http", "invalid port"),
        (b"db:", "invalid port"),
        (b"db:123456", "invalid port"),
        (b"d/b:80", "invalid host"),
        (b"http://db:80", "brackets"),
    ],
)
def test_bad_targets(target: bytes, match: str) -> None:
    with pytest.raises(BadRequest, match=match) as info:
        ConnectParser().receive_data(b"CONNECT " + target + b" HTTP/1.1\r\n")
    assert info.value.response().startswith(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"CONNECT db:80 HTTP/2.0", VersionNotSupported),
        (b"CONNECT db:80 HTTP/1.1.1", BadRequest),
        (b"CONNECT db:80 SPDY", BadRequest),
        (b"CONNECT db:80", BadRequest),
        (b"CONNECT  db:80 HTTP/1.1", BadRequest),
        (b"CONNECT db:80 HTTP/1.1 extra", BadRequest),
        (b"CONNECT \xff:80 HTTP/1.1", BadRequest),
    ],
)
def test_bad_request_lines(line: bytes, error: type[ConnectProxyError]) -> None:
    with pytest.raises(error):
        ConnectParser().receive_data(line + b"\r\n\r\n")


def test_version_not_supported_is_505() -> None:
    with pytest.raises(VersionNotSupported) as info:
        ConnectParser().receive_data(b"CONNECT db:80 HTTP/2.0\r\n")
    assert info.value.response().startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")


@pytest.mark.parametrize(
    "head",
    [
        b"CONNECT db:80 HTTP/1.1\n\n",
        b"CONNECT db:80 HTTP/1.1\r\nHost: db\n\r\n",
        b"CONNECT db:80 HTTP/1.1\r\nHost: d\rb\r\n\r\n",
    ],
)
def test_bare_lf_or_cr_is_refused(head: bytes) -> None:
    with pytest.raises(BadRequest, match="CRLF"):
        ConnectParser().receive_data(head)


def test_cr_at_the_end_of_a_chunk_waits_for_its_lf() -> None:
    parser = ConnectParser()
    assert parser.receive_data(b"CONNECT db:80 HTTP/1.1\r") is None
    assert parser.receive_data(b"\n\r") is None
    assert parser.receive_data(b"\n") is not None


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b" folded: yes", "folded"),
        (b"\tfolded", "folded"),
        (b"NoColon", "malformed header"),
        (b"Bad Name: x", "malformed header"),
        (b": empty-name", "malformed header"),
        (b"X: a\x00b", "control character"),
        (b"X: a\x1bb", "control character"),
    ],
)
def test_bad_headers(header: bytes, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        ConnectParser().receive_data(b"CONNECT db:80 HTTP/1.1\r\n" + header + b"\r\n\r\n")


def test_obs_text_in_values_is_kept_as_latin_1() -> None:
    request = parse(b"CONNECT db:80 HTTP/1.1\r\nX-Name: caf\xe9\t\r\n\r\n")
    assert request.header("x-name") == "caf\u00e9"


def test_head_too_large() -> None:
    parser = ConnectParser()
    parser.receive_data(b"CONNECT db:80 HTTP/1.1\r\n")
    with pytest.raises(HeadTooLarge) as info:
        for _ in range(MAX_HEAD // 16 + 1):
            parser.receive_data(b"X-Pad: 12345678\r\n")
    assert info.value.response().startswith(
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nBurrow-Error: head_too_large: "
    )
    assert parser.buffered == 0


def test_request_line_too_large() -> None:
    with pytest.raises(HeadTooLarge):
        ConnectParser().receive_data(b"CONNECT " + b"a" * MAX_HEAD)


def test_too_many_headers() -> None:
    head = b"CONNECT db:80 HTTP/1.1\r\n" + b"X:\r\n" * (MAX_HEADERS + 1) + b"\r\n"
    assert len(head) < MAX_HEAD
    with pytest.raises(HeadTooLarge, match="header lines"):
        ConnectParser().receive_data(head)


def test_early_data_is_bounded() -> None:
    parser = ConnectParser()
    parser.receive_data(CURL_HEAD + b"x" * MAX_EARLY_DATA)
    with pytest.raises(EarlyDataTooLarge):
        parser.receive_data(b"x")
    with pytest.raises(EarlyDataTooLarge):
        ConnectParser().receive_data(CURL_HEAD + b"x" * (MAX_EARLY_DATA + 1))


def test_trailing_data_before_the_request_is_a_caller_bug() -> None:
    parser = ConnectParser()
    parser.receive_data(b"CONNECT db")
    with pytest.raises(ConnectStateError):
        parser.trailing_data()


# --- replies -------------------------------------------------------------------------------


def test_connect_ok_exact_bytes() -> None:
    assert connect_ok() == b"HTTP/1.1 200 Connection established\r\n\r\n"


def test_connect_error_exact_bytes() -> None:
    assert connect_error(502, "refused", "connection refused by 10.0.0.5:5432") == (
        b"HTTP/1.1 502 Bad Gateway\r\n"
        b"Burrow-Error: refused: connection refused by 10.0.0.5:5432\r\n"
        b"Content-Length: 0\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    ("code", "status", "line"),
    [
        ("not_allowed", 403, b"403 Forbidden"),
        ("refused", 502, b"502 Bad Gateway"),
        ("unreachable", 502, b"502 Bad Gateway"),
        ("network_unreachable", 502, b"502 Bad Gateway"),
        ("no_such_tunnel", 502, b"502 Bad Gateway"),
        ("timeout", 504, b"504 Gateway Timeout"),
        ("protocol", 502, b"502 Bad Gateway"),
    ],
)
def test_reset_responses(code: str, status: int, line: bytes) -> None:
    assert status_for_reset(code) == status
    response = reset_response(code, "why")
    assert response.startswith(b"HTTP/1.1 " + line + b"\r\nBurrow-Error: " + code.encode())


def test_error_message_cannot_inject_headers() -> None:
    response = connect_error(502, "re\r\nfused", "a\r\nSet-Cookie: x=1\r\n\r\n\u00e9" + "y" * 600)
    head, _, body = response.partition(b"\r\n\r\n")
    assert body == b""
    lines = head.split(b"\r\n")
    assert len(lines) == 4 and not any(line.startswith(b"Set-Cookie") for line in lines)
    assert lines[1].startswith(b"Burrow-Error: re__fused: a  Set-Cookie: x=1    \\xe9y")
    assert lines[1].endswith(b"...") and len(lines[1]) == len(b"Burrow-Error: re__fused: ") + 512


def test_unknown_status_gets_a_generic_reason() -> None:
    assert connect_error(599, "x", "y").startswith(b"HTTP/1.1 599 Error\r\n")
    with pytest.raises(ValueError):
        connect_error(200, "x", "y")


def test_proxy_auth_required_exact_bytes() -> None:
    assert proxy_auth_required("wrong user or password") == (
        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
        b"Burrow-Error: auth_required: wrong user or password\r\n"
        b'Proxy-Authenticate: Basic realm="burrow"\r\n'
        b"Content-Length: 0\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )


# --- properties ----------------------------------------------------------------------------


hosts = st.one_of(
    st.from_regex(r"[A-Za-z0-9._~-]{1,60}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(
    host=hosts,
    port=st.integers(1, 0xFFFF),
    user=st.text(max_size=20).filter(lambda u: ":" not in u),
    password=st.text(max_size=20),
    trailing=st.binary(max_size=64),
    cuts=st.lists(st.integers(0, 500), max_size=6),
)
def test_any_valid_request_round_trips(
    host: str, port: int, user: str, password: str, trailing: bytes, cuts: list[int]
) -> None:
    head = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
    head += basic(f"{user}:{password}".encode()) + b"\r\n"
    parser = ConnectParser()
    results = [parser.receive_data(chunk) for chunk in split(head + trailing, cuts)]
    requests = [r for r in results if r is not None]
    assert len(requests) == 1
    assert (requests[0].host, requests[0].port) == (host.strip("[]"), port)
    assert requests[0].credentials == (user, password)
    assert parser.trailing_data() == trailing


@settings(max_examples=500)
@given(
    chunks=st.lists(st.binary(max_size=3000), max_size=8),
    prefix=st.sampled_from([b"", b"CONNECT ", b"CONNECT db:80 HTTP/1.1\r\n"]),
)
def test_random_bytes_raise_only_documented_errors(chunks: list[bytes], prefix: bytes) -> None:
    parser = ConnectParser()
    try:
        for chunk in [prefix, *chunks]:
            parser.receive_data(chunk)
            limit = MAX_HEAD if parser.request is None else MAX_EARLY_DATA
            assert parser.buffered <= limit
    except ConnectProxyError as exc:
        assert parser.buffered == 0
        assert exc.response().startswith(b"HTTP/1.1 4") or exc.response().startswith(b"HTTP/1.1 5")

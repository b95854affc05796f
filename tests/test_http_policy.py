"""The HTTP tunnel's pure policy: validation, IP rules, Basic auth, header rewriting, pages."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from burrow.errors import ConfigError
from burrow.http.policy import (
    HttpOptions,
    check_access,
    error_page,
    is_upgrade,
    parse_local,
    rewrite_request_headers,
    rewrite_response_headers,
    same_host,
)


def opts(**kw: Any) -> HttpOptions:
    return HttpOptions(local=("127.0.0.1", 3000), **kw)


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n.lower() for n, _ in headers]


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name]


def basic(user_pass: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", b"Basic " + base64.b64encode(user_pass.encode()))]


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"basic_auth": ["x"]}, "--basic-auth 'x': expected USER:PASS"),
        ({"basic_auth": [":pw"]}, "--basic-auth ':pw': expected USER:PASS"),
        ({"basic_auth": ["user:"]}, "expected USER:PASS"),
        ({"allow": ["10.0.0.0/33"]}, "--allow '10.0.0.0/33': not a CIDR"),
        ({"deny": ["nonsense"]}, "--deny 'nonsense': not a CIDR"),
        ({"request_header_add": ["X-Foo"]}, "--request-header-add 'X-Foo': expected 'NAME: VALUE'"),
        ({"request_header_add": ["Bad Name: 1"]}, "is not a header name"),
        ({"request_header_add": ["Host: x"]}, "use --host-header"),
        ({"response_header_remove": ["Content-Length"]}, "burrow manages Content-Length"),
        ({"response_header_add": ["X-A: 1\r\nX-B: 2"]}, "line break"),
        ({"host_header": "a b"}, "--host-header 'a b'"),
        ({"local_ca": Path("/ca.pem")}, "apply only to an https:// local service"),
        ({"public_url": "ftp://x"}, "--public-url 'ftp://x'"),
        ({"connect_timeout": 0}, "connect timeout"),
    ],
)
def test_bad_options_are_one_line_config_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        opts(**kw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_local_port() -> None:
    with pytest.raises(ConfigError, match="PORT 1-65535"):
        HttpOptions(local=("localhost", 0))


def test_good_options_pass() -> None:
    options = opts(
        basic_auth=["alice:pa:ss"],
        allow=["10.0.0.1", "2001:db8::/32"],
        deny=["10.0.0.0/8"],
        request_header_add=["X-Env: dev"],
        response_header_remove=["Server"],
        host_header="app.internal:8080",
        public_url="https://demo.example.net",
    )
    assert options.local_address == "127.0.0.1:3000"
    assert HttpOptions(local=("::1", 80)).local_address == "[::1]:80"


def test_parse_local() -> None:
    assert parse_local("3000") == (("localhost", 3000), False)
    assert parse_local("127.0.0.1:8080") == (("127.0.0.1", 8080), False)
    assert parse_local("[::1]:8080") == (("::1", 8080), False)
    assert parse_local("https://localhost:8443") == (("localhost", 8443), True)
    assert parse_local("http://app") == (("app", 80), False)
    for bad in ("x", "70000", "ftp://x", "host:"):
        with pytest.raises(ConfigError, match="local service"):
            parse_local(bad)


# --- IP rules -------------------------------------------------------------------------------------


def test_no_rules_allow_everyone() -> None:
    assert check_access(opts(), "203.0.113.9", []) is None
    assert check_access(opts(), "", []) is None


def test_allow_list_denies_the_rest() -> None:
    options = opts(allow=["10.0.0.0/8", "2001:db8::/32"])
    assert check_access(options, "10.1.2.3", []) is None
    assert check_access(options, "2001:db8::7", []) is None
    denial = check_access(options, "192.0.2.1", [])
    assert denial is not None and denial.status == 403
    assert b"192.0.2.1" in denial.body
    denial6 = check_access(options, "2001:db9::1", [])
    assert denial6 is not None and denial6.status == 403


def test_deny_wins_over_allow() -> None:
    options = opts(allow=["10.0.0.0/8"], deny=["10.9.0.0/16"])
    assert check_access(options, "10.1.0.1", []) is None
    denial = check_access(options, "10.9.0.1", [])
    assert denial is not None and denial.status == 403


def test_deny_ipv6_and_mapped_ipv4() -> None:
    options = opts(deny=["::1/128", "192.0.2.0/24"])
    assert check_access(options, "::1", []) is not None
    assert check_access(options, "::ffff:192.0.2.10", []) is not None  # dual-stack listener
    assert check_access(options, "127.0.0.1", []) is None
    assert check_access(options, "fe80::1%eth0", []) is None


def test_ip_rules_never_read_headers() -> None:
    options = opts(allow=["10.0.0.0/8"])
    spoof = [(b"X-Forwarded-For", b"10.0.0.1"), (b"Forwarded", b"for=10.0.0.1")]
    assert check_access(options, "198.51.100.7", spoof) is not None


def test_unparseable_peer_is_denied_when_rules_exist() -> None:
    assert check_access(opts(deny=["10.0.0.0/8"]), "not-an-ip", []) is not None


# --- Basic auth -----------------------------------------------------------------------------------


def test_basic_auth() -> None:
    options = opts(basic_auth=["alice:s3cret", "bob:pa:ss"])
    missing = check_access(options, "127.0.0.1", [])
    assert missing is not None and missing.status == 401
    assert (b"WWW-Authenticate", b'Basic realm="burrow", charset="UTF-8"') in missing.headers
    assert check_access(options, "127.0.0.1", basic("alice:wrong")) is not None
    assert check_access(options, "127.0.0.1", basic("alice:s3cret")) is None
    assert check_access(options, "127.0.0.1", basic("bob:pa:ss")) is None
    assert check_access(options, "127.0.0.1", [("authorization", "basic YWxpY2U6czNjcmV0")]) is None
    for bad in (b"Bearer abc", b"Basic !!!", b"Basic", b"Basic " + b"A" * 5000):
        assert check_access(options, "127.0.0.1", [(b"Authorization", bad)]) is not None


def test_ip_rules_come_before_auth() -> None:
    options = opts(basic_auth=["a:b"], deny=["127.0.0.0/8"])
    denial = check_access(options, "127.0.0.1", basic("a:b"))
    assert denial is not None and denial.status == 403


# --- request rewriting ----------------------------------------------------------------------------


def rewrite(options: HttpOptions, headers: list[tuple[bytes, bytes]], **kw: Any) -> Any:
    args: dict[str, Any] = {"peer_ip": "198.51.100.7", "scheme": "https", "public_host": ""}
    args.update(kw)
    return rewrite_request_headers(options, headers, **args)


def test_spoofed_forwarded_headers_are_dropped() -> None:
    out = rewrite(
        opts(),
        [
            (b"Host", b"demo.example.net"),
            (b"X-Forwarded-For", b"10.0.0.1"),
            (b"x-forwarded-proto", b"gopher"),
            (b"X-Forwarded-Host", b"evil"),
            (b"Forwarded", b"for=10.0.0.1"),
        ],
    )
    assert values(out, b"x-forwarded-for") == [b"198.51.100.7"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"demo.example.net"]
    assert values(out, b"forwarded") == []
    assert out[0] == (b"Host", b"demo.example.net")


def test_trusted_forwarded_headers_are_extended() -> None:
    out = rewrite(
        opts(trust_forwarded=True),
        [
            (b"Host", b"demo"),
            (b"X-Forwarded-For", b"10.0.0.1"),
            (b"X-Forwarded-For", b"10.0.0.2"),
            (b"X-Forwarded-Proto", b"http"),
            (b"Forwarded", b"for=10.0.0.1"),
        ],
    )
    assert values(out, b"x-forwarded-for") == [b"10.0.0.1, 10.0.0.2, 198.51.100.7"]
    assert values(out, b"x-forwarded-proto") == [b"http"]
    assert values(out, b"forwarded") == [b"for=10.0.0.1"]


def test_peer_is_shown_without_ipv4_mapping() -> None:
    out = rewrite(opts(), [(b"Host", b"h")], peer_ip="::ffff:192.0.2.1")
    assert values(out, b"x-forwarded-for") == [b"192.0.2.1"]


def test_host_header_modes() -> None:
    head = [(b"Host", b"demo.example.net")]
    assert values(rewrite(opts(), head), b"host") == [b"demo.example.net"]
    assert values(rewrite(opts(host_header="rewrite"), head), b"host") == [b"127.0.0.1:3000"]
    literal = rewrite(opts(host_header="app.internal"), head)
    assert values(literal, b"host") == [b"app.internal"]
    assert values(literal, b"x-forwarded-host") == [b"demo.example.net"]
    # An HTTP/1.0 visitor may send no Host: the public name fills in.
    bare = rewrite(opts(), [], public_host="demo.example.net")
    assert values(bare, b"host") == [b"demo.example.net"]


def test_hop_by_hop_headers_are_dropped() -> None:
    out = rewrite(
        opts(),
        [
            (b"Host", b"h"),
            (b"Connection", b"keep-alive, X-Secret, Content-Length"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Secret", b"1"),
            (b"Proxy-Authorization", b"Basic x"),
            (b"Proxy", b"http://evil"),
            (b"TE", b"trailers"),
            (b"Trailer", b"X-Sum"),
            (b"Upgrade", b"h2c"),
            (b"Content-Length", b"5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Accept", b"*/*"),
        ],
    )
    got = names(out)
    for gone in (b"connection", b"keep-alive", b"x-secret", b"proxy-authorization", b"proxy"):
        assert gone not in got
    for gone in (b"te", b"trailer", b"upgrade"):
        assert gone not in got
    # Framing stays for h11, even when a peer lists it in Connection.
    assert values(out, b"content-length") == [b"5"]
    assert values(out, b"transfer-encoding") == [b"chunked"]
    assert values(out, b"accept") == [b"*/*"]


def test_websocket_upgrade_is_kept() -> None:
    head = [
        (b"Host", b"h"),
        (b"Connection", b"keep-alive, Upgrade"),
        (b"Upgrade", b"websocket"),
        (b"Sec-WebSocket-Key", b"abc"),
    ]
    assert is_upgrade(head)
    out = rewrite(opts(), head)
    assert values(out, b"upgrade") == [b"websocket"]
    assert values(out, b"connection") == [b"upgrade"]
    assert values(out, b"sec-websocket-key") == [b"abc"]
    assert not is_upgrade([(b"Upgrade", b"websocket")])


def test_header_rules_remove_then_add() -> None:
    options = opts(
        request_header_remove=["x-drop", "User-Agent"],
        request_header_add=["X-Env: dev", "User-Agent: burrow-test"],
    )
    out = rewrite(options, [(b"Host", b"h"), (b"X-Drop", b"1"), (b"User-Agent", b"curl")])
    assert b"x-drop" not in names(out)
    assert values(out, b"user-agent") == [b"burrow-test"]
    assert values(out, b"x-env") == [b"dev"]
    # Rules can remove what burrow added, too.
    stripped = rewrite(opts(request_header_remove=["X-Forwarded-For"]), [(b"Host", b"h")])
    assert b"x-forwarded-for" not in names(stripped)


def test_tunnel_password_is_not_passed_on() -> None:
    head = [(b"Host", b"h"), *basic("a:b")]
    assert b"authorization" not in names(rewrite(opts(basic_auth=["a:b"]), head))
    assert b"authorization" in names(rewrite(opts(), head))


def test_str_headers_are_accepted() -> None:
    out = rewrite_request_headers(
        opts(), [("Host", "h"), ("X-A", "1")], peer_ip="127.0.0.1", scheme="http", public_host=""
    )
    assert (b"X-A", b"1") in out


# --- response rewriting ---------------------------------------------------------------------------


def test_response_rewrite() -> None:
    options = opts(response_header_remove=["Server"], response_header_add=["X-Frame-Options: DENY"])
    out = rewrite_response_headers(
        options,
        [
            (b"Server", b"gunicorn"),
            (b"Connection", b"keep-alive, Upgrade"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Upgrade", b"h2c"),
            (b"Content-Length", b"3"),
            (b"Location", b"/next"),
        ],
    )
    assert names(out) == [b"content-length", b"location", b"x-frame-options"]
    switched = rewrite_response_headers(
        opts(),
        [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Accept", b"x")],
        upgrade=True,
    )
    assert values(switched, b"upgrade") == [b"websocket"]
    assert values(switched, b"connection") == [b"upgrade"]


# --- pages ----------------------------------------------------------------------------------------


def test_error_page() -> None:
    status, headers, body = error_page(502, "Bad Gateway", "burrow: <local> refused & gone")
    assert status == 502
    assert (b"Content-Length", str(len(body)).encode()) in headers
    assert b"&lt;local&gt; refused &amp; gone" in body
    assert b"502 Bad Gateway" in body


# --- one tenant per connection, client-address headers --------------------------------------------


def test_same_host_compares_the_host_part_case_blind() -> None:
    assert same_host(b"cap.example.net", b"cap.example.net")
    assert same_host(b"cap.example.net:8080", b"CAP.Example.NET")
    assert same_host(b"cap.example.net.", b"cap.example.net:80")
    assert same_host(b"[::1]:8080", b"[::1]")
    assert same_host(b"", b"")
    assert not same_host(b"cap.example.net", b"other.example.net")
    assert not same_host(b"cap.example.net:8080", b"other.example.net:8080")
    assert not same_host(b"[::1]:80", b"[::2]:80")
    assert not same_host(b"cap.example.net", b"")


CLIENT_ADDRESS_HEADERS = [
    (b"X-Real-IP", b"10.0.0.1"),
    (b"True-Client-IP", b"10.0.0.1"),
    (b"X-Client-IP", b"10.0.0.1"),
    (b"CF-Connecting-IP", b"10.0.0.1"),
    (b"Fastly-Client-IP", b"10.0.0.1"),
    (b"X-Cluster-Client-IP", b"10.0.0.1"),
]


def test_spoofed_client_address_headers_are_dropped_and_x_real_ip_set() -> None:
    out = rewrite(opts(), [(b"Host", b"h"), *CLIENT_ADDRESS_HEADERS])
    assert values(out, b"x-real-ip") == [b"198.51.100.7"]
    for name, _ in CLIENT_ADDRESS_HEADERS[1:]:
        assert name.lower() not in names(out)
    assert b"10.0.0.1" not in b"".join(v for _, v in out)
    bare = rewrite(opts(), [(b"Host", b"h")], peer_ip="::ffff:192.0.2.1")
    assert values(bare, b"x-real-ip") == [b"192.0.2.1"]


def test_trusted_client_address_headers_are_kept() -> None:
    out = rewrite(opts(trust_forwarded=True), [(b"Host", b"h"), *CLIENT_ADDRESS_HEADERS])
    assert values(out, b"x-real-ip") == [b"10.0.0.1"]
    for name, value in CLIENT_ADDRESS_HEADERS[1:]:
        assert values(out, name.lower()) == [value]
    unset = rewrite(opts(trust_forwarded=True), [(b"Host", b"h")])
    assert values(unset, b"x-real-ip") == [b"198.51.100.7"]

"""The doctor's sans-I/O parts on byte literals: PostgreSQL packets, SCRAM, MySQL packets and
scrambles, RESP, SOCKS5/CONNECT client halves, greeting recognition, URLs and the verdict."""

from __future__ import annotations

import struct

import pymysql._auth
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from burrow.doctor import mywire, pgwire, resp
from burrow.doctor.greeting import identify
from burrow.doctor.model import Checklist, PhaseFailed, Stop
from burrow.doctor.proxywire import (
    ProxyWireError,
    SocksClient,
    SocksRefused,
    connect_request,
    parse_connect_response,
)
from burrow.doctor.scram import ScramClient, ScramError, saslprep
from burrow.doctor.target import parse_target, redact
from burrow.errors import ConfigError

# ---- PostgreSQL ---------------------------------------------------------------------------


def test_ssl_request_and_startup_bytes() -> None:
    assert bytes.fromhex("0000000804d2162f") == pgwire.SSL_REQUEST
    packet = pgwire.startup_message({"user": "app", "database": "db"})
    assert packet == (struct.pack("!ii", len(packet), 196608) + b"user\0app\0database\0db\0\0")
    assert pgwire.query("SELECT 1") == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert pgwire.terminate() == b"X\x00\x00\x00\x04"


def test_reader_splits_messages_across_feeds() -> None:
    reader = pgwire.BackendReader()
    stream = (
        b"R\x00\x00\x00\x08\x00\x00\x00\x00"  # AuthenticationOk
        b"S\x00\x00\x00\x18server_version\x0015.2\x00"
        b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\xde\xad\xbe\xef"
        b"Z\x00\x00\x00\x05I"
    )
    messages = []
    for i in range(0, len(stream), 3):
        reader.feed(stream[i : i + 3])
        while (m := reader.next()) is not None:
            messages.append(m)
    assert [m.type for m in messages] == [b"R", b"S", b"K", b"Z"]
    assert pgwire.parse_auth(messages[0].body).code == pgwire.AUTH_OK
    assert pgwire.parse_parameter_status(messages[1].body) == ("server_version", "15.2")
    assert pgwire.parse_backend_key(messages[2].body) == (1234, b"\xde\xad\xbe\xef")
    assert reader.buffered == 0


def test_reader_refuses_oversized_and_foreign_bytes_at_the_header() -> None:
    reader = pgwire.BackendReader()
    reader.feed(b"E\x7f\x00\x00\x00")  # a 2 GiB ErrorResponse is refused before its body
    with pytest.raises(pgwire.MessageTooLarge):
        reader.next()
    other = pgwire.BackendReader()
    other.feed(b"SSH-2.0-OpenSSH_9.2\r\n")
    with pytest.raises(pgwire.PgWireError):
        other.next()


def test_error_response_fields() -> None:
    body = b'SFATAL\x00VFATAL\x00C28P01\x00Mpassword authentication failed for user "app"\x00\x00'
    error = pgwire.parse_error(body)
    assert error.sqlstate == "28P01"
    assert error.severity == "FATAL"
    assert error.describe() == 'SQLSTATE 28P01: password authentication failed for user "app"'


def test_sasl_mechanisms_and_data_row() -> None:
    auth = pgwire.parse_auth(struct.pack("!i", 10) + b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")
    assert auth.mechanisms == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    row = struct.pack("!h", 2) + struct.pack("!i", 3) + b"abc" + struct.pack("!i", -1)
    assert pgwire.parse_data_row(row) == [b"abc", None]
    with pytest.raises(pgwire.PgWireError):
        pgwire.parse_data_row(struct.pack("!hi", 1, 10) + b"short")


def test_md5_password_matches_the_server_formula() -> None:
    import hashlib

    inner = hashlib.md5(b"secretapp").hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + b"salt").hexdigest()
    assert pgwire.md5_password("app", "secret", b"salt") == expected.encode()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_yield_messages_or_documented_errors(data: bytes) -> None:
    reader = pgwire.BackendReader()
    reader.feed(data)
    try:
        for _ in range(100):
            message = reader.next()
            if message is None:
                break
            assert len(message.type) == 1
    except pgwire.PgWireError:
        pass


# ---- SCRAM --------------------------------------------------------------------------------


def test_scram_rfc7677_vector() -> None:
    client = ScramClient("pencil", user="user", nonce="rOprNGfwEbeRWgbNEkqO")
    assert client.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = client.final(
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    assert final == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    client.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    with pytest.raises(ScramError, match="signature is wrong"):
        client.verify(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


def test_scram_refuses_a_nonce_that_does_not_extend_ours_and_huge_iterations() -> None:
    client = ScramClient("pw", nonce="abc")
    with pytest.raises(ScramError, match="nonce"):
        client.final(b"r=xyz123,s=c2FsdA==,i=4096")
    with pytest.raises(ScramError, match="iteration"):
        ScramClient("pw", nonce="abc").final(b"r=abcdef,s=c2FsdA==,i=99999999")


def test_scram_plus_header_and_saslprep() -> None:
    client = ScramClient("pw", nonce="n", cbind_data=b"\x01\x02")
    assert client.mechanism == "SCRAM-SHA-256-PLUS"
    assert client.first().startswith(b"p=tls-server-end-point,,n=,r=n")
    assert saslprep("I\u00adX") == b"IX"  # soft hyphen maps to nothing
    assert saslprep("a\u2002b") == b"a b"  # non-ASCII space becomes a space
    assert saslprep("\x07bell") == b"\x07bell"  # prohibited: used as raw bytes


# ---- MySQL --------------------------------------------------------------------------------

MARIADB_GREETING = bytes.fromhex(
    "0a352e352e352d31302e31312e362d4d617269614442000a000000"
    "3132333435363738"
    "00"
    "fef7"  # caps low (no CLIENT_SSL)
    "2d"
    "0200"
    "ff81"  # caps high
    "15"
    "000000000000"
    + "1d000000"  # MariaDB extended caps in the last 4 reserved bytes
    + "393031323334353637383930"
    + "00"
    + "6d7973716c5f6e61746976655f70617373776f726400"
)


def test_parse_mariadb_handshake() -> None:
    g = mywire.parse_handshake(MARIADB_GREETING)
    assert g.product == "MariaDB 10.11.6"
    assert g.connection_id == 10
    assert g.scramble == b"12345678901234567890"
    assert g.auth_plugin == "mysql_native_password"
    assert not g.offers_tls
    assert identify(mywire.packet(0, MARIADB_GREETING)) == (
        "a MariaDB server (version 10.11.6-MariaDB)"
    )


def test_scrambles_match_pymysql() -> None:
    nonce = b"abcdefghijklmnopqrst"
    assert mywire.scramble_native("secret", nonce) == pymysql._auth.scramble_native_password(
        b"secret", nonce
    )
    assert mywire.scramble_sha2("secret", nonce) == pymysql._auth.scramble_caching_sha2(
        b"secret", nonce
    )
    assert mywire.scramble_native("", nonce) == b""


def test_err_packet_and_reader_limit() -> None:
    payload = b"\xff\x15\x04#28000Access denied for user 'x'@'localhost' (using password: YES)"
    error = mywire.parse_err(payload)
    assert (error.code, error.sqlstate) == (1045, "28000")
    assert error.message.startswith("Access denied")
    reader = mywire.PacketReader(limit=100)
    reader.feed(b"\xff\xff\x00\x00")
    with pytest.raises(mywire.MyWireError):
        reader.next()


def test_ssl_request_is_32_bytes_with_client_ssl() -> None:
    packet = mywire.ssl_request(mywire.BASE_CAPABILITIES)
    assert len(packet) == 4 + 32 and packet[3] == 1
    (caps,) = struct.unpack_from("<I", packet, 4)
    assert caps & mywire.CLIENT_SSL


# ---- RESP ---------------------------------------------------------------------------------


def test_resp_command_and_replies() -> None:
    assert resp.command("AUTH", "pw") == b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n"
    reader = resp.ReplyReader()
    reader.feed(b"-NOAUTH Authentication required.\r\n+PONG\r\n%2\r\n$6\r\nserver\r\n")
    error = reader.next()
    assert isinstance(error, resp.ErrorReply) and error.code == "NOAUTH"
    assert reader.next() == "PONG"
    assert reader.next() is resp.INCOMPLETE
    reader.feed(b"$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n")
    assert reader.next() == {"server": b"redis", "proto": 3}


def test_resp_limits() -> None:
    reader = resp.ReplyReader()
    reader.feed(b"$999999999\r\n")
    with pytest.raises(resp.RespError):
        reader.next()
    deep = resp.ReplyReader()
    deep.feed(b"*1\r\n" * 20 + b":1\r\n")
    with pytest.raises(resp.RespError, match="deeply"):
        deep.next()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_resp_random_bytes_only_documented_errors(data: bytes) -> None:
    reader = resp.ReplyReader()
    try:
        reader.feed(data)
        for _ in range(50):
            if reader.next() is resp.INCOMPLETE:
                break
    except resp.RespError:
        pass


# ---- greetings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", "an SSH server (SSH-2.0-OpenSSH_9.2p1 Debian-2)"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "an HTTP server (HTTP/1.1 400 Bad Request)"),
        (b"220 mail.example ESMTP Postfix\r\n", "an SMTP server (220 mail.example ESMTP Postfix)"),
        (b"-ERR unknown command\r\n", "a Redis server (it replied '-ERR unknown command')"),
        (b"\x15\x03\x03\x00\x02\x02\x46", "a TLS server (it expects TLS from the first byte)"),
        (b"E\x00\x00\x00\x50SFATAL\x00", "a PostgreSQL server (it sent an ErrorResponse)"),
        (b"\x00\x01\x02", None),
    ],
)
def test_identify(data: bytes, expected: str | None) -> None:
    assert identify(data) == expected


# ---- proxies ------------------------------------------------------------------------------


def test_socks_client_by_name_and_refusal_code() -> None:
    client = SocksClient("db.internal", 5432)
    assert client.start() == b"\x05\x01\x00"
    request = client.receive(b"\x05\x00")
    assert request == b"\x05\x01\x00\x03\x0bdb.internal\x15\x38"
    with pytest.raises(SocksRefused) as info:
        client.receive(b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00")
    assert info.value.code == 2
    assert "connection not allowed by ruleset" in str(info.value)


def test_socks_client_success_keeps_early_bytes_and_auth() -> None:
    client = SocksClient("10.0.0.5", 5432, ("u", "p"))
    assert client.start() == b"\x05\x02\x00\x02"
    assert client.receive(b"\x05\x02") == b"\x01\x01u\x01p"
    assert client.receive(b"\x01\x00") == b"\x05\x01\x00\x01\x0a\x00\x00\x05\x15\x38"
    client.receive(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x00" + b"hello")
    assert client.done and client.bound == ("127.0.0.1", 1024)
    assert client.trailing == b"hello"
    with pytest.raises(ProxyWireError, match="not a SOCKS5"):
        SocksClient("h", 1).receive(b"HTTP/1.1 400")


def test_connect_response() -> None:
    assert connect_request("db", 5432) == b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n"
    assert parse_connect_response(b"HTTP/1.1 200 Connection") is None
    response = parse_connect_response(
        b"HTTP/1.1 502 Bad Gateway\r\nTailscale-Connect-Error: dial tcp: refused\r\n\r\n"
    )
    assert response is not None and response.status == 502
    assert response.error_header() == "dial tcp: refused"
    with pytest.raises(ProxyWireError):
        parse_connect_response(b"\x05\x00")


# ---- URLs and the verdict ------------------------------------------------------------------


def test_parse_targets() -> None:
    pg = parse_target("postgresql://app:pw@db.example:6432/shop?sslmode=verify-full&options=-c%20x")
    assert (pg.kind, pg.host, pg.port, pg.user, pg.password, pg.database) == (
        "pg",
        "db.example",
        6432,
        "app",
        "pw",
        "shop",
    )
    assert pg.tls_mode == "verify-full" and pg.params["options"] == "-c x"
    assert parse_target("postgres://h").database == "postgres"
    assert parse_target("mysql://h/db?ssl-mode=REQUIRED").tls_mode == "require"
    assert parse_target("rediss://h").tls_mode == "verify-full"
    assert parse_target("redis://:pw@h/2").password == "pw"
    assert parse_target("https://h/path?q=1").path == "/path?q=1"
    assert parse_target("postgres://u:url@h", password="env").password == "env"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("localhost:5432", "expected SCHEME://"),
        ("ftp://h", "unknown scheme"),
        ("tcp://h", "needs a port"),
        ("postgres://h:99999", "out of range"),
        ("postgres://:5432", "no host"),
        ("postgres://h?sslmode=maybe", "sslmode=maybe"),
        ("redis://h/x", "database number"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_target(url)


def test_redact_hides_passwords_everywhere() -> None:
    assert redact("postgres://app:s3cret@h:5432/db") == "postgres://app:***@h:5432/db"
    assert "s3cret" not in redact("postgres://h/db?password=s3cret&sslmode=require")
    assert "s3cret" not in str(_config_error("postgres://app:s3cret@h?sslmode=bad"))


def _config_error(url: str) -> ConfigError:
    try:
        parse_target(url)
    except ConfigError as exc:
        return exc
    raise AssertionError("no error")


async def test_checklist_stops_at_the_first_failure_and_keeps_its_verdict() -> None:
    seen: list[str] = []
    checklist = Checklist(lambda r: seen.append(f"{r.phase}:{r.status}"))

    async def ok() -> str:
        return "fine"

    async def bad() -> str:
        raise PhaseFailed("detail", "the cause", "the fix")

    assert await checklist.run("dns", ok)
    with pytest.raises(Stop):
        await checklist.run("dial", bad)
    verdict = checklist.verdict()
    assert seen == ["dns:ok", "dial:failed"]
    assert (verdict.ok, verdict.layer, verdict.cause, verdict.fix) == (
        False,
        "dial",
        "the cause",
        "the fix",
    )
    assert not checklist.passed


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_mysql_random_payloads_only_documented_errors(data: bytes) -> None:
    for parse in (mywire.parse_handshake, mywire.parse_err, mywire.parse_text_row):
        try:
            parse(b"\x0a" + data if parse is mywire.parse_handshake else data)
        except mywire.MyWireError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_socks_and_connect_random_answers_only_documented_errors(data: bytes) -> None:
    client = SocksClient("db", 5432)
    client.start()
    try:
        client.receive(data)
    except (ProxyWireError, SocksRefused):
        pass
    try:
        parse_connect_response(data)
    except ProxyWireError:
        pass


async def test_an_unforeseen_exception_is_a_finding_not_a_traceback() -> None:
    checklist = Checklist()

    async def broken() -> str:
        raise ValueError("bad bytes")

    with pytest.raises(Stop):
        await checklist.run("hello", broken)
    verdict = checklist.verdict()
    assert verdict.layer == "hello" and "ValueError: bad bytes" in verdict.cause

    async def user_error() -> str:
        raise ConfigError("bad flag")

    with pytest.raises(ConfigError):
        await Checklist().run("dial", user_error)

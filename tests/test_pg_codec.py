"""The sans-I/O PostgreSQL codec, on byte literals: the startup packets, the server's startup
messages, the size limits checked at the header, the encoders, and garbage in (hypothesis)."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from burrow.pg import codec
from burrow.pg.codec import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendDecoder,
    BackendKeyData,
    CancelRequest,
    ErrorResponse,
    FrontendDecoder,
    GSSENCRequest,
    Message,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    ReadyForQuery,
    SSLRequest,
    StartupMessage,
    parse_backend,
    parse_sasl_initial_response,
)
from burrow.pg.errors import (
    DOCUMENTED_ERRORS,
    DirectTLSFromClient,
    MalformedMessage,
    MessageTooLarge,
    PgWireError,
    UnexpectedMessage,
    UnsupportedProtocol,
)

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# --- literals, as captured from libpq and PostgreSQL 15 ------------------------------------------

SSL_REQUEST = bytes.fromhex("00000008 04d2162f")
GSSENC_REQUEST = bytes.fromhex("00000008 04d21630")
CANCEL_30 = bytes.fromhex("00000010 04d2162e 00003039 deadbeef")  # pid 12345
STARTUP_30 = (
    b"\x00\x00\x00\x20"  # 32 bytes
    b"\x00\x03\x00\x00"  # 3.0
    b"user\x00app\x00database\x00shop\x00\x00"
)
STARTUP_32 = b"\x00\x00\x00\x12\x00\x03\x00\x02user\x00bob\x00\x00"
SASL_BOTH = (
    b"R\x00\x00\x00\x2a\x00\x00\x00\x0a"  # length 42, code 10
    b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
)
SASL_PLAIN = b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"
AUTH_OK = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
KEY_30 = b"K\x00\x00\x00\x0c\x00\x00\x30\x39\xde\xad\xbe\xef"
READY_IDLE = b"Z\x00\x00\x00\x05I"
# A real server's password failure (field order as PostgreSQL writes it, F/L/R included).
ERROR_28P01 = (
    b"E\x00\x00\x00\x63"
    b"SFATAL\x00VFATAL\x00C28P01\x00"
    b'Mpassword authentication failed for user "app"\x00'
    b"Fauth.c\x00L326\x00Rauth_failed\x00\x00"
)


def test_literals_are_self_consistent() -> None:
    for blob in (SASL_BOTH, SASL_PLAIN, AUTH_OK, KEY_30, READY_IDLE, ERROR_28P01):
        assert struct.unpack("!I", blob[1:5])[0] == len(blob) - 1
    for blob in (STARTUP_30, STARTUP_32, CANCEL_30):
        assert struct.unpack("!I", blob[:4])[0] == len(blob)


# --- frontend: startup packets -----------------------------------------------------------------


def _frontend(*chunks: bytes) -> list[object]:
    decoder = FrontendDecoder()
    out: list[object] = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (item := decoder.next()) is not None:
            out.append(item[0])
    return out


def test_ssl_and_gssenc_requests() -> None:
    assert _frontend(SSL_REQUEST) == [SSLRequest()]
    assert _frontend(GSSENC_REQUEST) == [GSSENCRequest()]
    assert codec.encode_ssl_request() == SSL_REQUEST
    assert codec.encode_gssenc_request() == GSSENC_REQUEST


def test_cancel_request_30_and_32() -> None:
    assert _frontend(CANCEL_30) == [CancelRequest(12345, b"\xde\xad\xbe\xef")]
    assert codec.encode_cancel_request(12345, b"\xde\xad\xbe\xef") == CANCEL_30
    key = bytes(range(32))  # PostgreSQL 18 sends 32-byte keys under 3.2
    packet = b"\x00\x00\x00\x2c\x04\xd2\x16\x2e\x00\x00\x00\x07" + key
    assert _frontend(packet) == [CancelRequest(7, key)]
    assert codec.encode_cancel_request(7, key) == packet


@pytest.mark.parametrize("size", [0, 3, 257])
def test_cancel_request_key_size_is_bounded(size: int) -> None:
    packet = struct.pack("!IiI", 12 + size, codec.CANCEL_REQUEST_CODE, 1) + b"k" * size
    with pytest.raises(MalformedMessage):
        _frontend(packet)


def test_startup_message_30() -> None:
    (startup,) = _frontend(STARTUP_30)
    assert isinstance(startup, StartupMessage)
    assert startup.version == codec.PROTOCOL_3_0
    assert dict(startup.parameters) == {"user": "app", "database": "shop"}
    assert startup.user == "app" and startup.database == "shop"
    assert codec.encode_startup_message({"user": "app", "database": "shop"}) == STARTUP_30


def test_startup_message_32_and_default_database() -> None:
    (startup,) = _frontend(STARTUP_32)
    assert isinstance(startup, StartupMessage)
    assert codec.format_version(startup.version) == "3.2"
    assert startup.database == "bob"  # the server's default: the user name
    assert codec.encode_startup_message({"user": "bob"}, codec.PROTOCOL_3_2) == STARTUP_32


def test_negotiation_then_startup_then_typed_messages_byte_by_byte() -> None:
    password = b"p\x00\x00\x00\x09pass\x00"
    blob = SSL_REQUEST + STARTUP_30 + password + codec.TERMINATE
    items = _frontend(*[blob[i : i + 1] for i in range(len(blob))])
    assert items[0] == SSLRequest()
    assert isinstance(items[1], StartupMessage)
    assert items[2:] == [Message("p", b"pass\x00"), Message("X", b"")]


def test_decoder_returns_the_raw_bytes_it_parsed() -> None:
    decoder = FrontendDecoder()
    decoder.feed(STARTUP_30 + b"p\x00\x00\x00\x05x" + b"Q\x00")
    assert decoder.next() == (
        StartupMessage(codec.PROTOCOL_3_0, {"user": "app", "database": "shop"}),
        STARTUP_30,
    )
    assert decoder.next() == (Message("p", b"x"), b"p\x00\x00\x00\x05x")
    assert decoder.take_remainder() == b"Q\x00"  # what a proxy splices on


@pytest.mark.parametrize(
    ("blob", "error"),
    [
        (b"\x00\x00\x00\x07", MalformedMessage),  # shorter than a code
        (struct.pack("!I", codec.MAX_STARTUP_PACKET + 1), MalformedMessage),  # at the header
        (b"\x00\x00\x00\x0c\x04\xd2\x16\x2f\x00\x00\x00\x00", MalformedMessage),  # long SSLRequest
        (b"\x00\x00\x00\x09\x00\x03\x00\x00\x01", MalformedMessage),  # unterminated parameters
        (b"\x00\x00\x00\x0a\x00\x03\x00\x00\x00\x00", MalformedMessage),  # bytes after the list
        (b"\x00\x00\x00\x09\x00\x02\x00\x00\x00", UnsupportedProtocol),  # protocol 2.0
        (b"\x16\x03\x01\x02\x00\x01", DirectTLSFromClient),  # a TLS ClientHello
    ],
)
def test_bad_startup_packets(blob: bytes, error: type[PgWireError]) -> None:
    with pytest.raises(error):
        _frontend(blob)


def test_errors_carry_the_sqlstate_to_answer_with() -> None:
    with pytest.raises(UnsupportedProtocol) as unsupported:
        _frontend(b"\x00\x00\x00\x09\x00\x02\x00\x00\x00")
    assert unsupported.value.sqlstate == "0A000"
    with pytest.raises(MalformedMessage) as malformed:
        _frontend(b"\x00\x00\x00\x07")
    assert malformed.value.sqlstate == "08P01"
    assert DirectTLSFromClient("x").answer is False


def test_typed_client_messages_are_limited_at_the_header() -> None:
    decoder = FrontendDecoder()
    decoder.feed(STARTUP_30)
    decoder.next()
    decoder.feed(b"p" + struct.pack("!I", codec.FRONTEND_LIMITS["p"] + 5))  # header only
    with pytest.raises(MessageTooLarge):
        decoder.next()


def test_unexpected_client_message_is_refused_on_its_first_byte() -> None:
    decoder = FrontendDecoder()
    decoder.feed(STARTUP_30)
    decoder.next()
    decoder.feed(b"Q")
    with pytest.raises(UnexpectedMessage):
        decoder.next()


def test_sasl_initial_response_and_its_channel_binding_flag() -> None:
    body = b"SCRAM-SHA-256\x00" + struct.pack("!i", 16) + b"n,,n=,r=abcdefgh"
    parsed = parse_sasl_initial_response(body)
    assert parsed.mechanism == "SCRAM-SHA-256" and parsed.gs2_flag == "n"
    assert codec.encode_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abcdefgh") == (
        b"p" + struct.pack("!I", 4 + len(body)) + body
    )
    assert parse_sasl_initial_response(b"X\x00" + struct.pack("!i", 4) + b"y,,n").gs2_flag == "y"
    plus = b"p=tls-server-end-point,,n=,r=x"
    assert (
        parse_sasl_initial_response(
            b"SCRAM-SHA-256-PLUS\x00" + struct.pack("!i", len(plus)) + plus
        ).gs2_flag
        == "p"
    )
    empty = parse_sasl_initial_response(b"M\x00\xff\xff\xff\xff")
    assert empty.data is None and empty.gs2_flag is None
    with pytest.raises(MalformedMessage):
        parse_sasl_initial_response(b"M\x00\x00\x00\x00\x09abc")  # length beyond the body


# --- backend -----------------------------------------------------------------------------------


def _backend(blob: bytes) -> list[object]:
    decoder = BackendDecoder()
    decoder.feed(blob)
    out: list[object] = []
    while (message := decoder.next()) is not None:
        out.append(parse_backend(message))
    assert decoder.buffered == 0
    return out


def test_sasl_mechanism_list_and_withholding_plus() -> None:
    (sasl,) = _backend(SASL_BOTH)
    assert sasl == AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    assert codec.without_channel_binding(sasl.mechanisms) == ("SCRAM-SHA-256",)
    assert codec.encode_authentication_sasl(["SCRAM-SHA-256"]) == SASL_PLAIN
    assert codec.encode_authentication_sasl(sasl.mechanisms) == SASL_BOTH


def test_authentication_messages() -> None:
    blob = (
        AUTH_OK
        + b"R\x00\x00\x00\x08\x00\x00\x00\x03"
        + b"R\x00\x00\x00\x0c\x00\x00\x00\x05salt"
        + b"R\x00\x00\x00\x0d\x00\x00\x00\x0br=abc"
        + b"R\x00\x00\x00\x0d\x00\x00\x00\x0cv=xyz"
        + b"R\x00\x00\x00\x0a\x00\x00\x00\x07\x01\x02"
    )
    assert _backend(blob) == [
        AuthenticationOk(),
        AuthenticationCleartextPassword(),
        AuthenticationMD5Password(b"salt"),
        AuthenticationSASLContinue(b"r=abc"),
        AuthenticationSASLFinal(b"v=xyz"),
        AuthenticationOther(7, b"\x01\x02"),
    ]
    assert (
        AuthenticationOther(7, b"").needs_response
        and not AuthenticationOther(2, b"").needs_response
    )


def test_parameter_status_key_data_ready() -> None:
    blob = b"S\x00\x00\x00\x18server_version\x0015.2\x00" + KEY_30 + READY_IDLE
    assert _backend(blob) == [
        ParameterStatus("server_version", "15.2"),
        BackendKeyData(12345, b"\xde\xad\xbe\xef"),
        ReadyForQuery("I"),
    ]
    assert codec.encode_parameter_status("server_version", "15.2") == blob[:25]
    assert codec.encode_backend_key_data(12345, b"\xde\xad\xbe\xef") == KEY_30
    assert codec.encode_ready_for_query("I") == READY_IDLE


def test_backend_key_data_32_bytes_under_protocol_32() -> None:
    key = bytes(range(100, 132))
    blob = b"K\x00\x00\x00\x28\x00\x00\x00\x2a" + key
    assert _backend(blob) == [BackendKeyData(42, key)]


@pytest.mark.parametrize("size", [0, 3])
def test_backend_key_data_too_short(size: int) -> None:
    with pytest.raises(MalformedMessage):
        _backend(b"K" + struct.pack("!II", 8 + size, 1) + b"k" * size)


def test_backend_key_data_too_long_is_refused_at_the_header() -> None:
    decoder = BackendDecoder()
    decoder.feed(b"K" + struct.pack("!I", 4 + 4 + 257))
    with pytest.raises(MessageTooLarge):
        decoder.next()


def test_error_response_fields() -> None:
    (error,) = _backend(ERROR_28P01)
    assert isinstance(error, ErrorResponse)
    assert error.severity == "FATAL" and error.sqlstate == "28P01"
    assert error.message == 'password authentication failed for user "app"'
    assert error.fields["R"] == "auth_failed" and error.hint is None


def test_notice_with_unknown_field_codes_kept() -> None:
    (notice,) = _backend(b"N\x00\x00\x00\x16SWARNING\x00Zzz\x00Mhi\x00\x00")
    assert isinstance(notice, NoticeResponse)
    assert notice.severity == "WARNING" and notice.fields["Z"] == "zz" and notice.message == "hi"


def test_encode_error_response_exactly() -> None:
    blob = codec.encode_error_response(
        "FATAL", "28000", 'user "eve" is not allowed', hint="ask for access"
    )
    assert blob == (
        b"E\x00\x00\x00\x45"
        b"SFATAL\x00VFATAL\x00C28000\x00"
        b'Muser "eve" is not allowed\x00'
        b"Hask for access\x00\x00"
    )
    (parsed,) = _backend(blob)
    assert isinstance(parsed, ErrorResponse) and parsed.hint == "ask for access"
    assert codec.encode_error_response("NOTICE", "00000", "n", notice=True).startswith(b"N")
    with pytest.raises(ValueError):
        codec.encode_error_response("FATAL", "280", "short sqlstate")


def test_negotiate_protocol_version() -> None:
    blob = b"v\x00\x00\x00\x17\x00\x03\x00\x00\x00\x00\x00\x01_pq_.extra\x00"
    assert _backend(blob) == [NegotiateProtocolVersion(codec.PROTOCOL_3_0, ("_pq_.extra",))]
    assert codec.encode_negotiate_protocol_version(codec.PROTOCOL_3_0, ["_pq_.extra"]) == blob


@pytest.mark.parametrize(
    "blob",
    [
        b"Z\x00\x00\x00\x05X",  # unknown transaction status
        b"R\x00\x00\x00\x09\x00\x00\x00\x00\x00",  # AuthenticationOk with a body
        b"R\x00\x00\x00\x09\x00\x00\x00\x0a\x00",  # SASL with no mechanism
        b"R\x00\x00\x00\x09\x00\x00\x00\x0aX",  # mechanism list not terminated
        b"E\x00\x00\x00\x07SX\x00",  # fields not terminated
        b"S\x00\x00\x00\x06a\x00",  # ParameterStatus with no value
        b"v\x00\x00\x00\x0c\x00\x03\x00\x00\x00\x00\x00\x05",  # claims 5 options, has none
        b"R\x00\x00\x00\x03",  # length below 4
    ],
)
def test_malformed_backend_messages(blob: bytes) -> None:
    with pytest.raises(MalformedMessage):
        _backend(blob)


def test_startup_decoder_refuses_types_startup_never_sees() -> None:
    decoder = BackendDecoder()
    decoder.feed(b"D")  # a DataRow before ReadyForQuery: refused on its first byte
    with pytest.raises(UnexpectedMessage):
        decoder.next()


def test_ready_for_query_length_is_checked_at_the_header() -> None:
    decoder = BackendDecoder()
    decoder.feed(b"Z\x00\x00\x00\x06")
    with pytest.raises(MessageTooLarge):
        decoder.next()


def test_a_probe_decoder_reads_any_type_within_its_default_limit() -> None:
    decoder = BackendDecoder(default_limit=16)
    decoder.feed(b"D\x00\x00\x00\x06\x00\x00" + b"C\x00\x00\x00\x0bSELECT\x00")
    first, second = decoder.next(), decoder.next()
    assert first == Message("D", b"\x00\x00") and second == Message("C", b"SELECT\x00")
    assert parse_backend(second) == second  # not modelled: passed back as is
    decoder.feed(b"D" + struct.pack("!I", 4 + 17))
    with pytest.raises(MessageTooLarge):
        decoder.next()


# --- garbage in: only the documented errors ---------------------------------------------------


_NO_NUL = st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])


def _split(blob: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(blob) + 1) for c in cuts} | {0, len(blob)})
    return [blob[a:b] for a, b in itertools.pairwise(points)]


@PROPERTY
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=8))
def test_frontend_garbage_yields_only_documented_errors(blob: bytes, cuts: list[int]) -> None:
    decoder = FrontendDecoder()
    try:
        for chunk in _split(blob, cuts):
            decoder.feed(chunk)
            while decoder.next() is not None:
                pass
    except DOCUMENTED_ERRORS:
        pass


@PROPERTY
@given(
    st.lists(st.tuples(st.sampled_from(list("RSKEZvN")), st.binary(max_size=40)), max_size=6).map(
        lambda ms: b"".join(codec.encode_message(k, b) for k, b in ms)
    )
    | st.binary(max_size=400)
)
def test_backend_garbage_yields_only_documented_errors(blob: bytes) -> None:
    decoder = BackendDecoder()
    decoder.feed(blob)
    try:
        while (message := decoder.next()) is not None:
            parse_backend(message)
    except DOCUMENTED_ERRORS:
        pass


@PROPERTY
@given(
    st.dictionaries(
        st.text(_NO_NUL, min_size=1, max_size=12),
        st.text(_NO_NUL, max_size=20),
        max_size=5,
    ),
    st.sampled_from([codec.PROTOCOL_3_0, codec.PROTOCOL_3_2]),
)
def test_startup_message_round_trip(params: dict[str, str], version: int) -> None:
    (startup,) = _frontend(codec.encode_startup_message(params, version))
    assert isinstance(startup, StartupMessage)
    assert dict(startup.parameters) == params and startup.version == version


@PROPERTY
@given(st.binary(max_size=300))
def test_sasl_initial_response_garbage(body: bytes) -> None:
    try:
        parse_sasl_initial_response(body)
    except DOCUMENTED_ERRORS:
        pass

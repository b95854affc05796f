"""The startup relay, sans-I/O: scripted conversations on byte literals, no sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from burrow.pg import codec
from burrow.pg.codec import BackendDecoder, ErrorResponse, parse_backend
from burrow.pg.errors import (
    ChannelBindingRefused,
    DirectTLSFromClient,
    PgError,
    PolicyRefused,
    UnexpectedMessage,
    UpstreamFailed,
)
from burrow.pg.policy import PgPolicy
from burrow.pg.startup import Phase, StartupRelay

SSL_REQUEST = bytes.fromhex("00000008 04d2162f")
GSSENC_REQUEST = bytes.fromhex("00000008 04d21630")
STARTUP = codec.encode_startup_message({"user": "app", "database": "app"})
SASL_BOTH = codec.encode_authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
SASL_PLAIN = codec.encode_authentication_sasl(["SCRAM-SHA-256"])
CLIENT_FIRST = codec.encode_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=clientnonce")
SERVER_FIRST = codec.encode_authentication(11, b"r=clientnonceserver,s=c2FsdA==,i=4096")
CLIENT_FINAL = codec.encode_message("p", b"c=biws,r=clientnonceserver,p=cHJvb2Y=")
SERVER_FINAL = codec.encode_authentication(12, b"v=c2lnbmF0dXJl")
AUTH_OK = codec.encode_authentication(0)
AFTER_AUTH = (
    codec.encode_parameter_status("server_version", "15.20")
    + codec.encode_backend_key_data(4242, b"\x01\x02\x03\x04")
    + codec.encode_ready_for_query("I")
)


def _errors(blob: bytes) -> list[ErrorResponse]:
    decoder = BackendDecoder()
    decoder.feed(blob)
    out = []
    while (message := decoder.next()) is not None:
        parsed = parse_backend(message)
        assert isinstance(parsed, ErrorResponse)
        out.append(parsed)
    return out


def _to_auth(relay: StartupRelay) -> None:
    relay.receive_client(SSL_REQUEST)
    assert relay.data_to_client() == b"N"
    relay.receive_client(STARTUP)
    assert relay.phase is Phase.DIAL and relay.waiting_for is None
    relay.upstream_ready()
    assert relay.data_to_server() == STARTUP
    assert relay.phase is Phase.AUTH and relay.waiting_for == "server"


def test_scram_conversation_with_plus_withheld() -> None:
    relay = StartupRelay(PgPolicy())
    _to_auth(relay)
    relay.receive_server(SASL_BOTH)
    assert relay.data_to_client() == SASL_PLAIN  # the PLUS offer never reaches the client
    assert relay.withheld == ("SCRAM-SHA-256-PLUS",)
    assert relay.waiting_for == "client"
    relay.receive_client(CLIENT_FIRST)
    assert relay.data_to_server() == CLIENT_FIRST
    relay.receive_server(SERVER_FIRST)
    assert relay.data_to_client() == SERVER_FIRST
    relay.receive_client(CLIENT_FINAL)
    assert relay.data_to_server() == CLIENT_FINAL
    relay.receive_server(SERVER_FINAL + AUTH_OK + AFTER_AUTH + b"A\x00\x00")
    assert relay.data_to_client() == SERVER_FINAL + AUTH_OK + AFTER_AUTH
    assert relay.phase is Phase.READY
    assert relay.server_remainder() == b"A\x00\x00"  # after ReadyForQuery: spliced as is
    assert relay.auth_method == "SCRAM-SHA-256"
    assert relay.server_version == "15.20"
    assert relay.backend_key == codec.BackendKeyData(4242, b"\x01\x02\x03\x04")


def test_gssenc_then_ssl_then_startup_in_one_chunk() -> None:
    relay = StartupRelay(PgPolicy())
    relay.receive_client(GSSENC_REQUEST + SSL_REQUEST + STARTUP)
    assert relay.data_to_client() == b"NN"
    assert relay.phase is Phase.DIAL and relay.startup is not None


def test_pipelined_client_bytes_wait_for_their_turn() -> None:
    relay = StartupRelay(PgPolicy())
    relay.receive_client(STARTUP)
    relay.upstream_ready()
    relay.data_to_server()
    relay.receive_server(codec.encode_authentication(3))  # cleartext password
    query = codec.encode_message("Q", b"select 1\x00")
    relay.receive_client(codec.encode_message("p", b"secret\x00") + query)
    assert relay.data_to_server() == codec.encode_message("p", b"secret\x00")
    relay.receive_server(AUTH_OK + AFTER_AUTH)
    assert relay.phase is Phase.READY and relay.auth_method == "password"
    assert relay.client_remainder() == query


def test_trust_and_protocol_32_negotiated_down() -> None:
    relay = StartupRelay(PgPolicy())
    relay.receive_client(codec.encode_startup_message({"user": "app"}, codec.PROTOCOL_3_2))
    relay.upstream_ready()
    assert relay.protocol == codec.PROTOCOL_3_2
    nego = codec.encode_negotiate_protocol_version(codec.PROTOCOL_3_0, [])
    relay.receive_server(nego + AUTH_OK + AFTER_AUTH)
    assert relay.data_to_client() == nego + AUTH_OK + AFTER_AUTH
    assert relay.protocol == codec.PROTOCOL_3_0 and relay.auth_method == "trust"


def test_server_error_is_passed_on_and_ends_startup() -> None:
    relay = StartupRelay(PgPolicy())
    _to_auth(relay)
    error = codec.encode_error_response(
        "FATAL", "28P01", 'password authentication failed for "app"'
    )
    relay.receive_server(codec.encode_authentication(5, b"salt"))
    relay.receive_client(codec.encode_message("p", b"md5abc\x00"))
    relay.receive_server(error)
    assert relay.data_to_client().endswith(error)
    assert relay.phase is Phase.CLOSED
    assert relay.server_error is not None and relay.server_error.sqlstate == "28P01"


@pytest.mark.parametrize(
    ("policy", "startup", "text"),
    [
        (PgPolicy.create(users=["app"]), {"user": "eve", "database": "app"}, 'user "eve"'),
        (PgPolicy.create(databases=["app"]), {"user": "app", "database": "x"}, 'database "x"'),
        (PgPolicy.create(databases=["app"]), {"user": "x"}, 'database "x"'),  # default db
        (
            PgPolicy.create(databases=["app"]),
            {"user": "app", "database": "app", "replication": "true"},
            'database "replication"',
        ),
        (PgPolicy(), {"database": "app"}, "no PostgreSQL user name"),
    ],
)
def test_allow_lists_refuse_with_28000(
    policy: PgPolicy, startup: dict[str, str], text: str
) -> None:
    relay = StartupRelay(policy)
    with pytest.raises(PolicyRefused):
        relay.receive_client(codec.encode_startup_message(startup))
    (error,) = _errors(relay.data_to_client())
    assert error.sqlstate == "28000" and error.severity == "FATAL" and text in error.message
    assert relay.phase is Phase.CLOSED and relay.data_to_server() == b""


def test_allowed_user_and_database_pass() -> None:
    relay = StartupRelay(PgPolicy.create(users=["app"], databases=["app"]))
    relay.receive_client(STARTUP)
    assert relay.phase is Phase.DIAL


@pytest.mark.parametrize(
    "response",
    [
        codec.encode_sasl_initial_response("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=x"),
        codec.encode_sasl_initial_response("SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=x"),
        codec.encode_sasl_initial_response("SCRAM-SHA-256", b"y,,n=,r=x"),
    ],
)
def test_client_insisting_on_channel_binding_is_told_why(response: bytes) -> None:
    relay = StartupRelay(PgPolicy())
    _to_auth(relay)
    relay.receive_server(SASL_BOTH)
    relay.data_to_client()
    with pytest.raises(ChannelBindingRefused):
        relay.receive_client(response)
    (error,) = _errors(relay.data_to_client())
    assert error.sqlstate == "28000" and "channel binding" in error.message
    assert error.hint is not None and "channel_binding=prefer" in error.hint
    assert relay.data_to_server() == b""  # nothing reaches the database


def test_server_offering_only_plus_is_explained() -> None:
    relay = StartupRelay(PgPolicy())
    _to_auth(relay)
    with pytest.raises(ChannelBindingRefused):
        relay.receive_server(codec.encode_authentication_sasl(["SCRAM-SHA-256-PLUS"]))
    (error,) = _errors(relay.data_to_client())
    assert "only SASL mechanisms with channel binding" in error.message


def test_cancel_request_after_ssl_request() -> None:
    relay = StartupRelay(PgPolicy())
    relay.receive_client(SSL_REQUEST + codec.encode_cancel_request(4242, b"\x01\x02\x03\x04"))
    assert relay.data_to_client() == b"N"
    assert relay.phase is Phase.CANCEL
    assert relay.cancel == codec.CancelRequest(4242, b"\x01\x02\x03\x04")


def test_second_ssl_request_is_a_protocol_violation() -> None:
    relay = StartupRelay(PgPolicy())
    with pytest.raises(UnexpectedMessage):
        relay.receive_client(SSL_REQUEST + SSL_REQUEST)
    data = relay.data_to_client()
    assert data[:1] == b"N"
    (error,) = _errors(data[1:])
    assert error.sqlstate == "08P01"


def test_garbage_gets_08p01_and_tls_gets_silence() -> None:
    relay = StartupRelay(PgPolicy())
    with pytest.raises(PgError):
        relay.receive_client(struct.pack("!I", 50_000))
    (error,) = _errors(relay.data_to_client())
    assert error.sqlstate == "08P01"
    relay = StartupRelay(PgPolicy())
    with pytest.raises(DirectTLSFromClient):
        relay.receive_client(b"\x16\x03\x01\x00\xa5")
    assert relay.data_to_client() == b"" and relay.phase is Phase.CLOSED


def test_ready_before_authentication_is_refused() -> None:
    relay = StartupRelay(PgPolicy())
    _to_auth(relay)
    with pytest.raises(UnexpectedMessage):
        relay.receive_server(codec.encode_ready_for_query("I"))


def test_dial_failure_is_answered() -> None:
    relay = StartupRelay(PgPolicy())
    relay.receive_client(STARTUP)
    relay.fail(UpstreamFailed("burrow: the database at x:5432 refused the connection"))
    (error,) = _errors(relay.data_to_client())
    assert error.sqlstate == "08001" and "refused" in error.message
    assert relay.phase is Phase.CLOSED


def test_terminate_during_authentication() -> None:
    relay = StartupRelay(PgPolicy())
    _to_auth(relay)
    relay.receive_server(SASL_BOTH)
    relay.receive_client(codec.TERMINATE)
    assert relay.phase is Phase.CLOSED and relay.client_terminated


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_garbage_from_either_side_yields_only_pg_errors(client: bytes, server: bytes) -> None:
    relay = StartupRelay(PgPolicy())
    try:
        relay.receive_client(STARTUP[:8] + client if client[:1] == b"\x00" else client)
        if relay.phase is Phase.DIAL:
            relay.upstream_ready()
            relay.receive_server(server)
    except PgError:
        assert relay.phase is Phase.CLOSED


def test_a_message_sent_ahead_goes_as_soon_as_its_turn_comes() -> None:
    """A client that sends its password before being asked: nothing waits on more input."""
    relay = StartupRelay(PgPolicy())
    password = codec.encode_message("p", b"secret\x00")
    relay.receive_client(STARTUP + password)
    relay.upstream_ready()
    assert relay.data_to_server() == STARTUP  # the password waits for its turn ...
    relay.receive_server(codec.encode_authentication(3))
    assert relay.data_to_server() == password  # ... and goes with no further client bytes
    assert relay.waiting_for == "server"

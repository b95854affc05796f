"""The serverless relay's sans-I/O parts on byte literals: WebSocket framing (RFC 6455's own
examples), the message protocol and its limits, in-order delivery, the agent's response
decoder and body sizing, the gateway's event and response shapes."""

from __future__ import annotations

import base64
import json
import random

import pytest

from burrow.aws.serverless import protocol, wsframes
from burrow.aws.serverless.gateway import Failure, Gateway, _Answer, _raw_request, is_text
from burrow.aws.serverless.response import BodySize, DecodeError, Head, ResponseDecoder

# --- WebSocket framing (RFC 6455 §5.7) ---------------------------------------------------------


def test_rfc_6455_examples_parse() -> None:
    server = wsframes.FrameParser(masked=False, max_frame=1 << 20)
    assert server.feed(bytes.fromhex("810548656c6c6f")) == [
        wsframes.Frame(True, wsframes.TEXT, b"Hello")
    ]
    masked = wsframes.FrameParser(masked=True, max_frame=1 << 20)
    assert masked.feed(bytes.fromhex("818537fa213d7f9f4d5158")) == [
        wsframes.Frame(True, wsframes.TEXT, b"Hello")
    ]
    frames = server.feed(bytes.fromhex("010348656c") + bytes.fromhex("80026c6f"))
    assembler = wsframes.Assembler(100)
    assert assembler.push(frames[0]) is None
    assert assembler.push(frames[1]) == wsframes.Message(wsframes.TEXT, b"Hello")
    assert server.feed(bytes.fromhex("890548656c6c6f")) == [
        wsframes.Frame(True, wsframes.PING, b"Hello")
    ]
    long = server.feed(bytes.fromhex("827e0100") + bytes(256))
    assert long[0].payload == bytes(256)
    longer = server.feed(bytes.fromhex("827f0000000000010000") + bytes(65536))
    assert len(longer[0].payload) == 65536


def test_frames_arrive_in_pieces() -> None:
    parser = wsframes.FrameParser(masked=True, max_frame=1 << 20)
    data = wsframes.encode_frame(wsframes.TEXT, b"x" * 70000, masked=True)
    out = []
    for i in range(0, len(data), 777):
        out += parser.feed(data[i : i + 777])
    assert out == [wsframes.Frame(True, wsframes.TEXT, b"x" * 70000)]


def test_encode_round_trips_and_masks() -> None:
    for size in (0, 125, 126, 65535, 65536):
        frame = wsframes.encode_frame(wsframes.BINARY, bytes(size), masked=True)
        assert frame[1] & 0x80
        got = wsframes.FrameParser(masked=True, max_frame=1 << 20).feed(frame)
        assert got == [wsframes.Frame(True, wsframes.BINARY, bytes(size))]
    assert wsframes.encode_frame(wsframes.TEXT, b"Hello", masked=False) == bytes.fromhex(
        "810548656c6c6f"
    )


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (bytes.fromhex("c10548656c6c6f"), wsframes.PROTOCOL_ERROR),  # RSV1 without extension
        (bytes.fromhex("830548656c6c6f"), wsframes.PROTOCOL_ERROR),  # opcode 3
        (bytes.fromhex("818537fa213d7f9f4d5158"), wsframes.PROTOCOL_ERROR),  # masked to a client
        (bytes.fromhex("097e0100"), wsframes.PROTOCOL_ERROR),  # fragmented long ping
        (bytes.fromhex("817f0000000000008001"), wsframes.TOO_BIG),  # 32769 bytes, at the header
    ],
)
def test_bad_frames_close_with_the_right_code(data: bytes, code: int) -> None:
    parser = wsframes.FrameParser(masked=False, max_frame=32768)
    with pytest.raises(wsframes.WsError) as caught:
        parser.feed(data)
    assert caught.value.code == code


def test_messages_over_the_limit_and_bad_sequences() -> None:
    assembler = wsframes.Assembler(10)
    assert assembler.push(wsframes.Frame(False, wsframes.TEXT, b"12345")) is None
    with pytest.raises(wsframes.WsError) as caught:
        assembler.push(wsframes.Frame(True, wsframes.CONT, b"123456"))
    assert caught.value.code == wsframes.TOO_BIG
    with pytest.raises(wsframes.WsError):
        wsframes.Assembler(10).push(wsframes.Frame(True, wsframes.CONT, b"x"))
    started = wsframes.Assembler(10)
    started.push(wsframes.Frame(False, wsframes.TEXT, b"x"))
    assert started.push(wsframes.Frame(True, wsframes.PING, b"")) == wsframes.Message(
        wsframes.PING, b""
    )
    with pytest.raises(wsframes.WsError):
        started.push(wsframes.Frame(True, wsframes.TEXT, b"y"))


def test_handshake_keys() -> None:
    assert wsframes.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    key = wsframes.new_key()
    head = f"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {wsframes.accept_key(key)}"
    assert wsframes.parse_response_head(head.encode(), key) == (101, "Switching Protocols")
    with pytest.raises(wsframes.WsError):
        wsframes.parse_response_head(b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: nope", key)
    assert wsframes.parse_response_head(b"HTTP/1.1 403 Forbidden", key) == (403, "Forbidden")
    with pytest.raises(wsframes.WsError):
        wsframes.parse_response_head(b"SSH-2.0", key)
    request = wsframes.client_request("h", "/relay", key, {"Authorization": "x"})
    assert request.startswith(b"GET /relay HTTP/1.1\r\nHost: h\r\n")
    assert b"Authorization: x\r\n" in request and request.endswith(b"\r\n\r\n")


# --- the message protocol ----------------------------------------------------------------------


def test_limits_fit_aws() -> None:
    assert protocol.SEND_FRAME <= protocol.AWS_MAX_FRAME
    assert protocol.SEND_MESSAGE <= protocol.AWS_MAX_MESSAGE
    message = {
        "t": "data",
        "s": "a" * 128,
        "q": 1 << 40,
        "to": "c" * 128,
        "mac": "f" * 32,
        "fin": False,
        "d": protocol.b64(bytes(protocol.CHUNK)),
    }
    assert len(protocol.encode(message)) <= protocol.SEND_MESSAGE
    assert all(len(f) <= protocol.SEND_FRAME for f in protocol.frames("x" * 300_000))
    assert protocol.frames("") == [""]


def test_data_room_fills_a_message_exactly_below_the_limit() -> None:
    rng = random.Random(1)
    for _ in range(50):
        envelope = {
            "t": "open",
            "s": "s" * rng.randint(1, 128),
            "k": "http",
            "n": "shop",
            "w": 1,
            "q": 0,
            "put": "u" * rng.randint(0, 4000),
        }
        room = protocol.data_room(envelope)
        full = {**envelope, "d": protocol.b64(bytes(room)), "fin": False}
        assert len(protocol.encode(full)) <= protocol.SEND_MESSAGE
        bigger = {**envelope, "d": protocol.b64(bytes(room + 3)), "fin": False}
        assert len(json.dumps(bigger, separators=(",", ":"))) > protocol.SEND_MESSAGE - 12
    assert list(protocol.chunks(b"abcdefg", 2))[:1] == [b"ab"]


def test_encode_refuses_over_the_limit() -> None:
    with pytest.raises(protocol.ProtocolError, match="over"):
        protocol.encode({"t": "data", "d": "x" * 200_000})


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("nope", "not a JSON"),
        ("[1]", "JSON object"),
        ('{"t":"fly"}', "unknown message type"),
        ('{"t":"data","s":"a b","q":0}', "bad 's'"),
        ('{"t":"data","s":"a","q":-1}', "bad 'q'"),
        ('{"t":"data","s":"a","q":true}', "bad 'q'"),
        ('{"t":"data","s":"a","q":0,"fin":1}', "bad 'fin'"),
        ('{"t":"hello","v":1,"role":"god"}', "bad 'role'"),
        ('{"t":"hello","v":1,"role":"agent","tunnels":[{"k":"ftp"}]}', "bad tunnel"),
        ('{"t":"hello","v":1,"role":"agent","tunnels":[{"k":"http","n":""}]}', "tunnel name"),
        ('{"t":"hello","v":1,"role":"agent","tunnels":{}}', "bad 'tunnels'"),
        ('{"t":"open","s":"a","q":0,"k":"udp","n":"x","w":1}', "bad 'k'"),
        ('{"t":"open","s":"a","q":0,"k":"http","n":"x","w":1,"src":[1,2]}', "bad 'src'"),
        ('{"t":"head","s":"a","q":0,"st":42,"h":[]}', "bad 'st'"),
        ('{"t":"head","s":"a","q":0,"st":200,"h":[["a",1]]}', "bad header"),
        ('{"t":"head","s":"a","q":0,"st":200,"h":"x"}', "bad 'h'"),
        ('{"t":"credit","s":"a","n":0}', "bad 'n'"),
        ('{"t":"reset","s":"a","code":"Bad Code"}', "bad 'code'"),
        ('{"t":"error","code":"x","msg":5}', "bad 'msg'"),
        ('{"t":"ping","n":"1"}', "bad 'n'"),
        ('{"t":"stored","s":"a","q":1}', "bad 'size'"),
        ('{"t":"data","s":"a","q":0,"mac":"XYZ"}', "bad 'mac'"),
    ],
)
def test_decode_refuses_bad_messages(text: str, why: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=why):
        protocol.decode(text)


def test_decode_refuses_oversized_and_payload_must_be_base64() -> None:
    with pytest.raises(protocol.ProtocolError, match="over"):
        protocol.decode("x" * (protocol.AWS_MAX_MESSAGE + 1))
    message = protocol.decode('{"t":"data","s":"a","q":0,"d":"aGk="}')
    assert protocol.payload(message) == b"hi"
    with pytest.raises(protocol.ProtocolError, match="not base64"):
        protocol.payload(protocol.decode('{"t":"data","s":"a","q":0,"d":"a!k="}'))
    assert protocol.payload({"t": "data"}) == b""


def test_routes_prove_who_may_answer() -> None:
    key = protocol.derive(b"k" * 32, "route")
    mac = protocol.route_mac(key, "GW", "s1", "AG")
    message = {"t": "data", "s": "s1", "to": "GW", "mac": mac}
    assert protocol.check_route(key, message, "AG") == "GW"
    for sender, stream in (("OTHER", "s1"), ("AG", "s2")):
        with pytest.raises(protocol.ProtocolError, match="does not verify"):
            protocol.check_route(key, {**message, "s": stream}, sender)
    with pytest.raises(protocol.ProtocolError, match="no route"):
        protocol.check_route(key, {"t": "data", "s": "s1"}, "AG")
    assert protocol.derive(b"k" * 32, "route") != protocol.derive(b"k" * 32, "gateway")


def test_connect_proofs() -> None:
    key = protocol.derive(b"k" * 32, "gateway")
    header = protocol.gateway_proof(key, "api.example", 1700000000, "ab" * 16)
    proof = protocol.parse_proof(header)
    assert proof.role == "gateway" and proof.timestamp == 1700000000
    assert protocol.check_gateway_proof(key, proof, "API.example")
    assert not protocol.check_gateway_proof(key, proof, "other.example")
    agent = protocol.parse_proof(protocol.agent_proof("Y2xhaW1z", "c" * 64, 5, "d" * 32))
    assert agent.role == "agent" and agent.claims == "Y2xhaW1z"
    for bad in (
        "Bearer x",
        "Burrow-Gateway Y2xh.5." + "d" * 32 + "." + "c" * 64,
        "Burrow-Token 5." + "d" * 32 + "." + "c" * 64,
        "x" * 10000,
    ):
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_proof(bad)


def test_reorder_delivers_in_sequence_and_bounds_what_it_holds() -> None:
    order = protocol.Reorder()
    assert order.push({"q": 1}) == []
    assert order.push({"q": 2, "fin": True}) == []
    assert [m["q"] for m in order.push({"q": 0})] == [0, 1, 2]
    assert order.ended and order.push({"q": 3}) == []
    again = protocol.Reorder()
    assert again.push({"q": 0}) == [{"q": 0}]
    assert again.push({"q": 0}) == []  # a duplicate
    flood = protocol.Reorder()
    for q in range(1, protocol.MAX_PENDING + 1):
        flood.push({"q": q})
    with pytest.raises(protocol.ProtocolError, match="out of order"):
        flood.push({"q": protocol.MAX_PENDING + 1})


def test_check_headers() -> None:
    assert protocol.check_headers([(b"X-A", b"1")]) == [["X-A", "1"]]
    with pytest.raises(protocol.ProtocolError):
        protocol.check_headers([(b"X A", b"1")])
    with pytest.raises(protocol.ProtocolError):
        protocol.check_headers([(b"X-A", b"1\r\nX-B: 2")])
    with pytest.raises(protocol.ProtocolError, match="too large"):
        protocol.check_headers([(b"X", b"v" * 70000)])


# --- the agent's response decoder ---------------------------------------------------------------


def _decode(raw: bytes, method: str = "GET", step: int = 7) -> tuple[Head, bytes, bool]:
    decoder = ResponseDecoder(method)
    events: list[object] = []
    for i in range(0, len(raw), step):
        events += decoder.feed(raw[i : i + step])
    head = next(e for e in events if isinstance(e, Head))
    body = b"".join(e for e in events if isinstance(e, bytes))
    return head, body, events[-1] is None if events else False


def test_decoder_framings() -> None:
    head, body, done = _decode(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\nhello")
    assert (head.status, body, done) == (200, b"hello", True)
    assert (b"X", b"y") in head.headers
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
    )
    assert _decode(chunked)[1:] == (b"hello world", True)
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    assert _decode(interim)[0].status == 204 and _decode(interim)[2]
    head_only = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"
    assert _decode(head_only, "HEAD")[1:] == (b"", True)
    decoder = ResponseDecoder()
    events = decoder.feed(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
    assert events[-1] == b"until the end" and decoder.eof() == [None]
    assert decoder.eof() == []


@pytest.mark.parametrize(
    "raw",
    [
        b"NOPE\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad line\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc",
    ],
)
def test_decoder_refuses_broken_answers(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        ResponseDecoder().feed(raw)


def test_decoder_bounds_and_early_ends() -> None:
    with pytest.raises(DecodeError, match="64 KiB"):
        ResponseDecoder().feed(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000)
    with pytest.raises(DecodeError, match="too long"):
        ResponseDecoder().feed(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 2000
        )
    cut = ResponseDecoder()
    cut.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(DecodeError, match="ended early"):
        cut.eof()


def test_body_size_matches_what_json_makes_of_it() -> None:
    text = 'plain "quoted" back\\slash\nnew\ttab \x01 é 漢 🙂'.encode()
    size = BodySize(text=True)
    size.add(text[:20])
    size.add(text[20:])  # split inside nothing in particular
    size.finish()
    assert size.encoded == len(json.dumps(text.decode()))
    binary = BodySize(text=False)
    binary.add(bytes(1000))
    assert binary.encoded == len(json.dumps(base64.b64encode(bytes(1000)).decode()))
    broken = BodySize(text=True)
    broken.add(b"\xff\xfe")
    broken.finish()
    assert broken.encoded == len(base64.b64encode(b"\xff\xfe")) + 2
    dangling = BodySize(text=True)
    dangling.add("é".encode()[:1])
    dangling.finish()
    assert dangling.encoded == 4 + 2


# --- the gateway's shapes ---------------------------------------------------------------------


def test_is_text() -> None:
    assert is_text([("Content-Type", "text/html; charset=utf-8")])
    assert is_text([("content-type", "application/vnd.api+json")])
    assert not is_text([("content-type", "text/html"), ("content-encoding", "gzip")])
    assert not is_text([("content-type", "image/png")])
    assert not is_text([])


def test_raw_request_from_an_event() -> None:
    event = {
        "requestContext": {"http": {"method": "POST"}},
        "headers": {
            "host": "shop.example",
            "content-length": "3",
            "x-a": "1,2",
            "connection": "keep-alive",
        },
        "cookies": ["a=1", "b=2"],
        "body": base64.b64encode(b"\x00\x01\x02").decode(),
        "isBase64Encoded": True,
    }
    raw = _raw_request(event, "/p?q=1")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body == b"\x00\x01\x02"
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /p?q=1 HTTP/1.1"
    assert b"cookie: a=1; b=2" in lines and b"content-length: 3" in lines
    assert b"x-a: 1,2" in lines and b"connection: close" in lines
    assert b"connection: keep-alive" not in lines
    with pytest.raises(Failure):
        _raw_request({**event, "body": "!!"}, "/")


def test_answers_as_lambda_responses() -> None:
    answer = _Answer()
    answer.status = 201
    answer.headers = [
        ["Content-Type", "text/plain"],
        ["Set-Cookie", "a=1"],
        ["Set-Cookie", "b=2"],
        ["X-M", "1"],
        ["X-M", "2"],
        ["Content-Length", "2"],
    ]
    answer.parts = [b"h", b"i"]
    response = answer.response(1 << 20)
    assert response == {
        "statusCode": 201,
        "headers": {"content-type": "text/plain", "x-m": "1, 2"},
        "body": "hi",
        "isBase64Encoded": False,
        "cookies": ["a=1", "b=2"],
    }
    answer.headers = [["Content-Type", "text/plain"]]
    answer.parts = [b"\xff"]
    assert answer.response(1 << 20)["isBase64Encoded"] is True
    answer.parts = [bytes(2000)]
    with pytest.raises(Failure, match="more than the serverless relay returns"):
        answer.response(1000)


def test_routing_by_host_and_path() -> None:
    from burrow.aws.serverless.config import Config

    gateway = Gateway(
        Config(
            table="t",
            key=b"k" * 32,
            ws_url="ws://x/s",
            management_url="http://x/s",
            domain="example.net",
        )
    )

    def route(host: str, path: str, query: str = "") -> tuple[str, str]:
        return gateway._route({"headers": {"host": host}, "rawPath": path, "rawQueryString": query})

    assert route("shop.example.net", "/a", "b=1") == ("shop", "/a?b=1")
    assert route("api.example", "/t/shop/x/y") == ("shop", "/x/y")
    assert route("api.example", "/t/shop") == ("shop", "/")
    with pytest.raises(Failure) as caught:
        route("api.example", "/elsewhere")
    assert caught.value.status == 404
    with pytest.raises(Failure):
        route("a.b.example.net", "/")
    response = gateway.handle({"headers": {"host": "example.org"}, "rawPath": "/"})
    assert response["statusCode"] == 404 and "NAME.example.net" in response["body"]

"""The serverless relay's handlers and the emulator's AWS behaviour, seen from raw clients: the
connect proofs (missing, stale, forged, replayed), hello/ping, routes that do not verify,
peers that are gone, API Gateway's frame and message limits (1009) and binary frames (1003),
@connections' 410 and 413, the HTTP API's size limits, the module-level entry points."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from burrow.aws.serverless import protocol
from burrow.aws.serverless.config import Config
from burrow.aws.serverless.emulator import Emulator, EmulatorThread
from burrow.aws.serverless.wsclient import WsClient, WsClosed, WsRefused
from burrow.errors import ConfigError
from burrow.tokens import token_proof
from serverless_support import token, visit


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    with EmulatorThread(state_dir=tmp_path_factory.mktemp("relay"), bucket=False) as emu:
        yield emu


def host_of(emulator: Emulator) -> str:
    return emulator.ws_url.split("/")[2]


def gateway_header(emulator: Emulator, stamp: int | None = None, key: bytes | None = None) -> str:
    assert emulator.config is not None
    secret = protocol.derive(key or emulator.config.key, "gateway")
    return protocol.gateway_proof(
        secret, host_of(emulator), stamp or int(time.time()), secrets.token_hex(16)
    )


def agent_header(emulator: Emulator, text: str) -> str:
    stamp, nonce = int(time.time()), secrets.token_hex(16)
    claims, mac = token_proof(text, protocol.transcript("agent", host_of(emulator), stamp, nonce))
    return protocol.agent_proof(claims, mac, stamp, nonce)


def receive(ws: WsClient, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = ws.recv(end - time.monotonic())
        if text is not None:
            message = protocol.decode(text)
            if message["t"] == kind:
                return message
    raise AssertionError(f"no {kind}")


def test_connect_refusals(emulator: Emulator) -> None:
    cases = [
        ({}, 401),
        ({"Authorization": gateway_header(emulator, stamp=int(time.time()) - 3600)}, 401),
        ({"Authorization": gateway_header(emulator, key=b"z" * 32)}, 403),
        ({"Authorization": agent_header(emulator, token(emulator, ["x"], ttl=1)[:-2] + "AA")}, 403),
    ]
    for headers, status in cases:
        with pytest.raises(WsRefused) as caught:
            WsClient(emulator.ws_url, headers)
        assert caught.value.status == status, caught.value.body
    replayed = gateway_header(emulator)
    WsClient(emulator.ws_url, {"Authorization": replayed}).close()
    with pytest.raises(WsRefused, match="already used"):
        WsClient(emulator.ws_url, {"Authorization": replayed})


def test_gateway_hello_ping_and_bad_messages(emulator: Emulator) -> None:
    ws = WsClient(emulator.ws_url, {"Authorization": gateway_header(emulator)})
    try:
        ws.send_text('{"t":"hello","v":1,"role":"gateway"}')
        conn = receive(ws, "welcome")["conn"]
        assert conn and ws.alive()
        ws.send_text('{"t":"ping","n":7}')
        assert receive(ws, "pong")["n"] == 7
        ws.send_text("not json")
        assert receive(ws, "error")["code"] == "bad_message"
        ws.send_text('{"t":"hello","v":1,"role":"agent","lease":"' + "a" * 64 + '"}')
        assert receive(ws, "error")["code"] == "not_allowed"
        # A stream message whose route does not verify is refused with a reset.
        ws.send_text('{"t":"data","s":"s1","q":0,"to":"someone","mac":"' + "0" * 32 + '"}')
        assert receive(ws, "reset")["code"] == "not_allowed"
        # A verified route to a peer that is gone: the sender is told to stop.
        assert emulator.config is not None
        route = protocol.derive(emulator.config.key, "route")
        mac = protocol.route_mac(route, "GoneConn=", "s2", conn)
        ws.send_text(json.dumps({"t": "data", "s": "s2", "q": 0, "to": "GoneConn=", "mac": mac}))
        reset = receive(ws, "reset")
        assert reset["code"] == "gone" and reset["from"] == "GoneConn="
    finally:
        ws.close()
    assert not ws.alive()


def test_agent_hello_checks(emulator: Emulator) -> None:
    header = agent_header(emulator, token(emulator, ["*"]))
    ws = WsClient(emulator.ws_url, {"Authorization": header})
    try:
        ws.send_text('{"t":"hello","v":1,"role":"agent"}')
        assert receive(ws, "error")["code"] == "bad_message"
        ws.send_text(
            '{"t":"hello","v":1,"role":"agent","lease":"'
            + "b" * 64
            + '","tunnels":[{"k":"http","n":"Not_A_Label"}]}'
        )
        assert receive(ws, "error")["code"] == "bad_name"
    finally:
        ws.close()


async def test_frame_and_message_limits_close_like_api_gateway(emulator: Emulator) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    headers = {"Authorization": agent_header(emulator, token(emulator, ["*"]))}

    async def closed_with(send: Any) -> int:
        headers["Authorization"] = agent_header(emulator, token(emulator, ["*"]))
        async with connect(
            emulator.ws_url, additional_headers=headers, compression=None, max_size=None
        ) as ws:
            await send(ws)
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(10):
                    await ws.recv()
            assert ws.close_code is not None
            return ws.close_code

    before = emulator.stats.counts["ws.closed_1009"]
    assert await closed_with(lambda ws: ws.send("x" * (32 * 1024 + 1))) == 1009
    # 132 KB in frames of 32 KB: each frame is fine, the message is not.
    pieces = ["y" * 32000] * 4 + ["y" * 4000]
    assert await closed_with(lambda ws: ws.send(pieces)) == 1009
    assert await closed_with(lambda ws: ws.send(b"binary")) == 1003
    assert emulator.stats.counts["ws.closed_1009"] == before + 2
    # Within both limits: 127 KB in frames of 32 KB is delivered (answered with an error).
    headers["Authorization"] = agent_header(emulator, token(emulator, ["*"]))
    async with connect(emulator.ws_url, additional_headers=headers, compression=None) as ws:
        await ws.send(["z" * 32000] * 3 + ["z" * 30000])
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["t"] == "error"


def _call(method: str, url: str, data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_connections_api(emulator: Emulator) -> None:
    base = f"{emulator.management_url}/@connections/"
    for method in ("GET", "POST", "DELETE"):
        status, body = _call(method, base + "unknown%3D", b"x" if method == "POST" else None)
        assert status == 410, (method, body)
    ws = WsClient(emulator.ws_url, {"Authorization": gateway_header(emulator)})
    ws.send_text('{"t":"hello","v":1,"role":"gateway"}')
    conn = receive(ws, "welcome")["conn"]
    quoted = urllib.request.quote(conn, safe="")
    status, body = _call("GET", base + quoted)
    assert status == 200 and json.loads(body)["identity"]["sourceIp"] == "127.0.0.1"
    assert _call("POST", base + quoted, b"hello")[0] == 200
    assert ws.recv(5) == "hello"
    assert _call("POST", base + quoted, b"x" * (128 * 1024 + 1))[0] == 413
    big = "w" * (100 * 1024)
    assert _call("POST", base + quoted, big.encode())[0] == 200
    assert ws.recv(5) == big  # sent in frames of 32 KB, reassembled
    assert _call("DELETE", base + quoted)[0] == 204
    with pytest.raises(WsClosed):
        ws.recv(5)
    assert _call("GET", base + quoted)[0] == 410
    assert _call("GET", emulator.management_url + "/elsewhere")[0] == 404
    status, body = _call(
        "POST", emulator.management_url.rsplit("/", 1)[0] + "/_emulator/advance?seconds=1"
    )
    assert status == 200 and "now" in json.loads(body)
    status, body = _call("GET", emulator.management_url.rsplit("/", 1)[0] + "/_emulator/stats")
    assert json.loads(body)["lambda.connect"] >= 1


async def test_http_api_limits_and_response_shapes(emulator: Emulator) -> None:
    over_lambda = await visit(
        emulator.http_url,
        "POST",
        "/t/x/",
        body=b"a" * (6_400_000),
        headers=[("Content-Type", "text/plain")],
    )
    assert over_lambda.status == 413
    over_api = await visit(emulator.http_url, "POST", "/t/x/", body=b"a" * (10 * 1024 * 1024 + 1))
    assert over_api.status == 413
    assert Emulator.http_answer({"ok": True}) == (
        200,
        [("content-type", "application/json")],
        b'{"ok": true}',
    )
    event = emulator.http_event(
        "GET",
        "/p?a=1&a=2&b",
        [("Host", "h"), ("X-A", "1"), ("X-A", "2"), ("Cookie", "c=1; d=2")],
        b"\x00",
        "10.0.0.1",
    )
    assert event["headers"]["x-a"] == "1,2" and event["cookies"] == ["c=1", "d=2"]
    assert event["queryStringParameters"] == {"a": "1,2", "b": ""}
    assert event["isBase64Encoded"] and event["body"] == "AA=="
    assert event["requestContext"]["http"]["sourceIp"] == "10.0.0.1"


def test_config_from_env(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="BURROW_TABLE"):
        Config.from_env({})
    base = {
        "BURROW_TABLE": "t",
        "BURROW_WS_URL": "wss://a/s",
        "BURROW_MANAGEMENT_URL": "https://a/s",
    }
    key_file = tmp_path / "key"
    key_file.write_text("ab" * 32 + "\n")
    config = Config.from_env(
        {
            **base,
            "BURROW_TOKEN_KEY_FILE": str(key_file),
            "BURROW_TOKEN_DENY": "a,b c",
            "BURROW_DOMAIN": "Example.NET.",
        }
    )
    assert config.key == bytes.fromhex("ab" * 32)
    assert config.deny == frozenset({"a", "b", "c"}) and config.domain == "example.net"
    with pytest.raises(ConfigError, match="64 hex"):
        Config.from_env({**base, "BURROW_TOKEN_KEY": "zz"})


def test_module_entry_points(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lambda calls ``handlers.connect`` etc.; they build their state from the environment
    (the key from Secrets Manager, here moto's)."""
    from burrow.aws.serverless import handlers

    assert emulator.config is not None
    session = emulator.session
    secrets_client = session.client("secretsmanager", endpoint_url=emulator.moto_url)
    arn = secrets_client.create_secret(
        Name=f"key-{secrets.token_hex(3)}", SecretString=emulator.config.key.hex()
    )["ARN"]
    for name, value in {
        "BURROW_TABLE": emulator.table,
        "BURROW_TOKEN_KEY_SECRET": arn,
        "BURROW_WS_URL": emulator.ws_url,
        "BURROW_MANAGEMENT_URL": emulator.management_url,
        "AWS_ENDPOINT_URL_DYNAMODB": emulator.moto_url,
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": emulator.moto_url,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(handlers, "_relay", None)
    monkeypatch.setattr(handlers, "_gateway", None)
    context = {"requestContext": {"connectionId": "NoSuchConn=", "domainName": "h"}}
    assert handlers.connect({**context, "headers": {}}, None)["statusCode"] == 401
    assert handlers.default({**context, "body": '{"t":"ping","n":1}'}, None) == {"statusCode": 200}
    assert handlers.disconnect(context, None) == {"statusCode": 200}
    response = handlers.http({"headers": {"host": "h"}, "rawPath": "/t/nobody/"}, None)
    assert response["statusCode"] == 404


async def test_too_large_without_a_bucket_is_a_502_that_says_so(emulator: Emulator) -> None:
    """With no bucket, an answer over a Lambda response is refused early (the agent stops
    reading the local service) with a page that names the limit."""
    from serverless_support import local_app, running_agent

    with local_app() as port:
        async with running_agent(emulator, port, "huge"):
            answer = await visit(emulator.http_url, "GET", f"/t/huge/bytes?n={7 * 1024 * 1024}")
            assert answer.status == 502
            assert b"no bucket for large answers" in answer.body
            small = await visit(emulator.http_url, "GET", "/t/huge/bytes?n=1000")
            assert small.status == 200 and len(small.body) == 1000

"""The serverless relay end to end: the real handlers in the emulator (a fake API Gateway that
closes with 1009 above AWS's frame and message limits and runs ``$default`` concurrently, with
random delays, so messages arrive out of order), moto's DynamoDB and S3, the real agent.

Every test here also proves the frame and message limits hold: the emulator would close the
agent's connection with 1009 otherwise, and ``test_limits_held`` checks none was."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from burrow.aws.serverless.emulator import Emulator, EmulatorThread
from burrow.errors import AuthError, TunnelError
from burrow.http.relaypage import gone_message, not_found_message, offline_message, page
from helpers import SCALE, Events
from serverless_support import (
    App,
    follow,
    local_app,
    payload,
    running_agent,
    sha,
    token,
    visit,
)

DOMAIN = "tunnel.test"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    state = tmp_path_factory.mktemp("serverless")
    with EmulatorThread(state_dir=state, domain=DOMAIN, reorder=True, concurrency=64) as emu:
        yield emu


@pytest.fixture(scope="module")
def app() -> Iterator[int]:
    with local_app() as port:
        yield port


def host(name: str) -> str:
    return f"{name}.{DOMAIN}"


async def test_get_by_host_and_by_path_with_headers_and_cookies(
    emulator: Emulator, app: int
) -> None:
    events = Events()
    async with running_agent(emulator, app, "shop", events=events) as agent:
        ready = events.named("tunnel_ready")[0]
        port = emulator.http_url.rsplit(":", 1)[1]
        assert ready["url"] == f"http://shop.{DOMAIN}:{port}"
        assert ready["name"] == "shop" and ready["kind"] == "http"
        assert agent.tunnels[0].public == ready["url"]
        answer = await visit(
            emulator.http_url,
            "GET",
            "/echo?x=1&x=2",
            host=host("shop"),
            headers=[("X-Test", "yes"), ("Cookie", "a=1; b=2"), ("X-Forwarded-For", "6.6.6.6")],
        )
        assert answer.status == 200, answer.body
        report = answer.json()
        seen = dict(report["headers"])
        assert report["path"] == "/echo?x=1&x=2"
        assert seen["x-test"] == "yes"
        assert seen["cookie"] == "a=1; b=2"
        assert seen["host"] == host("shop")
        # The visitor's own X-Forwarded-For is not believed; the relay's view of it is.
        assert seen["x-forwarded-for"] == "127.0.0.1"
        by_path = await visit(
            emulator.http_url, "GET", "/t/shop/echo?y=3", headers=[("X-Forwarded-Prefix", "/evil")]
        )
        assert by_path.status == 200 and by_path.json()["path"] == "/echo?y=3"
        assert dict(by_path.json()["headers"])["x-forwarded-prefix"] == "/t/shop"
        cookies = await visit(emulator.http_url, "GET", "/cookies", host=host("shop"))
        assert cookies.all("set-cookie") == ["a=1; Path=/; HttpOnly", "b=2; Path=/; Secure"]
        assert cookies.header("x-multi") == "one, two"
        assert cookies.body == b"cookies"
        assert agent.tunnels[0].connections == 3


async def test_post_5mb_and_binary_bodies(emulator: Emulator, app: int, tmp_path: Path) -> None:
    async with running_agent(emulator, app, "upload"):
        big = payload(5 * 1024 * 1024, "text")
        answer = await visit(
            emulator.http_url,
            "POST",
            "/echo",
            host=host("upload"),
            body=big,
            headers=[("Content-Type", "text/plain")],
        )
        assert answer.status == 200, answer.body[:300]
        assert answer.json()["sha256"] == sha(big)
        assert answer.json()["length"] == len(big)
        import subprocess

        # curl as a visitor: Expect: 100-continue, a file body, the answer's JSON.
        body_file = tmp_path / "body"
        file_body = payload(200_000, seed=3)
        await asyncio.to_thread(body_file.write_bytes, file_body)
        curl = await asyncio.to_thread(
            subprocess.run,
            [
                "curl",
                "-sS",
                "--fail",
                "-H",
                f"Host: {host('upload')}",
                "--data-binary",
                f"@{body_file}",
                "-H",
                "Content-Type: application/octet-stream",
                f"{emulator.http_url}/echo",
            ],
            capture_output=True,
            timeout=60,
        )
        assert curl.returncode == 0, curl.stderr
        import json as _json

        assert _json.loads(curl.stdout)["sha256"] == sha(file_body)
        binary = payload(300_000)
        mirrored = await visit(
            emulator.http_url,
            "POST",
            "/mirror",
            host=host("upload"),
            body=binary,
            headers=[("Content-Type", "application/octet-stream")],
        )
        assert mirrored.status == 200
        assert mirrored.body == binary


async def test_5mb_answers_text_inline_binary_through_s3(emulator: Emulator, app: int) -> None:
    async with running_agent(emulator, app, "files"):
        size = 5 * 1024 * 1024
        text = await visit(
            emulator.http_url, "GET", f"/bytes?n={size}&kind=text", host=host("files")
        )
        assert text.status == 200
        assert sha(text.body) == sha(payload(size, "text")) == text.header("x-sha256")
        # 5 MB of binary is 6.7 MB as base64: over a Lambda response, so it goes through S3.
        binary = await visit(emulator.http_url, "GET", f"/bytes?n={size}", host=host("files"))
        assert binary.status == 307
        assert binary.header("x-sha256") == sha(payload(size))
        fetched = await follow(binary)
        assert fetched.status == 200
        assert sha(fetched.body) == sha(payload(size))
        assert fetched.header("content-type") == "application/octet-stream"
    # No body ever reached DynamoDB: every item is a small control item.
    db = emulator.config.client("dynamodb")  # type: ignore[union-attr]
    items = db.scan(TableName=emulator.table)["Items"]
    assert items and max(len(str(item)) for item in items) < 2048


async def test_chunked_answers_reassembled_in_order(emulator: Emulator, app: int) -> None:
    async with running_agent(emulator, app, "stream"):
        answer = await visit(
            emulator.http_url, "GET", "/chunked?pieces=30&size=40000", host=host("stream")
        )
        assert answer.status == 200
        expected = b"".join(payload(40000, seed=i) for i in range(30))
        assert answer.body == expected
        assert answer.header("transfer-encoding") is None


async def test_unknown_and_offline_names_get_the_relays_pages(emulator: Emulator, app: int) -> None:
    missing = await visit(emulator.http_url, "GET", "/", host=host("nobody"))
    assert missing.status == 404
    assert missing.body == page("Tunnel not found", not_found_message("nobody"))
    async with running_agent(emulator, app, "brief"):
        pass
    offline = await visit(emulator.http_url, "GET", "/", host=host("brief"))
    assert offline.status == 502
    assert offline.body == page("Tunnel offline", offline_message("brief"))


async def test_policies_and_inspector_run_on_the_agent(emulator: Emulator, app: int) -> None:
    from burrow.http.inspector import ExchangeStore

    recorder = ExchangeStore()
    async with running_agent(
        emulator, app, "guarded", http={"basic_auth": ["u:p"], "recorder": recorder}
    ):
        refused = await visit(emulator.http_url, "GET", "/", host=host("guarded"))
        assert refused.status == 401
        allowed = await visit(
            emulator.http_url,
            "GET",
            "/",
            host=host("guarded"),
            headers=[("Authorization", "Basic dTpw")],
        )
        assert allowed.status == 200
        exchanges = recorder.newest_first()
        assert [e.status for e in exchanges][:2] == [200, 401]


async def test_deadline_gives_a_504_naming_the_tunnel(tmp_path: Path, app: int) -> None:
    with EmulatorThread(state_dir=tmp_path, domain=DOMAIN, deadline=1.0, concurrency=1) as emulator:
        async with running_agent(emulator, app, "sleepy"):
            answer = await visit(emulator.http_url, "GET", "/slow?s=1.5", host=host("sleepy"))
            assert answer.status == 504
            assert b"sleepy" in answer.body and b"did not answer within 1 s" in answer.body
            # The late answer reaches the same container during the next request: it is
            # told to stop, and the next visitor gets its own answer.
            answer = await visit(emulator.http_url, "GET", "/slow?s=0.8", host=host("sleepy"))
            assert answer.status == 200 and answer.body == b"slow"


async def test_heartbeat_renews_names_and_measures_the_round_trip(tmp_path: Path, app: int) -> None:
    with EmulatorThread(state_dir=tmp_path, domain=DOMAIN) as emulator:
        async with running_agent(emulator, app, "beating", heartbeat=0.1) as agent:
            assert agent.conn is not None
            async with asyncio.timeout(10 * SCALE):
                while agent.conn.rtt is None or emulator.stats.counts["ws.in_messages"] < 5:
                    await asyncio.sleep(0.05)
            assert agent.conn.is_open and agent.relay_label.endswith("/local")
            from burrow.aws.serverless.store import Store

            store = Store(emulator.config.client("dynamodb"), emulator.table)  # type: ignore[union-attr]
            # The lease runs 15 minutes from the last heartbeat: 14 minutes on, still held.
            emulator.clock.advance(840)
            await asyncio.sleep(0.5)
            held, conn = store.lookup("http#beating", emulator.clock.now())
            assert held and conn == agent.conn.conn_id


def test_settings_for_a_serverless_relay() -> None:
    from burrow.aws.serverless.agent import ServerlessConfig, check_url
    from burrow.errors import ConfigError
    from burrow.kinds import http_service, tcp_service
    from burrow.roles.settings import ClientSettings

    assert check_url("wss://api.example/relay") == "wss://api.example/relay"
    assert check_url("ws://127.0.0.1:9/x") == "ws://127.0.0.1:9/x"
    for bad in ("https://api.example", "ws://api.example/x", "wss:///x"):
        with pytest.raises(ConfigError):
            check_url(bad)
    text = token_for_settings()
    settings = ClientSettings(relay="wss://api.example/relay", token=text)
    settings.check()
    config = ServerlessConfig.from_settings(settings, [http_service("3000", name="a")])
    assert config.url == "wss://api.example/relay" and config.token == text
    for changes, words in [
        ({"secret": "s"}, "takes tokens"),
        ({"token": None}, "needs --token"),
        ({"fingerprint": "sha256:00"}, "--fingerprint"),
    ]:
        with pytest.raises(ConfigError, match=words):
            ServerlessConfig.from_settings(
                ClientSettings(**{"relay": "wss://a/b", "token": text, **changes}),
                [http_service("3000")],
            )
    with pytest.raises(ConfigError, match="carries HTTP tunnels"):
        ServerlessConfig.from_settings(settings, [tcp_service("3000")])


def token_for_settings() -> str:
    from burrow.tokens import TokenKey, mint

    return mint(TokenKey.from_secret(b"s" * 32), ["*"], [], 60, time.time())


async def test_tokens_and_names_are_checked(emulator: Emulator, app: int) -> None:
    with pytest.raises(AuthError, match=r"does not verify|another relay key"):
        from burrow.tokens import TokenKey, mint

        other = TokenKey.from_secret(b"x" * 32)
        async with running_agent(
            emulator, app, "stolen", token_text=mint(other, ["*"], [], 60, time.time())
        ):
            pass
    with pytest.raises(AuthError, match="token expired at"):
        async with running_agent(
            emulator,
            app,
            "late",
            token_text=mint(TokenKey.load(emulator.state_dir), ["*"], [], 1, time.time() - 10),
        ):
            pass
    with pytest.raises(TunnelError, match="may not expose 'other'"):
        async with running_agent(emulator, app, "other", token_text=token(emulator, ["mine"])):
            pass
    async with running_agent(emulator, app, "taken"):
        with pytest.raises(TunnelError, match="held by another agent"):
            async with running_agent(emulator, app, "taken"):
                pass


async def test_a_revoked_token_is_refused_at_its_next_connect(emulator: Emulator, app: int) -> None:
    from burrow.tokens import deny, parse_token

    revoked = token(emulator, ["*"])
    async with running_agent(emulator, app, "before", token_text=revoked):
        pass
    deny(emulator.state_dir, parse_token(revoked)[0]["id"])
    with pytest.raises(AuthError, match="revoked"):
        async with running_agent(emulator, app, "after", token_text=revoked):
            pass


async def test_a_random_name_when_none_is_given(emulator: Emulator, app: int) -> None:
    events = Events()
    async with running_agent(emulator, app, None, events=events) as agent:
        name = agent.tunnels[0].name
        assert name and events.named("tunnel_ready")[0]["name"] == name
        answer = await visit(emulator.http_url, "GET", "/", host=host(name))
        assert answer.status == 200


async def test_stale_connection_410_is_cleaned_up(emulator: Emulator, app: int) -> None:
    """A name whose connection died without $disconnect: the visitor gets 502, the stale id
    is dropped from the name (the lease stays for its agent)."""
    from burrow.aws.serverless.store import Store

    store = Store(emulator.config.client("dynamodb"), emulator.table)  # type: ignore[union-attr]
    now = emulator.clock.now()
    assert store.claim("http#ghost", "GhOsTcOnNeCtIoN=", "f" * 64, now)
    answer = await visit(emulator.http_url, "GET", "/", host=host("ghost"))
    assert answer.status == 502
    assert answer.body == page("Tunnel offline", offline_message("ghost"))
    assert store.lookup("http#ghost", now) == (True, None)
    assert emulator.stats.counts["manage.POST"] > 0


async def test_agent_killed_mid_request_gives_502(tmp_path: Path, app: int) -> None:
    """The agent is SIGKILLed while the local service is still working: the visitor gets the
    relay's 502 page within seconds (the gateway checks a silent agent), never a hang."""
    from helpers import burrow_cli, read_event, stop

    with EmulatorThread(state_dir=tmp_path / "emu", domain=DOMAIN, probe_after=0.5) as emulator:
        App.arrived.clear()
        App.release.clear()
        proc = burrow_cli(
            "http",
            str(app),
            "--name",
            "doomed",
            "--to",
            emulator.ws_url,
            "--json",
            "--no-inspect",
            "--state-dir",
            str(tmp_path / "agent"),
            env={"BURROW_TOKEN": token(emulator, ["doomed"])},
        )
        try:
            ready = read_event(proc, "tunnel_ready", timeout=30)
            assert ready["url"].startswith(f"http://doomed.{DOMAIN}:")
            request = asyncio.create_task(
                visit(emulator.http_url, "GET", "/hang", host=host("doomed"))
            )
            assert await asyncio.to_thread(App.arrived.wait, 20 * SCALE)
            proc.kill()
            started = time.monotonic()
            answer = await asyncio.wait_for(request, 20 * SCALE)
            assert answer.status == 502
            assert answer.body in (
                page("Tunnel offline", gone_message("doomed")),
                page("Tunnel offline", offline_message("doomed")),
            )
            assert time.monotonic() - started < 15 * SCALE
        finally:
            App.release.set()
            stop(proc)


async def test_name_kept_across_the_2_hour_limit_and_idle_limit(tmp_path: Path, app: int) -> None:
    """The emulator's clock jumps past 2 hours: API Gateway closes every connection; the agent
    reconnects and takes its name back with its lease (visitors are served again, the
    gateway's own connection too). Then 10 idle minutes: closed again, back again."""
    with EmulatorThread(state_dir=tmp_path, domain=DOMAIN) as emulator:
        events = Events()
        async with running_agent(
            emulator, app, "durable", events=events, state_dir=tmp_path / "agent"
        ) as agent:
            assert (await visit(emulator.http_url, "GET", "/", host=host("durable"))).status == 200
            first = agent.link
            assert first is not None
            for jump, count in ((7201, 1), (601, 2)):
                emulator.clock.advance(jump)
                await events.wait_for("session_lost", count, timeout=10)
                await events.wait_for("connected", count + 1, timeout=20)
                assert agent.tunnels[0].name == "durable"
                answer = await visit(emulator.http_url, "GET", "/", host=host("durable"))
                assert answer.status == 200, answer.body
            assert agent.link is not first
            reasons = [e["reason"] for e in events.named("session_lost")]
            assert all("1001" in r for r in reasons), reasons


async def test_connection_replaced_before_the_limit_keeps_requests(
    tmp_path: Path, app: int
) -> None:
    """Make before break: with a short max age the agent opens a new connection, moves its
    name, and lets the old one finish its requests; no visitor sees an error."""
    with EmulatorThread(state_dir=tmp_path, domain=DOMAIN) as emulator:
        events = Events()
        async with running_agent(emulator, app, "rolling", events=events, max_age=1.0):
            statuses = []
            deadline = time.monotonic() + 3.5 * SCALE
            while time.monotonic() < deadline:
                answer = await visit(emulator.http_url, "GET", "/slow?s=0.2", host=host("rolling"))
                statuses.append(answer.status)
            assert len(events.named("connected")) >= 3
            assert not events.named("session_lost")
            assert set(statuses) == {200}


async def test_many_agents_many_requests(tmp_path: Path, app: int) -> None:
    """100 agents at once, 10 concurrent requests each: every answer is its request's. The
    emulator runs in its own process here (`burrow serverless emulate`), as a user runs it."""
    from serverless_support import EmulatorProcess

    agents = 100
    names = [f"crowd{i}" for i in range(agents)]
    with EmulatorProcess(tmp_path, "--domain", DOMAIN, "--concurrency", "50") as emulator:
        async with contextlib_stack() as stack:
            await asyncio.gather(
                *(stack.enter(running_agent(emulator, app, n)) for n in names)  # type: ignore[arg-type]
            )
            results = await asyncio.gather(
                *(crowd_visit(emulator, n, i) for n in names for i in range(10))
            )
        stats = emulator.stats()
    assert len(results) == agents * 10
    for name, i, answer in results:
        assert answer.status == 200, answer.body[:200]
        assert answer.json()["path"] == f"/echo?who={name}&i={i}"
    assert stats.get("ws.closed_1009", 0) == 0 and stats.get("ws.closed_1003", 0) == 0


async def crowd_visit(emulator: Any, name: str, i: int) -> tuple[str, int, Any]:
    answer = await visit(
        emulator.http_url, "GET", f"/echo?who={name}&i={i}", host=host(name), timeout=120
    )
    return name, i, answer


async def test_limits_held(emulator: Emulator) -> None:
    """Runs last in this module: no connection was ever closed for a frame or message too
    large (1009) or a binary frame (1003)."""
    counts = emulator.stats.counts
    assert counts["ws.in_messages"] > 100
    assert counts["ws.closed_1009"] == 0 and counts["ws.closed_1003"] == 0


class contextlib_stack:
    """An async exit stack whose ``enter`` is awaitable in a gather."""

    def __init__(self) -> None:
        import contextlib

        self.stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> contextlib_stack:
        await self.stack.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stack.__aexit__(*exc)

    async def enter(self, manager: Any) -> Any:
        return await self.stack.enter_async_context(manager)


async def test_private_tcp_streams_through_the_serverless_relay(emulator: Emulator) -> None:
    """Issue 12's groundwork: an agent offers a private TCP service, a connector reaches it
    as a local port; 3 MB each way arrive byte for byte (out-of-order delivery, credit both
    ways), and a real PostgreSQL client works through it."""
    from burrow.aws.serverless.agent import ServerlessConfig, ServerlessConnector
    from burrow.kinds import tcp_service
    from burrow.roles.connector import ListenSpec

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the connector half-closes
        writer.write(data[::-1])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    events = Events()
    agent_config = ServerlessConfig(
        url=emulator.ws_url,
        token=token(emulator, ["echo", "pg"]),
        services=[
            tcp_service(str(port), name="echo", private=True),
            tcp_service("5432", name="pg", private=True),
        ],
    )
    from burrow.aws.serverless.agent import ServerlessAgent

    agent = ServerlessAgent(agent_config, on_event=events)
    await agent.start()
    from burrow.tokens import TokenKey, mint

    connect_token = mint(
        TokenKey.load(emulator.state_dir), [], ["echo", "pg", "ghost"], 600, time.time()
    )
    connector = ServerlessConnector(
        ServerlessConfig(
            url=emulator.ws_url,
            token=connect_token,
            services=[],
            listen=[ListenSpec(n) for n in ("echo", "pg", "nothing", "ghost")],
        ),
        on_event=events,
    )
    await connector.start()
    try:
        ready = {(e["kind"], e["name"]) for e in events.named("tunnel_ready")}
        assert {("private", "echo"), ("private", "pg"), ("connect", "echo")} <= ready
        host, local_port = connector.listeners["echo"].rsplit(":", 1)
        blob = payload(3 * 1024 * 1024, seed=12)
        reader, writer = await asyncio.open_connection(host, int(local_port))
        writer.write(blob)
        await writer.drain()
        writer.write_eof()
        back = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        assert back == blob[::-1]

        import psycopg

        pg_host, pg_port = connector.listeners["pg"].rsplit(":", 1)

        def query() -> Any:
            with psycopg.connect(
                host=pg_host, port=int(pg_port), dbname="test", user="postgres", connect_timeout=20
            ) as conn:
                return conn.execute("select repeat('x', 100000), 42").fetchone()

        text, number = await asyncio.to_thread(query)
        assert number == 42 and text == "x" * 100000

        # A name the token does not allow, and one nobody offers: refused, and said so.
        for name, count, words in (
            ("nothing", 1, "may not connect to 'nothing'"),
            ("ghost", 2, "no such service"),
        ):
            host, nothing_port = connector.listeners[name].rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(nothing_port))
            assert await asyncio.wait_for(reader.read(), 20) == b""
            refused = await events.wait_for("connection_refused", count)
            assert refused["service"] == name and words in refused["reason"]
    finally:
        await connector.close()
        await agent.close()
        server.close()


async def test_psql_through_burrow_connect_and_burrow_tcp_private(tmp_path: Path) -> None:
    """The commands a user types: `burrow tcp 5432 --private --name pg --to ws://...` and
    `burrow connect pg=PORT --to ws://...`, then psql through them."""
    import subprocess

    from helpers import burrow_cli, free_port, read_event, stop

    with EmulatorThread(state_dir=tmp_path / "emu", domain=DOMAIN) as emulator:
        from burrow.tokens import TokenKey, mint

        key = TokenKey.load(emulator.state_dir)
        agent = burrow_cli(
            "tcp",
            "5432",
            "--private",
            "--name",
            "pgdb",
            "--to",
            emulator.ws_url,
            "--json",
            "--state-dir",
            str(tmp_path / "agent"),
            env={"BURROW_TOKEN": mint(key, ["pgdb"], [], 600, time.time())},
        )
        port = free_port()
        connector = burrow_cli(
            "connect",
            f"pgdb={port}",
            "--to",
            emulator.ws_url,
            "--json",
            env={"BURROW_TOKEN": mint(key, [], ["pgdb"], 600, time.time())},
        )
        try:
            assert read_event(agent, "tunnel_ready", timeout=30)["kind"] == "private"
            assert read_event(connector, "tunnel_ready", timeout=30)["local"].endswith(str(port))
            result = await asyncio.to_thread(
                subprocess.run,
                [
                    "psql",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    "postgres",
                    "-d",
                    "test",
                    "-Atc",
                    "select md5(string_agg(g::text, ',')) from generate_series(1, 50000) g",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr
            expected = ",".join(str(i) for i in range(1, 50001))
            import hashlib

            assert result.stdout.strip() == hashlib.md5(expected.encode()).hexdigest()
        finally:
            stop(connector)
            stop(agent)

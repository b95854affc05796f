"""``burrow doctor --via``: through burrow's own SOCKS5 / HTTP CONNECT proxy and through a
burrow stream, the proxy's exact answer reported (SOCKS code, CONNECT status, reset reason).

One relay with a token key; an agent offering the EXIT "vpc" (allow-list: the local PostgreSQL
and a closed port on 127.0.0.1) and the local PostgreSQL as the private service "pg"; a
connector with ``ProxyServer`` listeners. Every target is on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from burrow.allowlist import AllowList
from burrow.doctor import Checklist
from burrow.net.proxy_server import ProxyServer
from burrow.net.tls import TrustPolicy
from burrow.roles.agent import Agent, AgentConfig, ExitSpec, TcpTunnelSpec
from burrow.roles.connector import Connector, ConnectorConfig
from burrow.roles.relay import Relay
from burrow.roles.settings import ClientSettings
from burrow.tokens import TokenKey, mint
from doctor_support import POSTGRES, doctor, json_lines, phases, run_cli
from helpers import LoopThread, free_port, relay_config

pytestmark = pytest.mark.timeout(60)

REFUSED_TARGET = "postgres://postgres@127.0.0.1:3306/test"  # MariaDB's port: not allowed


@dataclass
class World:
    loop: LoopThread
    socks: int
    http: int
    closed_port: int
    burrow: ClientSettings

    def run(self, url: str, via: str, **kw: Any) -> Checklist:
        return self.loop.run(doctor(url, via, burrow=self.burrow, **kw))


@contextlib.asynccontextmanager
async def _started(role: Any) -> Any:
    await role.start()
    try:
        yield role
    finally:
        await role.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("doctor-via")
    key = TokenKey.load_or_create(tmp / "relay-state")
    now = time.time()
    expose = mint(key, ["vpc", "pg"], [], 3600, now)
    reach = mint(key, [], ["vpc", "pg"], 3600, now)
    closed_port = free_port()
    loop = LoopThread()
    stack = contextlib.AsyncExitStack()

    async def up() -> World:
        relay = await stack.enter_async_context(_started(Relay(relay_config(tmp))))
        assert relay.control_address is not None and relay.fingerprint
        trust = TrustPolicy(fingerprint=relay.fingerprint)
        agent = Agent(
            AgentConfig(
                relay=relay.control_address,
                token=expose,
                trust=trust,
                tunnels=[
                    ExitSpec("vpc", AllowList.parse([f"127.0.0.1:5432,{closed_port}"])),
                    TcpTunnelSpec(local=("127.0.0.1", 5432), name="pg", private=True),
                ],
            )
        )
        await stack.enter_async_context(_started(agent))
        connector = Connector(
            ConnectorConfig(relay=relay.control_address, token=reach, trust=trust)
        )
        await stack.enter_async_context(_started(connector))
        server = ProxyServer(connector, exit_name="vpc")
        stack.callback(server.close)
        socks = (await server.listen("socks", "127.0.0.1", 0))[1]
        http = (await server.listen("http", "127.0.0.1", 0))[1]
        host, port = relay.control_address
        settings = ClientSettings(
            relay=f"{host}:{port}", token=reach, fingerprint=relay.fingerprint
        )
        return World(loop, socks, http, closed_port, settings)

    try:
        yield loop.run(up())
    finally:
        loop.run(stack.aclose())
        loop.stop()


def test_through_socks5_every_phase_passes(world: World) -> None:
    checklist = world.run(POSTGRES, f"socks5://127.0.0.1:{world.socks}")
    assert checklist.passed, checklist.results
    dial = phases(checklist)["dial"].detail
    assert dial.startswith(f"SOCKS5 socks5://127.0.0.1:{world.socks}: reply 0x00 (succeeded)")


def test_exit_refusing_the_target_names_the_socks_code(world: World) -> None:
    checklist = world.run(REFUSED_TARGET, f"socks5://127.0.0.1:{world.socks}")
    verdict = checklist.verdict()
    assert (verdict.ok, verdict.layer) == (False, "dial")
    assert (
        "SOCKS reply 0x02 (connection not allowed by ruleset)" in phases(checklist)["dial"].detail
    )
    assert verdict.cause.startswith("SOCKS 0x02: the proxy's rules forbid 127.0.0.1:3306")
    assert "--allow" in verdict.fix


def test_closed_port_behind_the_exit_is_socks_refused(world: World) -> None:
    url = f"postgres://postgres@127.0.0.1:{world.closed_port}/test"
    verdict = world.run(url, f"socks5://127.0.0.1:{world.socks}").verdict()
    assert verdict.layer == "dial"
    assert verdict.cause.startswith("SOCKS 0x05:") and "refused" in verdict.cause


def test_http_connect_refusal_reports_status_and_error_text(world: World) -> None:
    checklist = world.run(REFUSED_TARGET, f"http://127.0.0.1:{world.http}")
    verdict = checklist.verdict()
    assert verdict.layer == "dial"
    detail = phases(checklist)["dial"].detail
    assert "answered CONNECT 127.0.0.1:3306 with 403" in detail
    assert "not allowed" in detail or "allow" in detail  # burrow's Burrow-Error text
    passed = world.run(POSTGRES, f"http://127.0.0.1:{world.http}", payload=False)
    assert passed.passed, passed.results


def test_burrow_stream_refused_gives_the_reset_code_and_reason(world: World) -> None:
    checklist = world.run(REFUSED_TARGET, "burrow:vpc")
    verdict = checklist.verdict()
    assert verdict.layer == "dial"
    detail = phases(checklist)["dial"].detail
    assert detail.startswith("burrow:vpc refused the stream to 127.0.0.1:3306: reset not_allowed")
    assert verdict.cause.startswith("burrow reset not_allowed")
    assert "resolved by the exit" not in phases(checklist)["dns"].detail  # an IP: nothing to do


def test_burrow_stream_to_a_private_service_passes(world: World) -> None:
    checklist = world.run(POSTGRES, "burrow:pg")
    assert checklist.passed, checklist.results
    assert "burrow stream to private service pg" in phases(checklist)["dial"].detail


def test_cli_via_burrow_with_relay_options(world: World) -> None:
    settings = world.burrow
    assert settings.relay and settings.token and settings.fingerprint
    code, out, err = run_cli(
        REFUSED_TARGET,
        "--via",
        "burrow:vpc",
        "--to",
        settings.relay,
        "--token",
        settings.token,
        "--fingerprint",
        settings.fingerprint,
        "--json",
    )
    assert code == 1, err
    verdict = json_lines(out)[-1]
    assert verdict["layer"] == "dial" and "not_allowed" in verdict["cause"]
    assert settings.token not in out + err


def test_burrow_exit_resolves_the_name_itself(world: World) -> None:
    checklist = world.run("postgres://postgres@localhost:5432/test", "burrow:vpc", payload=False)
    assert checklist.passed, checklist.results
    got = phases(checklist)
    assert got["dns"].detail.startswith("localhost is resolved by the exit when it dials")
    assert "burrow stream to exit vpc to localhost:5432" in got["dial"].detail

"""pgproxy on the far side of a tunnel: serve_pg on each relay stream an agent accepts.

The agent's service-kind seam (``burrow pg``) is not wired yet, so this test's agent routes
its private service "pg" to ``burrow.pg.service.serve_pg_channel`` itself: the same thin
adapter the agent will use. Connectors reach it as a local listener; each client connection
(a query's, and its CancelRequest's) is a new stream, so a cancel must find the key that
another stream's connection registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from burrow.net.tls import TrustPolicy
from burrow.node import Relay
from burrow.pg import PgPolicy, PgUpstream
from burrow.pg.service import PgService
from burrow.roles.agent import Agent, AgentConfig
from burrow.roles.connector import Connector, ConnectorConfig, ListenSpec
from burrow.tokens import TokenKey, mint
from helpers import Events, LoopThread, relay_config

try:
    from pgcluster import ThrowawayPostgres
except ImportError:  # tests/ imported as a package
    from tests.pgcluster import ThrowawayPostgres

pytestmark = pytest.mark.timeout(60)


class World:
    def __init__(self, pg: ThrowawayPostgres, loop: LoopThread, events: Events, port: int) -> None:
        self.pg, self.loop, self.events, self.port = pg, loop, events, port

    def connect(self, **extra: Any) -> psycopg.Connection:
        params: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.pg.user,
            "password": self.pg.password,
            "dbname": self.pg.dbname,
            "connect_timeout": 10,
        }
        return psycopg.connect(**(params | extra))

    def find(self, **fields: Any) -> dict[str, Any]:
        """The first pg_connection event with these fields, waiting for it if need be (the
        connector may open empty streams of its own, so counting events would not do)."""
        seen = 0
        while True:
            events = self.events.named("pg_connection")
            for event in events:
                if all(event.get(k) == v for k, v in fields.items()):
                    return event
            seen = len(events)
            self.loop.run(self.events.wait_for("pg_connection", seen + 1, 10))


@contextlib.asynccontextmanager
async def _started(role: Any) -> Any:
    await role.start()
    try:
        yield role
    finally:
        await role.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("pgtunnel")
    key = TokenKey.load_or_create(tmp / "relay-state")
    now = time.time()
    expose = mint(key, ["pg"], [], 3600, now)
    reach = mint(key, [], ["pg"], 3600, now, subject="lambda-orders")
    loop = LoopThread()
    events = Events()
    stack = contextlib.AsyncExitStack()
    with ThrowawayPostgres(ssl_only=True) as pg:
        try:

            async def up() -> int:
                relay = await stack.enter_async_context(_started(Relay(relay_config(tmp))))
                assert relay.control_address is not None and relay.fingerprint
                trust = TrustPolicy(fingerprint=relay.fingerprint)
                upstream = PgUpstream.create(
                    ("127.0.0.1", pg.port), ca=pg.ca_path, name=pg.host_name
                )
                service = PgService(upstream, name="pg", policy=PgPolicy.create(users=["app"]))
                agent = Agent(
                    AgentConfig(
                        relay=relay.control_address, token=expose, trust=trust, tunnels=[service]
                    ),
                    on_event=events,
                )
                await stack.enter_async_context(_started(agent))
                connector = Connector(
                    ConnectorConfig(
                        relay=relay.control_address,
                        token=reach,
                        trust=trust,
                        services=[ListenSpec("pg", "127.0.0.1:0")],
                    )
                )
                await stack.enter_async_context(_started(connector))
                await connector.wait_ready("pg")
                return int(connector.listeners["pg"].rpartition(":")[2])

            yield World(pg, loop, events, loop.run(up()))
        finally:
            loop.run(stack.aclose())
            loop.stop()


def test_queries_through_the_tunnel(world: World) -> None:
    with world.connect() as conn:
        pid = conn.info.backend_pid
        assert not conn.pgconn.ssl_in_use
        row = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        assert row.fetchone() == (True,)
        rows = conn.execute("select g, repeat('x', 500) from generate_series(1, 5000) g")
        assert len(rows.fetchall()) == 5000
    event = world.find(backend_pid=pid, kind="session")
    assert event["ended"] == "client_terminated" and event["user"] == "app"
    assert event["peer"] is not None and event["peer"].startswith("127.0.0.1:")
    assert event["bytes_from_server"] > 5000 * 500
    assert event["identity"] == "token:lambda-orders"  # the connector's token, named


def test_cancel_through_the_tunnel(world: World) -> None:
    """The cancel arrives on a new stream; the key it carries was registered by another."""
    with world.connect() as conn:
        pid = conn.info.backend_pid
        # cancel_safe, not cancel: PQcancel holds the GIL, and this agent is in-process.
        canceller = threading.Timer(0.5, conn.cancel_safe)
        canceller.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(30)")
        finally:
            canceller.cancel()
        conn.rollback()
        assert conn.execute("select 1").fetchone() == (1,)
    cancel = world.find(backend_pid=pid, kind="cancel")
    assert cancel["ended"] == "cancel_forwarded"
    assert world.find(backend_pid=pid, kind="session")["ended"] == "client_terminated"


def test_copy_through_the_tunnel(world: World) -> None:
    with world.connect() as conn, conn.cursor() as cur:
        total = 0
        query = "copy (select repeat('y', 1000) from generate_series(1, 20000)) to stdout"
        with cur.copy(query) as copy:
            for data in copy:
                total += len(data)
        assert total == 20000 * 1001
        cur.execute("create temporary table sink (line text)")
        with cur.copy("copy sink from stdin") as copy:
            for _ in range(20):
                copy.write((b"z" * 1000 + b"\n") * 1000)
        cur.execute("select count(*) from sink")
        assert cur.fetchone() == (20000,)


def test_copy_100_mb_each_way_through_the_tunnel(world: World) -> None:
    """The issue's size: 100 MB out of the database and 100 MB into it, through the agent's
    pgproxy, the relay and the connector, every byte counted on the far side."""
    with world.connect() as conn, conn.cursor() as cur:
        total = 0
        query = "copy (select repeat('y', 9999) from generate_series(1, 10000)) to stdout"
        with cur.copy(query) as copy:
            for data in copy:
                total += len(data)
        assert total == 10000 * 10000  # 100 MB
        cur.execute("create temporary table big (line text)")
        block = (b"z" * 9999 + b"\n") * 100  # 1 MB
        with cur.copy("copy big from stdin") as copy:
            for _ in range(100):
                copy.write(block)
        cur.execute("select count(*), sum(length(line)) from big")
        assert cur.fetchone() == (10000, 10000 * 9999)


def test_pg8000_through_the_tunnel(world: World) -> None:
    import pg8000.native

    conn = pg8000.native.Connection(
        world.pg.user,
        host="127.0.0.1",
        port=world.port,
        password=world.pg.password,
        database=world.pg.dbname,
        timeout=10,
    )
    try:
        assert conn.run("select :a::int + 1", a=41) == [[42]]
    finally:
        conn.close()


async def test_asyncpg_and_refusal_through_the_tunnel(world: World) -> None:
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=world.port,
        user=world.pg.user,
        password=world.pg.password,
        database=world.pg.dbname,
        timeout=10,
    )
    try:
        statement = await conn.prepare("select $1::int * 2")
        assert await statement.fetchval(21) == 42
    finally:
        await asyncio.wait_for(conn.close(), 10)
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(
            host="127.0.0.1",
            port=world.port,
            user="postgres",
            password="x",
            database=world.pg.dbname,
            timeout=10,
        )


@pytest.mark.timeout(120)
def test_burrow_pg_and_connect_from_the_command_line(tmp_path: Any) -> None:
    """The user's way: `burrow pg` next to the database (from a burrow.toml too), `burrow
    connect` where the client runs, psql with libpq's defaults, a log line naming the token."""
    import subprocess

    from helpers import SCALE
    from test_cli import Cli, relay

    key = TokenKey.load_or_create(tmp_path / "r")
    now = time.time()
    expose = mint(key, ["orders", "billing"], [], 3600, now)
    reach = mint(key, [], ["orders", "billing"], 3600, now, subject="lambda-orders")
    with ThrowawayPostgres(ssl_only=True) as pg, relay(tmp_path, state="r") as (_, ready):
        common = ["--to", ready["control"], "--fingerprint", ready["fingerprint"], "--json"]
        upstream = ["--upstream-ca", str(pg.ca_path), "--upstream-name", pg.host_name]
        agent = Cli(
            "pg", f"127.0.0.1:{pg.port}", "--name", "orders", "--private", *upstream,
            "--allow-user", pg.user, "--token", expose, "--state-dir", str(tmp_path / "a"),
            *common,
        )  # fmt: skip
        config = tmp_path / "burrow.toml"
        config.write_text(
            f'[[tunnel]]\nkind = "pg"\nname = "billing"\nlocal = "127.0.0.1:{pg.port}"\n'
            f'upstream_ca = "{pg.ca_path}"\nupstream_name = "{pg.host_name}"\n'
        )
        config.chmod(0o600)
        up = Cli("up", "-c", str(config), "--token", expose, "--state-dir", str(tmp_path / "u"),
                 *common)  # fmt: skip
        connector = Cli("connect", "orders=127.0.0.1:0", "billing=127.0.0.1:0", "--token",
                        reach, *common)  # fmt: skip
        try:
            assert agent.event("tunnel_ready")["name"] == "orders"
            assert up.event("tunnel_ready")["name"] == "billing"
            local = {}
            for _ in range(2):
                ready_event = connector.event("tunnel_ready")
                local[ready_event["name"]] = ready_event["local"].rpartition(":")[2]
            for name in ("orders", "billing"):
                dsn = (
                    f"host=127.0.0.1 port={local[name]} user={pg.user} dbname={pg.dbname} "
                    "connect_timeout=10"
                )
                out = subprocess.run(
                    ["psql", dsn, "-Atc", "select current_user"],
                    capture_output=True,
                    text=True,
                    timeout=30 * SCALE,
                    env={**__import__("os").environ, "PGPASSWORD": pg.password},
                )
                assert out.stdout.strip() == pg.user, out.stderr
            while (event := agent.event("pg_connection")).get("user") != pg.user:
                pass  # the connector's readiness probes are connections too
            assert event["identity"] == "token:lambda-orders"
            assert event["database"] == pg.dbname and event["bytes_from_server"] > 0
        finally:
            connector.stop()
            up.stop()
            agent.stop()

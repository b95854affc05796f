"""A Lambda reaches a private database with no public port.

One relay (TLS, pinned fingerprint) with a token key; an agent offers the throwaway SCRAM+TLS
PostgreSQL cluster as the PRIVATE service "pg" (its token may expose pg); connectors holding a
token that may connect to pg reach it as local listeners (TCP and Unix), through the CLI
(``burrow connect``) and through the Python API (``burrow.connect``, ``burrow.open_socket``).
Every client is a real one: psql, psycopg, asyncpg, pg8000. PostgreSQL's own TLS runs end to
end inside the tunnel, checked with verify-full and SCRAM channel binding.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pg8000.native
import psycopg
import pytest

import burrow
from burrow.net.tls import TrustPolicy
from burrow.roles.agent import Agent, AgentConfig, TcpTunnelSpec
from burrow.roles.connector import Connector, ConnectorConfig, ListenSpec
from burrow.roles.relay import Relay
from burrow.tokens import TokenKey, mint
from helpers import SCALE, LoopThread, burrow_cli, read_event, relay_config, stop

try:
    from pgcluster import ThrowawayPostgres
except ImportError:  # tests/ imported as a package
    from tests.pgcluster import ThrowawayPostgres

pytestmark = pytest.mark.timeout(60)

PSYCOPG_HAS_REQUIRE_AUTH = psycopg.pq.version() >= 160000
SSL_REQUEST = struct.pack("!ii", 8, 80877103)  # 00000008 04d2162f


@dataclass
class World:
    pg: ThrowawayPostgres
    loop: LoopThread
    relay: Relay
    agent: Agent
    connector: Connector
    fingerprint: str
    control: str  # "127.0.0.1:PORT" of the relay
    connect_token: str
    tmp: Path

    def listener(self, service: str) -> tuple[str, int]:
        host, _, port = self.connector.listeners[service].rpartition(":")
        return host, int(port)


async def _drain_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read to EOF, then answer with what arrived: the far half of a half-close test."""
    digest = hashlib.sha256()
    total = 0
    try:
        while chunk := await reader.read(65536):
            digest.update(chunk)
            total += len(chunk)
        writer.write(f"{total} {digest.hexdigest()}\n".encode())
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if shutil.which("psql") is None:
        pytest.fail("psql must be on PATH (Debian: postgresql-client)")
    tmp = tmp_path_factory.mktemp("private")
    state = tmp / "relay-state"
    # The relay loads its token key at start: mint before it starts.
    key = TokenKey.load_or_create(state)
    now = time.time()
    expose_token = mint(key, ["pg", "drain"], [], 3600, now)
    connect_token = mint(key, [], ["pg", "drain"], 3600, now)
    loop = LoopThread()
    stack = contextlib.AsyncExitStack()
    with ThrowawayPostgres() as pg:
        try:

            async def up() -> World:
                drain = await asyncio.start_server(_drain_handler, "127.0.0.1", 0)
                stack.callback(drain.close)
                drain_port = drain.sockets[0].getsockname()[1]
                relay = await stack.enter_async_context(_started(Relay(relay_config(tmp))))
                assert relay.control_address is not None and relay.fingerprint
                trust = TrustPolicy(fingerprint=relay.fingerprint)
                agent = Agent(
                    AgentConfig(
                        relay=relay.control_address,
                        token=expose_token,
                        trust=trust,
                        tunnels=[
                            TcpTunnelSpec(local=("127.0.0.1", pg.port), name="pg", private=True),
                            TcpTunnelSpec(
                                local=("127.0.0.1", drain_port), name="drain", private=True
                            ),
                        ],
                    )
                )
                await stack.enter_async_context(_started(agent))
                connector = Connector(
                    ConnectorConfig(
                        relay=relay.control_address,
                        token=connect_token,
                        trust=trust,
                        services=[
                            ListenSpec("pg", "127.0.0.1:0"),
                            ListenSpec("drain", "127.0.0.1:0"),
                        ],
                    )
                )
                await stack.enter_async_context(_started(connector))
                await connector.wait_ready("pg")
                host, port = relay.control_address
                return World(
                    pg=pg,
                    loop=loop,
                    relay=relay,
                    agent=agent,
                    connector=connector,
                    fingerprint=relay.fingerprint,
                    control=f"{host}:{port}",
                    connect_token=connect_token,
                    tmp=tmp,
                )

            yield loop.run(up())
        finally:
            loop.run(stack.aclose())
            loop.stop()


@contextlib.asynccontextmanager
async def _started(role: Any) -> Any:
    await role.start()
    try:
        yield role
    finally:
        await role.close()


# ---- helpers --------------------------------------------------------------------------------


def _params(world: World, host: str, port: int, sslmode: str = "require") -> dict[str, Any]:
    pg = world.pg
    params: dict[str, Any] = {
        "port": port,
        "user": pg.user,
        "password": pg.password,
        "dbname": pg.dbname,
        "sslmode": sslmode,
        "connect_timeout": 10,
        "channel_binding": "disable" if sslmode == "disable" else "require",
    }
    if sslmode == "verify-full":
        params |= {"host": pg.host_name, "hostaddr": host, "sslrootcert": str(pg.ca_path)}
    else:
        params["host"] = host
    if PSYCOPG_HAS_REQUIRE_AUTH:
        # SCRAM-SHA-256-PLUS under TLS: proves SCRAM and an unbroken TLS session end to end.
        params["require_auth"] = "scram-sha-256"
    return params


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env | extra


def _psql(world: World, conninfo: str, query: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", conninfo, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", query],
        env=_clean_env(PGPASSWORD=world.pg.password, PGCONNECT_TIMEOUT="10"),
        capture_output=True,
        text=True,
        timeout=30 * SCALE,
        check=False,
    )


def _tcp_conninfo(world: World, host: str, port: int, sslmode: str = "require") -> str:
    pg = world.pg
    return (
        f"host={host} port={port} user={pg.user} dbname={pg.dbname} sslmode={sslmode} "
        f"channel_binding={'disable' if sslmode == 'disable' else 'require'}"
    )


WHO_SQL = "select current_user || '|' || ssl::text from pg_stat_ssl where pid = pg_backend_pid()"


def _recv_all(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    out = bytearray()
    while len(out) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        out += chunk
    return bytes(out)


# ---- the relay side: no public port ----------------------------------------------------------


def test_private_service_has_no_public_port(world: World) -> None:
    async def snapshot() -> tuple[dict[int, Any], dict[tuple[str, str], str]]:
        return dict(world.relay.tunnels), {k: r.kind for k, r in world.relay.names.items()}

    tunnels, names = world.loop.run(snapshot())
    assert tunnels == {}
    assert names.get(("svc", "pg")) == "private"
    assert world.agent.tunnels[0].port is None
    assert world.agent.tunnels[0].public == "pg"
    # Nothing but the control port listens for the relay: the database port is not on it.
    assert world.relay.control_address is not None
    assert world.pg.port != world.relay.control_address[1]


# ---- a Connector listener ----------------------------------------------------------------------


@pytest.mark.parametrize("sslmode", ["disable", "require"])
def test_psql_through_connector(world: World, sslmode: str) -> None:
    host, port = world.listener("pg")
    proc = _psql(world, _tcp_conninfo(world, host, port, sslmode), WHO_SQL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{world.pg.user}|{'false' if sslmode == 'disable' else 'true'}"


def test_psycopg_through_connector(world: World) -> None:
    host, port = world.listener("pg")
    with psycopg.connect(**_params(world, host, port, "require")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        rows = conn.execute("select g, md5(g::text) from generate_series(1, 5000) g").fetchall()
        assert rows == [(g, hashlib.md5(str(g).encode()).hexdigest()) for g in range(1, 5001)]
        blob = random.randbytes(512 * 1024)
        echoed, digest = conn.execute(
            "select %s::bytea, encode(sha256(%s::bytea), 'hex')", (blob, blob)
        ).fetchone()
        assert bytes(echoed) == blob
        assert digest == hashlib.sha256(blob).hexdigest()


def test_psycopg_verify_full_end_to_end(world: World) -> None:
    """libpq checks the server's certificate for db.burrow.test against the cluster's CA,
    with SCRAM channel binding: the TLS session is the database's own, not burrow's."""
    host, port = world.listener("pg")
    params = _params(world, host, port, "verify-full")
    with psycopg.connect(**params) as conn:
        assert conn.pgconn.ssl_in_use
        row = conn.execute(
            "select ssl, current_user from pg_stat_ssl where pid = pg_backend_pid()"
        ).fetchone()
        assert row == (True, world.pg.user)
    # And the check is real: a wrong expected name fails.
    params["host"] = "not-" + world.pg.host_name
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**params)


async def test_asyncpg_through_connector(world: World) -> None:
    host, port = world.listener("pg")
    context = ssl.create_default_context(cafile=str(world.pg.ca_path))  # verifies 127.0.0.1
    conn = await asyncpg.connect(
        host=host,
        port=port,
        user=world.pg.user,
        password=world.pg.password,
        database=world.pg.dbname,
        ssl=context,
        timeout=10,
        command_timeout=20,
    )
    try:
        assert await conn.fetchval("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        rows = await conn.fetch("select g from generate_series(1, 3000) g")
        assert [r[0] for r in rows] == list(range(1, 3001))

        async def one(i: int) -> int:
            return int(await conn.fetchval("select $1::int * 2", i))

        # asyncpg serialises queries on one connection; a few in a row, then several conns.
        assert [await one(i) for i in range(20)] == [i * 2 for i in range(20)]
    finally:
        await asyncio.wait_for(conn.close(), 10)

    async def worker(i: int) -> int:
        c = await asyncpg.connect(
            host=host,
            port=port,
            user=world.pg.user,
            password=world.pg.password,
            database=world.pg.dbname,
            ssl=context if i % 2 else False,
            timeout=10,
        )
        try:
            return int(await c.fetchval("select $1::int + 1", i))
        finally:
            await asyncio.wait_for(c.close(), 10)

    got = await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(6))), 30)
    assert got == [i + 1 for i in range(6)]


def test_wrong_password_is_postgres_error_not_burrow(world: World) -> None:
    host, port = world.listener("pg")
    params = _params(world, host, port, "require")
    params["password"] = "not-the-password"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**params)


# ---- the CLI: burrow connect --------------------------------------------------------------------


def test_psql_through_cli_connect(world: World) -> None:
    proc = burrow_cli(
        "connect",
        "pg=127.0.0.1:0",
        "--to",
        world.control,
        "--token",
        world.connect_token,
        "--fingerprint",
        world.fingerprint,
        "--state-dir",
        str(world.tmp / "cli-connector"),
        "--json",
    )
    try:
        ready = read_event(proc, "tunnel_ready")
        assert ready["kind"] == "connect" and ready["name"] == "pg"
        host, _, port = str(ready["local"]).rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
        one = _psql(world, _tcp_conninfo(world, host, int(port)), WHO_SQL)
        assert one.returncode == 0, one.stderr
        assert one.stdout.strip() == f"{world.pg.user}|true"
        # verify-full through the CLI's listener too.
        full = _psql(
            world,
            f"host={world.pg.host_name} hostaddr={host} port={port} user={world.pg.user} "
            f"dbname={world.pg.dbname} sslmode=verify-full sslrootcert={world.pg.ca_path} "
            "channel_binding=require",
            "select 42",
        )
        assert full.returncode == 0, full.stderr
        assert full.stdout.strip() == "42"
        assert proc.poll() is None
    finally:
        stop(proc)
    assert proc.returncode is not None


# ---- the Python API -----------------------------------------------------------------------------


@pytest.fixture
def api_cleanup() -> Iterator[None]:
    """Close the connectors ``open_socket`` shares, so none outlives the module's relay."""
    yield
    from burrow import api

    if api._shared is not None:
        api._LoopThread.get().run(api._shared.close(), 10)


def test_python_api_connect_with_psycopg(world: World) -> None:
    with burrow.connect(
        "pg", relay=world.control, token=world.connect_token, fingerprint=world.fingerprint
    ) as (host, port):
        assert host == "127.0.0.1"
        with psycopg.connect(**_params(world, host, port, "verify-full")) as conn:
            assert conn.execute("select current_user").fetchone() == (world.pg.user,)
            assert conn.pgconn.ssl_in_use
    # The listener is gone once the block ends.
    with pytest.raises(OSError), socket.create_connection((host, port), timeout=2) as late:
        late.recv(1)


def test_python_api_open_socket_with_pg8000(world: World, api_cleanup: None) -> None:
    pg = world.pg
    sock = burrow.open_socket(
        "pg", relay=world.control, token=world.connect_token, fingerprint=world.fingerprint
    )
    sock.settimeout(20)
    context = ssl.create_default_context(cafile=str(pg.ca_path))  # checks db.burrow.test
    conn = pg8000.native.Connection(
        pg.user,
        host=pg.host_name,  # only for the certificate check: the socket is already connected
        password=pg.password,
        database=pg.dbname,
        sock=sock,
        ssl_context=context,
        timeout=20,
    )
    try:
        assert conn.run("select current_user, 6 * 7") == [[pg.user, 42]]
        assert conn.run("select ssl from pg_stat_ssl where pid = pg_backend_pid()") == [[True]]
        rows = conn.run("select g from generate_series(1, 2000) g")
        assert [r[0] for r in rows] == list(range(1, 2001))
    finally:
        conn.close()

    # Without TLS (ssl_context=False) on a second socket from the same shared connector.
    plain = burrow.open_socket(
        "pg", relay=world.control, token=world.connect_token, fingerprint=world.fingerprint
    )
    plain.settimeout(20)
    conn = pg8000.native.Connection(
        pg.user, password=pg.password, database=pg.dbname, sock=plain, ssl_context=False
    )
    try:
        assert conn.run("select ssl from pg_stat_ssl where pid = pg_backend_pid()") == [[False]]
    finally:
        conn.close()


# ---- a Unix socket listener ---------------------------------------------------------------------


def test_unix_socket_listener_with_psql(world: World) -> None:
    directory = Path(tempfile.mkdtemp(prefix="burrow-sock-"))
    path = directory / ".s.PGSQL.5432"  # libpq's name for port 5432 in a socket directory

    async def open_connector() -> Connector:
        connector = Connector(
            ConnectorConfig(
                relay=world.relay.control_address,  # type: ignore[arg-type]
                token=world.connect_token,
                trust=TrustPolicy(fingerprint=world.fingerprint),
                services=[ListenSpec("pg", f"unix:{path}")],
            )
        )
        await connector.start()
        return connector

    connector = world.loop.run(open_connector())
    try:
        assert connector.listeners["pg"] == f"unix:{path}"
        assert path.is_socket()
        pg = world.pg
        proc = subprocess.run(
            [
                "psql",
                "-h",
                str(directory),
                "-p",
                "5432",
                "-U",
                pg.user,
                "-d",
                pg.dbname,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "select current_user || '|' || inet_server_addr()::text",
            ],
            env=_clean_env(PGPASSWORD=pg.password, PGCONNECT_TIMEOUT="10"),
            capture_output=True,
            text=True,
            timeout=30 * SCALE,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        # The server saw a TCP connection from the agent, not a local socket.
        assert proc.stdout.strip() == f"{pg.user}|127.0.0.1/32"
    finally:
        world.loop.run(connector.close())
        shutil.rmtree(directory, ignore_errors=True)


# ---- half-close and idle ----------------------------------------------------------------------


def test_half_close_carries_fin_and_the_answer_still_comes(world: World) -> None:
    payload = random.randbytes(1024 * 1024 + 17)
    with socket.create_connection(world.listener("drain"), timeout=20) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # the service reads to EOF, then answers
        answer = _recv_all(sock)
    assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


def test_half_close_against_postgres(world: World) -> None:
    """An SSLRequest then SHUT_WR: the server still answers 'S', then closes its side."""
    with socket.create_connection(world.listener("pg"), timeout=20) as sock:
        sock.sendall(SSL_REQUEST)
        sock.shutdown(socket.SHUT_WR)
        answer = _recv_all(sock)
    assert answer == b"S"


def test_idle_connection_still_works(world: World) -> None:
    """burrow has no idle timeout of its own: a connection quiet for 3 s is still alive."""
    host, port = world.listener("pg")
    with psycopg.connect(**_params(world, host, port, "require")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        time.sleep(3)
        assert conn.execute("select 2").fetchone() == (2,)
        backend = conn.execute("select pg_backend_pid()").fetchone()
        time.sleep(0.5)
        assert conn.execute("select pg_backend_pid()").fetchone() == backend

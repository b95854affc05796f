"""Real database protocols through a burrow TCP tunnel.

Every client here talks to a real server *through* the tunnel: psql, psycopg, asyncpg and
pgbench against a throwaway PostgreSQL cluster (SCRAM-SHA-256 only, TLS on), PyMySQL against
the local MariaDB and redis-py against the local Redis.

Fixture contract (provided by tests/conftest.py):

    tcp_tunnel(local_port: int, **options) -> tuple[str, int]

returns the public (host, port) of a TLS-encrypted burrow tunnel whose agent forwards to
127.0.0.1:local_port; everything is torn down at the end of the test. The host may be an IP
address or a name that resolves to one (for libpq ``hostaddr``).

PostgreSQL TLS is end to end (client <-> postgres, carried opaquely inside the tunnel's own
TLS). With TLS on we demand SCRAM channel binding (SCRAM-SHA-256-PLUS), which fails if anything
between the client and the server terminates or alters the TLS session.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import secrets
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pymysql
import pytest
import redis

try:
    from pgcluster import ThrowawayPostgres
except ImportError:  # tests/ imported as a package
    from tests.pgcluster import ThrowawayPostgres

pytestmark = pytest.mark.timeout(60)

SSLMODES = ["disable", "require", "verify-full"]
MANY_ROWS = 20_000
MARIADB_PORT = 3306
REDIS_PORT = 6379
# libpq >= 16 understands require_auth; the psycopg wheel usually bundles a newer libpq.
PSYCOPG_HAS_REQUIRE_AUTH = psycopg.pq.version() >= 160000


# ---- helpers -----------------------------------------------------------------------------------
def _numeric_host(host: str) -> str:
    """The numeric address for a tunnel host (libpq's hostaddr= needs one)."""
    info = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return str(info[0][4][0])


def _require_service(port: int, what: str) -> None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
    except OSError as e:
        pytest.fail(f"{what} is not answering on 127.0.0.1:{port} ({e}); run scripts/services.sh")


def _expected_rows(n: int) -> list[tuple[int, str]]:
    return [(g, hashlib.md5(str(g).encode()).hexdigest()) for g in range(1, n + 1)]


MANY_ROWS_SQL = f"select g, md5(g::text) from generate_series(1, {MANY_ROWS}) g order by g"


def _libpq_params(
    pg: ThrowawayPostgres, host: str, port: int, sslmode: str, *, password: str | None = None
) -> dict[str, str]:
    params = {
        "port": str(port),
        "user": pg.user,
        "dbname": pg.dbname,
        "password": pg.password if password is None else password,
        "sslmode": sslmode,
        "connect_timeout": "10",
        # TLS on => insist on SCRAM-SHA-256-PLUS: proves SCRAM *and* an unbroken TLS session.
        "channel_binding": "disable" if sslmode == "disable" else "require",
    }
    if sslmode == "verify-full":
        params |= {
            "host": pg.host_name,
            "hostaddr": _numeric_host(host),
            "sslrootcert": str(pg.ca_path),
        }
    else:
        params["host"] = host
    return params


def _conninfo(params: dict[str, str]) -> str:
    """A libpq keyword/value string, without the password (that goes in PGPASSWORD)."""
    return " ".join(f"{k}={v}" for k, v in params.items() if k != "password")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env |= extra
    return env


def _psql(params: dict[str, str], query: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", _conninfo(params), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", query],
        env=_clean_env(PGPASSWORD=params["password"]),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class _PinnedNameContext(ssl.SSLContext):
    """An SSLContext that sends SNI / checks the certificate for a fixed server name,
    whatever address the client connects to (asyncpg uses its host= for both)."""

    pinned_name: str = ""

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=self.pinned_name,
            session=session,
        )


def _asyncpg_ssl(pg: ThrowawayPostgres, sslmode: str) -> ssl.SSLContext | bool:
    if sslmode == "disable":
        return False
    if sslmode == "require":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    assert sslmode == "verify-full"
    pinned = _PinnedNameContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    pinned.pinned_name = pg.host_name
    pinned.load_verify_locations(cafile=str(pg.ca_path))
    return pinned


async def _asyncpg_connect(
    pg: ThrowawayPostgres, host: str, port: int, sslmode: str, *, password: str | None = None
) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=host,
        port=port,
        user=pg.user,
        password=pg.password if password is None else password,
        database=pg.dbname,
        ssl=_asyncpg_ssl(pg, sslmode),
        timeout=10,
        command_timeout=30,
    )


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pg() -> Iterator[ThrowawayPostgres]:
    if shutil.which("psql") is None or shutil.which("pgbench") is None:
        pytest.fail("psql and pgbench must be on PATH (Debian: postgresql-client)")
    with ThrowawayPostgres() as cluster:
        yield cluster


@pytest.fixture
def pg_tunnel(pg: ThrowawayPostgres, tcp_tunnel: Any) -> tuple[str, int]:
    host, port = tcp_tunnel(pg.port)
    return host, port


def test_throwaway_cluster_is_scram_only(pg: ThrowawayPostgres) -> None:
    """Sanity of the fixture itself (direct, no tunnel): SCRAM verifiers, TLS configured."""
    with pg.superuser_connect() as conn:
        (verifier,) = conn.execute(
            "select rolpassword from pg_authid where rolname = %s", (pg.user,)
        ).fetchone()
        assert verifier.startswith("SCRAM-SHA-256$")
        assert conn.execute("show ssl").fetchone() == ("on",)
        assert conn.execute("show password_encryption").fetchone() == ("scram-sha-256",)
        methods = {
            r[0] for r in conn.execute("select auth_method from pg_hba_file_rules").fetchall()
        }
        assert methods == {"scram-sha-256"}


# ---- psql --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sslmode", SSLMODES)
def test_psql_through_tunnel(
    pg: ThrowawayPostgres, pg_tunnel: tuple[str, int], sslmode: str
) -> None:
    params = _libpq_params(pg, *pg_tunnel, sslmode)

    one = _psql(params, "select 1")
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip() == "1"

    who = _psql(
        params,
        "select current_user || '|' || ssl::text from pg_stat_ssl where pid = pg_backend_pid()",
    )
    assert who.returncode == 0, who.stderr
    assert who.stdout.strip() == f"{pg.user}|{'false' if sslmode == 'disable' else 'true'}"

    many = _psql(params, MANY_ROWS_SQL)
    assert many.returncode == 0, many.stderr
    lines = many.stdout.splitlines()
    assert len(lines) == MANY_ROWS
    assert lines == [f"{g}|{h}" for g, h in _expected_rows(MANY_ROWS)]


def test_psql_wrong_password_through_tunnel(
    pg: ThrowawayPostgres, pg_tunnel: tuple[str, int]
) -> None:
    params = _libpq_params(pg, *pg_tunnel, "require", password="not-the-password")
    proc = _psql(params, "select 1")
    assert proc.returncode == 2
    assert "password authentication failed" in proc.stderr


# ---- psycopg -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sslmode", SSLMODES)
def test_psycopg_through_tunnel(
    pg: ThrowawayPostgres, pg_tunnel: tuple[str, int], sslmode: str
) -> None:
    params: dict[str, Any] = _libpq_params(pg, *pg_tunnel, sslmode)
    if PSYCOPG_HAS_REQUIRE_AUTH:
        params["require_auth"] = "scram-sha-256"
    with psycopg.connect(**params) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        row = conn.execute(
            "select ssl, current_user from pg_stat_ssl where pid = pg_backend_pid()"
        ).fetchone()
        assert row == (sslmode != "disable", pg.user)
        assert conn.pgconn.ssl_in_use == (sslmode != "disable")

        assert conn.execute(MANY_ROWS_SQL).fetchall() == _expected_rows(MANY_ROWS)

        # A large value each way: 2 MiB of random bytes up, echoed back down, plus a digest
        # computed by the server to prove what arrived.
        blob = random.randbytes(2 * 1024 * 1024)
        echoed, digest = conn.execute(
            "select %s::bytea, encode(sha256(%s::bytea), 'hex')", (blob, blob)
        ).fetchone()
        assert bytes(echoed) == blob
        assert digest == hashlib.sha256(blob).hexdigest()


def test_psycopg_wrong_password_through_tunnel(
    pg: ThrowawayPostgres, pg_tunnel: tuple[str, int]
) -> None:
    params = _libpq_params(pg, *pg_tunnel, "require", password="not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**params)


# ---- asyncpg -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sslmode", SSLMODES)
async def test_asyncpg_through_tunnel(
    pg: ThrowawayPostgres, pg_tunnel: tuple[str, int], sslmode: str
) -> None:
    conn = await _asyncpg_connect(pg, *pg_tunnel, sslmode)
    try:
        assert await conn.fetchval("select 1") == 1
        row = await conn.fetchrow(
            "select ssl, current_user from pg_stat_ssl where pid = pg_backend_pid()"
        )
        assert tuple(row) == (sslmode != "disable", pg.user)
        rows = await conn.fetch(MANY_ROWS_SQL)
        assert [tuple(r) for r in rows] == _expected_rows(MANY_ROWS)

        blob = random.randbytes(1024 * 1024)
        echoed, digest = await conn.fetchrow(
            "select $1::bytea, encode(sha256($1::bytea), 'hex')", blob
        )
        assert echoed == blob
        assert digest == hashlib.sha256(blob).hexdigest()
    finally:
        await asyncio.wait_for(conn.close(), 10)


async def test_asyncpg_verify_full_rejects_wrong_name(
    pg: ThrowawayPostgres, pg_tunnel: tuple[str, int]
) -> None:
    """The verify-full context really checks the name (so the test above means something)."""
    ctx = _PinnedNameContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.pinned_name = "not-" + pg.host_name
    ctx.load_verify_locations(cafile=str(pg.ca_path))
    host, port = pg_tunnel
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncpg.connect(
            host=host,
            port=port,
            user=pg.user,
            password=pg.password,
            database=pg.dbname,
            ssl=ctx,
            timeout=10,
        )


async def test_asyncpg_wrong_password_through_tunnel(
    pg: ThrowawayPostgres, pg_tunnel: tuple[str, int]
) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError, match="password authentication failed"):
        await _asyncpg_connect(pg, *pg_tunnel, "require", password="not-the-password")


async def test_asyncpg_concurrent_connections_through_tunnel(
    pg: ThrowawayPostgres, pg_tunnel: tuple[str, int]
) -> None:
    """Many simultaneous streams over one tunnel, each with its own COPY and queries."""
    n_conns, n_rows = 8, 2_000

    async def worker(i: int) -> None:
        conn = await _asyncpg_connect(pg, *pg_tunnel, "require" if i % 2 else "disable")
        try:
            await conn.execute("create temp table t (id int primary key, v text)")
            records = [(k, f"w{i}-{k}-" + "x" * (k % 97)) for k in range(n_rows)]
            await conn.copy_records_to_table("t", records=records)
            for _ in range(10):
                assert await conn.fetchval("select count(*) from t") == n_rows
            got = await conn.fetch("select id, v from t order by id")
            assert [tuple(r) for r in got] == records
        finally:
            await asyncio.wait_for(conn.close(), 10)

    await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(n_conns))), 45)


# ---- pgbench -----------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_pgbench_through_tunnel(pg: ThrowawayPostgres, pg_tunnel: tuple[str, int]) -> None:
    host, port = pg_tunnel
    env = _clean_env(
        PGHOST=host,
        PGPORT=str(port),
        PGUSER=pg.user,
        PGDATABASE=pg.dbname,
        PGPASSWORD=pg.password,
        PGSSLMODE="require",
        PGCONNECT_TIMEOUT="10",
    )

    init = subprocess.run(
        ["pgbench", "-i", "-s", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    assert "error" not in init.stderr.lower(), init.stderr
    assert "done" in init.stderr

    clients, per_client = 4, 500
    run = subprocess.run(
        ["pgbench", "-n", "-S", "-c", str(clients), "-j", "2", "-t", str(per_client)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "error" not in run.stderr.lower(), run.stderr
    total = clients * per_client
    m = re.search(r"number of transactions actually processed: (\d+)/(\d+)", run.stdout)
    assert m, run.stdout
    assert (int(m[1]), int(m[2])) == (total, total)
    failed = re.search(r"number of failed transactions: (\d+)", run.stdout)
    if failed:  # pgbench >= 15
        assert failed[1] == "0", run.stdout


# ---- MariaDB -----------------------------------------------------------------------------------
def test_mariadb_through_tunnel(tcp_tunnel: Any) -> None:
    _require_service(MARIADB_PORT, "MariaDB")
    host, port = tcp_tunnel(MARIADB_PORT)
    conn = pymysql.connect(
        host=host,
        port=port,
        user="root",
        password="",
        database="test",
        charset="utf8mb4",
        connect_timeout=10,
        read_timeout=30,
        write_timeout=30,
    )
    try:
        with conn.cursor() as cur:
            cur.execute(
                "create temporary table burrow_rows ("
                " id int primary key, name varchar(200) character set utf8mb4, payload blob)"
            )
            rng = random.Random(1234)
            rows = [
                (i, f"row-{i}-ünïcødé-🦔-" + "z" * (i % 50), rng.randbytes(rng.randrange(0, 2048)))
                for i in range(1000)
            ]
            cur.executemany("insert into burrow_rows (id, name, payload) values (%s, %s, %s)", rows)
            assert cur.rowcount == 1000
            conn.commit()
            cur.execute("select id, name, payload from burrow_rows order by id")
            got = [(i, n, bytes(p)) for i, n, p in cur.fetchall()]
            assert got == rows
            cur.execute("drop temporary table burrow_rows")
    finally:
        conn.close()


# ---- Redis -------------------------------------------------------------------------------------
def test_redis_pipeline_through_tunnel(tcp_tunnel: Any) -> None:
    _require_service(REDIS_PORT, "Redis")
    host, port = tcp_tunnel(REDIS_PORT)
    prefix = f"burrow-test:{secrets.token_hex(8)}:"
    n = 10_000
    rng = random.Random(99)
    data = {f"{prefix}{i}".encode(): rng.randbytes(rng.randrange(0, 300)) for i in range(n)}
    keys = list(data)

    direct = redis.Redis(host="127.0.0.1", port=REDIS_PORT, socket_timeout=30)
    client = redis.Redis(host=host, port=port, socket_timeout=30, socket_connect_timeout=10)
    try:
        pipe = client.pipeline(transaction=False)
        for key, value in data.items():
            pipe.set(key, value)
            pipe.get(key)
        results = pipe.execute()
        assert len(results) == 2 * n
        assert all(r is True for r in results[0::2])
        assert results[1::2] == [data[k] for k in keys]
        # And the server really holds them (checked directly, not through the tunnel).
        assert direct.mget(keys[:100]) == [data[k] for k in keys[:100]]
    finally:
        client.close()
        for i in range(0, n, 1000):
            direct.delete(*keys[i : i + 1000])
        assert direct.exists(*keys[:1000]) == 0
        direct.close()

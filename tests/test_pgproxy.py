"""pgproxy against a real PostgreSQL that accepts only hostssl + scram-sha-256.

Two proxies share one throwaway cluster: ``burrow pgproxy`` as a subprocess (uvloop, the CLI
the user runs) for the client matrix, and an in-process listener calling ``serve_pg`` with an
identity (the stdlib loop) for the audit events. Every client is a real one: psql, psycopg,
asyncpg, pg8000. The upstream leg is TLS, so the server offers SCRAM-SHA-256-PLUS and the
clients run with libpq's defaults (sslmode=prefer, channel_binding=prefer).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pg8000.native
import psycopg
import pytest
import trustme

from burrow.pg import PgPolicy, PgUpstream, codec
from burrow.pg.proxy import serve_pg
from burrow.pg.standalone import PgProxyServer
from helpers import SCALE, Events, LoopThread, burrow_cli, read_event, stop

try:
    from pgcluster import ThrowawayPostgres
except ImportError:  # tests/ imported as a package
    from tests.pgcluster import ThrowawayPostgres

pytestmark = pytest.mark.timeout(60)

IDENTITY = "token:ci-lambda"
OUTSIDER = "eve"  # a real role with a password, outside the allow-list


@dataclass
class Proxy:
    host: str
    port: int
    proc: subprocess.Popen[str] | None = None


@dataclass
class InProcess:
    loop: LoopThread
    events: Events
    host: str
    port: int

    def wait_event(self, count: int, timeout: float = 10.0) -> dict[str, Any]:
        return self.loop.run(self.events.wait_for("pg_connection", count, timeout))

    def count(self) -> int:
        return len(self.events.named("pg_connection"))


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[ThrowawayPostgres]:
    if shutil.which("psql") is None:
        pytest.fail("psql must be on PATH (Debian: postgresql-client)")
    with ThrowawayPostgres(ssl_only=True) as cluster:
        with cluster.superuser_connect() as conn:
            conn.execute(f"CREATE ROLE {OUTSIDER} LOGIN PASSWORD 'eve-password'")
            conn.execute(f"GRANT CONNECT ON DATABASE {cluster.dbname} TO {OUTSIDER}")
        yield cluster


def _start_cli(pg: ThrowawayPostgres, *extra: str) -> tuple[subprocess.Popen[str], Proxy]:
    proc = burrow_cli(
        "pgproxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"127.0.0.1:{pg.port}",
        "--json",
        *extra,
    )
    try:
        ready = read_event(proc, "pgproxy_ready")
    except BaseException:
        stop(proc)
        raise
    host, _, port = ready["listen"].rpartition(":")
    return proc, Proxy(host, int(port), proc)


@pytest.fixture(scope="module")
def proxy(pg: ThrowawayPostgres) -> Iterator[Proxy]:
    proc, found = _start_cli(
        pg,
        "--upstream-ca",
        str(pg.ca_path),
        "--upstream-name",
        pg.host_name,
        "--allow-user",
        pg.user,
        "--allow-database",
        pg.dbname,
    )
    try:
        yield found
    finally:
        stop(proc)
    # Whatever the clients did, the proxy printed no traceback and no asyncio complaint.
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "Traceback" not in err and "Error" not in err, err


@pytest.fixture(scope="module")
def inproc(pg: ThrowawayPostgres) -> Iterator[InProcess]:
    loop = LoopThread()
    events = Events()
    upstream = PgUpstream.create(
        ("127.0.0.1", pg.port), ca=pg.ca_path, name=pg.host_name, connect_timeout=10 * SCALE
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        await serve_pg(
            reader,
            writer,
            upstream=upstream,
            policy=PgPolicy.create(users=[pg.user]),
            peer=peer,
            identity=IDENTITY,
            on_event=events,
        )

    async def start() -> asyncio.Server:
        return await asyncio.start_server(handle, "127.0.0.1", 0)

    server = loop.run(start())
    port = server.sockets[0].getsockname()[1]
    try:
        yield InProcess(loop, events, "127.0.0.1", port)
    finally:

        async def close() -> None:
            server.close()
            await server.wait_closed()

        with contextlib.suppress(Exception):
            loop.run(close(), timeout=10)
        loop.stop()


# ---- helpers -------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return env | {"LC_ALL": "C"} | extra


def _psql(
    pg: ThrowawayPostgres, at: Proxy | InProcess, query: str, **conninfo: str
) -> subprocess.CompletedProcess[str]:
    params = {"host": at.host, "port": str(at.port), "user": pg.user, "dbname": pg.dbname}
    params |= conninfo
    password = params.pop("password", pg.password)
    text = " ".join(f"{k}={v}" for k, v in params.items())
    return subprocess.run(
        ["psql", text, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", query],
        env=_env(PGPASSWORD=password, PGCONNECT_TIMEOUT="10"),
        capture_output=True,
        text=True,
        timeout=30 * SCALE,
        check=False,
    )


def _psycopg(pg: ThrowawayPostgres, at: Proxy | InProcess, **extra: Any) -> psycopg.Connection:
    params: dict[str, Any] = {
        "host": at.host,
        "port": at.port,
        "user": pg.user,
        "password": pg.password,
        "dbname": pg.dbname,
        "connect_timeout": 10,
    }
    return psycopg.connect(**(params | extra))


# ---- the client matrix through `burrow pgproxy` -----------------------------------------------


def test_server_offers_scram_plus_directly(pg: ThrowawayPostgres) -> None:
    """The premise of the tests below: straight to the server over TLS, channel binding is
    offered and works, so the proxy really has a PLUS offer to withhold."""
    with psycopg.connect(
        host="127.0.0.1",
        port=pg.port,
        user=pg.user,
        password=pg.password,
        dbname=pg.dbname,
        sslmode="require",
        channel_binding="require",
    ) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    # ... and plaintext is refused by pg_hba.conf, so every success below went over TLS.
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(
            host="127.0.0.1",
            port=pg.port,
            user=pg.user,
            password=pg.password,
            dbname=pg.dbname,
            sslmode="disable",
        )


def test_psql_with_libpq_defaults(pg: ThrowawayPostgres, proxy: Proxy) -> None:
    """sslmode=prefer and channel_binding=prefer (libpq's defaults) through the proxy."""
    proc = _psql(
        pg,
        proxy,
        "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{pg.user}|t"  # the database saw a TLS client


def test_psycopg_queries_and_transactions(pg: ThrowawayPostgres, proxy: Proxy) -> None:
    with _psycopg(pg, proxy) as conn:
        assert not conn.pgconn.ssl_in_use  # the client leg is plaintext ...
        row = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()
        assert row == (True,)  # ... the database leg is not
        conn.execute("create temporary table t (x int)")
        with conn.transaction():
            conn.execute("insert into t select generate_series(1, 1000)")
        assert conn.execute("select sum(x) from t").fetchone() == (500500,)
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1 / 0")
        conn.rollback()
        assert conn.execute("select 2").fetchone() == (2,)


async def test_asyncpg_named_prepared_statements(pg: ThrowawayPostgres, proxy: Proxy) -> None:
    conn = await asyncpg.connect(
        host=proxy.host,
        port=proxy.port,
        user=pg.user,
        password=pg.password,
        database=pg.dbname,
        timeout=10,
        command_timeout=20,
    )
    try:
        statement = await conn.prepare("select $1::int + 1")  # a named server-side statement
        assert [await statement.fetchval(i) for i in range(5)] == [1, 2, 3, 4, 5]
        names = await conn.fetch("select name from pg_prepared_statements")
        assert any(r["name"].startswith("__asyncpg_stmt_") for r in names)
        rows = await conn.fetch("select g, repeat('x', g) from generate_series(1, 2000) g")
        assert len(rows) == 2000 and rows[-1][1] == "x" * 2000
        await conn.execute("prepare twice(int) as select $1 * 2")
        assert await conn.fetchval("execute twice(21)") == 42
    finally:
        await asyncio.wait_for(conn.close(), 10)


def test_pg8000(pg: ThrowawayPostgres, proxy: Proxy) -> None:
    conn = pg8000.native.Connection(
        pg.user,
        host=proxy.host,
        port=proxy.port,
        password=pg.password,
        database=pg.dbname,
        timeout=10,
    )
    try:
        assert conn.run("select :a::int * 3", a=14) == [[42]]
        assert conn.run("select ssl from pg_stat_ssl where pid = pg_backend_pid()") == [[True]]
    finally:
        conn.close()


def test_protocol_32_is_negotiated_down(pg: ThrowawayPostgres, inproc: InProcess) -> None:
    """libpq 18 asks for 3.2; PostgreSQL 15 answers NegotiateProtocolVersion through us."""
    if psycopg.pq.version() < 180000:
        pytest.skip("needs libpq 18 (max_protocol_version)")
    before = inproc.count()
    with _psycopg(pg, inproc, max_protocol_version="3.2") as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.info.pgconn.protocol_version == 3
    assert inproc.wait_event(before + 1)["protocol"] == "3.0"  # asked 3.2, got 3.0


@pytest.mark.timeout(120)
def test_copy_100_mb_each_way(pg: ThrowawayPostgres, proxy: Proxy) -> None:
    rows, width = 100_000, 1000  # 100,000 lines of 1,001 bytes
    with _psycopg(pg, proxy) as conn, conn.cursor() as cur:
        received = 0
        with cur.copy(
            f"copy (select repeat('x', {width}) from generate_series(1, {rows})) to stdout"
        ) as copy:
            for data in copy:
                received += len(data)
        assert received == rows * (width + 1)
        cur.execute("create temporary table sink (line text)")
        line = b"y" * width + b"\n"
        block = line * 1000
        with cur.copy("copy sink from stdin") as copy:
            for _ in range(rows // 1000):
                copy.write(block)
        cur.execute("select count(*), sum(length(line)) from sink")
        assert cur.fetchone() == (rows, rows * width)


def test_pg_sleep_is_cancelled(pg: ThrowawayPostgres, proxy: Proxy) -> None:
    """psycopg's cancel opens a new connection with a CancelRequest: the proxy forwards it to
    the backend that issued the key, over a fresh TLS connection."""
    with _psycopg(pg, proxy) as conn:
        canceller = threading.Timer(0.5, conn.cancel)
        canceller.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(30)")
        finally:
            canceller.cancel()
        conn.rollback()
        assert conn.execute("select 1").fetchone() == (1,)  # the session survives


async def test_asyncpg_timeout_cancels_the_query(pg: ThrowawayPostgres, proxy: Proxy) -> None:
    conn = await asyncpg.connect(
        host=proxy.host,
        port=proxy.port,
        user=pg.user,
        password=pg.password,
        database=pg.dbname,
        timeout=10,
    )
    try:
        with pytest.raises(asyncio.TimeoutError):
            await conn.execute("select pg_sleep(30)", timeout=0.5)
        # asyncpg cancels on a new connection and waits for it before the next query.
        assert await asyncio.wait_for(conn.fetchval("select 7"), 10) == 7
    finally:
        await asyncio.wait_for(conn.close(), 10)


def test_user_outside_the_allow_list_gets_28000_in_psql(
    pg: ThrowawayPostgres, proxy: Proxy
) -> None:
    proc = _psql(pg, proxy, "select 1", user=OUTSIDER, password="eve-password")
    assert proc.returncode != 0
    assert f'FATAL:  burrow: user "{OUTSIDER}" is not allowed on this service' in proc.stderr
    proc = _psql(pg, proxy, "select 1", dbname="postgres")
    assert 'database "postgres" is not allowed' in proc.stderr


async def test_user_outside_the_allow_list_sqlstate(pg: ThrowawayPostgres, proxy: Proxy) -> None:
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as refused:
        await asyncpg.connect(
            host=proxy.host,
            port=proxy.port,
            user=OUTSIDER,
            password="eve-password",
            database=pg.dbname,
            timeout=10,
        )
    assert refused.value.sqlstate == "28000"


def test_channel_binding_require_cannot_work(pg: ThrowawayPostgres, proxy: Proxy) -> None:
    """libpq refuses on its own once the PLUS offer is withheld (before we could answer)."""
    proc = _psql(pg, proxy, "select 1", channel_binding="require")
    assert proc.returncode != 0
    assert "channel binding" in proc.stderr


def _raw_startup(at: Proxy | InProcess, pg: ThrowawayPostgres) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection((at.host, at.port), timeout=10 * SCALE)
    sock.sendall(codec.encode_ssl_request())
    assert sock.recv(1) == b"N"
    sock.sendall(codec.encode_startup_message({"user": pg.user, "database": pg.dbname}))
    return sock, _read_message(sock)


def _read_message(sock: socket.socket) -> bytes:
    head = b""
    while len(head) < 5:
        chunk = sock.recv(5 - len(head))
        assert chunk, "closed"
        head += chunk
    (length,) = struct.unpack("!I", head[1:])
    body = b""
    while len(body) < length - 4:
        chunk = sock.recv(length - 4 - len(body))
        assert chunk, "closed"
        body += chunk
    return head + body


def test_client_asking_for_binding_gets_an_error_response(
    pg: ThrowawayPostgres, proxy: Proxy
) -> None:
    sock, offer = _raw_startup(proxy, pg)
    with sock:
        assert offer == codec.encode_authentication_sasl(["SCRAM-SHA-256"])
        sock.sendall(
            codec.encode_sasl_initial_response(
                "SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abcdefghijkl"
            )
        )
        answer = codec.parse_backend(codec.Message("E", _read_message(sock)[5:]))
        assert isinstance(answer, codec.ErrorResponse)
        assert answer.sqlstate == "28000" and "channel binding" in answer.message
        assert sock.recv(1) == b""  # then the proxy closes


def test_gssenc_request_is_answered_n(proxy: Proxy) -> None:
    with socket.create_connection((proxy.host, proxy.port), timeout=10 * SCALE) as sock:
        sock.sendall(codec.encode_gssenc_request())
        assert sock.recv(8) == b"N"


def test_hostile_clients_get_08p01_or_silence(proxy: Proxy) -> None:
    def send(blob: bytes) -> bytes:
        with socket.create_connection((proxy.host, proxy.port), timeout=10 * SCALE) as sock:
            sock.sendall(blob)
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            return out

    oversized = send(struct.pack("!I", 1 << 20))  # refused on the length, nothing more read
    error = codec.parse_backend(codec.Message("E", oversized[5:]))
    assert isinstance(error, codec.ErrorResponse) and error.sqlstate == "08P01"
    assert (
        codec.parse_backend(
            codec.Message("E", send(struct.pack("!II", 8, 2 << 16))[5:])  # protocol 2.0
        ).sqlstate
        == "0A000"
    )  # type: ignore[union-attr]
    assert send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03") == b""  # a ClientHello
    huge_password = codec.encode_startup_message({"user": "app", "database": "app"})
    huge_password += b"p" + struct.pack("!I", 10 << 20)  # announced, never sent
    answer = send(huge_password)
    assert answer.startswith(b"R")  # the server's SASL offer, then the refusal
    assert b"C08P01" in answer


# ---- upstream verification --------------------------------------------------------------------


def test_wrong_upstream_ca_is_refused_clearly(pg: ThrowawayPostgres, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_bytes(trustme.CA().cert_pem.bytes())
    proc, at = _start_cli(pg, "--upstream-ca", str(other), "--upstream-name", pg.host_name)
    try:
        result = _psql(pg, at, "select 1")
        assert result.returncode != 0
        assert "failed TLS verification: unable to get local issuer certificate" in result.stderr
        event = read_event(proc, "pg_connection")
        assert event["ended"] == "upstream_tls" and event["sqlstate"] == "08001"
    finally:
        stop(proc)


def test_wrong_upstream_name_is_refused(pg: ThrowawayPostgres) -> None:
    proc, at = _start_cli(pg, "--upstream-ca", str(pg.ca_path), "--upstream-name", "evil.test")
    try:
        with pytest.raises(
            psycopg.OperationalError, match=r"certificate is not valid for 'evil\.test'"
        ):
            _psycopg(pg, at)
    finally:
        stop(proc)


def test_system_roots_do_not_trust_a_private_ca(pg: ThrowawayPostgres) -> None:
    """Without --upstream-ca the system's roots apply: a private CA is not trusted."""
    proc, at = _start_cli(pg)
    try:
        with pytest.raises(psycopg.OperationalError, match="failed TLS verification"):
            _psycopg(pg, at)
    finally:
        stop(proc)


def test_upstream_insecure_warns_and_still_uses_tls(pg: ThrowawayPostgres) -> None:
    proc = burrow_cli(
        "pgproxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"127.0.0.1:{pg.port}",
        "--upstream-insecure",
        "--json",
    )
    try:
        warning = read_event(proc, "warning")
        assert "not verified" in warning["message"]
        ready = read_event(proc, "pgproxy_ready")
        assert ready["tls"] == "insecure"
        host, _, port = ready["listen"].rpartition(":")
        with _psycopg(pg, Proxy(host, int(port))) as conn:
            row = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
            assert row.fetchone() == (True,)
    finally:
        stop(proc)


# ---- the audit event (in-process serve_pg with an identity) -----------------------------------


def test_event_names_identity_user_bytes_and_end(pg: ThrowawayPostgres, inproc: InProcess) -> None:
    before = inproc.count()
    with _psycopg(pg, inproc) as conn:
        conn.execute("select repeat('z', 100000)").fetchone()
    event = inproc.wait_event(before + 1)
    assert event["identity"] == IDENTITY
    assert event["peer"].startswith("127.0.0.1:")
    assert (event["user"], event["database"]) == (pg.user, pg.dbname)
    assert event["kind"] == "session" and event["ended"] == "client_terminated"
    assert event["bytes_from_server"] > 100000 > event["bytes_from_client"] > 0
    assert event["auth"] == "SCRAM-SHA-256" and event["withheld"] == ["SCRAM-SHA-256-PLUS"]
    assert event["sqlstate"] is None and event["duration"] >= 0
    assert isinstance(event["backend_pid"], int)


def test_event_carries_the_servers_sqlstate(pg: ThrowawayPostgres, inproc: InProcess) -> None:
    """A backend terminated by an administrator: its FATAL 57P01 is read from the last bytes."""
    before = inproc.count()
    conn = _psycopg(pg, inproc)
    pid = conn.info.backend_pid
    with pg.superuser_connect() as admin:
        admin.execute("select pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        conn.execute("select 1")
    conn.close()
    event = inproc.wait_event(before + 1)
    assert event["ended"] == "server_closed" and event["sqlstate"] == "57P01"
    assert event["backend_pid"] == pid


def test_event_for_a_wrong_password(pg: ThrowawayPostgres, inproc: InProcess) -> None:
    before = inproc.count()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _psycopg(pg, inproc, password="not-the-password")
    event = inproc.wait_event(before + 1)
    assert event["ended"] == "server_error" and event["sqlstate"] == "28P01"


def test_event_for_a_refused_user(pg: ThrowawayPostgres, inproc: InProcess) -> None:
    before = inproc.count()
    with pytest.raises(psycopg.OperationalError, match="not allowed"):
        _psycopg(pg, inproc, user=OUTSIDER, password="eve-password")
    event = inproc.wait_event(before + 1)
    assert event["ended"] == "refused" and event["sqlstate"] == "28000"
    assert event["user"] == OUTSIDER and event["identity"] == IDENTITY


def test_cancel_events_and_unknown_keys(pg: ThrowawayPostgres, inproc: InProcess) -> None:
    before = inproc.count()
    with _psycopg(pg, inproc) as conn:
        # cancel_safe (libpq 17's API: SSLRequest first, polled from Python) rather than
        # cancel (PQcancel holds the GIL while it waits, and this proxy runs in-process).
        canceller = threading.Timer(0.3, conn.cancel_safe)
        canceller.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(30)")
        pid = conn.info.backend_pid
    events = [inproc.wait_event(before + 1), inproc.wait_event(before + 2)]
    cancel = next(e for e in events if e["kind"] == "cancel")
    assert cancel["ended"] == "cancel_forwarded" and cancel["backend_pid"] == pid
    # A key this proxy never issued is not passed on (no probing the database's keys).
    with socket.create_connection((inproc.host, inproc.port), timeout=10 * SCALE) as sock:
        sock.sendall(codec.encode_cancel_request(pid, b"\x00\x00\x00\x00"))
        assert sock.recv(1) == b""
    assert inproc.wait_event(before + 3)["ended"] == "cancel_unknown_key"


# ---- direct TLS (PostgreSQL 17's sslnegotiation=direct) ----------------------------------------


@contextlib.contextmanager
def _direct_tls_front(
    pg: ThrowawayPostgres, loop: LoopThread
) -> Iterator[tuple[int, Path, list[str]]]:
    """A stand-in for a PostgreSQL 17 listener: TLS from the first byte, refused without ALPN
    ``postgresql`` (as the server does), then the bytes go on to the real cluster over its
    own TLS. Yields (port, the front's CA file, what it saw)."""
    ca = trustme.CA()
    cert = ca.issue_cert(pg.host_name)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    server_ctx.set_alpn_protocols(["postgresql"])
    to_pg = ssl.create_default_context(cafile=str(pg.ca_path))
    seen: list[str] = []

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        seen.append(str(alpn))
        if alpn != "postgresql":
            writer.close()
            return
        sock = socket.create_connection(("127.0.0.1", pg.port))
        sock.sendall(codec.encode_ssl_request())
        assert sock.recv(1) == b"S"
        sock.setblocking(False)
        up_reader, up_writer = await asyncio.open_connection(
            sock=sock, ssl=to_pg, server_hostname=pg.host_name
        )
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def start() -> asyncio.Server:
        return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)

    server = loop.run(start())
    ca_file = Path(pg.tmpdir or "/tmp") / "front-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        yield server.sockets[0].getsockname()[1], ca_file, seen
    finally:
        server.close()


def test_direct_tls_upstream_with_alpn(pg: ThrowawayPostgres) -> None:
    loop = LoopThread()
    try:
        with _direct_tls_front(pg, loop) as (front_port, front_ca, seen):
            events = Events()
            upstream = PgUpstream.create(
                ("127.0.0.1", front_port), ca=front_ca, name=pg.host_name, direct_tls=True
            )
            server = PgProxyServer(upstream, PgPolicy(), on_event=events)
            host, port = loop.run(server.start("127.0.0.1", 0))
            try:
                with _psycopg(pg, Proxy(host, port)) as conn:
                    assert conn.execute("select 5").fetchone() == (5,)
                assert seen == ["postgresql"]
                # Without --direct-tls the proxy would send an SSLRequest in plaintext, which
                # a direct-TLS listener cannot take: the option is what makes this work.
                plain = PgProxyServer(
                    PgUpstream.create(("127.0.0.1", front_port), ca=front_ca, name=pg.host_name),
                    PgPolicy(),
                )
                host2, port2 = loop.run(plain.start("127.0.0.1", 0))
                with pytest.raises(psycopg.OperationalError):
                    _psycopg(pg, Proxy(host2, port2))
                loop.run(plain.close())
            finally:
                loop.run(server.close())
    finally:
        loop.stop()


# ---- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--upstream-ca", "/nonexistent/ca.pem"], "no such file"),
        (["--upstream-ca", "{ca}", "--upstream-insecure"], "contradict"),
        (["--listen", "127.0.0.1:99999"], "port must be"),
    ],
)
def test_cli_usage_errors_exit_2_in_one_line(
    pg: ThrowawayPostgres, args: list[str], text: str
) -> None:
    args = [a.replace("{ca}", str(pg.ca_path)) for a in args]
    proc = burrow_cli("pgproxy", "--upstream", f"127.0.0.1:{pg.port}", *args)
    _, err = proc.communicate(timeout=30 * SCALE)
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and text in err and "Traceback" not in err


def test_cli_warns_when_listening_beyond_loopback(pg: ThrowawayPostgres) -> None:
    proc = burrow_cli(
        "pgproxy", "--listen", "0.0.0.0:0", "--upstream", f"127.0.0.1:{pg.port}", "--json"
    )
    try:
        warning = read_event(proc, "warning")
        assert "plaintext" in warning["message"]
    finally:
        stop(proc)


def test_cli_human_lines(pg: ThrowawayPostgres) -> None:
    proc = burrow_cli(
        "pgproxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"127.0.0.1:{pg.port}",
        "--upstream-ca",
        str(pg.ca_path),
        "--upstream-name",
        pg.host_name,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("pgproxy listening on 127.0.0.1:")
        port = int(first.split()[3].rpartition(":")[2])
        with _psycopg(pg, Proxy("127.0.0.1", port)) as conn:
            conn.execute("select 1")
        line = proc.stdout.readline()
        assert f"user={pg.user} database={pg.dbname}" in line and "ended=client_terminated" in line
    finally:
        stop(proc)

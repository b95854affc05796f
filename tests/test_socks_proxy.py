"""``burrow socks``: a SOCKS5 and HTTP CONNECT proxy in front of a connector.

One relay with a token key; one agent offering an EXIT "vpc" (allow-list: MariaDB, Redis, a
local HTTP server and a closed port, all on 127.0.0.1), an exit "open" (0.0.0.0/0 and ::/0,
used only to show that cloud metadata addresses stay closed) and the local PostgreSQL as the
private service "pg"; a connector with ``ProxyServer`` listeners in-process, plus one run of the
real CLI. Real clients: PyMySQL and redis-py over python-socks, curl, and raw SOCKS5 / CONNECT
bytes where the exact reply code matters.

Every target is on 127.0.0.1. The metadata addresses are refused by the exit before any dial;
``test_metadata_addresses_are_refused`` checks the allow-list in-process first, so a broken
check fails the test without a packet leaving the machine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import os
import random
import secrets
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pymysql
import pytest
import redis
from python_socks import ProxyError
from python_socks.sync import Proxy

from burrow.allowlist import AllowList
from burrow.net.proxy_server import ProxyServer
from burrow.net.tls import TrustPolicy
from burrow.roles.agent import Agent, AgentConfig, ExitSpec, TcpTunnelSpec
from burrow.roles.connector import Connector, ConnectorConfig
from burrow.roles.relay import Relay
from burrow.tokens import TokenKey, mint
from helpers import SCALE, LoopThread, burrow_cli, free_port, read_event, relay_config, stop

pytestmark = pytest.mark.timeout(60)

MARIADB_PORT = 3306
REDIS_PORT = 6379
POSTGRES_PORT = 5432
SSL_REQUEST = struct.pack("!ii", 8, 80877103)  # 00000008 04d2162f
PRIVATE_NAME = "db.vpc.internal"  # resolves only at the exit (see _exit_only_resolver)
USER, PASSWORD = "alice", "s3cret"
BANNER = b"220 burrow-test banner: the server speaks first\r\n"

# Not strict: whether MariaDB's greeting beats the splice is a race (it is lost most runs,
# not all). test_server_first_greeting_arrives shows the bug deterministically.


def _require_service(port: int, what: str) -> None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
    except OSError as exc:
        pytest.fail(f"{what} is not answering on 127.0.0.1:{port} ({exc})")


# ---- a local HTTP server behind the exit ------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        body = self.body + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _http_server(body: bytes) -> Iterator[int]:
    handler = type("Handler", (_Handler,), {"body": body})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def _banner_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Greets first (like MySQL, SMTP, SSH), then echoes one line."""
    try:
        writer.write(BANNER)
        await writer.drain()
        line = await reader.readline()
        writer.write(b"echo " + line)
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


# ---- the world --------------------------------------------------------------------------------


@dataclass
class World:
    loop: LoopThread
    relay: Relay
    connector: Connector
    socks: int  # exit "vpc"
    http: int  # exit "vpc", HTTP CONNECT
    open_socks: int  # exit "open" (0.0.0.0/0, ::/0)
    open_http: int
    auth_socks: int  # exit "vpc", USER:PASSWORD required
    auth_http: int
    http_port: int  # the HTTP server behind the exit
    banner_port: int  # a server-first service behind the exit
    closed_port: int  # allowed, nothing listening
    body: bytes
    fingerprint: str
    control: str
    connect_token: str
    tmp: Path


@contextlib.asynccontextmanager
async def _started(role: Any) -> Any:
    await role.start()
    try:
        yield role
    finally:
        await role.close()


def _exit_only_resolver(loop: asyncio.AbstractEventLoop) -> None:
    """Make PRIVATE_NAME resolve (to 127.0.0.1) on the loop the exit runs on: a name only the
    exit's network knows. The connector never resolves anything, so this shows it is not."""
    original = loop.getaddrinfo

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.lower() == PRIVATE_NAME:
            host = "127.0.0.1"
        return await original(host, port, *args, **kwargs)

    loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("socks")
    key = TokenKey.load_or_create(tmp / "relay-state")
    now = time.time()
    expose_token = mint(key, ["vpc", "open", "pg"], [], 3600, now)
    # "ghost" may be reached but nothing offers it: no_such_tunnel rather than not_allowed.
    connect_token = mint(key, [], ["vpc", "open", "pg", "ghost"], 3600, now)
    body = b"through the exit " + secrets.token_hex(8).encode() + b" "
    closed_port = free_port()  # nothing listens here, but the exit may dial it
    loop = LoopThread()
    stack = contextlib.AsyncExitStack()
    with _http_server(body) as http_port:
        try:

            async def up() -> World:
                _exit_only_resolver(asyncio.get_running_loop())
                banner = await asyncio.start_server(_banner_handler, "127.0.0.1", 0)
                stack.callback(banner.close)
                banner_port = banner.sockets[0].getsockname()[1]
                relay = await stack.enter_async_context(_started(Relay(relay_config(tmp))))
                assert relay.control_address is not None and relay.fingerprint
                trust = TrustPolicy(fingerprint=relay.fingerprint)
                allow = (
                    f"127.0.0.1:{MARIADB_PORT},{REDIS_PORT},{http_port},{closed_port},{banner_port}"
                )
                agent = Agent(
                    AgentConfig(
                        relay=relay.control_address,
                        token=expose_token,
                        trust=trust,
                        tunnels=[
                            ExitSpec("vpc", AllowList.parse([allow])),
                            ExitSpec("open", AllowList.parse(["0.0.0.0/0", "::/0"])),
                            TcpTunnelSpec(
                                local=("127.0.0.1", POSTGRES_PORT), name="pg", private=True
                            ),
                        ],
                    )
                )
                await stack.enter_async_context(_started(agent))
                connector = Connector(
                    ConnectorConfig(relay=relay.control_address, token=connect_token, trust=trust)
                )
                await stack.enter_async_context(_started(connector))
                ports: dict[str, int] = {}
                for label, exit_name, credentials in (
                    ("", "vpc", None),
                    ("open_", "open", None),
                    ("auth_", "vpc", (USER, PASSWORD)),
                ):
                    server = ProxyServer(connector, exit_name=exit_name, credentials=credentials)
                    stack.callback(server.close)
                    for kind in ("socks", "http"):
                        ports[label + kind] = (await server.listen(kind, "127.0.0.1", 0))[1]
                host, port = relay.control_address
                return World(
                    loop=loop,
                    relay=relay,
                    connector=connector,
                    **ports,
                    http_port=http_port,
                    banner_port=banner_port,
                    closed_port=closed_port,
                    body=body,
                    fingerprint=relay.fingerprint,
                    control=f"{host}:{port}",
                    connect_token=connect_token,
                    tmp=tmp,
                )

            yield loop.run(up())
        finally:
            loop.run(stack.aclose())
            loop.stop()


# ---- raw SOCKS5 and CONNECT ---------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"EOF after {bytes(out)!r}, wanted {n} bytes")
        out += chunk
    return bytes(out)


def _address_bytes(host: str) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode("ascii")
        return b"\x03" + bytes([len(raw)]) + raw
    return (b"\x01" if ip.version == 4 else b"\x04") + ip.packed


@contextlib.contextmanager
def _socks_connect(port: int, host: str, dport: int) -> Iterator[tuple[int, socket.socket]]:
    """Greeting 05 01 00, then CONNECT: yields the REP byte and the socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=15 * SCALE) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert _recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00" + _address_bytes(host) + struct.pack("!H", dport))
        head = _recv_exact(sock, 4)
        assert head[0] == 5 and head[2] == 0, head
        atyp = head[3]
        length = {1: 4, 4: 16}.get(atyp)
        if length is None:
            assert atyp == 3, head
            length = _recv_exact(sock, 1)[0]
        _recv_exact(sock, length + 2)  # BND.ADDR, BND.PORT
        yield head[1], sock


def _socks_rep(port: int, host: str, dport: int) -> int:
    with _socks_connect(port, host, dport) as (rep, sock):
        if rep != 0:  # a failure reply is followed by the close
            assert sock.recv(1) == b""
        return rep


def _http_connect(
    port: int, target: str, headers: tuple[str, ...] = ()
) -> tuple[int, dict[str, str], socket.socket, bytes]:
    """CONNECT ``target``: (status, headers with lower-case names, socket, the bytes that
    came after the response head)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15 * SCALE)
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    head += "".join(f"{h}\r\n" for h in headers) + "\r\n"
    sock.sendall(head.encode())
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        assert len(data) < 16384
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    text = head.decode("latin-1")
    status_line, *lines = text.split("\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), fields, sock, rest


def _http_status(port: int, target: str, headers: tuple[str, ...] = ()) -> tuple[int, str]:
    status, fields, sock, _ = _http_connect(port, target, headers)
    sock.close()
    return status, fields.get("burrow-error", "")


def _get_over(sock: socket.socket, host: str) -> bytes:
    """A plain HTTP/1.0 GET on an open tunnel; the body."""
    sock.sendall(f"GET /x HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
        assert len(data) < 1 << 20
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return body


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(int(15 * SCALE)), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30 * SCALE,
        check=False,
    )


# ---- MariaDB and Redis through SOCKS5 ---------------------------------------------------------


def _mysql_over(sock: socket.socket) -> pymysql.connections.Connection:
    conn = pymysql.connect(
        user="root",
        password="",
        database="test",
        charset="utf8mb4",
        # Short: the server greets within milliseconds, and a lost greeting should fail fast.
        read_timeout=3 * SCALE,
        write_timeout=10 * SCALE,
        defer_connect=True,
    )
    conn.connect(sock)
    return conn


def _mysql_round_trip(conn: pymysql.connections.Connection) -> None:
    with conn.cursor() as cur:
        cur.execute(
            "create temporary table burrow_socks (id int primary key, v varchar(100), b blob)"
        )
        rng = random.Random(7)
        rows = [(i, f"row-{i}-ü-🦔", rng.randbytes(rng.randrange(0, 1500))) for i in range(300)]
        cur.executemany("insert into burrow_socks (id, v, b) values (%s, %s, %s)", rows)
        conn.commit()
        cur.execute("select id, v, b from burrow_socks order by id")
        assert [(i, v, bytes(b)) for i, v, b in cur.fetchall()] == rows
        cur.execute("select connection_id()")
        assert cur.fetchone()[0] > 0


def test_pymysql_through_socks_exit(world: World) -> None:
    _require_service(MARIADB_PORT, "MariaDB")
    proxy = Proxy.from_url(f"socks5://127.0.0.1:{world.socks}")
    sock = proxy.connect(dest_host="127.0.0.1", dest_port=MARIADB_PORT, timeout=15 * SCALE)
    conn = _mysql_over(sock)
    try:
        _mysql_round_trip(conn)
    finally:
        conn.close()


class SocksRedisConnection(redis.connection.Connection):
    """redis-py's Connection with its socket from a SOCKS5 proxy (python-socks)."""

    def __init__(self, *, proxy_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.proxy_url = proxy_url

    def _connect(self) -> socket.socket:
        sock = Proxy.from_url(self.proxy_url).connect(
            dest_host=self.host, dest_port=self.port, timeout=self.socket_connect_timeout
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.socket_timeout)
        return sock


def test_redis_through_socks_exit(world: World) -> None:
    _require_service(REDIS_PORT, "Redis")
    pool = redis.ConnectionPool(
        connection_class=SocksRedisConnection,
        proxy_url=f"socks5://127.0.0.1:{world.socks}",
        host="127.0.0.1",
        port=REDIS_PORT,
        socket_timeout=20,
        socket_connect_timeout=15,
    )
    client = redis.Redis(connection_pool=pool)
    direct = redis.Redis(host="127.0.0.1", port=REDIS_PORT, socket_timeout=10)
    prefix = f"burrow-socks:{secrets.token_hex(6)}:"
    keys = [f"{prefix}{i}" for i in range(500)]
    try:
        assert client.set(prefix + "one", b"\x00value\xff") is True
        assert client.get(prefix + "one") == b"\x00value\xff"
        assert direct.get(prefix + "one") == b"\x00value\xff"  # really stored on the server

        pipe = client.pipeline(transaction=False)
        for i, key in enumerate(keys):  # 1,000 commands in one pipeline
            pipe.set(key, str(i * i))
            pipe.get(key)
        results = pipe.execute()
        assert len(results) == 1000
        assert all(r is True for r in results[0::2])
        assert results[1::2] == [str(i * i).encode() for i in range(500)]
    finally:
        client.close()
        pool.disconnect()
        direct.delete(prefix + "one", *keys)
        direct.close()


# ---- private services by name ------------------------------------------------------------------


@pytest.mark.parametrize("target", ["pg", "pg.burrow", "PG.burrow"])
def test_private_service_by_name_through_socks(world: World, target: str) -> None:
    _require_service(POSTGRES_PORT, "PostgreSQL")
    with _socks_connect(world.socks, target, POSTGRES_PORT) as (rep, sock):
        assert rep == 0x00
        sock.sendall(SSL_REQUEST)
        assert _recv_exact(sock, 1) in (b"S", b"N")


def test_private_service_by_name_through_http_connect(world: World) -> None:
    _require_service(POSTGRES_PORT, "PostgreSQL")
    status, _, sock, _ = _http_connect(world.http, "pg.burrow:5432")
    with sock:
        assert status == 200
        sock.sendall(SSL_REQUEST)
        assert _recv_exact(sock, 1) in (b"S", b"N")


def test_unknown_private_service_is_host_unreachable(world: World) -> None:
    assert _socks_rep(world.socks, "ghost.burrow", 1) == 0x04
    status, error = _http_status(world.http, "ghost.burrow:1")
    assert status == 502 and error.startswith("no_such_tunnel:"), error


def test_service_outside_the_token_is_not_allowed(world: World) -> None:
    assert _socks_rep(world.socks, "nope.burrow", 1) == 0x02
    status, error = _http_status(world.http, "nope.burrow:1")
    assert status == 403 and error.startswith("not_allowed:"), error
    assert "'nope'" in error, error


# ---- server-first protocols -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["socks", "http"])
def test_server_first_greeting_arrives(world: World, kind: str) -> None:
    """The service writes before the client does; the greeting must reach the client."""
    target = f"127.0.0.1:{world.banner_port}"
    if kind == "socks":
        with _socks_connect(world.socks, "127.0.0.1", world.banner_port) as (rep, sock):
            assert rep == 0x00
            sock.settimeout(3 * SCALE)
            assert _recv_exact(sock, len(BANNER)) == BANNER
    else:
        status, _, sock, rest = _http_connect(world.http, target)
        with sock:
            assert status == 200
            sock.settimeout(3 * SCALE)
            assert rest + _recv_exact(sock, len(BANNER) - len(rest)) == BANNER


def test_server_first_greeting_through_a_channel(world: World) -> None:
    """The same service through an exit stream joined at once (no Channel, no splice): the
    greeting arrives, so the loss above is the proxy's, not the exit's."""

    async def open_channel() -> bytes:
        channel = world.connector.open_channel("vpc", f"127.0.0.1:{world.banner_port}")
        async with asyncio.timeout(10 * SCALE):
            await channel.wait_accepted()
            greeting = await channel.readexactly(len(BANNER))
            channel.write(b"hi\n")
            echoed = await channel.readline()
        channel.close()
        assert echoed == b"echo hi\n"
        return greeting

    assert world.loop.run(open_channel()) == BANNER


# ---- curl through the exit ----------------------------------------------------------------------


def test_curl_socks5_hostname_through_exit(world: World) -> None:
    url = f"http://127.0.0.1:{world.http_port}/socks"
    proc = _curl("--socks5-hostname", f"127.0.0.1:{world.socks}", url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.encode() == world.body + b"/socks"


def test_curl_http_connect_through_exit(world: World) -> None:
    url = f"http://127.0.0.1:{world.http_port}/connect"
    proc = _curl("--proxytunnel", "--proxy", f"http://127.0.0.1:{world.http}", url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.encode() == world.body + b"/connect"


# ---- the exit's allow-list -------------------------------------------------------------------


def test_allowed_port_connects(world: World) -> None:
    with _socks_connect(world.socks, "127.0.0.1", world.http_port) as (rep, sock):
        assert rep == 0x00
        assert _get_over(sock, "127.0.0.1") == world.body + b"/x"
    status, _, sock, _ = _http_connect(world.http, f"127.0.0.1:{world.http_port}")
    with sock:
        assert status == 200
        assert _get_over(sock, "127.0.0.1") == world.body + b"/x"


def test_port_not_in_the_allow_list_is_not_allowed(world: World) -> None:
    port = POSTGRES_PORT  # something listens there, but the exit may not dial it
    assert _socks_rep(world.socks, "127.0.0.1", port) == 0x02
    status, error = _http_status(world.http, f"127.0.0.1:{port}")
    assert status == 403
    assert error.startswith("not_allowed:") and "allow-list" in error, error


def test_closed_allowed_port_is_refused(world: World) -> None:
    assert _socks_rep(world.socks, "127.0.0.1", world.closed_port) == 0x05
    status, error = _http_status(world.http, f"127.0.0.1:{world.closed_port}")
    assert status == 502
    assert error.startswith("refused:") and "refused the connection" in error, error


def test_no_exit_configured_means_ip_targets_are_not_allowed(world: World) -> None:
    async def listen() -> tuple[ProxyServer, int]:
        server = ProxyServer(world.connector)  # no exit_name
        return server, (await server.listen("socks", "127.0.0.1", 0))[1]

    server, port = world.loop.run(listen())
    try:
        assert _socks_rep(port, "127.0.0.1", world.http_port) == 0x02
    finally:
        world.loop.loop.call_soon_threadsafe(server.close)


METADATA = [("169.254.169.254", "169.254.169.254:80"), ("fd00:ec2::254", "[fd00:ec2::254]:80")]


@pytest.mark.parametrize(("host", "target"), METADATA)
def test_metadata_addresses_are_refused(world: World, host: str, target: str) -> None:
    # First in-process: if the allow-list let this through, stop before sending anything.
    reason = AllowList.parse(["0.0.0.0/0", "::/0"]).check(host, 80)
    assert reason is not None and "metadata" in reason
    assert _socks_rep(world.open_socks, host, 80) == 0x02
    status, error = _http_status(world.open_http, target)
    assert status == 403
    assert error.startswith("not_allowed:") and "metadata" in error, error


def test_domain_name_is_resolved_at_the_exit(world: World) -> None:
    """PRIVATE_NAME resolves only where the exit runs; the proxy passes the name along."""
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo(PRIVATE_NAME, 80)  # not here: only in the exit's resolver
    with _socks_connect(world.socks, PRIVATE_NAME, world.http_port) as (rep, sock):
        assert rep == 0x00
        assert _get_over(sock, PRIVATE_NAME) == world.body + b"/x"
    url = f"http://{PRIVATE_NAME}:{world.http_port}/named"
    proc = _curl("--socks5-hostname", f"127.0.0.1:{world.socks}", url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.encode() == world.body + b"/named"
    # The name's addresses are checked too: a port not listed is still not allowed.
    assert _socks_rep(world.socks, PRIVATE_NAME, POSTGRES_PORT) == 0x02
    # And a name nobody resolves is host unreachable.
    assert _socks_rep(world.socks, "nowhere.invalid", world.http_port) == 0x04


def test_localhost_target_is_resolved_at_the_exit(world: World) -> None:
    with _socks_connect(world.socks, "localhost", world.http_port) as (rep, sock):
        assert rep == 0x00
        assert _get_over(sock, "localhost") == world.body + b"/x"


# ---- SOCKS username/password ---------------------------------------------------------------------


def test_socks_credentials_required(world: World) -> None:
    # No-auth only: the server has no acceptable method (05 FF) and closes.
    with socket.create_connection(("127.0.0.1", world.auth_socks), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert _recv_exact(sock, 2) == b"\x05\xff"
        assert sock.recv(1) == b""
    with pytest.raises(ProxyError):
        Proxy.from_url(f"socks5://127.0.0.1:{world.auth_socks}").connect(
            dest_host="127.0.0.1", dest_port=world.http_port, timeout=10
        )
    with pytest.raises(ProxyError):
        Proxy.from_url(f"socks5://{USER}:wrong@127.0.0.1:{world.auth_socks}").connect(
            dest_host="127.0.0.1", dest_port=world.http_port, timeout=10
        )
    # The right user and password: through to the HTTP server and to Redis.
    sock = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{world.auth_socks}").connect(
        dest_host="127.0.0.1", dest_port=world.http_port, timeout=15
    )
    with sock:
        assert _get_over(sock, "127.0.0.1") == world.body + b"/x"
    _require_service(REDIS_PORT, "Redis")
    sock = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{world.auth_socks}").connect(
        dest_host="127.0.0.1", dest_port=REDIS_PORT, timeout=15
    )
    with sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert _recv_exact(sock, 7) == b"+PONG\r\n"


def test_http_connect_credentials_required(world: World) -> None:
    target = f"127.0.0.1:{world.http_port}"
    status, _, sock, _ = _http_connect(world.auth_http, target)
    sock.close()
    assert status == 407
    bad = base64.b64encode(f"{USER}:wrong".encode()).decode()
    status, _, sock, _ = _http_connect(
        world.auth_http, target, (f"Proxy-Authorization: Basic {bad}",)
    )
    sock.close()
    assert status == 407
    good = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    status, _, sock, _ = _http_connect(
        world.auth_http, target, (f"Proxy-Authorization: Basic {good}",)
    )
    with sock:
        assert status == 200
        assert _get_over(sock, "127.0.0.1") == world.body + b"/x"


# ---- the CLI: burrow socks ----------------------------------------------------------------------


@contextlib.contextmanager
def _cli_socks(world: World) -> Iterator[tuple[int, int]]:
    """``burrow socks --exit vpc`` with a SOCKS5 and an HTTP CONNECT listener: their ports."""
    proc = burrow_cli(
        "socks",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--exit",
        "vpc",
        "--to",
        world.control,
        "--token",
        world.connect_token,
        "--fingerprint",
        world.fingerprint,
        "--state-dir",
        str(world.tmp / "cli-socks"),
        "--json",
    )
    try:
        first = read_event(proc, "tunnel_ready")
        second = read_event(proc, "tunnel_ready")
        local = {e["kind"]: str(e["local"]) for e in (first, second)}
        assert set(local) == {"socks", "http-connect"}
        yield (
            int(local["socks"].rpartition(":")[2]),
            int(local["http-connect"].rpartition(":")[2]),
        )
        assert proc.poll() is None
    finally:
        stop(proc)


def test_cli_socks_and_http_connect(world: World) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl must be on PATH")
    _require_service(REDIS_PORT, "Redis")
    with _cli_socks(world) as (socks_port, http_port):
        url = f"http://127.0.0.1:{world.http_port}/cli"
        curled = _curl("--socks5-hostname", f"127.0.0.1:{socks_port}", url)
        assert curled.returncode == 0, curled.stderr
        assert curled.stdout.encode() == world.body + b"/cli"
        curled = _curl("--proxytunnel", "--proxy", f"http://127.0.0.1:{http_port}", url)
        assert curled.returncode == 0, curled.stderr
        assert curled.stdout.encode() == world.body + b"/cli"

        client = redis.Redis(
            connection_pool=redis.ConnectionPool(
                connection_class=SocksRedisConnection,
                proxy_url=f"socks5://127.0.0.1:{socks_port}",
                host="127.0.0.1",
                port=REDIS_PORT,
                socket_timeout=20,
                socket_connect_timeout=15,
            )
        )
        key = f"burrow-socks-cli:{secrets.token_hex(6)}"
        try:
            assert client.set(key, b"cli", ex=60) is True
            assert client.get(key) == b"cli"
            assert client.delete(key) == 1
        finally:
            client.close()

        assert _socks_rep(socks_port, "127.0.0.1", world.closed_port) == 0x05
        assert _socks_rep(socks_port, "127.0.0.1", POSTGRES_PORT) == 0x02
        assert _socks_rep(socks_port, "pg", POSTGRES_PORT) == 0x00


def test_cli_pymysql_through_socks(world: World) -> None:
    _require_service(MARIADB_PORT, "MariaDB")
    with _cli_socks(world) as (socks_port, _):
        sock = Proxy.from_url(f"socks5://127.0.0.1:{socks_port}").connect(
            dest_host="127.0.0.1", dest_port=MARIADB_PORT, timeout=15
        )
        conn = _mysql_over(sock)
        try:
            _mysql_round_trip(conn)
        finally:
            conn.close()

"""Relay nodes of a cluster as processes, and the small servers and visitors the cluster tests
use. Each node listens on its own loopback address (127.0.0.1, .2, .3), as separate machines
would, so every node can listen on the same public port; they share Redis database 15.

A process's JSON events are read by a thread as they come (so a busy relay never blocks on a
full pipe) and waited for by name.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from helpers import SCALE, burrow_cli, stop

REDIS_URL = "redis://127.0.0.1:6379/15"
SECRET = "cluster-test-secret"
T = TypeVar("T")


def flush_redis(url: str = REDIS_URL) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


class Proc:
    """A ``burrow`` process run with ``--json``: its events, as they arrive."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.proc = burrow_cli(*args, env=env)
        self.events: list[dict[str, Any]] = []
        self.stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._cond = threading.Condition()
        for target in (self._read_stdout, self._read_stderr):
            threading.Thread(target=target, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip())

    def named(self, name: str, /, **match: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [
                e
                for e in self.events
                if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
            ]

    def wait(
        self, name: str, /, count: int = 1, timeout: float = 20.0, **match: Any
    ) -> dict[str, Any]:
        """The ``count``-th event ``name`` (with fields ``match``), waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout * SCALE
        with self._cond:
            while True:
                found = [
                    e
                    for e in self.events
                    if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
                ]
                if len(found) >= count:
                    return found[count - 1]
                remaining = deadline - time.monotonic()
                if self.proc.poll() is not None or remaining <= 0:
                    raise AssertionError(
                        f"no {name!r} event #{count} from `burrow {' '.join(self.args[:2])}` "
                        f"(exit {self.proc.poll()}); events: "
                        f"{[e.get('event') for e in self.events][-15:]}; stderr: "
                        f"{list(self.stderr)[-8:]}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop(self.proc)


class Node(Proc):
    """A relay node (``--node-id nINDEX`` on 127.0.0.INDEX): its addresses and fingerprint."""

    def __init__(
        self, index: int, state: Path, url: str, ports: tuple[int, int], extra: tuple[str, ...]
    ) -> None:
        host = f"127.0.0.{index}"
        super().__init__(
            "relay",
            "--listen",
            f"{host}:0",
            "--http-listen",
            f"{host}:0",
            "--registry",
            url,
            "--node-id",
            f"n{index}",
            "--secret",
            SECRET,
            "--state-dir",
            str(state),
            "--min-port",
            str(ports[0]),
            "--max-port",
            str(ports[1]),
            "--json",
            *extra,
        )
        self.index = index
        self.host = host
        self.control: tuple[str, int] = ("", 0)
        self.fingerprint = ""
        self.http: tuple[str, int] = ("", 0)

    @property
    def address(self) -> str:
        return f"{self.control[0]}:{self.control[1]}"


@contextlib.contextmanager
def cluster(
    tmp: Path, count: int = 3, url: str = REDIS_URL, extra: tuple[str, ...] = ()
) -> Iterator[list[Node]]:
    """``count`` relay processes sharing ``url`` and one token key, linked to each other."""
    from burrow.tokens import TokenKey

    states = [tmp / f"n{i}" for i in range(1, count + 1)]
    TokenKey.create(states[0])
    for state in states[1:]:
        state.mkdir(parents=True, exist_ok=True)
        shutil.copy(states[0] / "token.key", state / "token.key")
    base = random.randrange(42000, 58000, 1000)
    nodes = [Node(i, states[i - 1], url, (base, base + 999), extra) for i in range(1, count + 1)]
    try:
        for node in nodes:
            ready = node.wait("relay_ready", timeout=30)
            host, _, port = ready["control"].rpartition(":")
            node.control = (host, int(port))
            node.fingerprint = ready["fingerprint"]
            http_host, _, http_port = node.wait("http_ready")["listen"].rpartition(":")
            node.http = (http_host, int(http_port))
        for node in nodes:
            for peer in nodes:
                if peer is not node:
                    node.wait("node_link_up", node=f"n{peer.index}")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def agent_up(tmp: Path, nodes: list[Node], tunnels: str, name: str = "agent") -> Proc:
    """``burrow up`` with ``tunnels`` (TOML tables), given every node (``--to n1,n2,n3``)."""
    config = tmp / f"{name}.toml"
    config.write_text(tunnels)
    relays = ",".join(node.address for node in nodes)
    return Proc(
        "up",
        "-c",
        str(config),
        "--to",
        relays,
        "--secret",
        SECRET,
        "--state-dir",
        str(tmp / f"{name}-state"),
        "--json",
    )


def connector(node: Node, service: str) -> tuple[Proc, tuple[str, int]]:
    """``burrow connect SERVICE`` through ``node``; its local address."""
    proc = Proc("connect", service, "--to", node.address, "--secret", SECRET, "--json")
    try:
        local = proc.wait("tunnel_ready", kind="connect")["local"]
    except BaseException:
        proc.stop()
        raise
    host, _, port = local.rpartition(":")
    return proc, (host, int(port))


# --- local servers --------------------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        with contextlib.suppress(OSError):
            while data := sock.recv(256 * 1024):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)


class _Download(socketserver.BaseRequestHandler):
    """Sends ``server.payload`` in paced chunks, so a transfer lasts a few seconds."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        payload: bytes = self.server.payload  # type: ignore[attr-defined]
        chunk = 128 * 1024
        with contextlib.suppress(OSError):
            for start in range(0, len(payload), chunk):
                sock.sendall(payload[start : start + chunk])
                time.sleep(0.03)
            sock.shutdown(socket.SHUT_WR)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextlib.contextmanager
def tcp_server(handler: type[socketserver.BaseRequestHandler], **attrs: Any) -> Iterator[int]:
    server = _Server(("127.0.0.1", 0), handler)
    for name, value in attrs.items():
        setattr(server, name, value)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def echo_server() -> contextlib.AbstractContextManager[int]:
    return tcp_server(_Echo)


def download_server(payload: bytes) -> contextlib.AbstractContextManager[int]:
    return tcp_server(_Download, payload=payload)


@contextlib.contextmanager
def http_server(body: bytes) -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


# --- visitors -------------------------------------------------------------------------------


def echo_through(address: tuple[str, int], size: int = 512 * 1024) -> None:
    """Send ``size`` random bytes to an echo service at ``address``; the same must come back."""
    payload = os.urandom(size)

    def send(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # a refused visitor: the reader sees it too
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

    with socket.create_connection(address, timeout=10 * SCALE) as sock:
        sender = threading.Thread(target=send, args=(sock,))
        sender.start()
        received = bytearray()
        while chunk := sock.recv(256 * 1024):
            received += chunk
        sender.join(10 * SCALE)
    assert bytes(received) == payload, f"{len(received)} of {len(payload)} bytes came back"


def get_through(address: tuple[str, int], name: str) -> bytes:
    """GET / for ``NAME.localhost`` from an HTTP listener; the body, if the status is 200."""
    conn = http.client.HTTPConnection(*address, timeout=10 * SCALE)
    try:
        conn.request("GET", "/", headers={"Host": f"{name}.localhost"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 200, f"{response.status}: {body[:200]!r}"
    return body


def eventually(check: Callable[[], T], deadline: float) -> T:
    """``check()``'s result once it stops failing (a route being set up), up to ``deadline``
    (``time.monotonic()``); its last failure after that."""
    while True:
        try:
            return check()
        except (OSError, AssertionError, http.client.HTTPException):
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.1)


@dataclass
class Download:
    """A download through a tunnel, in a thread: every byte must arrive, in order."""

    address: tuple[str, int]
    expected: bytes
    received: bytearray = field(default_factory=bytearray)
    error: BaseException | None = None
    started: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        try:
            with socket.create_connection(self.address, timeout=30 * SCALE) as sock:
                sock.shutdown(socket.SHUT_WR)
                while chunk := sock.recv(256 * 1024):
                    self.received += chunk
                    if len(self.received) >= 512 * 1024:
                        self.started.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()


def wait_exit(proc: subprocess.Popen[str], timeout: float) -> int:
    return proc.wait(timeout * SCALE)

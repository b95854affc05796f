"""What the serverless relay's tests share: a local web app with the routes they ask for, an
asyncio visitor (so a thousand requests need no thousand threads), agents on the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import threading
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from burrow.aws.serverless.agent import ServerlessAgent, ServerlessConfig
from burrow.aws.serverless.emulator import Emulator
from burrow.kinds import http_service
from burrow.tokens import TokenKey, mint


def payload(n: int, kind: str = "bin", seed: int = 7) -> bytes:
    """``n`` deterministic bytes: any byte value (bin) or printable ASCII lines (text)."""
    rng = random.Random(seed)
    if kind == "text":
        line = bytes(rng.choice(b'abcdefghijklmnopqrstuvwxyz0123456789 "\\') for _ in range(99))
        line += b"\n"
        return (line * (n // len(line) + 1))[:n]
    return rng.randbytes(n)


class App(BaseHTTPRequestHandler):
    """The local service behind the tunnels."""

    protocol_version = "HTTP/1.1"
    arrived: threading.Event = threading.Event()
    release: threading.Event = threading.Event()

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        if path == "/bytes":
            data = payload(int(query["n"]), query.get("kind", "bin"), int(query.get("seed", 7)))
            kind = (
                "text/plain; charset=utf-8"
                if query.get("kind") == "text"
                else ("application/octet-stream")
            )
            self._send(
                200, data, [("Content-Type", kind), ("X-Sha256", hashlib.sha256(data).hexdigest())]
            )
        elif path == "/chunked":
            pieces = int(query.get("pieces", "20"))
            size = int(query.get("size", "50000"))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            digest = hashlib.sha256()
            for i in range(pieces):
                chunk = payload(size, seed=i)
                digest.update(chunk)
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/cookies":
            self._send(
                200,
                b"cookies",
                [
                    ("Content-Type", "text/plain"),
                    ("Set-Cookie", "a=1; Path=/; HttpOnly"),
                    ("Set-Cookie", "b=2; Path=/; Secure"),
                    ("X-Multi", "one"),
                    ("X-Multi", "two"),
                ],
            )
        elif path == "/slow":
            time.sleep(float(query.get("s", "1")))
            self._send(200, b"slow", [("Content-Type", "text/plain")])
        elif path == "/hang":
            App.arrived.set()
            App.release.wait(30)
            self._send(200, b"late", [("Content-Type", "text/plain")])
        else:
            self._echo(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if self.path.startswith("/mirror"):
            self._send(200, body, [("Content-Type", self.headers.get("Content-Type", ""))])
            return
        self._echo(body)

    def _echo(self, body: bytes) -> None:
        report = {
            "method": self.command,
            "path": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        self._send(200, json.dumps(report).encode(), [("Content-Type", "application/json")])


@contextlib.contextmanager
def local_app() -> Any:
    server = ThreadingHTTPServer(("127.0.0.1", 0), App)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def token(emulator: Emulator, expose: list[str], ttl: int = 3600) -> str:
    return mint(TokenKey.load(emulator.state_dir), expose, [], ttl, time.time())


@contextlib.asynccontextmanager
async def running_agent(
    emulator: Emulator,
    port: int,
    name: str | None,
    *,
    events: Any = None,
    token_text: str | None = None,
    **options: Any,
) -> AsyncIterator[ServerlessAgent]:
    spec = http_service(str(port), name=name, **options.pop("http", {}))
    config = ServerlessConfig(
        url=emulator.ws_url,
        token=token_text or token(emulator, [name or "*"]),
        services=[spec],
        **options,
    )
    agent = ServerlessAgent(config, on_event=events)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.close()


class Answer:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


async def visit(
    url: str,
    method: str = "GET",
    path: str = "/",
    *,
    host: str | None = None,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    timeout: float = 60.0,
) -> Answer:
    """One HTTP/1.1 request on its own connection (asyncio, Content-Length bodies only)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host or parts.netloc}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers or []]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ")[1])
            answer_headers = [
                (k.strip(), v.strip())
                for k, _, v in (line.partition(":") for line in header_lines if line)
            ]
            length = next(
                (int(v) for k, v in answer_headers if k.lower() == "content-length"), None
            )
            if method == "HEAD":
                data = b""
            elif length is not None:
                data = await reader.readexactly(length)
            else:
                data = await reader.read()
        return Answer(status, answer_headers, data)
    finally:
        writer.close()


async def follow(answer: Answer) -> Answer:
    """Follow a 307 to S3 (a presigned GET)."""
    assert answer.status == 307, (answer.status, answer.body[:300])
    location = answer.header("location")
    assert location is not None
    parts = urlsplit(location)
    return await visit(
        f"{parts.scheme}://{parts.netloc}",
        "GET",
        parts.path + ("?" + parts.query if parts.query else ""),
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_state(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


class EmulatorProcess:
    """``burrow serverless emulate`` in its own process (its own core and GIL), for load:
    the same ``ws_url``/``http_url``/``state_dir`` as an ``Emulator``, and ``stats()``."""

    def __init__(self, state_dir: Path, *extra: str) -> None:
        self.state_dir = state_dir
        self.extra = extra
        self.proc: Any = None
        self.ws_url = self.http_url = self.management_url = ""

    def __enter__(self) -> EmulatorProcess:
        from helpers import burrow_cli, read_event

        self.proc = burrow_cli(
            "serverless",
            "emulate",
            "--ws-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--state-dir",
            str(self.state_dir),
            "--json",
            *self.extra,
        )
        ready = read_event(self.proc, "emulator_ready", timeout=60)
        self.ws_url, self.http_url = ready["ws"], ready["http"]
        self.management_url = ready["manage"]
        return self

    def __exit__(self, *exc: object) -> None:
        from helpers import stop

        stop(self.proc)

    def stats(self) -> dict[str, int]:
        import urllib.request

        base = self.management_url.rsplit("/", 1)[0]
        with urllib.request.urlopen(f"{base}/_emulator/stats", timeout=10) as answer:
            return dict(json.loads(answer.read()))

"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_commands() -> None:
    first = re.search(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    assert first is not None
    lines = [line.split("#")[0].strip() for line in first.group(1).splitlines() if line.strip()]
    assert lines == ["bash scripts/burrow tcp 5432", "bash scripts/test"]


@pytest.mark.timeout(60)
def test_webhook_example_runs() -> None:
    [block] = [b for b in _python_blocks() if "def test_webhook_reaches_the_app" in b]
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    test = namespace["test_webhook_reaches_the_app"]
    assert callable(test)
    test()


def _block(language: str, containing: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)
    [block] = [b for b in blocks if containing in b]
    return str(block)


@pytest.mark.timeout(90)
def test_relay_and_agent_example_runs(tmp_path: Path) -> None:
    """The first tour: a relay with a secret, an agent next to PostgreSQL, psql through it."""
    import subprocess

    from helpers import SCALE, free_port
    from test_cli import Cli

    relay_line = _block("sh", "burrow relay --listen").splitlines()[0]
    agent_block = _block("sh", "burrow tcp 5432 --to relay.example.com")
    agent_line = agent_block.splitlines()[0]
    psql_line = next(line for line in agent_block.splitlines() if line.startswith("psql"))
    port = free_port()
    secret = "readme-secret"

    def words(line: str, **values: str) -> list[str]:
        line = line.replace("0.0.0.0:7835", f"127.0.0.1:{port}")  # loopback only, in a test
        line = line.replace("relay.example.com", f"127.0.0.1:{port}")
        for name, value in values.items():
            line = line.replace(name, value)
        return [w.strip('"') for w in line.split("#")[0].split()][1:]  # without "burrow"

    relay = Cli(
        *words(relay_line, **{"$SECRET": secret}), "--state-dir", str(tmp_path / "r"), "--json"
    )
    try:
        fingerprint = relay.event("relay_ready")["fingerprint"]
        agent = Cli(
            *words(agent_line, **{"$SECRET": secret, "sha256:3b0f...": fingerprint}),
            "--state-dir",
            str(tmp_path / "a"),
            "--json",
        )
        try:
            public = agent.event("tunnel_ready")["public"]
            public_port = public.rpartition(":")[2]
            assert 20000 <= int(public_port) <= 30000  # the range the README's relay names
            dsn = psql_line.split('"')[1]
            dsn = dsn.replace("relay.example.com", "127.0.0.1").replace("24817", public_port)
            dsn = dsn.replace("user=app dbname=app", "user=postgres dbname=test")
            out = subprocess.run(
                ["psql", dsn, "-Atc", "select 40 + 2"],
                capture_output=True,
                text=True,
                timeout=30 * SCALE,
            )
            assert out.stdout.strip() == "42", out.stderr
        finally:
            agent.stop()
    finally:
        relay.stop()


@pytest.mark.timeout(90)
def test_config_file_example_runs(tmp_path: Path) -> None:
    """The burrow.toml of the README, with the relay and the local ports of this machine."""
    import socket
    import threading
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import psycopg
    import redis

    from helpers import free_port
    from test_cli import Cli

    class Shop(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"shop")

        def log_message(self, *args: object) -> None:
            pass

    shop = ThreadingHTTPServer(("127.0.0.1", 0), Shop)
    threading.Thread(target=shop.serve_forever, daemon=True).start()
    port, secret = free_port(), "readme-secret"
    relay = Cli(
        "relay", "--listen", f"127.0.0.1:{port}", "--secret", secret, "--http-listen",
        "127.0.0.1:0", "--state-dir", str(tmp_path / "r"), "--json",
    )  # fmt: skip
    try:
        ready = relay.event("relay_ready")
        [http_ready] = [e for e in relay.events if e["event"] == "http_ready"]
        http_port = http_ready["listen"].rpartition(":")[2]
        text = _block("toml", "[[tunnel]]")
        text = text.replace("relay.example.com:7835", f"127.0.0.1:{port}")
        text = text.replace("sha256:3b0f...", ready["fingerprint"])
        text = text.replace('local = "3000"', f'local = "{shop.server_address[1]}"')
        config = tmp_path / "burrow.toml"
        config.write_text(text)
        command = _block("sh", "burrow up -c burrow.toml").splitlines()[0]
        args = command.split("#")[0].replace('"$SECRET"', secret).split()[1:]
        agent = Cli(*args[:2], str(config), *args[3:], "--json", "--state-dir", str(tmp_path / "a"))
        try:
            ready_events = {}
            for _ in range(3):
                event = agent.event("tunnel_ready")
                ready_events[event["name"]] = event
            assert set(ready_events) == {"db", "cache", "shop"}
            assert ready_events["db"]["public"].endswith(":25432")
            with psycopg.connect(
                host="127.0.0.1", port=25432, user="postgres", dbname="test", connect_timeout=10
            ) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
            cache_port = int(ready_events["cache"]["public"].rpartition(":")[2])
            assert redis.Redis(host="127.0.0.1", port=cache_port, socket_timeout=10).ping()
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/",
                headers={"Host": f"shop.localhost:{http_port}", "Authorization": "Basic "
                         + __import__("base64").b64encode(b"alice:s3cret").decode()},
            )  # fmt: skip
            assert urllib.request.urlopen(request, timeout=10).read() == b"shop"
            with socket.create_connection(("127.0.0.1", int(http_port)), timeout=10) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: shop.localhost\r\nConnection: close\r\n\r\n")
                assert sock.recv(64).startswith(b"HTTP/1.1 401")  # basic auth as the file says
        finally:
            agent.stop()
    finally:
        relay.stop()
        shop.shutdown()

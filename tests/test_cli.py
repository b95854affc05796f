"""The real ``burrow`` command in subprocesses: relay, tcp, up, trust on first use, secrets,
the embedded relay, PROXY protocol and signals. Every process talks to 127.0.0.1 only and is
stopped in a ``finally`` (helpers.stop)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from burrow.wire import proxyproto
from helpers import SCALE, burrow_cli, free_port, read_event, stop

# --- helpers -------------------------------------------------------------------------------


class Cli:
    """A ``burrow`` subprocess whose stdout JSON lines are pumped by a thread.

    helpers.read_event is not used for processes that print several events: it selects on
    the pipe but reads through a buffered text wrapper, so lines that arrived together sit in
    the buffer while select() waits for more (see test_read_event_sees_buffered_lines).
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.proc = burrow_cli(*args, env=env)
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self._lines.put(line)
        except (OSError, ValueError):
            pass
        finally:
            self._lines.put(None)

    def _next(self, timeout: float) -> dict[str, Any] | None:
        line = self._lines.get(timeout=max(0.0, timeout))
        if line is None:
            self._lines.put(None)  # stay at the end
            return None
        event = dict(json.loads(line))
        self.events.append(event)
        return event

    def event(self, name: str, timeout: float = 15.0) -> dict[str, Any]:
        """The next event called ``name``; an ``error`` event or the end of output fails."""
        deadline = time.monotonic() + timeout * SCALE
        while True:
            try:
                event = self._next(deadline - time.monotonic())
            except queue.Empty:
                raise TimeoutError(
                    f"no {name!r} event within {timeout} s from burrow {' '.join(self.args)}; "
                    f"saw {self.events}"
                ) from None
            if event is None:
                raise AssertionError(f"burrow ended before {name!r}: {self.stderr_text()}")
            if event["event"] == name:
                return event
            if event["event"] == "error":
                raise AssertionError(f"error event before {name!r}: {event}")

    def finish(self, timeout: float = 15.0) -> tuple[int, list[dict[str, Any]], str]:
        """Wait for the process to end: (exit code, every event, stderr)."""
        code = self.proc.wait(timeout * SCALE)
        self._pump.join(5)
        with contextlib.suppress(queue.Empty):
            while self._next(0) is not None:
                pass
        return code, self.events, self.stderr_text()

    def stderr_text(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        try:
            return self.proc.stderr.read()
        except (OSError, ValueError):
            return ""

    def stop(self) -> None:
        stop(self.proc)


@contextlib.contextmanager
def cli(*args: str, env: dict[str, str] | None = None) -> Iterator[Cli]:
    process = Cli(*args, env=env)
    try:
        yield process
    finally:
        process.stop()


@contextlib.contextmanager
def relay(
    tmp_path: Path, *extra: str, state: str = "relay", port: int | None = None
) -> Iterator[tuple[Cli, dict[str, Any]]]:
    """``burrow relay --json`` on 127.0.0.1; yields the process and its relay_ready event."""
    for attempt in range(3):
        listen = port or free_port()
        process = Cli(
            "relay",
            "--listen",
            f"127.0.0.1:{listen}",
            "--state-dir",
            str(tmp_path / state),
            "--json",
            *extra,
        )
        try:
            ready = process.event("relay_ready")
        except AssertionError as exc:
            process.stop()
            if port is None and "already in use" in str(exc) and attempt < 2:
                continue  # free_port() raced with another process
            raise
        except BaseException:
            process.stop()
            raise
        try:
            yield process, ready
        finally:
            process.stop()
        return


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    """Run ``burrow`` to completion (bounded); returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "burrow.cli", *args],
        capture_output=True,
        text=True,
        timeout=30 * SCALE,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("burrow: error: "), stderr
    return lines[0]


def error_line(stderr: str) -> str:
    """The one ``burrow: error:`` line, tolerating other noise on stderr (see
    test_certificate_mismatch_error_is_one_line for the noise there is)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("burrow: error: ")]
    assert len(errors) == 1, stderr
    assert stderr.lstrip().startswith(errors[0]), stderr
    return errors[0]


def run_to_end(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[Any], str]:
    """Run a ``burrow`` that is expected to end by itself: (exit code, events, stderr)."""
    process = Cli(*args, env=env)
    try:
        return process.finish()
    finally:
        process.stop()


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


@contextlib.contextmanager
def tcp_service(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A threaded TCP service on 127.0.0.1; yields its port."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.settimeout(10 * SCALE)
            with contextlib.suppress(OSError):
                handle(self.request)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def echo(sock: socket.socket, prefix: bytes = b"") -> None:
    if prefix:
        sock.sendall(prefix)
    while data := sock.recv(65536):
        sock.sendall(data)


def roundtrip(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data``, shut down the write side, and read everything until EOF."""
    with socket.create_connection(address, timeout=10 * SCALE) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def known_relays_file() -> Path:
    return Path(os.environ["BURROW_HOME"]) / "known_relays"


# --- harness and CLI bugs shown by tests -------------------------------------------------


def test_read_event_sees_buffered_lines() -> None:
    script = (
        "import sys, time; "
        'sys.stdout.write(\'{"event": "a"}\\n{"event": "b"}\\n\'); sys.stdout.flush(); '
        "time.sleep(5)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(0.3)
        assert read_event(proc, "a", timeout=3)["event"] == "a"
        assert read_event(proc, "b", timeout=1)["event"] == "b"
    finally:
        stop(proc)


def test_relay_listen_on_any_port(tmp_path: Path) -> None:
    with cli(
        "relay", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "relay"), "--json"
    ) as process:
        ready = process.event("relay_ready", timeout=10)
        host, port = split_address(ready["control"])
        assert host == "127.0.0.1"
        assert port != 0
        assert ready["fingerprint"].startswith("sha256:")


# --- relay ---------------------------------------------------------------------------------


def test_relay_ready_and_stable_fingerprint(tmp_path: Path) -> None:
    with relay(tmp_path) as (_, ready):
        assert ready["event"] == "relay_ready"
        assert ready["control"].startswith("127.0.0.1:")
        assert ready["tls"] is True
        fingerprint = ready["fingerprint"]
        assert fingerprint.startswith("sha256:")
        assert len(fingerprint) == len("sha256:") + 64
    assert (tmp_path / "relay").is_dir()
    with relay(tmp_path) as (_, again):
        assert again["fingerprint"] == fingerprint
    with relay(tmp_path, state="other") as (_, other):
        assert other["fingerprint"] != fingerprint


def test_relay_control_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "relay", "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "relay")
        )
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert "already in use" in line
    assert f"127.0.0.1:{port}" in line


def test_relay_admin_endpoint(tmp_path: Path) -> None:
    admin_port = free_port()
    with relay(tmp_path, "--admin", f"127.0.0.1:{admin_port}") as (_, ready):
        assert ready["admin"] == f"127.0.0.1:{admin_port}"
        base = f"http://127.0.0.1:{admin_port}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=5 * SCALE) as response:
            assert response.status == 200
            health = json.loads(response.read())
        assert health["status"] == "ok"
        assert health["sessions"] == 0
        with urllib.request.urlopen(f"{base}/metrics", timeout=5 * SCALE) as response:
            assert response.status == 200
            metrics = response.read().decode()
        assert "burrow_sessions" in metrics


# --- tcp -----------------------------------------------------------------------------------


def test_tcp_with_flags(tmp_path: Path) -> None:
    with relay(tmp_path) as (_, ready), tcp_service(echo) as local_port:
        pin = ready["fingerprint"]
        with cli(
            "tcp", str(local_port), "--to", ready["control"], "--fingerprint", pin, "--json"
        ) as agent:
            tunnel = agent.event("tunnel_ready")
            assert tunnel["kind"] == "tcp"
            assert tunnel["local"] == f"127.0.0.1:{local_port}"
            host, port = split_address(tunnel["public"])
            assert host == "127.0.0.1"
            payload = os.urandom(200_000)
            assert roundtrip((host, port), payload) == payload
            assert roundtrip((host, port), b"again") == b"again"


def test_tcp_with_environment(tmp_path: Path) -> None:
    with (
        relay(tmp_path, "--secret", "s3cret") as (relay_process, ready),
        tcp_service(echo) as local,
    ):
        env = {
            "BURROW_RELAY": ready["control"],
            "BURROW_FINGERPRINT": ready["fingerprint"],
            "BURROW_SECRET": "s3cret",
        }
        with cli("tcp", str(local), "--json", env=env) as agent:
            tunnel = agent.event("tunnel_ready")
            assert tunnel["local"] == f"127.0.0.1:{local}"
            assert roundtrip(split_address(tunnel["public"]), b"from the environment") == (
                b"from the environment"
            )
            relay_process.event("session_opened")


def test_trust_on_first_use(tmp_path: Path) -> None:
    port = free_port()
    with tcp_service(echo) as local:
        with relay(tmp_path, port=port) as (_, first):
            with cli("tcp", str(local), "--to", first["control"], "--json") as agent:
                warning = agent.event("warning")
                assert "first use" in warning["message"]
                assert first["fingerprint"] in warning["message"]
                tunnel = agent.event("tunnel_ready")
                assert roundtrip(split_address(tunnel["public"]), b"tofu") == b"tofu"
            lines = known_relays_file().read_text().splitlines()
            assert f"127.0.0.1:{port} {first['fingerprint']}" in lines

            # The same relay again: trusted silently.
            with cli("tcp", str(local), "--to", first["control"], "--json") as agent:
                agent.event("tunnel_ready")
                assert not [e for e in agent.events if e["event"] == "warning"]

        # A new certificate on the same address: refused with a one-line error.
        with relay(tmp_path, state="new-state", port=port) as (_, second):
            assert second["fingerprint"] != first["fingerprint"]
            code, events, stderr = run_to_end(
                "tcp", str(local), "--to", second["control"], "--json"
            )
            assert code != 0
            line = error_line(stderr)
            assert "known_relays" in line
            assert second["fingerprint"] in line
            assert first["fingerprint"] in line
            assert [e["message"] for e in events if e["event"] == "error"] == [
                line.removeprefix("burrow: error: ")
            ]
            assert not [e for e in events if e["event"] == "tunnel_ready"]
            # known_relays still holds the first fingerprint only.
            assert second["fingerprint"] not in known_relays_file().read_text()

            # A wrong pin: refused with a one-line error.
            wrong = "sha256:" + "0" * 64
            code, _, stderr = run_to_end(
                "tcp", str(local), "--to", second["control"], "--fingerprint", wrong
            )
            assert code != 0
            line = error_line(stderr)
            assert "--fingerprint" in line
            assert second["fingerprint"] in line
            assert wrong in line


def test_certificate_mismatch_error_is_one_line(tmp_path: Path) -> None:
    with relay(tmp_path) as (_, ready):
        wrong = "sha256:" + "1" * 64
        code, _, stderr = run_to_end(
            "tcp", "5432", "--to", ready["control"], "--fingerprint", wrong
        )
    assert code == 1
    line = one_error_line(stderr)
    assert "--fingerprint" in line


def test_wrong_secret_told_on_both_sides(tmp_path: Path) -> None:
    with relay(tmp_path, "--secret", "right") as (relay_process, ready):
        code, events, stderr = run_to_end(
            "tcp",
            "5432",
            "--to",
            ready["control"],
            "--fingerprint",
            ready["fingerprint"],
            "--secret",
            "wrong",
            "--json",
        )
        assert code != 0
        line = one_error_line(stderr)
        errors = [e for e in events if e["event"] == "error"]
        assert len(errors) == 1
        assert set(errors[0]) == {"event", "message"}
        assert line == f"burrow: error: {errors[0]['message']}"
        assert "secret" in line
        refused = relay_process.event("session_refused", timeout=5)
        assert "secret" in refused["reason"]


PSQL = ("psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test")


def test_embedded_relay_with_psql(tmp_path: Path) -> None:
    if shutil.which("psql") is None:
        pytest.skip("psql is not installed")
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    with cli("tcp", "5432", "--json") as agent:
        tunnel = agent.event("tunnel_ready")
        host, port = split_address(tunnel["public"])
        assert host == "127.0.0.1"
        assert tunnel["local"] == "127.0.0.1:5432"
        result = subprocess.run(
            [*PSQL, "-p", str(port), "-c", "select 1"],
            capture_output=True,
            text=True,
            timeout=20 * SCALE,
            env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
        )
        assert result.returncode == 0, result.stderr
        assert "1" in [line.strip() for line in result.stdout.splitlines()], result.stdout


# --- up ------------------------------------------------------------------------------------


def test_up_two_tunnels(tmp_path: Path) -> None:
    with (
        relay(tmp_path) as (_, ready),
        tcp_service(lambda s: echo(s, b"one:")) as first,
        tcp_service(lambda s: echo(s, b"two:")) as second,
    ):
        config = tmp_path / "burrow.toml"
        config.write_text(
            f'relay = "{ready["control"]}"\n'
            f'fingerprint = "{ready["fingerprint"]}"\n'
            "\n[[tunnel]]\n"
            f'local = "{first}"\n'
            "\n[[tunnel]]\n"
            f'local = "127.0.0.1:{second}"\n'
        )
        with cli("up", "-c", str(config), "--json") as agent:
            tunnels = [agent.event("tunnel_ready"), agent.event("tunnel_ready")]
            by_local = {t["local"]: split_address(t["public"]) for t in tunnels}
            assert set(by_local) == {f"127.0.0.1:{first}", f"127.0.0.1:{second}"}
            assert by_local[f"127.0.0.1:{first}"] != by_local[f"127.0.0.1:{second}"]
            assert roundtrip(by_local[f"127.0.0.1:{first}"], b"x") == b"one:x"
            assert roundtrip(by_local[f"127.0.0.1:{second}"], b"y") == b"two:y"


def test_up_config_with_a_typo(tmp_path: Path) -> None:
    config = tmp_path / "burrow.toml"
    config.write_text('relay = "127.0.0.1:7835"\n\n[[tunnel]]\nlocal = "5432"\nprot = 6000\n')
    result = run_cli("up", "-c", str(config))
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert str(config) in line
    assert "prot" in line
    assert "unknown key" in line


# --- PROXY protocol ------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol(tmp_path: Path, version: str) -> None:
    seen: queue.Queue[tuple[proxyproto.ProxyHeader, bytes]] = queue.Queue()

    def service(sock: socket.socket) -> None:
        buffer = b""
        header = None
        for _ in range(100):  # bounded: a header is at most a few hundred bytes
            header, used = proxyproto.parse(buffer)
            if header is not None:
                buffer = buffer[used:]
                break
            chunk = sock.recv(4096)
            if not chunk:
                return
            buffer += chunk
        assert header is not None
        while len(buffer) < 5 and (chunk := sock.recv(4096)):
            buffer += chunk
        seen.put((header, buffer))
        sock.sendall(b"seen")

    with (
        tcp_service(service) as local,
        cli("tcp", str(local), "--proxy-protocol", version, "--json") as agent,
    ):
        public = split_address(agent.event("tunnel_ready")["public"])
        with socket.create_connection(public, timeout=10 * SCALE) as client:
            source = client.getsockname()
            client.sendall(b"hello")
            assert client.recv(16) == b"seen"
        header, rest = seen.get(timeout=10 * SCALE)
    assert header.version == int(version[1])
    assert header.command == "PROXY"
    assert header.family == "TCP4"
    assert header.src == ("127.0.0.1", source[1])
    assert header.dst == public
    assert rest == b"hello"


# --- signals -------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_agent_stops_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    with relay(tmp_path) as (relay_process, ready), tcp_service(echo) as local:
        with cli(
            "tcp",
            str(local),
            "--to",
            ready["control"],
            "--fingerprint",
            ready["fingerprint"],
            "--json",
        ) as agent:
            tunnel = agent.event("tunnel_ready")
            opened = relay_process.event("session_opened")
            relay_process.event("tunnel_opened")
            # A round trip proves the agent's loop is past start(), where the CLI installs its
            # signal handlers (a signal before that is fatal: see test_sigterm_while_connecting).
            assert roundtrip(split_address(tunnel["public"]), b"up") == b"up"
            started = time.monotonic()
            agent.proc.send_signal(sig)
            code = agent.proc.wait(5 * SCALE)
            elapsed = time.monotonic() - started
            stderr = agent.stderr_text()
            assert code == 0, stderr
            assert elapsed < 3 * SCALE
            assert "Traceback" not in stderr
        closed = relay_process.event("session_closed", timeout=5)
        assert closed["peer"] == opened["peer"]
        relay_process.proc.send_signal(signal.SIGTERM)
        assert relay_process.proc.wait(5 * SCALE) == 0


def test_sigterm_while_connecting(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts TCP, never answers the TLS handshake
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with cli("tcp", "5432", "--to", address, "--fingerprint", "sha256:" + "0" * 64) as agent:
            time.sleep(1)
            assert agent.proc.poll() is None, "the agent should still be connecting"
            agent.proc.send_signal(signal.SIGTERM)
            code = agent.proc.wait(5 * SCALE)
            assert code >= 0, f"killed by signal {-code}"
            assert "Traceback" not in agent.stderr_text()

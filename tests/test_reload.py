"""``burrow up`` reloads its burrow.toml on SIGHUP, and tells systemd (sd_notify) about it.

The relay and ``burrow up`` run as real processes; the test holds the notification socket a
service manager would, so it sees READY=1, RELOADING=1 + MONOTONIC_USEC, STOPPING=1 as
systemd would."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from burrow.cli.reload import plan
from helpers import SCALE, burrow_cli, read_event

pytestmark = pytest.mark.timeout(90)


class TaggedServer:
    """A TCP server that answers every connection with its tag, then echoes."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(self.tag + b":")
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def dial(port: int) -> tuple[socket.socket, bytes]:
    """Connect to a public port and read the tag of the service behind it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10 * SCALE)
    tag = b""
    while not tag.endswith(b":"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"port {port} closed before its tag ({tag!r})")
        tag += chunk
    return sock, tag[:-1]


def echoes(sock: socket.socket, payload: bytes) -> bool:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            return False
        got += chunk
    return got == payload


def is_closed(sock: socket.socket) -> bool:
    """True once the far end closed or reset the connection (bounded wait)."""
    sock.settimeout(10 * SCALE)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class NotifySocket:
    """The service manager's end of $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(15 * SCALE)

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096)
        return dict(line.split("=", 1) for line in data.decode().splitlines())


@pytest.fixture
def servers() -> Iterator[dict[str, TaggedServer]]:
    made = {tag: TaggedServer(tag.encode()) for tag in ("A", "B", "C", "C2", "D")}
    try:
        yield made
    finally:
        for server in made.values():
            server.close()


@contextlib.contextmanager
def process(*args: str, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = burrow_cli(*args, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def write_config(path: Path, relay: dict[str, Any], tunnels: dict[str, int]) -> None:
    lines = [f'relay = "{relay["control"]}"', f'fingerprint = "{relay["fingerprint"]}"']
    for name, port in tunnels.items():
        lines += ["", "[[tunnel]]", f'name = "{name}"', f'local = "127.0.0.1:{port}"']
    path.write_text("\n".join(lines) + "\n")


class EventReader:
    """JSON events from a process's stdout, in order, each wait bounded."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.buffer = b""

    def until(self, name: str, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Every event up to and including the first ``name``."""
        import os
        import select

        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout * SCALE
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                seen.append(json.loads(line))
                if seen[-1]["event"] == name:
                    return seen
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"no {name!r} event within {timeout} s; saw {seen}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"process ended before {name!r}; saw {seen}")
            self.buffer += chunk


def public_ports(events: list[dict[str, Any]]) -> dict[str, int]:
    return {
        e["name"]: int(e["public"].rsplit(":", 1)[1])
        for e in events
        if e["event"] == "tunnel_ready"
    }


def test_up_reloads_on_sighup(tmp_path: Path, servers: dict[str, TaggedServer]) -> None:
    """SIGHUP: a tunnel added answers, one removed is closed (its port and its open
    connection), one changed is replaced (new target), the other keeps its connection; a
    broken file changes nothing; systemd hears RELOADING=1 (with MONOTONIC_USEC) and READY=1."""
    notify = NotifySocket(tmp_path / "notify")
    env = {"BURROW_HOME": str(tmp_path / "home"), "BURROW_SECRET": "s3cret"}
    config = tmp_path / "burrow.toml"
    with process("relay", "--listen", "127.0.0.1:0", "--json", env=env) as relay_proc:
        relay = read_event(relay_proc, "relay_ready")
        write_config(
            config,
            relay,
            {"a": servers["A"].port, "b": servers["B"].port, "c": servers["C"].port},
        )
        up_env = {**env, "NOTIFY_SOCKET": str(notify.path)}
        with process("up", "-c", str(config), "--json", env=up_env) as up:
            events = EventReader(up)
            ports = public_ports(events.until("tunnel_ready"))
            ports.update(public_ports(events.until("tunnel_ready")))
            ports.update(public_ports(events.until("tunnel_ready")))
            assert notify.next() == {"READY": "1", "STATUS": "3 tunnels ready"}

            conn_a, tag_a = dial(ports["a"])
            conn_b, tag_b = dial(ports["b"])
            conn_c, tag_c = dial(ports["c"])
            assert (tag_a, tag_b, tag_c) == (b"A", b"B", b"C")
            assert echoes(conn_a, b"before the reload")

            # b removed, c pointed at another service, d added; a untouched
            write_config(
                config,
                relay,
                {"a": servers["A"].port, "c": servers["C2"].port, "d": servers["D"].port},
            )
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            up.send_signal(signal.SIGHUP)
            reloading = notify.next()
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert reloading["RELOADING"] == "1"
            assert before <= int(reloading["MONOTONIC_USEC"]) <= after
            during = events.until("reloaded")
            reloaded = during[-1]
            removed = {e["name"]: e["public"] for e in during if e["event"] == "tunnel_removed"}
            assert removed == {n: f"127.0.0.1:{ports[n]}" for n in ("b", "c")}  # c: replaced
            assert [e["event"] for e in during if e["event"] == "error"] == []
            assert (reloaded["added"], reloaded["removed"], reloaded["changed"]) == (
                ["d"],
                ["b"],
                ["c"],
            )
            assert reloaded["refused"] == []
            ready = notify.next()
            assert ready["READY"] == "1"
            assert "1 added" in ready["STATUS"] and "1 removed" in ready["STATUS"]

            # the kept tunnel's connection survived; the removed and changed ones' did not
            assert echoes(conn_a, b"after the reload" * 1000)
            assert is_closed(conn_b)
            assert is_closed(conn_c)
            with pytest.raises(OSError):
                dial(ports["b"])[0].close()
            new_ports = {**ports, **public_ports(during)}
            assert set(public_ports(during)) == {"c", "d"}
            for name, tag in (("c", b"C2"), ("d", b"D"), ("a", b"A")):
                sock, got = dial(new_ports[name])
                with sock:
                    assert got == tag, name
                    assert echoes(sock, name.encode() * 100)

            # a broken file: a warning, READY=1 again, every tunnel still served
            config.write_text(config.read_text() + "\n[[tunnel]\n")
            up.send_signal(signal.SIGHUP)
            assert notify.next()["RELOADING"] == "1"
            warning = events.until("warning")[-1]
            assert "reload failed" in warning["message"] and "line" in warning["message"]
            assert notify.next()["READY"] == "1"
            assert echoes(conn_a, b"still here")
            conn_a.close()

            up.send_signal(signal.SIGTERM)
            assert notify.next() == {"STOPPING": "1"}
            assert up.wait(15 * SCALE) == 0


def test_plan_names_what_changed() -> None:
    old = {"a": 1, "b": 2, "c": 3}
    new = {"c": 4, "a": 1, "d": 5}
    steps = plan(old, new)
    assert (steps.added, steps.removed, steps.changed, steps.kept) == (["d"], ["b"], ["c"], ["a"])
    assert plan(old, dict(old)).empty
    assert json.dumps(plan({}, {}).added) == "[]"


def test_reload_closes_a_removed_private_service(
    tmp_path: Path, servers: dict[str, TaggedServer]
) -> None:
    """A private service's connections go through the connector and the relay, which keeps
    no listener of its own for it: the agent itself closes what the removed service had open,
    and refuses new streams to it, while the kept service's connection carries on."""
    from helpers import free_port

    env = {"BURROW_HOME": str(tmp_path / "home"), "BURROW_SECRET": "s3cret"}
    config = tmp_path / "burrow.toml"
    with process("relay", "--listen", "127.0.0.1:0", "--json", env=env) as relay_proc:
        relay = read_event(relay_proc, "relay_ready")
        lines = [f'relay = "{relay["control"]}"', f'fingerprint = "{relay["fingerprint"]}"']
        for name, tag in (("keep", "A"), ("gone", "B")):
            lines += ["[[tunnel]]", 'kind = "private"', f'name = "{name}"']
            lines += [f'local = "127.0.0.1:{servers[tag].port}"']
        config.write_text("\n".join(lines) + "\n")
        with process("up", "-c", str(config), "--json", env=env) as up:
            events = EventReader(up)
            events.until("tunnel_ready")
            events.until("tunnel_ready")
            keep_at, gone_at = free_port(), free_port()
            with process(
                "connect",
                f"keep=127.0.0.1:{keep_at}",
                f"gone=127.0.0.1:{gone_at}",
                "--to",
                relay["control"],
                "--fingerprint",
                relay["fingerprint"],
                "--json",
                env=env,
            ) as connector:
                read_event(connector, "tunnel_ready")
                read_event(connector, "tunnel_ready")
                keep, tag_keep = dial(keep_at)
                gone, tag_gone = dial(gone_at)
                assert (tag_keep, tag_gone) == (b"A", b"B")

                # "gone" dropped; "bad" asks for a port outside the relay's range
                bad = ["[[tunnel]]", 'name = "bad"', f'local = "{servers["D"].port}"', "port = 80"]
                config.write_text("\n".join(lines[:6] + bad) + "\n")
                assert "gone" not in config.read_text()
                up.send_signal(signal.SIGHUP)
                during = events.until("reloaded")
                assert (during[-1]["removed"], during[-1]["added"]) == (["gone"], ["bad"])
                assert during[-1]["refused"] == ["bad"]  # not kept: a reconnect won't trip on it
                assert any("bad" in e.get("message", "") for e in during if e["event"] == "warning")

                assert is_closed(gone)
                assert echoes(keep, b"kept" * 10000)
                with pytest.raises(ConnectionError):
                    dial(gone_at)[0].close()
                keep.close()


async def test_hangups_coalesce() -> None:
    """A signal during start-up waits for ``arm``; signals during a reload make one more
    reload after it, not one each."""
    import asyncio

    from burrow.cli.reload import HangupReloads

    runs = 0
    gate = asyncio.Event()

    async def reload() -> None:
        nonlocal runs
        runs += 1
        await gate.wait()

    hangups = HangupReloads(reload)
    try:
        hangups.request()
        await asyncio.sleep(0)
        assert runs == 0  # not armed: start-up is not over
        hangups.arm()
        await asyncio.sleep(0)
        assert runs == 1
        for _ in range(5):
            hangups.request()
        gate.set()
        for _ in range(20):
            await asyncio.sleep(0)
        assert runs == 2
    finally:
        await hangups.close()

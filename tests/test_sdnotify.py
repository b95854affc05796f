"""sd_notify: the messages, the socket addresses, and ``burrow relay`` under a service manager
(READY=1 only once its control port accepts connections; STOPPING=1 on SIGTERM)."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from burrow.cli.sdnotify import MAX_STATUS, Notifier, encode, socket_address
from helpers import SCALE, burrow_cli

pytestmark = pytest.mark.timeout(60)


def test_encode() -> None:
    assert encode({"READY": 1, "STATUS": "two\nlines"}) == b"READY=1\nSTATUS=two lines\n"
    assert encode({"STATUS": "x" * 10_000}) == b"STATUS=" + b"x" * MAX_STATUS + b"\n"
    with pytest.raises(ValueError):
        encode({"READY\nSTOPPING": 1})


@pytest.mark.parametrize(
    ("value", "address"),
    [
        (None, None),
        ("", None),
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@burrow/notify", b"\0burrow/notify"),
        ("@", None),
        ("vsock:2:1234", None),  # systemd in a VM: not spoken here, so notifications are off
        ("relative/path", None),
        ("/" + "x" * 200, None),  # longer than sockaddr_un holds
    ],
)
def test_socket_address(value: str | None, address: str | bytes | None) -> None:
    assert socket_address(value) == address


def _abstract_socket() -> tuple[socket.socket, str]:
    name = f"burrow-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(10 * SCALE)
    return sock, "@" + name


def test_notifier_sends_to_an_abstract_socket() -> None:
    sock, name = _abstract_socket()
    with sock:
        notifier = Notifier({"NOTIFY_SOCKET": name})
        assert notifier.enabled
        assert notifier.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up\n"
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        fields = dict(line.split("=") for line in sock.recv(4096).decode().splitlines())
        assert fields["RELOADING"] == "1"
        assert before <= int(fields["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000 + 1
        assert notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1\n"


def test_notifier_never_fails_its_service(tmp_path: Path) -> None:
    assert not Notifier({}).enabled
    assert Notifier({}).ready() is False
    nobody = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert nobody.enabled and nobody.ready() is False  # no listener: dropped, no exception


def test_relay_is_ready_once_it_listens(tmp_path: Path) -> None:
    sock, name = _abstract_socket()
    env = {"NOTIFY_SOCKET": name, "BURROW_HOME": str(tmp_path / "home")}
    proc = burrow_cli("relay", "--listen", "127.0.0.1:0", "--secret", "s", env=env)
    try:
        with sock:
            message = sock.recv(4096).decode()
            assert message.startswith("READY=1\nSTATUS=listening on 127.0.0.1:")
            port = int(message.strip().rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=5 * SCALE):
                pass  # READY=1 came after the control port was open
            proc.send_signal(signal.SIGTERM)
            assert sock.recv(4096) == b"STOPPING=1\n"
        assert proc.wait(15 * SCALE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

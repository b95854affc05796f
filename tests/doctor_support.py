"""Pieces the doctor's tests share: misbehaving proxies (one that stalls large transfers, one
that resets idle connections), a plain HTTP responder, a real sshd and a real pgbouncer on free
ports, and a way to run the doctor in-process or as the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from burrow.doctor import Checklist, Options, diagnose, parse_target, parse_via
from burrow.roles.settings import ClientSettings
from helpers import SCALE, free_port

POSTGRES = "postgres://postgres@127.0.0.1:5432/test"


async def doctor(
    url: str, via: str | None = None, *, burrow: ClientSettings | None = None, **options: Any
) -> Checklist:
    """Run the doctor in this loop; ``options`` go to ``Options`` (timeout, idle, payload)."""
    options.setdefault("timeout", 2.0 * SCALE)
    return await diagnose(parse_target(url), parse_via(via), Options(**options), burrow=burrow)


def phases(checklist: Checklist) -> dict[str, Any]:
    return {r.phase: r for r in checklist.results}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    """``burrow doctor ARGS``: (exit code, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "burrow.cli", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=timeout * SCALE,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


# ---- proxies that misbehave like real paths ---------------------------------------------------


class _Pipe:
    """One proxied connection: both directions, with a policy hook per chunk."""

    def __init__(self, proxy: Proxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.last_direction = ""
        self.run = 0
        self.stalled = False
        self.last_activity = time.monotonic()

    def allow(self, direction: str, size: int) -> bool:
        self.last_activity = time.monotonic()
        if direction != self.last_direction:
            self.last_direction, self.run = direction, 0
        self.run += size
        limit = self.proxy.stall_above
        if limit is not None and self.run > limit:
            self.stalled = True
        return not self.stalled

    def reset(self) -> None:
        """Abort both sides with RST, as a NAT or proxy forgetting the connection does."""
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


class Proxy:
    """A TCP proxy to ``upstream`` that can stall any one-way run of more than ``stall_above``
    bytes (a path-MTU blackhole, seen from the application) or reset connections idle for
    ``reset_idle`` seconds (a NAT or proxy idle timeout)."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        stall_above: int | None = None,
        reset_idle: float | None = None,
        rewrite_down: Callable[[], Callable[[bytes], bytes]] | None = None,
    ) -> None:
        self.upstream = upstream
        self.stall_above = stall_above
        self.reset_idle = reset_idle
        self.rewrite_down = rewrite_down  # a factory: one rewriter per connection
        self.port = 0
        self.resets = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        pipe = _Pipe(self, writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            pipe.upstream = up_writer
            rewrite = self.rewrite_down() if self.rewrite_down is not None else None
            jobs = [
                asyncio.ensure_future(self._pump(reader, up_writer, pipe, "up")),
                asyncio.ensure_future(self._pump(up_reader, writer, pipe, "down", rewrite)),
            ]
            if self.reset_idle is not None:
                jobs.append(asyncio.ensure_future(self._watch(pipe)))
            try:
                await asyncio.wait(jobs, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for job in jobs:
                    job.cancel()
                await asyncio.gather(*jobs, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass  # the proxy is closing: this connection ends with it
        finally:
            for w in (writer, pipe.upstream):
                if w is not None:
                    w.transport.abort()
            self._tasks.discard(task)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pipe: _Pipe,
        direction: str,
        rewrite: Callable[[bytes], bytes] | None = None,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1 << 20):
                if rewrite is not None:
                    data = rewrite(data)
                if pipe.allow(direction, len(data)):
                    writer.write(data)
                    await writer.drain()
        # A stalled pipe holds the connection open: the doctor must see a hang, not an EOF.
        while pipe.stalled:
            await asyncio.sleep(3600)

    async def _watch(self, pipe: _Pipe) -> None:
        assert self.reset_idle is not None
        for _ in range(100_000):
            await asyncio.sleep(self.reset_idle / 10)
            if time.monotonic() - pipe.last_activity >= self.reset_idle:
                self.resets += 1
                pipe.reset()
                return


@contextlib.asynccontextmanager
async def http_responder() -> AsyncIterator[int]:
    """Answers any head with a small HTTP 200; stays silent until a head arrives."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nServer: doctor-test\r\nContent-Length: 2\r\n"
                b"Connection: close\r\n\r\nok"
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


# ---- real daemons on free ports ---------------------------------------------------------------


def _wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float) -> bool:
    deadline = time.monotonic() + seconds * SCALE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def sshd() -> Iterator[int | str]:
    """A real OpenSSH server on a free port with its own config and host key; yields its port,
    or a string saying why it cannot start."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(binary) or shutil.which("ssh-keygen") is None:
        yield "openssh-server is not installed (scripts/system-deps.sh installs it)"
        return
    if os.geteuid() != 0:
        yield "sshd needs root here (privilege separation)"
        return
    tmp = Path(tempfile.mkdtemp(prefix="burrow-sshd-"))
    try:
        key = tmp / "host_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
            check=True,
            timeout=30,
            capture_output=True,
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        port = free_port()
        conf = tmp / "sshd_config"
        conf.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {key}\nPidFile {tmp}/sshd.pid\n"
            "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "StrictModes no\nLogLevel ERROR\n"
        )
        proc = subprocess.Popen(
            [binary, "-f", str(conf), "-D", "-e"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            if not _wait_port(port, proc, 10):
                err = proc.stderr.read().decode() if proc.poll() is not None and proc.stderr else ""
                yield f"sshd did not start: {err.strip()[:200]}"
                return
            yield port
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def pgbouncer(pool_mode: str = "transaction") -> Iterator[int]:
    """Debian's pgbouncer in front of the local PostgreSQL's database ``test``."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        raise RuntimeError("pgbouncer is not installed (scripts/system-deps.sh installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="burrow-pgbouncer-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        pw = pwd.getpwnam("postgres")
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
        run_as = ["-u", "postgres"]
    try:
        port = free_port()
        ini = tmp / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            "test = host=127.0.0.1 port=5432 dbname=test user=postgres\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = any\npool_mode = {pool_mode}\n"
            f"logfile = {tmp}/pgbouncer.log\npidfile = {tmp}/pgbouncer.pid\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
        )
        os.chmod(ini, 0o644)
        proc = subprocess.Popen(
            [binary, *run_as, str(ini)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            if not _wait_port(port, proc, 10):
                err = proc.stderr.read().decode() if proc.poll() is not None and proc.stderr else ""
                raise RuntimeError(f"pgbouncer did not start: {err.strip()[:300]}")
            yield port
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def throwaway_mariadb() -> Iterator[dict[str, Any]]:
    """A private MariaDB with TLS (a trustme CA; certificate for 127.0.0.1 and localhost) on a
    free port: the system server has no TLS, and the doctor's TLS path needs one that does."""
    import trustme

    install = shutil.which("mariadb-install-db")
    server = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
    if install is None or not os.path.exists(server):
        raise RuntimeError("MariaDB server binaries are not installed (Debian: mariadb-server)")
    tmp = Path(tempfile.mkdtemp(prefix="burrow-mariadb-"))
    as_root = os.geteuid() == 0
    user = ["--user=mysql"] if as_root else []
    try:
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        (tmp / "ca.pem").write_bytes(ca.cert_pem.bytes())
        (tmp / "cert.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
        (tmp / "key.pem").write_bytes(cert.private_key_pem.bytes())
        if as_root:
            pw = pwd.getpwnam("mysql")
            for path in (tmp, *tmp.iterdir()):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        fast = [
            "--innodb-flush-method=nosync",
            "--innodb-log-file-size=4M",
            "--innodb-buffer-pool-size=16M",
            "--innodb-doublewrite=0",
            "--innodb-flush-log-at-trx-commit=0",
        ]
        subprocess.run(
            [install, "--no-defaults", f"--datadir={tmp}/data", *user, "--skip-test-db",
             "--auth-root-authentication-method=normal", "--skip-name-resolve", *fast],
            check=True, capture_output=True, timeout=120 * SCALE,
        )  # fmt: skip
        port = free_port()
        proc = subprocess.Popen(
            [server, "--no-defaults", f"--datadir={tmp}/data", *user, f"--port={port}",
             "--bind-address=127.0.0.1", f"--socket={tmp}/mysqld.sock", "--skip-name-resolve",
             f"--pid-file={tmp}/mysqld.pid", f"--log-error={tmp}/error.log",
             f"--ssl-ca={tmp}/ca.pem", f"--ssl-cert={tmp}/cert.pem", f"--ssl-key={tmp}/key.pem",
             *fast],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            if not _wait_port(port, proc, 30):
                log = (tmp / "error.log").read_text(errors="replace")[-500:]
                raise RuntimeError(f"mariadbd did not start: {log}")
            yield {"port": port, "socket": str(tmp / "mysqld.sock"), "ca": str(tmp / "ca.pem")}
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def without_backend_key() -> Callable[[bytes], bytes]:
    """A rewriter of a PostgreSQL server's bytes (after a one-byte SSLRequest answer) that drops
    BackendKeyData, as RDS Proxy does."""
    state = {"answered": False, "buf": b""}

    def rewrite(data: bytes) -> bytes:
        if not state["answered"] and data[:1] in (b"N", b"S"):
            state["answered"] = True
            head, data = data[:1], data[1:]
        else:
            head = b""
        buf = state["buf"] + data
        out = bytearray(head)
        while len(buf) >= 5:
            size = int.from_bytes(buf[1:5], "big")
            if len(buf) < 1 + size:
                break
            if buf[:1] != b"K":
                out += buf[: 1 + size]
            buf = buf[1 + size :]
        state["buf"] = buf
        return bytes(out)

    return rewrite

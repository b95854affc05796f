#!/usr/bin/env python3
"""Relay nodes of a cluster: what the second hop costs, and what 1,000 names cost a node.

Run from the repository root (needs ``redis-server``; uses a throwaway one on a free port)::

    .venv/bin/python bench/cluster.py [--quick] [--names 1000] [--idle 30]

1. **Two nodes against one**, in one run: two relay nodes (A on 127.0.0.1, B on 127.0.0.2)
   share a registry; one agent holds a TCP tunnel on A. The same measurements go through A
   (one node: visitor and agent on the node) and through B (two nodes: B carries the
   visitor over its node link to A), alternated ``--repeat`` times, and the medians are
   printed with their ratios: bulk download, 64-byte round trips, fresh connections, and the
   relays' CPU per unit of work. TLS is on
   (agent session and node link), as users run it.
2. **1,000 names**: a node whose agent registers N private names (and a second node that
   only mirrors them), against a relay with no registry: resident memory before and after,
   and CPU while idle (renewals, node records, sweeps) over ``--idle`` seconds.

All traffic stays on loopback; every child is stopped in a ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SECRET = "bench-cluster"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rfind(")") + 2 :].split()
    return sum(int(f) for f in fields[11:13]) / CLK_TCK


def rss_mib(pid: int) -> float:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) / 1024 if match else 0.0


class Proc:
    """A burrow command with ``--json``; its events read by a thread."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "burrow.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError), self._cond:
                self.events.append(json.loads(line))
                self._cond.notify_all()

    def wait(self, name: str, count: int = 1, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if e.get("event") == name]
                if len(found) >= count:
                    return found[count - 1]
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"no {name!r} event (exit {self.proc.poll()})")
                self._cond.wait(0.5)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"PING\r\n")
                if s.recv(8).startswith(b"+PONG"):
                    break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


def relay(tmp: Path, name: str, host: str, registry: str | None, *extra: str) -> Proc:
    state = tmp / name
    args = [
        "relay",
        "--listen",
        f"{host}:0",
        "--secret",
        SECRET,
        "--state-dir",
        str(state),
        "--min-port",
        "45000",
        "--max-port",
        "45999",
        "--json",
        *extra,
    ]
    if registry is not None:
        args += ["--registry", registry, "--node-id", name]
    proc = Proc(*args)
    ready = proc.wait("relay_ready")
    proc.control = ready["control"]  # type: ignore[attr-defined]
    proc.fingerprint = ready["fingerprint"]  # type: ignore[attr-defined]
    return proc


# --- local services (threads in this process) ----------------------------------------------


class Services:
    """An echo and a source (sends ``size`` bytes to whoever connects)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.echo = self._serve(self._echo)
        self.source = self._serve(self._source)

    def _serve(self, handler: Any) -> int:
        sock = socket.create_server(("127.0.0.1", 0), backlog=512)

        def accept() -> None:
            while True:
                conn, _ = sock.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=handler, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return int(sock.getsockname()[1])

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def _source(self, conn: socket.socket) -> None:
        block = b"\0" * (1 << 20)
        with conn, contextlib.suppress(OSError):
            for _ in range(self.size // len(block)):
                conn.sendall(block)
            conn.shutdown(socket.SHUT_WR)


# --- measurements ---------------------------------------------------------------------------


def bulk(address: tuple[str, int]) -> float:
    """MiB/s of one download."""
    start = time.perf_counter()
    total = 0
    with socket.create_connection(address) as s:
        s.shutdown(socket.SHUT_WR)
        buffer = bytearray(1 << 20)
        while n := s.recv_into(buffer):
            total += n
    return total / (1 << 20) / (time.perf_counter() - start)


def rtt(address: tuple[str, int], rounds: int) -> float:
    """Microseconds per 64-byte round trip."""
    with socket.create_connection(address) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = b"x" * 64
        for _ in range(50):
            s.sendall(payload)
            s.recv(64)
        start = time.perf_counter()
        for _ in range(rounds):
            s.sendall(payload)
            got = 0
            while got < 64:
                got += len(s.recv(64 - got))
        return (time.perf_counter() - start) / rounds * 1e6


def fresh(address: tuple[str, int], count: int) -> float:
    """Connections per second, each with one round trip."""
    start = time.perf_counter()
    for _ in range(count):
        with socket.create_connection(address) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"ping")
            s.recv(4)
    return count / (time.perf_counter() - start)


def measured(pids: list[int], work: Any) -> tuple[float, float]:
    before = sum(cpu_seconds(pid) for pid in pids)
    value = work()
    return value, sum(cpu_seconds(pid) for pid in pids) - before


def two_nodes_against_one(tmp: Path, url: str, quick: bool, repeat: int) -> dict[str, Any]:
    size = (256 if quick else 1024) << 20
    rounds = 2000 if quick else 10000
    conns = 300 if quick else 1000
    services = Services(size)
    procs: list[Proc] = []
    try:
        a = relay(tmp, "a", "127.0.0.1", url)
        procs.append(a)
        b = relay(tmp, "b", "127.0.0.2", url)
        procs.append(b)
        wait_links(a, b)
        agents = []
        for port in (services.source, services.echo):
            agent = Proc(
                "tcp",
                str(port),
                "--to",
                a.control,
                "--secret",
                SECRET,  # type: ignore[attr-defined]
                "--fingerprint",
                a.fingerprint,
                "--state-dir",
                str(tmp / f"ag{port}"),  # type: ignore[attr-defined]
                "--json",
            )
            procs.append(agent)
            agents.append(int(agent.wait("tunnel_ready")["public"].rpartition(":")[2]))
        for port in agents:
            b_wait_port(b, port)
        source, echo = agents
        relays = [a.pid, b.pid]
        samples: dict[str, list[dict[str, float]]] = {"one node": [], "two nodes": []}
        for attempt in range(repeat):  # alternated, so neither side always runs first
            for label, host in (("one node", "127.0.0.1"), ("two nodes", "127.0.0.2")):
                log(f"{label} ({attempt + 1}/{repeat}): bulk, round trips, fresh connections")
                mib_s, bulk_cpu = measured(relays, lambda h=host: bulk((h, source)))
                us, rtt_cpu = measured(relays, lambda h=host: rtt((h, echo), rounds))
                per_s, conn_cpu = measured(relays, lambda h=host: fresh((h, echo), conns))
                samples[label].append(
                    {
                        "bulk MiB/s": mib_s,
                        "relay CPU s/GiB": bulk_cpu / (size / (1 << 30)),
                        "round trip us": us,
                        "relay CPU us/round trip": rtt_cpu / rounds * 1e6,
                        "connections/s": per_s,
                        "relay CPU ms/connection": conn_cpu / conns * 1e3,
                    }
                )
        rows = {
            label: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
            for label, runs in samples.items()
        }
        return rows
    finally:
        for proc in reversed(procs):
            proc.stop()


def wait_links(a: Proc, b: Proc) -> None:
    a.wait("node_link_up", timeout=30)
    b.wait("node_link_up", timeout=30)


def b_wait_port(b: Proc, port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(e.get("event") == "peer_port_open" and e.get("port") == port for e in b.events):
            return
        time.sleep(0.05)
    raise RuntimeError(f"node b never listened on {port}")


def thousand_names(tmp: Path, url: str, names: int, idle: float) -> dict[str, Any]:
    services = Services(0)
    config = tmp / "names.toml"
    config.write_text(
        "".join(
            f'[[tunnel]]\nkind = "private"\nlocal = "127.0.0.1:{services.echo}"\nname = "n{i}"\n'
            for i in range(names)
        )
    )
    limit = ("--max-registrations-per-session", str(names + 10))
    results: dict[str, Any] = {}
    for label, registry in (("no registry", None), ("redis registry", url)):
        procs: list[Proc] = []
        try:
            holder = relay(tmp, f"h{len(results)}", "127.0.0.1", registry, *limit)
            procs.append(holder)
            mirror = None
            if registry is not None:
                mirror = relay(tmp, "m", "127.0.0.2", registry, *limit)
                procs.append(mirror)
            time.sleep(2)
            before = rss_mib(holder.pid)
            mirror_before = rss_mib(mirror.pid) if mirror else 0.0
            start = time.perf_counter()
            agent = Proc(
                "up",
                "-c",
                str(config),
                "--to",
                holder.control,
                "--secret",
                SECRET,  # type: ignore[attr-defined]
                "--fingerprint",
                holder.fingerprint,
                "--state-dir",
                str(tmp / "agent"),  # type: ignore[attr-defined]
                "--json",
            )
            procs.append(agent)
            agent.wait("tunnel_ready", count=names, timeout=300)
            took = time.perf_counter() - start
            time.sleep(2)
            log(f"{label}: {names} names registered in {took:.1f} s; idle {idle:.0f} s")
            pids = [holder.pid] + ([mirror.pid] if mirror else [])
            cpu0 = [cpu_seconds(pid) for pid in pids]
            time.sleep(idle)
            cpu = [cpu_seconds(pid) - c for pid, c in zip(pids, cpu0, strict=True)]
            results[label] = {
                "register s": took,
                "holder RSS MiB before": before,
                "holder RSS MiB after": rss_mib(holder.pid),
                "holder idle CPU %": 100 * cpu[0] / idle,
            }
            if mirror is not None:
                results[label] |= {
                    "mirror RSS MiB before": mirror_before,
                    "mirror RSS MiB after": rss_mib(mirror.pid),
                    "mirror idle CPU %": 100 * cpu[1] / idle,
                }
        finally:
            for proc in reversed(procs):
                proc.stop()
    return results


def table(rows: dict[str, dict[str, float]], ratio: tuple[str, str] | None = None) -> str:
    columns = list(rows)
    keys = list(dict.fromkeys(key for row in rows.values() for key in row))
    header = ["", *columns] + ([f"{ratio[1]} / {ratio[0]}"] if ratio else [])
    lines = [header]
    for key in keys:
        cells = [key] + [f"{rows[c][key]:.2f}" if key in rows[c] else "-" for c in columns]
        if ratio:
            first, second = rows[ratio[0]].get(key), rows[ratio[1]].get(key)
            cells.append(f"{second / first:.2f}" if first and second is not None else "-")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller transfers and counts")
    parser.add_argument("--names", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="alternated runs (median shown)")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measured")
    parser.add_argument("--only", choices=("hops", "names"), help="one of the two sections")
    options = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="burrow-bench-cluster-"))
    os.environ["BURROW_HOME"] = str(tmp / "home")
    from burrow.tokens import TokenKey

    try:
        # The nodes of a cluster share one token key (their links authenticate with it).
        for name in ("a", "b", "m", "h0", "h1"):
            (tmp / name).mkdir()
        TokenKey.create(tmp / "a")
        for name in ("b", "m", "h0", "h1"):
            shutil.copy(tmp / "a" / "token.key", tmp / name / "token.key")
        with redis_server(tmp) as url:
            if options.only in (None, "hops"):
                hops = two_nodes_against_one(tmp, url, options.quick, options.repeat)
                print("\nTCP tunnel: visitor on the agent's node (one node) or on another node\n")
                print(table(hops, ("one node", "two nodes")))
            if options.only in (None, "names"):
                names = thousand_names(tmp, url, options.names, options.idle)
                print(f"\nOne relay node holding {options.names} private names\n")
                print(table(names))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

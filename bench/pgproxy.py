"""pgbench -S through `burrow pgproxy` against the alternatives, as ratios.

    .venv/bin/python bench/pgproxy.py [--seconds 5] [--rounds 3]

One throwaway cluster (tests/pgcluster.py: hostssl + scram-sha-256 only, TLS), initialised with
`pgbench -i -s 1`, then `pgbench -S -c 4 -j 2 -T SECONDS` through each path, the paths taken in
turn for each round (so a noisy neighbour hits them all alike), medians reported:

    direct      libpq -> PostgreSQL, TLS (sslmode=require)
    socat       libpq -> socat TCP forward -> PostgreSQL, TLS end to end
    forward     libpq -> a plain TCP forward on asyncio Protocols (uvloop) -> PostgreSQL,
                TLS end to end: the plain tunnel's data path, without protocol awareness
    pgproxy     libpq (plaintext, sslmode=prefer) -> burrow pgproxy -> PostgreSQL over TLS
    private     libpq -> burrow connect -> relay -> burrow tcp --private -> PostgreSQL, TLS end
                to end (the plain private tunnel: two burrow TLS sessions and libpq's own)
    burrow-pg   libpq (plaintext) -> burrow connect -> relay -> burrow pg -> PostgreSQL over
                TLS (the protocol-aware tunnel: its cost against `private` is the issue's figure)

pgbench keeps its connections for the run, so this measures the spliced phase; each path's
connection set-up is timed separately with `pgbench -C` (a new connection per transaction).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from pgcluster import ThrowawayPostgres  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pgbench(conninfo: str, password: str, seconds: int, *extra: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env |= {"PGPASSWORD": password, "LC_ALL": "C"}
    proc = subprocess.run(
        ["pgbench", "-n", *extra, "-T", str(seconds), conninfo],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    match = re.search(r"tps = ([0-9.]+)", proc.stdout)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return float(match.group(1))


class _Half(asyncio.Protocol):
    """One side of the plain forward: what it reads goes to the other side's transport."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.peer: _Half | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        assert self.peer is not None
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.peer is not None
        self.peer.transport.resume_reading()


def forwarder_main(listen_port_file: str, target_port: int) -> None:
    """A plain TCP forward on Protocols (uvloop): the data path of burrow's plain tunnels."""
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def accepted() -> _Half:
            near = _Half()

            async def dial() -> None:
                far = _Half()
                far.peer, near.peer = near, far
                await loop.create_connection(lambda: far, "127.0.0.1", target_port)
                for chunk in near.early:
                    far.transport.write(chunk)
                near.early = []

            tasks.add(loop.create_task(dial()))
            return near

        tasks: set[asyncio.Task[None]] = set()
        server = await loop.create_server(accepted, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        Path(listen_port_file).write_text(str(port))  # noqa: ASYNC240
        await asyncio.Event().wait()

    uvloop.run(main())


def start_forwarder(target_port: int, tmp: Path) -> tuple[subprocess.Popen[str], int]:
    port_file = tmp / "forwarder.port"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--forwarder", str(port_file), str(target_port)], text=True
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text():
            return proc, int(port_file.read_text())
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the forwarder did not start")


def _cpu_tree(pid: int) -> float:
    """A process's CPU plus that of its live and reaped children (socat forks per client)."""
    total = 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    total += (sum(int(f) for f in fields[11:15])) / os.sysconf("SC_CLK_TCK")
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            stat = (child / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(stat[1]) == pid:
            total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return total


def start_pgproxy(pg: ThrowawayPostgres) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "burrow.cli",
            "pgproxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            f"127.0.0.1:{pg.port}",
            "--upstream-ca",
            str(pg.ca_path),
            "--upstream-name",
            pg.host_name,
            "--json",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for _ in range(20):
        line = proc.stdout.readline()
        if not line:
            break
        event = json.loads(line)
        if event.get("event") == "pgproxy_ready":
            # Drain the per-connection lines so the pipe never fills.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, int(event["listen"].rpartition(":")[2])
    proc.kill()
    raise RuntimeError("pgproxy did not start")


def start_socat(target_port: int) -> tuple[subprocess.Popen[str], int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "socat",
            f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
            f"TCP:127.0.0.1:{target_port}",
        ]
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("socat did not start")


def _burrow(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "burrow.cli", *args, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _event(proc: subprocess.Popen[str], name: str) -> dict[str, Any]:
    assert proc.stdout is not None
    for _ in range(50):  # bounded: a handful of events come first
        line = proc.stdout.readline()
        if not line:
            break
        event = json.loads(line)
        if event.get("event") == name:
            return dict(event)
    raise RuntimeError(f"no {name} event")


Procs = list[subprocess.Popen[str]]


def start_tunnels(pg: ThrowawayPostgres, tmp: Path) -> tuple[Procs, dict[str, int]]:
    """A relay with a token key, `burrow tcp --private` and `burrow pg --private` in front of
    the cluster, and one `burrow connect` for both: the local ports of each path."""
    state = tmp / "relay"
    burrow = [sys.executable, "-m", "burrow.cli"]
    subprocess.run([*burrow, "token", "init", "--state-dir", str(state)], check=True)

    def token(*scope: str) -> str:
        issue = [*burrow, "token", "issue", "--state-dir", str(state), *scope]
        out = subprocess.run(issue, check=True, capture_output=True, text=True).stdout
        return out.strip().splitlines()[-1]

    relay = _burrow("relay", "--listen", "127.0.0.1:0", "--state-dir", str(state))
    ready = _event(relay, "relay_ready")
    common = ["--to", ready["control"], "--fingerprint", ready["fingerprint"]]
    expose = token("--expose", "plain", "--expose", "aware")
    plain = _burrow(
        "tcp", str(pg.port), "--private", "--name", "plain", "--token", expose,
        "--state-dir", str(tmp / "a1"), *common,
    )  # fmt: skip
    aware = _burrow(
        "pg", f"127.0.0.1:{pg.port}", "--private", "--name", "aware", "--token", expose,
        "--upstream-ca", str(pg.ca_path), "--upstream-name", pg.host_name,
        "--state-dir", str(tmp / "a2"), *common,
    )  # fmt: skip
    _event(plain, "tunnel_ready")
    _event(aware, "tunnel_ready")
    connect = _burrow(
        "connect", "plain=127.0.0.1:0", "aware=127.0.0.1:0",
        "--token", token("--connect", "plain", "--connect", "aware"), *common,
    )  # fmt: skip
    ports = {}
    for _ in range(2):
        event = _event(connect, "tunnel_ready")
        ports[event["name"]] = int(event["local"].rpartition(":")[2])
    procs = [relay, plain, aware, connect]
    for proc in procs:  # keep their pipes drained (one event per connection)
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
    return procs, ports


def main() -> None:
    if sys.argv[1:2] == ["--forwarder"]:
        forwarder_main(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="pgbench -c")
    parser.add_argument("--threads", type=int, default=2, help="pgbench -j")
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args()
    for tool in ("pgbench", "socat"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed")
    with ThrowawayPostgres(ssl_only=True) as pg:
        base = f"user={pg.user} dbname={pg.dbname} host=127.0.0.1"
        tls = "sslmode=require"
        log("pgbench -i -s 1 ...")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        subprocess.run(
            ["pgbench", "-i", "-s", "1", "-q", f"{base} port={pg.port} {tls}"],
            env=env | {"PGPASSWORD": pg.password},
            check=True,
            capture_output=True,
        )
        proxy, proxy_port = start_pgproxy(pg)
        socat, socat_port = start_socat(pg.port)
        assert pg.tmpdir is not None
        forward, forward_port = start_forwarder(pg.port, pg.tmpdir)
        tunnels, ports = start_tunnels(pg, pg.tmpdir)
        middle = {"socat": socat.pid, "forward": forward.pid, "pgproxy": proxy.pid}
        paths = {
            "direct": f"{base} port={pg.port} {tls}",
            "socat": f"{base} port={socat_port} {tls}",
            "forward": f"{base} port={forward_port} {tls}",
            "pgproxy": f"{base} port={proxy_port}",
            "private": f"{base} port={ports['plain']} {tls}",
            "burrow-pg": f"{base} port={ports['aware']} sslmode=disable",
        }
        samples: dict[str, list[float]] = {name: [] for name in paths}
        cpu: dict[str, list[float]] = {name: [] for name in middle}
        connect: dict[str, list[float]] = {name: [] for name in paths}
        try:
            for round_ in range(args.rounds):
                order = list(paths) if round_ % 2 == 0 else list(reversed(paths))
                for name in order:
                    pid = middle.get(name)
                    before = _cpu_tree(pid) if pid else 0.0
                    tps = pgbench(
                        paths[name],
                        pg.password,
                        args.seconds,
                        "-S",
                        "-c",
                        str(args.clients),
                        "-j",
                        str(args.threads),
                    )
                    samples[name].append(tps)
                    line = f"round {round_ + 1} {name:8} {tps:10.0f} tps"
                    if pid:
                        used = _cpu_tree(pid) - before
                        cpu[name].append(used / (tps * args.seconds) * 1e6)
                        line += f"  {cpu[name][-1]:6.1f} us CPU per transaction in the middle"
                    log(line)
                for name in order:
                    tps = pgbench(paths[name], pg.password, 2, "-S", "-C", "-c", "2", "-j", "2")
                    connect[name].append(tps)
                    log(f"round {round_ + 1} {name:8} {tps:10.0f} connections/s (-C)")
        finally:
            for proc in (proxy, socat, forward, *tunnels):
                proc.terminate()
                proc.wait(10)
    median = {name: statistics.median(v) for name, v in samples.items()}
    median_c = {name: statistics.median(v) for name, v in connect.items()}
    print(
        f"pgbench -S -c {args.clients} -j {args.threads} -T {args.seconds}, "
        f"median of {args.rounds} (TPS; ratio)"
    )
    for name in paths:
        print(
            f"  {name:8} {median[name]:9.0f}  "
            f"vs direct {median[name] / median['direct']:.2f}  "
            f"vs socat {median[name] / median['socat']:.2f}  "
            f"vs forward {median[name] / median['forward']:.2f}"
        )
    print(
        f"  burrow pg vs the plain private tunnel: "
        f"{median['burrow-pg'] / median['private']:.2f} (goal: protocol awareness under 10 %)"
    )
    print("CPU of the middle process per transaction (median, microseconds)")
    for name, values in cpu.items():
        print(f"  {name:8} {statistics.median(values):7.1f}")
    print("pgbench -S -C (a new connection per transaction), connections/s")
    for name in paths:
        print(
            f"  {name:8} {median_c[name]:9.0f}  vs direct {median_c[name] / median_c['direct']:.2f}"
        )
    if args.json:
        record: dict[str, Any] = {
            "tps": samples,
            "connect": connect,
            "cpu_us_per_transaction": cpu,
            "seconds": args.seconds,
        }
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

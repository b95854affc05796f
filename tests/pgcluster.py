"""A throwaway PostgreSQL cluster for integration tests.

``ThrowawayPostgres`` builds a fresh cluster in a temporary directory: SCRAM-SHA-256 password
authentication only, TLS on with a certificate from a private trustme CA (valid for
``db.burrow.test``, ``localhost`` and ``127.0.0.1``), listening on a free port of 127.0.0.1 only.
It creates a login role ``app`` owning a database ``app``; everything is stopped and deleted on
exit. With ``ssl_only=True``, pg_hba.conf has only ``hostssl`` lines for TCP: a plaintext
client is refused with "no pg_hba.conf entry ... no encryption".

PostgreSQL refuses to run as root, so when the tests run as root the server binaries run as the
``postgres`` user (through ``runuser``) and the temporary directory belongs to that user.

    with ThrowawayPostgres() as pg:
        psycopg.connect(host="127.0.0.1", port=pg.port, user=pg.user,
                        password=pg.password, dbname=pg.dbname)
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import trustme

HOST_NAME = "db.burrow.test"
LISTEN_ADDR = "127.0.0.1"
RUN_AS = "postgres"


def find_pg_bindir() -> Path:
    """The directory holding initdb/pg_ctl/postgres: $BURROW_PG_BINDIR, the newest
    /usr/lib/postgresql/*/bin, or wherever ``pg_ctl`` is on PATH."""
    env = os.environ.get("BURROW_PG_BINDIR")
    if env:
        return Path(env)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
    )
    for cand in reversed(candidates):
        if (Path(cand) / "initdb").exists():
            return Path(cand)
    which = shutil.which("pg_ctl")
    if which:
        return Path(which).resolve().parent
    raise FileNotFoundError("no PostgreSQL server binaries (initdb, pg_ctl) found")


def free_port(host: str = LISTEN_ADDR) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ThrowawayPostgres:
    """A private PostgreSQL cluster that lives for the duration of a ``with`` block."""

    superuser = "postgres"
    user = "app"
    dbname = "app"
    host_name = HOST_NAME

    def __init__(
        self, *, bindir: Path | None = None, startup_timeout: int = 60, ssl_only: bool = False
    ) -> None:
        self.bindir = bindir or find_pg_bindir()
        self.ssl_only = ssl_only
        self.startup_timeout = startup_timeout
        self.superuser_password = secrets.token_urlsafe(18)
        self.password = secrets.token_urlsafe(18)
        self.port = 0
        self.tmpdir: Path | None = None
        self._started = False
        # Drop to the postgres user only when we are root (the server refuses to run as root).
        self._as_other_user = os.geteuid() == 0
        if self._as_other_user:
            pw = pwd.getpwnam(RUN_AS)
            self._uid, self._gid = pw.pw_uid, pw.pw_gid
        else:
            self._uid, self._gid = os.geteuid(), os.getegid()

    # ---- paths ---------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        assert self.tmpdir is not None, "cluster not started"
        return self.tmpdir / name

    @property
    def datadir(self) -> Path:
        return self._path("data")

    @property
    def socket_dir(self) -> Path:
        return self._path("")

    @property
    def ca_path(self) -> Path:
        return self._path("ca.pem")

    @property
    def log_path(self) -> Path:
        return self._path("postgres.log")

    # ---- helpers -------------------------------------------------------------------------
    def _own(self, path: Path, mode: int) -> None:
        os.chown(path, self._uid, self._gid)
        os.chmod(path, mode)

    def _write(self, name: str, data: bytes, mode: int) -> Path:
        path = self._path(name)
        path.write_bytes(data)
        self._own(path, mode)
        return path

    def _run_pg(
        self, tool: str, *args: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / tool), *args]
        if self._as_other_user:
            cmd = ["runuser", "-u", RUN_AS, "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        proc = subprocess.run(
            cmd,
            cwd=self.tmpdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{tool} failed with exit {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\n{self._log_tail()}"
            )
        return proc

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return "(no server log)"
        return "server log tail:\n" + "\n".join(text.splitlines()[-lines:])

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> ThrowawayPostgres:
        self.tmpdir = Path(tempfile.mkdtemp(prefix="burrow-pg-"))
        try:
            self._setup()
        except BaseException:
            self.stop()
            raise
        return self

    def _setup(self) -> None:
        assert self.tmpdir is not None
        self._own(self.tmpdir, 0o700)

        # TLS material: a private CA and a server certificate for the test name + loopback.
        ca = trustme.CA()
        cert = ca.issue_cert(HOST_NAME, "localhost", LISTEN_ADDR)
        self._write("ca.pem", ca.cert_pem.bytes(), 0o644)
        self._write("server.crt", b"".join(b.bytes() for b in cert.cert_chain_pems), 0o644)
        self._write("server.key", cert.private_key_pem.bytes(), 0o600)
        pwfile = self._write("superuser.pw", self.superuser_password.encode() + b"\n", 0o600)

        self._run_pg(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            self.superuser,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            timeout=120,
        )
        pwfile.unlink()

        self.port = free_port()
        conf = f"""
# --- burrow test settings ---
listen_addresses = '{LISTEN_ADDR}'
port = {self.port}
unix_socket_directories = '{self.tmpdir}'
max_connections = 100
password_encryption = 'scram-sha-256'
ssl = on
ssl_cert_file = '{self._path("server.crt")}'
ssl_key_file = '{self._path("server.key")}'
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 32MB
log_connections = on
log_min_messages = warning
"""
        with (self.datadir / "postgresql.conf").open("a") as f:
            f.write(conf)
        hba = f"""# TYPE   DATABASE USER ADDRESS        METHOD
local     all      all                   scram-sha-256
hostssl   all      all  {LISTEN_ADDR}/32  scram-sha-256
"""
        if not self.ssl_only:
            hba += f"host      all      all  {LISTEN_ADDR}/32  scram-sha-256\n"
        (self.datadir / "pg_hba.conf").write_text(hba)
        self._own(self.datadir / "pg_hba.conf", 0o600)

        self._run_pg(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(self.startup_timeout),
            "start",
            timeout=self.startup_timeout + 15,
        )
        self._started = True
        self._create_app_role()

    def _create_app_role(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(
            host=LISTEN_ADDR,
            port=self.port,
            user=self.superuser,
            password=self.superuser_password,
            dbname="postgres",
            sslmode=self._admin_sslmode,
            connect_timeout=10,
            autocommit=True,
        ) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(self.user), sql.Literal(self.password)
                )
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(self.dbname), sql.Identifier(self.user)
                )
            )

    def stop(self) -> None:
        if self._started:
            self._started = False
            with contextlib.suppress(Exception):
                self._run_pg(
                    "pg_ctl",
                    "-D",
                    str(self.datadir),
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "30",
                    "stop",
                    timeout=45,
                )
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __enter__(self) -> ThrowawayPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- convenience ---------------------------------------------------------------------
    @property
    def _admin_sslmode(self) -> str:
        return "require" if self.ssl_only else "disable"

    def superuser_connect(self):  # type: ignore[no-untyped-def]
        """A direct (not tunnelled) autocommit psycopg connection as the superuser."""
        import psycopg

        return psycopg.connect(
            host=LISTEN_ADDR,
            port=self.port,
            user=self.superuser,
            password=self.superuser_password,
            dbname=self.dbname,
            sslmode=self._admin_sslmode,
            connect_timeout=10,
            autocommit=True,
        )

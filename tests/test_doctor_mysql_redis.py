"""``burrow doctor`` for MariaDB (the local server on 3306, with throwaway accounts dropped
after) and Redis (a throwaway redis-server with requirepass on a free port)."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest
import redis

from doctor_support import _stop, _wait_port, doctor, phases, throwaway_mariadb
from helpers import free_port

pytestmark = pytest.mark.timeout(60)

MARIADB = "127.0.0.1:3306"


@pytest.fixture(scope="module")
def accounts() -> Iterator[dict[str, str]]:
    """Two throwaway MariaDB accounts: one with a password, one that REQUIRE SSL."""
    tag = secrets.token_hex(3)
    users = {"plain": f"doctor_pw_{tag}", "tls": f"doctor_tls_{tag}"}
    password = secrets.token_urlsafe(12)
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
    try:
        with conn.cursor() as cur:
            for host in ("%%", "localhost"):  # %% : pymysql formats the statement
                cur.execute(
                    f"CREATE USER '{users['plain']}'@'{host}' IDENTIFIED BY %s", (password,)
                )
                cur.execute(
                    f"CREATE USER '{users['tls']}'@'{host}' IDENTIFIED BY %s REQUIRE SSL",
                    (password,),
                )
        yield {**users, "password": password}
    finally:
        with conn.cursor() as cur:
            for user in users.values():
                for host in ("%", "localhost"):
                    cur.execute(f"DROP USER IF EXISTS '{user}'@'{host}'")
        conn.close()


async def test_mariadb_healthy_root_passes() -> None:
    checklist = await doctor(f"mariadb://root@{MARIADB}/mysql")
    assert checklist.passed, checklist.results
    got = phases(checklist)
    assert got["hello"].detail.startswith("MariaDB ")
    assert "auth plugin" in got["hello"].detail
    assert "= CONNECTION_ID()" in got["session"].detail
    assert "1 MiB" in got["payload"].detail


async def test_mariadb_bad_password(accounts: dict[str, str]) -> None:
    checklist = await doctor(f"mysql://{accounts['plain']}:wrong-{accounts['password']}@{MARIADB}/")
    verdict = checklist.verdict()
    assert (verdict.ok, verdict.layer) == (False, "auth")
    assert "error 1045" in verdict.cause and "SQLSTATE 28000" in verdict.cause
    assert "password is wrong" in verdict.cause
    right = await doctor(f"mysql://{accounts['plain']}:{accounts['password']}@{MARIADB}/")
    assert phases(right)["auth"].status == "ok"


async def test_mariadb_account_that_requires_ssl(accounts: dict[str, str]) -> None:
    """The password is right, but the account REQUIRE SSL and this server has no TLS."""
    checklist = await doctor(f"mysql://{accounts['tls']}:{accounts['password']}@{MARIADB}/")
    verdict = checklist.verdict()
    assert verdict.layer == "auth"
    if "TLS offered" in phases(checklist)["hello"].detail:
        pytest.skip("this MariaDB has TLS: the login over TLS passes")
    assert "error 1045" in verdict.cause
    assert "REQUIRE SSL" in verdict.cause and "no TLS configured" in verdict.cause
    assert "REQUIRE SSL" in verdict.fix


async def test_mariadb_ssl_mode_required_against_a_server_without_tls() -> None:
    checklist = await doctor(f"mysql://root@{MARIADB}/?ssl-mode=REQUIRED")
    if phases(checklist)["tls"].status == "ok":
        pytest.skip("this MariaDB has TLS")
    verdict = checklist.verdict()
    assert verdict.layer == "tls"
    assert "no TLS configured" in verdict.cause and "CLIENT_SSL" in verdict.cause
    assert phases(checklist)["auth"].status == "ok"  # the rest was still checked


async def test_mariadb_unknown_database() -> None:
    verdict = (await doctor(f"mysql://root@{MARIADB}/burrow_no_such_db")).verdict()
    assert verdict.layer == "auth"
    assert "error 1049" in verdict.cause and "burrow_no_such_db" in verdict.cause


# ---- Redis --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> Iterator[tuple[int, str]]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server must be installed (Debian: redis-server)")
    password = secrets.token_urlsafe(12)
    port = free_port()
    directory = tempfile.mkdtemp(prefix="burrow-redis-")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--requirepass",
            password,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
            "--hz",
            "50",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert _wait_port(port, proc, 10), "redis-server did not start"
        yield port, password
    finally:
        _stop(proc)
        shutil.rmtree(directory, ignore_errors=True)


async def test_redis_noauth(redis_server: tuple[int, str]) -> None:
    port, _ = redis_server
    checklist = await doctor(f"redis://127.0.0.1:{port}")
    assert "NOAUTH" in phases(checklist)["hello"].detail
    verdict = checklist.verdict()
    assert (verdict.ok, verdict.layer) == (False, "auth")
    assert "NOAUTH" in phases(checklist)["auth"].detail
    assert "requires authentication" in verdict.cause
    assert "--password-env" in verdict.fix


async def test_redis_wrong_password(redis_server: tuple[int, str]) -> None:
    port, password = redis_server
    checklist = await doctor(f"redis://:wrong-{password}@127.0.0.1:{port}")
    verdict = checklist.verdict()
    assert verdict.layer == "auth"
    assert "WRONGPASS" in verdict.cause and "wrong password" in verdict.cause


async def test_redis_right_password_passes(redis_server: tuple[int, str]) -> None:
    port, password = redis_server
    checklist = await doctor(f"redis://:{password}@127.0.0.1:{port}/0")
    assert checklist.passed, checklist.results
    got = phases(checklist)
    assert "HELLO 3 AUTH: authenticated as default" in got["auth"].detail
    assert "redis 7" in got["session"].detail or "redis " in got["session"].detail
    assert "ECHO 256 B to 1 MiB" in got["payload"].detail


async def test_redis_server_timeout_is_named_on_idle(redis_server: tuple[int, str]) -> None:
    port, password = redis_server
    admin = redis.Redis(host="127.0.0.1", port=port, password=password)
    admin.config_set("timeout", 1)
    try:
        checklist = await doctor(f"redis://:{password}@127.0.0.1:{port}", idle=2.5, payload=False)
    finally:
        with contextlib.suppress(redis.RedisError):
            admin.config_set("timeout", 0)
        admin.close()
    verdict = checklist.verdict()
    assert verdict.layer == "idle"
    assert "timeout 1 s" in phases(checklist)["session"].detail
    assert "the server's own timeout setting (1 s)" in verdict.cause


# ---- a MariaDB with TLS ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_mariadb() -> Iterator[dict[str, Any]]:
    with throwaway_mariadb() as server:
        password = secrets.token_urlsafe(12)
        conn = pymysql.connect(unix_socket=server["socket"], user="root", autocommit=True)
        with conn.cursor() as cur:
            cur.execute("CREATE USER 'secure'@'%%' IDENTIFIED BY %s REQUIRE SSL", (password,))
        conn.close()
        yield {**server, "password": password}


async def test_mariadb_over_tls_verified(tls_mariadb: dict[str, Any]) -> None:
    url = (
        f"mysql://secure:{tls_mariadb['password']}@127.0.0.1:{tls_mariadb['port']}/"
        f"?ssl-mode=VERIFY_IDENTITY&ssl-ca={tls_mariadb['ca']}"
    )
    checklist = await doctor(url, payload=False)
    assert checklist.passed, checklist.results
    got = phases(checklist)
    assert "TLS offered" in got["hello"].detail
    assert "verified, name checked" in got["tls"].detail and "TLSv1." in got["tls"].detail
    assert "logged in as secure over TLS" in got["auth"].detail


async def test_mariadb_require_ssl_account_told_apart_by_a_tls_retry(
    tls_mariadb: dict[str, Any],
) -> None:
    url = f"mysql://secure:{tls_mariadb['password']}@127.0.0.1:{tls_mariadb['port']}/"
    checklist = await doctor(url + "?ssl-mode=DISABLED", payload=False)
    verdict = checklist.verdict()
    assert verdict.layer == "auth"
    assert "the same login over TLS succeeds" in phases(checklist)["auth"].detail
    assert "requires TLS (REQUIRE SSL)" in verdict.cause
    assert "ssl-mode=REQUIRED" in verdict.fix
    # A wrong password is not mistaken for it: the TLS retry fails too.
    wrong = await doctor(url.replace(tls_mariadb["password"], "wrong") + "?ssl-mode=DISABLED")
    assert "REQUIRE SSL" not in wrong.verdict().cause
    assert "password is wrong" in wrong.verdict().cause


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str, str]]:
    """A throwaway redis-server that speaks only TLS (as ElastiCache with in-transit
    encryption): (port, password, CA file)."""
    import trustme

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server must be installed (Debian: redis-server)")
    tmp = tmp_path_factory.mktemp("tls-redis")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    password = secrets.token_urlsafe(12)
    port = free_port()
    proc = subprocess.Popen(
        [
            binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(tmp / "cert.pem"), "--tls-key-file", str(tmp / "key.pem"),
            "--tls-ca-cert-file", str(tmp / "ca.pem"), "--tls-auth-clients", "no",
            "--requirepass", password, "--save", "", "--appendonly", "no", "--dir", str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        if not _wait_port(port, proc, 10):
            pytest.skip("this redis-server has no TLS support")
        yield port, password, str(tmp / "ca.pem")
    finally:
        _stop(proc)


async def test_rediss_verified_and_plaintext_against_a_tls_port(
    tls_redis: tuple[int, str, str],
) -> None:
    port, password, ca = tls_redis
    checklist = await doctor(
        f"rediss://:{password}@127.0.0.1:{port}?ssl_ca_certs={ca}", payload=False
    )
    assert checklist.passed, checklist.results
    got = phases(checklist)
    assert [r.phase for r in checklist.results][:4] == ["dns", "dial", "tls", "hello"]
    assert "verified, name checked" in got["tls"].detail
    assert "over TLS" in got["auth"].detail
    plain = await doctor(f"redis://:{password}@127.0.0.1:{port}", timeout=1.0)
    verdict = plain.verdict()
    assert verdict.layer == "hello"
    assert "speaks TLS from the first byte" in verdict.cause
    assert "rediss://" in verdict.fix

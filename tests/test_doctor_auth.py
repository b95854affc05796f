"""``burrow doctor`` against a throwaway SCRAM + TLS cluster: each authentication verdict.

pg_hba.conf is rewritten for the module: md5 for one role, hostssl for everyone, plain host
only for the roles that should get in without TLS, so a role outside those lines meets the
server's own "no pg_hba.conf entry" text.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

import pytest

from doctor_support import doctor, phases, run_cli

try:
    from pgcluster import ThrowawayPostgres
except ImportError:  # tests/ imported as a package
    from tests.pgcluster import ThrowawayPostgres

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def pg() -> Iterator[ThrowawayPostgres]:
    with ThrowawayPostgres() as cluster:
        hba = (
            "local   all all                    scram-sha-256\n"
            "host    all md5user  127.0.0.1/32  md5\n"
            "hostssl all all      127.0.0.1/32  scram-sha-256\n"
            "host    all app,postgres,lim 127.0.0.1/32 scram-sha-256\n"
        )
        (cluster.datadir / "pg_hba.conf").write_text(hba)
        with cluster.superuser_connect() as conn:
            conn.execute("CREATE ROLE stranger LOGIN PASSWORD 'stranger-pw'")
            conn.execute("CREATE ROLE lim LOGIN PASSWORD 'lim-pw' CONNECTION LIMIT 0")
            conn.execute("SET password_encryption = 'md5'")
            conn.execute("CREATE ROLE md5user LOGIN PASSWORD 'md5-pw'")
            conn.execute("SELECT pg_reload_conf()")
        yield cluster


def _url(pg: ThrowawayPostgres, user: str, password: str | None, db: str, query: str) -> str:
    auth = f"{user}:{quote(password, safe='')}" if password is not None else user
    return f"postgres://{auth}@127.0.0.1:{pg.port}/{db}?{query}"


async def test_scram_plus_with_verify_full_passes(pg: ThrowawayPostgres) -> None:
    url = _url(pg, pg.user, pg.password, pg.dbname, f"sslmode=verify-full&sslrootcert={pg.ca_path}")
    checklist = await doctor(url)
    assert checklist.passed, checklist.results
    got = phases(checklist)
    assert got["hello"].detail.startswith("SSLRequest answered 'S'")
    assert "verified, name checked" in got["tls"].detail
    assert "matches 127.0.0.1" in got["tls"].detail
    assert "method SCRAM-SHA-256-PLUS" in got["auth"].detail and "over TLS" in got["auth"].detail
    assert "= pg_backend_pid()" in got["session"].detail


async def test_plain_scram_without_tls(pg: ThrowawayPostgres) -> None:
    checklist = await doctor(_url(pg, pg.user, pg.password, pg.dbname, "sslmode=disable"))
    assert checklist.passed, checklist.results
    assert "method SCRAM-SHA-256:" in phases(checklist)["auth"].detail
    assert phases(checklist)["tls"].status == "skipped"


async def test_md5_method_is_named(pg: ThrowawayPostgres) -> None:
    checklist = await doctor(_url(pg, "md5user", "md5-pw", pg.dbname, "sslmode=disable"))
    assert checklist.passed, checklist.results
    assert "method md5" in phases(checklist)["auth"].detail


async def test_wrong_password(pg: ThrowawayPostgres) -> None:
    checklist = await doctor(_url(pg, pg.user, "not-the-password", pg.dbname, "sslmode=require"))
    verdict = checklist.verdict()
    assert (verdict.ok, verdict.layer) == (False, "auth")
    assert "28P01" in verdict.cause and "wrong password" in verdict.cause
    assert "SCRAM-SHA-256" in phases(checklist)["auth"].detail


async def test_no_pg_hba_line_quotes_the_server(pg: ThrowawayPostgres) -> None:
    checklist = await doctor(_url(pg, "stranger", "stranger-pw", pg.dbname, "sslmode=disable"))
    verdict = checklist.verdict()
    assert verdict.layer == "auth"
    assert 'no pg_hba.conf entry for host "127.0.0.1", user "stranger"' in verdict.cause
    assert "no encryption" in verdict.cause
    assert "pg_hba.conf" in verdict.fix and "sslmode=require" in verdict.fix
    # The same role over TLS matches the hostssl line: the fix is real.
    ok = await doctor(_url(pg, "stranger", "stranger-pw", pg.dbname, "sslmode=require"))
    assert phases(ok)["auth"].status == "ok"


async def test_missing_database(pg: ThrowawayPostgres) -> None:
    checklist = await doctor(_url(pg, pg.user, pg.password, "nope", "sslmode=require"))
    verdict = checklist.verdict()
    assert verdict.layer == "auth"
    assert "3D000" in verdict.cause and "'nope' does not exist" in verdict.cause


async def test_too_many_connections(pg: ThrowawayPostgres) -> None:
    checklist = await doctor(_url(pg, "lim", "lim-pw", pg.dbname, "sslmode=disable"))
    verdict = checklist.verdict()
    assert verdict.layer == "auth"
    assert "53300" in verdict.cause


async def test_no_password_given(pg: ThrowawayPostgres) -> None:
    checklist = await doctor(_url(pg, pg.user, None, pg.dbname, "sslmode=require"))
    verdict = checklist.verdict()
    assert verdict.layer == "auth"
    assert "no password was given" in verdict.cause
    assert "--password-env" in verdict.fix


async def test_unverifiable_certificate_fails_at_tls(pg: ThrowawayPostgres) -> None:
    """verify-full against the system trust store: the private CA is not in it."""
    checklist = await doctor(_url(pg, pg.user, pg.password, pg.dbname, "sslmode=verify-full"))
    verdict = checklist.verdict()
    assert verdict.layer == "tls"
    assert "does not verify" in verdict.cause
    assert "issued by" in verdict.cause  # the certificate is still described
    assert "sslrootcert" in verdict.fix


async def test_certificate_name_checked_against_host_not_hostaddr(pg: ThrowawayPostgres) -> None:
    """libpq's host/hostaddr split: dial 127.0.0.1, check the certificate for the name."""
    query = f"sslmode=verify-full&sslrootcert={pg.ca_path}&hostaddr=127.0.0.1"
    good = _url(pg, pg.user, pg.password, pg.dbname, query).replace(
        "127.0.0.1:", f"{pg.host_name}:"
    )
    checklist = await doctor(good)
    assert checklist.passed, checklist.results
    assert f"matches {pg.host_name}" in phases(checklist)["tls"].detail
    wrong = good.replace(pg.host_name, "db.elsewhere.test")
    verdict = (await doctor(wrong)).verdict()
    assert verdict.layer == "tls"
    assert "not valid for db.elsewhere.test" in verdict.cause
    assert pg.host_name in verdict.cause  # the names it does hold are shown


async def test_channel_binding_required_without_tls(pg: ThrowawayPostgres) -> None:
    url = _url(pg, pg.user, pg.password, pg.dbname, "sslmode=disable&channel_binding=require")
    verdict = (await doctor(url)).verdict()
    assert verdict.layer == "auth"
    assert "channel binding is required" in verdict.cause


def test_password_from_the_environment(pg: ThrowawayPostgres) -> None:
    code, out, err = run_cli(
        _url(pg, pg.user, None, pg.dbname, "sslmode=require"),
        "--password-env",
        "DOCTOR_PG_PW",
        "--no-payload",
        env={"DOCTOR_PG_PW": pg.password},
    )
    assert code == 0, out + err
    assert pg.password not in out + err

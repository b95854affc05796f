"""``burrow doctor`` against real services on this machine: each verdict reproduced.

The local PostgreSQL (5432, trust, ssl off), an HTTP responder, a real sshd, Debian's pgbouncer
in transaction mode, a proxy that stalls large transfers and one that resets idle connections;
the CLI's JSON and human outputs, its exit codes and its redaction of passwords.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from doctor_support import (
    POSTGRES,
    Proxy,
    doctor,
    http_responder,
    json_lines,
    pgbouncer,
    phases,
    run_cli,
    sshd,
    without_backend_key,
)
from helpers import free_port

pytestmark = pytest.mark.timeout(60)


async def test_healthy_postgres_passes_every_phase() -> None:
    checklist = await doctor(POSTGRES)
    got = phases(checklist)
    assert [r.phase for r in checklist.results] == [
        "dns", "dial", "hello", "tls", "auth", "session", "query", "payload",
    ]  # fmt: skip
    assert checklist.passed
    assert got["hello"].detail.startswith("SSLRequest answered 'N'")
    assert got["tls"].status == "skipped"
    assert "method trust" in got["auth"].detail
    assert "PostgreSQL 15" in got["session"].detail or "PostgreSQL 1" in got["session"].detail
    assert "= pg_backend_pid()" in got["session"].detail
    assert "1 MiB" in got["payload"].detail
    verdict = checklist.verdict()
    assert verdict.ok and verdict.layer is None


async def test_closed_port_fails_at_dial() -> None:
    checklist = await doctor(f"postgres://postgres@127.0.0.1:{free_port()}/test")
    verdict = checklist.verdict()
    assert (verdict.ok, verdict.layer) == (False, "dial")
    assert "connection refused" in phases(checklist)["dial"].detail
    assert "nothing listens" in verdict.cause


async def test_http_server_on_the_postgres_port_is_named() -> None:
    async with http_responder() as port:
        checklist = await doctor(f"postgres://postgres@127.0.0.1:{port}/test", timeout=1.0)
    verdict = checklist.verdict()
    assert verdict.layer == "hello"
    assert "an HTTP server (HTTP/1.1 200 OK)" in verdict.cause
    assert "not PostgreSQL" in verdict.cause


async def test_ssh_banner_is_named() -> None:
    with sshd() as port:
        if isinstance(port, str):
            pytest.skip(port)
        checklist = await doctor(f"postgres://postgres@127.0.0.1:{port}/test")
        mysql = await doctor(f"mysql://root@127.0.0.1:{port}/")
        tcp = await doctor(f"tcp://127.0.0.1:{port}")
    for result in (checklist, mysql):
        verdict = result.verdict()
        assert verdict.layer == "hello"
        assert "an SSH server (SSH-2.0-OpenSSH" in verdict.cause
    assert tcp.passed
    assert "greeted by an SSH server" in phases(tcp)["hello"].detail


async def test_sslmode_require_against_ssl_off_is_explained() -> None:
    checklist = await doctor(POSTGRES + "?sslmode=require")
    verdict = checklist.verdict()
    assert (verdict.ok, verdict.layer) == (False, "tls")
    assert phases(checklist)["hello"].detail.startswith("SSLRequest answered 'N'")
    assert "server does not support SSL, but SSL was required" in verdict.cause
    assert "ssl = on" in verdict.fix
    # The phases after it still ran, in plaintext: the login itself works.
    assert phases(checklist)["auth"].status == "ok"
    assert not checklist.passed


async def test_missing_database_on_the_local_server() -> None:
    checklist = await doctor("postgres://postgres@127.0.0.1:5432/burrow_no_such_db")
    verdict = checklist.verdict()
    assert verdict.layer == "auth"
    assert "3D000" in verdict.cause and "burrow_no_such_db" in verdict.cause


async def test_pgbouncer_in_transaction_mode_is_detected_as_a_pooler() -> None:
    with pgbouncer("transaction") as port:
        checklist = await doctor(f"postgres://postgres@127.0.0.1:{port}/test")
    assert checklist.passed, checklist.results
    verdict = checklist.verdict()
    assert verdict.ok and verdict.layer == "session"
    assert "pooler" in verdict.cause and "transaction mode" in verdict.cause
    assert "statement_cache_size=0" in verdict.fix
    assert "but pg_backend_pid() is" in phases(checklist)["session"].detail


async def test_no_backend_key_data_is_named_like_rds_proxy() -> None:
    async with Proxy(("127.0.0.1", 5432), rewrite_down=without_backend_key) as proxy:
        checklist = await doctor(f"postgres://postgres@127.0.0.1:{proxy.port}/test")
    assert checklist.passed, checklist.results
    verdict = checklist.verdict()
    assert verdict.ok and verdict.layer == "session"
    assert "no BackendKeyData" in phases(checklist)["session"].detail
    assert "RDS Proxy" in verdict.cause and "cancel" in verdict.cause


_SIZE = re.compile(r"(\d+) (B|KiB|MiB)")


def _bytes(text: str) -> int:
    number, unit = _SIZE.search(text).groups()  # type: ignore[union-attr]
    return int(number) * {"B": 1, "KiB": 1024, "MiB": 1 << 20}[unit]


@pytest.mark.parametrize("limit", [3000, 40000])
async def test_payload_ladder_finds_the_stall_within_a_factor_of_two(limit: int) -> None:
    async with Proxy(("127.0.0.1", 5432), stall_above=limit) as proxy:
        checklist = await doctor(f"postgres://postgres@127.0.0.1:{proxy.port}/test")
    verdict = checklist.verdict()
    assert verdict.layer == "payload", checklist.results
    detail = phases(checklist)["payload"].detail
    stalled = _bytes(detail.split("stalled")[0])
    passed = _bytes(detail.split(";")[-1])
    assert passed < limit < stalled <= 2 * limit or passed < limit <= stalled
    assert stalled == 2 * passed
    assert limit / 2 <= stalled <= 2 * limit
    assert "path-MTU blackhole" in verdict.cause
    assert "MSS" in verdict.fix and "1280" in verdict.fix


async def test_a_proxy_idle_reset_is_told_apart_from_idle_session_timeout() -> None:
    async with Proxy(("127.0.0.1", 5432), reset_idle=1.0) as proxy:
        through_nat = await doctor(
            f"postgres://postgres@127.0.0.1:{proxy.port}/test", idle=2.0, payload=False
        )
    assert proxy.resets == 1
    nat = through_nat.verdict()
    assert nat.layer == "idle"
    assert "reset after" in phases(through_nat)["idle"].detail
    assert "no error from the server" in phases(through_nat)["idle"].detail
    assert "NAT gateway 350 s" in nat.cause and "RDS Proxy" in nat.cause
    assert "keepalive" in nat.fix

    server = await doctor(
        POSTGRES + "?options=-c%20idle_session_timeout%3D1000", idle=2.0, payload=False
    )
    verdict = server.verdict()
    assert verdict.layer == "idle"
    assert "idle_session_timeout" in verdict.cause and "57P05" in verdict.cause
    assert "NAT" not in verdict.cause


async def test_idle_connection_that_survives_passes() -> None:
    checklist = await doctor(POSTGRES, idle=0.5, payload=False)
    assert checklist.passed
    assert phases(checklist)["idle"].detail == "idle 0.5 s, then SELECT 1 answered"


# ---- the CLI ---------------------------------------------------------------------------------


def test_cli_json_one_object_per_line_and_exit_codes() -> None:
    code, out, err = run_cli(POSTGRES, "--json", "--no-payload")
    assert code == 0, err
    events = json_lines(out)
    assert [e["event"] for e in events[:-1]] == ["phase"] * (len(events) - 1)
    assert {"phase", "ok", "ms", "detail"} <= set(events[0])
    assert events[0]["phase"] == "dns" and events[0]["ok"] is True
    verdict = events[-1]
    assert verdict["event"] == "verdict" and verdict["ok"] is True
    code, out, _ = run_cli(f"postgres://127.0.0.1:{free_port()}/x", "--json")
    assert code == 1
    verdict = json_lines(out)[-1]
    assert (verdict["ok"], verdict["layer"]) == (False, "dial")
    assert verdict["cause"] and verdict["fix"]


def test_cli_human_and_json_carry_the_same_facts() -> None:
    url = f"postgres://postgres@127.0.0.1:{free_port()}/test"  # facts that do not change
    code_h, human, _ = run_cli(url)
    code_j, js, _ = run_cli(url, "--json")
    assert code_h == code_j == 1
    events = json_lines(js)
    for event in events:
        if event["event"] == "phase":
            assert event["detail"] in human
            assert event["phase"] in human
    verdict = events[-1]
    assert f"FAILED at {verdict['layer']}" in human
    assert verdict["cause"] in human and verdict["fix"] in human


def test_cli_bad_input_is_one_line_and_exit_2() -> None:
    from click.testing import CliRunner

    from burrow.cli.doctor import doctor as command

    for args in (
        ["localhost:5432"],
        ["ftp://h"],
        [POSTGRES, "--via", "socks4://h:1"],
        [POSTGRES, "--password-env", "BURROW_TEST_UNSET_VARIABLE"],
        [POSTGRES, "--via", "burrow:pg"],
        [POSTGRES, "--idle", "0"],
        [POSTGRES, "--token", "t"],
    ):
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("burrow doctor: "), result.output
    # The same settings from BURROW_* variables (a connector's environment) are not an error.
    result = CliRunner().invoke(
        command, [POSTGRES, "--no-payload"], env={"BURROW_RELAY": "relay.example:7835"}
    )
    assert result.exit_code == 0, result.output
    code, _out, err = run_cli("postgres://h:bad")  # the real process too
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_passwords_are_never_printed() -> None:
    secret = "Sup3r-s3cret-pw"
    for extra in ([], ["--json"]):
        code, out, err = run_cli(
            f"postgres://postgres:{secret}@127.0.0.1:5432/test?sslmode=require", *extra
        )
        assert code == 1
        assert secret not in out + err
        assert "postgres:***@" in out
    from click.testing import CliRunner

    from burrow.cli.doctor import doctor as command

    bad = CliRunner().invoke(command, [f"postgres://postgres:{secret}@127.0.0.1/t?sslmode=bogus"])
    assert bad.exit_code == 2 and secret not in bad.output
    code, out, err = run_cli(
        POSTGRES, "--password-env", "DOCTOR_PW", "--no-payload", env={"DOCTOR_PW": secret}
    )
    assert code == 0 and secret not in out + err


async def test_https_verified_with_a_private_ca_and_a_gateway_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import asyncio
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        status = b"502 Bad Gateway" if b"GET /broken" in head else b"200 OK"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        untrusted = await doctor(f"https://127.0.0.1:{port}/")
        assert untrusted.verdict().layer == "tls"
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        good = await doctor(f"https://127.0.0.1:{port}/")
        broken = await doctor(f"https://127.0.0.1:{port}/broken")
        plaintext = await doctor(f"http://127.0.0.1:{port}/", timeout=1.0)
    finally:
        server.close()
    assert good.passed, good.results
    got = phases(good)
    assert "verified, name checked" in got["tls"].detail and "ALPN" in got["tls"].detail
    assert got["hello"].detail.startswith("HTTP/1.1 200 OK")
    assert "GET / → 200 OK, 5 bytes" in got["query"].detail
    verdict = broken.verdict()
    assert verdict.layer == "query" and "502 Bad Gateway" in verdict.cause
    wrong_scheme = plaintext.verdict()
    assert wrong_scheme.layer == "hello" and "https://" in wrong_scheme.fix

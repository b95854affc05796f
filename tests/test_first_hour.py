"""What a new user meets in the first hour: each of these failed before, silently or with the
wrong advice. Subprocesses run the real ``burrow`` command; traffic stays on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import pytest

from burrow.cli import main
from burrow.http.policy import HttpOptions
from burrow.http.service import HttpTunnelSpec
from burrow.node import Relay
from burrow.roles.agent import Agent
from burrow.roles.connector import Connector, ConnectorConfig
from burrow.roles.relay import RelayConfig
from burrow.tokens import TokenKey, mint
from helpers import SCALE, Events, agent_config, burrow_cli, free_port, relay_config, stop
from test_cli import Cli, relay, run_cli

# --- 1. fatal errors print their line in every mode --------------------------------------------


class Lines:
    """A subprocess's stdout read line by line by a thread (human output, not JSON)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, fragment: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout * SCALE
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            if fragment in line:
                return line
        raise AssertionError(f"no line with {fragment!r}")


@pytest.mark.timeout(90)
def test_running_agent_prints_the_error_when_the_relay_certificate_changes(
    tmp_path: Path,
) -> None:
    port = free_port()
    agent = None
    try:
        with relay(tmp_path, state="first", port=port):
            agent = burrow_cli(
                "tcp",
                "5432",
                "--to",
                f"127.0.0.1:{port}",
                "--state-dir",
                str(tmp_path / "agent"),
                "--known-relays",
                str(tmp_path / "known"),
            )
            out = Lines(agent)
            out.wait_for("forwarding")  # human mode: a plain line on a pipe
        with relay(tmp_path, state="second", port=port):  # another certificate, same address
            code = agent.wait(40 * SCALE)
        assert code == 1
        assert agent.stderr is not None
        errors = [line for line in agent.stderr.read().splitlines() if "burrow: error:" in line]
        assert len(errors) == 1, errors
        assert "known_relays" in errors[0] or str(tmp_path / "known") in errors[0]
    finally:
        if agent is not None:
            stop(agent)


# --- 2. tokens minted after the relay started ----------------------------------------------


async def test_token_minted_after_the_relay_started_is_accepted(tmp_path: Path) -> None:
    state = tmp_path / "relay-state"
    relay_ = Relay(relay_config(tmp_path, state_dir=state))
    await relay_.start()
    try:
        assert not (state / "token.key").exists()
        key, created = TokenKey.create(state)  # what `burrow token init` does
        assert created
        token = mint(key, [], ["db"], 3600, time.time())
        connector = Connector(
            ConnectorConfig(
                relay=relay_.control_address,  # type: ignore[arg-type]
                token=token,
                trust=agent_config(relay_, ("127.0.0.1", 1)).trust,
            )
        )
        await connector.start()  # accepted: no restart of the relay
        await connector.close()
        # A rotated key is read again too: the old token is now refused, precisely.
        TokenKey.rotate(state)
        again = Connector(
            ConnectorConfig(
                relay=relay_.control_address,  # type: ignore[arg-type]
                token=token,
                trust=agent_config(relay_, ("127.0.0.1", 1)).trust,
                connect_timeout=2,
            )
        )
        with pytest.raises(Exception, match="another relay key"):
            await again.start()
        await again.close()
    finally:
        await relay_.close()


def test_token_issue_with_a_mistyped_state_dir_says_so(tmp_path: Path) -> None:
    wrong = tmp_path / "relay-sate"
    proc = run_cli("token", "issue", "--state-dir", str(wrong), "--connect", "db")
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert "no token key" in proc.stderr and "burrow token init" in proc.stderr
    assert not wrong.exists()  # nothing created by mistake
    init = run_cli("token", "init", "--state-dir", str(wrong))
    assert init.returncode == 0 and "created token key" in init.stdout
    issued = run_cli("token", "issue", "--state-dir", str(wrong), "--connect", "db")
    assert issued.returncode == 0 and issued.stdout.strip().splitlines()[-1].startswith("bt1.")


# --- 3. no open relay by default ------------------------------------------------------------


async def test_relay_beyond_loopback_requires_a_secret_or_a_token(tmp_path: Path) -> None:
    events = Events()
    relay_ = Relay(relay_config(tmp_path, listen_host="0.0.0.0"), on_event=events)
    await relay_.start()
    try:
        [required] = events.named("tokens_required")
        assert required["key"].endswith("token.key") and required["created"]
        agent = Agent(agent_config(relay_, ("127.0.0.1", 9)))
        with pytest.raises(Exception, match="requires a secret or a token"):
            await agent.start()
        await agent.close()
    finally:
        await relay_.close()
    events = Events()
    open_relay = Relay(
        relay_config(tmp_path, listen_host="0.0.0.0", allow_anonymous=True), on_event=events
    )
    await open_relay.start()
    try:
        assert any("anyone" in w["message"] for w in events.named("warning"))
        agent = Agent(agent_config(open_relay, ("127.0.0.1", 9)))
        await agent.start()
        await agent.close()
    finally:
        await open_relay.close()


def test_default_port_range_leaves_well_known_services_alone() -> None:
    config = RelayConfig()
    assert config.min_port >= 20000 and config.max_port <= 30000
    for port in (22, 80, 443, 1433, 3000, 3306, 5432, 6379, 8080, 9090, 9200, 11211):
        assert not config.min_port <= port <= config.max_port


def test_empty_secret_is_refused(tmp_path: Path) -> None:
    proc = run_cli("relay", "--listen", "127.0.0.1:0", "--secret", "", "--state-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "--secret is empty" in proc.stderr
    agent = run_cli("tcp", "5432", "--to", "127.0.0.1:1", "--secret", "")
    assert agent.returncode == 2 and "--secret is empty" in agent.stderr


# --- 4. and 5. burrow connect ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_connect_says_why_a_connection_was_refused(tmp_path: Path) -> None:
    with relay(tmp_path) as (_, ready):
        args = ("connect", "nosuch=127.0.0.1:0", "--to", ready["control"])
        args += ("--fingerprint", ready["fingerprint"], "--state-dir", str(tmp_path / "c"))
        connector = Cli(*args, "--json")
        try:
            listening = connector.event("tunnel_ready")
            host, _, port = listening["local"].rpartition(":")
            for _ in range(2):
                with __import__("socket").create_connection((host, int(port)), timeout=5) as s:
                    s.settimeout(5 * SCALE)
                    assert s.recv(10) == b""  # closed: there is no such service
            first = connector.event("connection_refused")
            second = connector.event("connection_refused")
            assert first["service"] == "nosuch" and first["code"] == "no_such_tunnel"
            assert "no service named" in first["reason"]
            assert (first["count"], second["count"]) == (1, 2)
        finally:
            connector.stop()
        # Human mode: the same reason on a line of its own.
        human = burrow_cli(*args)
        try:
            lines = Lines(human)
            line = lines.wait_for("reachable at")
            address = line.rsplit(" ", 1)[1].strip()
            host, _, port = address.rpartition(":")
            with __import__("socket").create_connection((host, int(port)), timeout=5) as s:
                s.settimeout(5 * SCALE)
                s.recv(10)
            assert "no service named" in lines.wait_for("refused")
        finally:
            stop(human)


@pytest.mark.parametrize("spec", ["pg=99999", "pg=65536", "pg=127.0.0.1:70000"])
def test_connect_refuses_ports_out_of_range_before_dialling(spec: str) -> None:
    # The relay address answers nothing: a dial would take seconds and say something else.
    proc = run_cli("connect", spec, "--to", "127.0.0.1:1")
    assert proc.returncode == 2, proc
    assert "out of range" in proc.stderr or "port must be" in proc.stderr
    assert proc.stderr.count("\n") == 1


# --- 6. burrow up takes credentials ---------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["flag", "environment"])
def test_up_takes_the_secret(tmp_path: Path, how: str) -> None:
    with relay(tmp_path, "--secret", "s3cret") as (_, ready):
        config = tmp_path / "burrow.toml"
        config.write_text(
            f'relay = "{ready["control"]}"\nfingerprint = "{ready["fingerprint"]}"\n\n'
            '[[tunnel]]\nname = "db"\nlocal = "5432"\n'
        )
        args = ["up", "-c", str(config), "--json", "--state-dir", str(tmp_path / "agent")]
        env = None
        if how == "flag":
            args += ["--secret", "s3cret"]
        else:
            env = {"BURROW_SECRET": "s3cret"}
        agent = Cli(*args, env=env)
        try:
            ready_event = agent.event("tunnel_ready")
            assert ready_event["name"] == "db"
        finally:
            agent.stop()


# --- 7. the Python API --------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_api_gets_its_name_back_when_the_script_runs_again(tmp_path: Path) -> None:
    with relay(tmp_path, "--http-listen", "127.0.0.1:0") as (_, ready):
        script = (
            "import burrow\n"
            f"with burrow.forward(9, name='again', relay={ready['control']!r}, "
            f"fingerprint={ready['fingerprint']!r}) as t:\n"
            "    print(t.name, t.url)\n"
        )
        names = []
        for _ in range(2):
            proc = subprocess.run(
                [sys.executable, "-c", script],
                capture_output=True,
                text=True,
                timeout=60 * SCALE,
                env=os.environ.copy(),
            )
            assert proc.returncode == 0, proc.stderr
            names.append(proc.stdout.split()[0])
        assert names == ["again", "again"]


def test_api_lists_what_it_offers() -> None:
    import burrow

    listed = dir(burrow)
    for name in ("forward", "aforward", "connect", "aconnect", "open_socket", "Relay", "Agent"):
        assert name in listed


async def test_embedded_http_tunnel_url_works_without_a_localhost_resolver(
    tmp_path: Path,
) -> None:
    import burrow

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(app, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tunnel = await burrow.aforward(port)
    try:
        assert tunnel.url.startswith("http://127.0.0.1:")
        host, _, url_port = tunnel.url.removeprefix("http://").partition(":")
        reader, writer = await asyncio.open_connection(host, int(url_port))
        writer.write(b"GET / HTTP/1.1\r\nHost: anything\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).endswith(b"ok")
        writer.close()
    finally:
        await tunnel.close()
        server.close()


# --- 8. help --------------------------------------------------------------------------------


def _options(command: click.Command, path: str) -> list[tuple[str, click.Option]]:
    if isinstance(command, click.Group):
        return [o for n, sub in command.commands.items() for o in _options(sub, f"{path} {n}")]
    return [
        (path, p)
        for p in command.params
        if isinstance(p, click.Option) and p.name not in ("help", "version")
    ]


def test_every_option_has_help_and_shows_its_variable() -> None:
    for path, option in _options(main, "burrow"):
        assert option.help, f"{path} {option.opts} has no description"
        assert option.show_envvar, f"{path} {option.opts} hides its environment variable"


def test_client_commands_say_they_need_a_relay() -> None:
    for name in ("connect", "socks", "exit"):
        command = main.commands[name]
        [to] = [p for p in command.params if p.name == "relay_addr"]
        assert to.help is not None and "embedded" not in to.help


# --- 9. set-up --------------------------------------------------------------------------------


def test_system_deps_waits_for_the_dpkg_lock() -> None:
    script = (Path(__file__).resolve().parent.parent / "scripts" / "system-deps.sh").read_text()
    calls = [line for line in script.splitlines() if "apt-get" in line and "-y" in line]
    calls += [line for line in script.splitlines() if "apt-get" in line and "update" in line]
    assert calls and all("DPkg::Lock::Timeout" in line for line in calls)


# --- 10. a request in flight when its agent dies --------------------------------------------


async def test_request_in_flight_gets_502_when_its_agent_dies(tmp_path: Path) -> None:
    arrived = asyncio.Event()

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()
        await asyncio.sleep(60)

    server = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    relay_ = Relay(relay_config(tmp_path, http_listen=("127.0.0.1", 0)))
    await relay_.start()
    agent = Agent(
        agent_config(
            relay_,
            ("127.0.0.1", port),
            tunnel=HttpTunnelSpec(options=HttpOptions(local=("127.0.0.1", port)), name="slow"),
        )
    )
    await agent.start()
    try:
        http_port = relay_.http.addresses["http"][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
        writer.write(b"GET / HTTP/1.1\r\nHost: slow.localhost\r\n\r\n")
        async with asyncio.timeout(10 * SCALE):
            await arrived.wait()
        assert agent.conn is not None
        agent.conn.abort("the agent's machine lost power")
        async with asyncio.timeout(10 * SCALE):
            response = await reader.read()
        assert response.startswith(b"HTTP/1.1 502 "), response[:80]
        assert b"slow" in response
        writer.close()
    finally:
        await agent.close()
        await relay_.close()
        server.close()


# --- 11. agents started at once ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_agents_started_at_once_share_one_identity(tmp_path: Path) -> None:
    path = tmp_path / "state" / "identity.key"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from burrow.roles.identity import load_or_create_identity\n"
        "from burrow.wire.handshake import public_identity\n"
        f"print(public_identity(load_or_create_identity(Path({str(path)!r}))))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(8)
    ]
    results = [p.communicate(timeout=30 * SCALE) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["identity.key"]  # no leftovers


@pytest.mark.timeout(60)
def test_two_relays_started_at_once_share_one_certificate(tmp_path: Path) -> None:
    code = (
        "from pathlib import Path\n"
        "from burrow.net.tls import load_or_create_relay_cert\n"
        f"print(load_or_create_relay_cert(Path({str(tmp_path / 'relay')!r})).fingerprint)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    results = [p.communicate(timeout=30 * SCALE) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1


# --- 12. start-up cost: what the entry points do not import ----------------------------------


def _imported_after(statement: str, candidates: list[str]) -> list[str]:
    check = f"import sys; {statement}; print([m for m in {candidates!r} if m in sys.modules])"
    proc = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=30 * SCALE
    )
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout.replace("'", '"')))


def test_the_command_line_imports_only_what_help_needs() -> None:
    heavy = ["asyncio", "msgspec", "cryptography", "rich", "prometheus_client", "h11", "ssl"]
    assert _imported_after("import burrow.cli", heavy) == []


def test_the_lambda_extension_leaves_out_what_it_never_uses() -> None:
    unused = ["rich", "prometheus_client", "click", "cryptography.x509", "h11", "burrow.cli"]
    statement = (
        "import burrow.aws.extension, burrow.roles.connector, burrow.roles.settings, "
        "burrow.net.proxy_server"
    )
    assert _imported_after(statement, unused) == []


def test_the_layer_leaves_out_the_command_lines_libraries() -> None:
    from burrow.aws.layer import runtime_requirements

    names = " ".join(runtime_requirements()).lower()
    assert "rich" not in names and "prometheus" not in names
    assert "cryptography" in names and "msgspec" in names

"""``burrow dev`` end to end: the command as a subprocess, boto3 over HTTP to moto's server on
loopback (its Lambda made strict like AWS by ``moto_lambda.StrictLambda``), a real relay, the
real PostgreSQL, and the function's side played by burrow's extension with the environment
``burrow dev`` wrote."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from burrow.roles.relay import Relay
from burrow.tokens import TokenKey, load_deny, parse_token
from helpers import SCALE, free_port, relay_config
from lambda_fake import FakeExtensionsAPI, extension
from moto_lambda import (
    REGION,
    StrictLambda,
    aws_env,
    client,
    configuration,
    deploy,
    moto_url,
    reset,
)
from serverless_support import EmulatorProcess

__all__ = ["moto_url"]  # a fixture

pytestmark = pytest.mark.timeout(120)

DATABASE_URL = "postgres://app:pw@localhost:5432/app"


# --- fixtures ------------------------------------------------------------------------------


@dataclass
class Aws:
    url: str
    strict: StrictLambda

    def env(self) -> dict[str, str]:
        return aws_env(self.url)


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Aws]:
    reset(moto_url)
    strict = StrictLambda()
    strict.install(monkeypatch)
    yield Aws(moto_url, strict)


@dataclass
class World:
    tmp: Path
    relay: Relay
    control: int
    key_dir: Path
    layer_zip: Path

    def args(self, *extra: str) -> list[str]:
        assert self.relay.fingerprint
        return [
            "--to",
            f"127.0.0.1:{self.control}",
            "--fingerprint",
            self.relay.fingerprint,
            "--token-key-dir",
            str(self.key_dir),
            "--layer-zip",
            str(self.layer_zip),
            "--state-dir",
            str(self.tmp / "dev-state"),
            "--json",
            *extra,
        ]

    async def restart_relay(self) -> None:
        await self.relay.close()
        self.relay = Relay(relay_config(self.tmp, listen_port=self.control))
        await self.relay.start()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    key_dir = tmp_path / "relay-state"
    TokenKey.load_or_create(key_dir)
    control = free_port()
    relay = Relay(relay_config(tmp_path, listen_port=control))
    await relay.start()
    layer = tmp_path / "layer.zip"
    with zipfile.ZipFile(layer, "w") as archive:
        archive.writestr("extensions/burrow", "#!/bin/sh\nexec python3 -m burrow.aws.extension\n")
    state = World(tmp_path, relay, control, key_dir, layer)
    try:
        yield state
    finally:
        await state.relay.close()


@dataclass
class Dev:
    """A running ``burrow dev --json``: its events as they come."""

    proc: asyncio.subprocess.Process
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _pumps: list[asyncio.Task[None]] = field(default_factory=list)

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.events.append(json.loads(line))
            self._changed.set()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr.append(line.decode().rstrip("\n"))
            self._changed.set()

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    async def wait(self, name: str, count: int = 1, timeout: float = 30.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout * SCALE):
            while len(self.named(name)) < count:
                if self.proc.returncode is not None and all(p.done() for p in self._pumps):
                    raise AssertionError(f"burrow dev ended before {name!r}: {self.stderr}")
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self._changed.wait()
        return self.named(name)[count - 1]

    async def finish(self, timeout: float = 30.0) -> int:
        async with asyncio.timeout(timeout * SCALE):
            code = await self.proc.wait()
            await asyncio.gather(*self._pumps)
        return code


@contextlib.asynccontextmanager
async def burrow_dev(args: list[str], env: dict[str, str]) -> AsyncIterator[Dev]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BURROW_"))}
    clean["BURROW_HOME"] = os.environ["BURROW_HOME"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "burrow.cli",
        "dev",
        *args,
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    dev = Dev(proc)
    dev._pumps = [
        asyncio.ensure_future(dev._read_stdout()),
        asyncio.ensure_future(dev._read_stderr()),
    ]
    try:
        yield dev
    except BaseException:
        print("burrow dev events:", *dev.events, "stderr:", *dev.stderr, sep="\n  ")
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pump in dev._pumps:
            pump.cancel()


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BURROW_"))}
    clean["BURROW_HOME"] = os.environ["BURROW_HOME"]
    return subprocess.run(
        [sys.executable, "-m", "burrow.cli", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60 * SCALE,
        check=False,
    )


def vpc_subnet(url: str, *, nat: bool) -> tuple[str, str, str]:
    """A VPC and a subnet, routed to the internet through a NAT gateway or not at all."""
    ec2 = client(url, "ec2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName=f"g{subnet}", Description="d", VpcId=vpc)
    if nat:
        public = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.2.0/24")["Subnet"]["SubnetId"]
        allocation = ec2.allocate_address(Domain="vpc")["AllocationId"]
        gateway = ec2.create_nat_gateway(SubnetId=public, AllocationId=allocation)
        table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
        ec2.create_route(
            RouteTableId=table,
            DestinationCidrBlock="0.0.0.0/0",
            NatGatewayId=gateway["NatGateway"]["NatGatewayId"],
        )
        ec2.associate_route_table(RouteTableId=table, SubnetId=subnet)
    return vpc, subnet, group["GroupId"]


def query(port: int, host: str = "127.0.0.1") -> int:
    with psycopg.connect(
        host=host, port=port, user="postgres", dbname="test", connect_timeout=10
    ) as conn:
        row = conn.execute("SELECT 1").fetchone()
        assert row is not None
        return int(row[0])


def function_env(url: str, name: str, **replace: str) -> dict[str, str]:
    env, _ = configuration(url, name)
    connect = env["BURROW_CONNECT"]
    for old, new in replace.items():
        connect = connect.replace(old, new)
    return {**env, "BURROW_CONNECT": connect}


# --- the session ---------------------------------------------------------------------------


async def test_session_changes_functions_and_restores_them(aws: Aws, world: World) -> None:
    url = aws.url
    deploy(
        url,
        "api",
        {
            "DATABASE_URL": DATABASE_URL,
            "STP_POSTGRES_DB_CONNECTION_STRING": "postgresql://postgres:pw@localhost:5432/pg",
            "NODE_ENV": "development",
        },
    )
    deploy(
        url,
        "worker",
        {"DB_HOST": "host.docker.internal", "DB_PORT": "5432", "LOG": "info"},
        Runtime="python3.12",
        Handler="app.handler",
    )
    deploy(url, "orders", {"AWS_ENDPOINT_URL_DYNAMODB": "http://localhost:8000", "T": "orders"})
    _, subnet, group = vpc_subnet(url, nat=False)
    deploy(
        url,
        "private-api",
        {"DATABASE_URL": DATABASE_URL},
        VpcConfig={"SubnetIds": [subnet], "SecurityGroupIds": [group]},
    )
    deploy(url, "plain", {"TABLE_NAME": "orders"})
    deploy(url, "bare", None)
    names = ["api", "worker", "orders", "private-api", "plain", "bare"]
    before = {name: configuration(url, name) for name in names}

    args = world.args("--local", "pg=5432,ddb=8000", "--ttl", "2h")
    async with burrow_dev(args, aws.env()) as dev:
        ready = await dev.wait("dev_ready")
        plan = dev.named("dev_plan")[0]
        assert (plan["change"], plan["skip"], plan["unrelated"]) == (3, 1, 2)
        found = {e["function"]: e for e in dev.named("function_found")}
        assert sorted(found) == ["api", "orders", "worker"]
        assert found["worker"]["references"] == [
            {
                "variable": "DB_HOST",
                "port_variable": "DB_PORT",
                "host": "host.docker.internal",
                "port": 5432,
                "resource": "pg",
            }
        ]
        skipped = {e["function"]: e["reason"] for e in dev.named("function_skipped")}
        # (moto reports a made-up VpcId for functions; the subnet is the real one)
        assert f"subnet {subnet} has no route to the internet" in skipped["private-api"]
        assert skipped["plain"] == skipped["bare"] == "refers to nothing local"
        assert sorted(ready["functions"]) == ["api", "orders", "worker"]
        services = {r["name"]: r["service"] for r in ready["resources"]}
        assert any(
            "nothing answers on 127.0.0.1:8000 (ddb)" in e["message"] for e in dev.named("warning")
        )

        # What the functions have now: their own variables, the extension's, the layer.
        api_env, api_layers = configuration(url, "api")
        assert {k: v for k, v in api_env.items() if not k.startswith("BURROW_")} == before["api"][0]
        assert api_env["BURROW_RELAY"] == f"127.0.0.1:{world.control}"
        assert api_env["BURROW_CONNECT"] == f"{services['pg']}=127.0.0.1:5432"
        assert api_env["BURROW_FINGERPRINT"] == world.relay.fingerprint
        assert len(api_layers) == 1 and ":layer:burrow-dev-standalone-x86_64:" in api_layers[0]
        worker_env, worker_layers = configuration(url, "worker")
        assert worker_env["DB_HOST"] == "127.0.0.1" and worker_env["DB_PORT"] == "5432"
        assert ":layer:burrow-dev-python312-x86_64:" in worker_layers[0]
        orders_env, _ = configuration(url, "orders")
        assert orders_env["AWS_ENDPOINT_URL_DYNAMODB"] == "http://localhost:8000"
        assert orders_env["BURROW_CONNECT"] == f"{services['ddb']}=127.0.0.1:8000"
        for name in ("private-api", "plain", "bare"):
            assert configuration(url, name) == before[name]

        # The token reaches exactly this session's services, for as long as the session.
        claims, _, _ = parse_token(api_env["BURROW_TOKEN"])
        assert sorted(claims["connect"]) == sorted(services.values())
        assert claims["expose"] == [] and claims["exp"] - claims["iat"] == 7200

        # The function's side: the extension with the environment burrow dev wrote reaches
        # this machine's PostgreSQL (its listener moved off 5432, which PostgreSQL holds here).
        fake = FakeExtensionsAPI()
        await fake.start()
        pg_port = free_port()
        env = function_env(url, "api", **{"127.0.0.1:5432": f"127.0.0.1:{pg_port}"})
        try:
            async with extension({**env, "AWS_LAMBDA_RUNTIME_API": fake.address}, fake) as ext:
                await fake.wait_call("next", timeout=15)
                assert await asyncio.to_thread(query, pg_port) == 1
                fake.push("SHUTDOWN", shutdownReason="spindown")
                assert await ext.exited(5) == 0
        finally:
            await fake.close()
        assert not fake.violations

        # A tunnel that drops and comes back is shown.
        tunnels_before = len(dev.named("tunnel_ready"))
        await world.restart_relay()
        await dev.wait("session_lost")
        await dev.wait("tunnel_ready", tunnels_before + 2)

        # Someone edits functions during the session: a variable burrow changed, and another.
        lam = client(url, "lambda")
        current, _ = configuration(url, "worker")
        lam.update_function_configuration(
            FunctionName="worker", Environment={"Variables": {**current, "DB_HOST": "db.internal"}}
        )
        current, _ = configuration(url, "api")
        lam.update_function_configuration(
            FunctionName="api", Environment={"Variables": {**current, "FEATURE": "on"}}
        )

        dev.proc.send_signal(signal.SIGINT)
        assert await dev.finish() == 0
    restored = {e["function"]: e for e in dev.named("function_restored")}
    assert sorted(restored) == ["api", "orders", "worker"]
    assert restored["worker"]["kept"] == ["DB_HOST"]
    assert configuration(url, "orders") == before["orders"]  # exactly
    assert configuration(url, "api") == ({**before["api"][0], "FEATURE": "on"}, [])
    assert configuration(url, "worker") == ({**before["worker"][0], "DB_HOST": "db.internal"}, [])
    for name in ("private-api", "plain", "bare"):
        assert configuration(url, name) == before[name]
    assert not (world.tmp / "dev-state" / "journal.json").exists()
    assert {parse_token(api_env["BURROW_TOKEN"])[0]["id"]} <= load_deny(world.key_dir)
    assert not dev.stderr, dev.stderr


async def test_journal_survives_kill_9(aws: Aws, world: World) -> None:
    url = aws.url
    deploy(url, "api", {"DATABASE_URL": DATABASE_URL})
    deploy(url, "worker", {"DB_HOST": "localhost", "DB_PORT": "5432"}, Layers=[])
    before = {name: configuration(url, name) for name in ("api", "worker")}
    args = world.args("--local", "pg=5432")
    journal = world.tmp / "dev-state" / "journal.json"

    async def session_killed() -> dict[str, Any]:
        async with burrow_dev(args, aws.env()) as dev:
            await dev.wait("dev_ready")
            dev.proc.send_signal(signal.SIGKILL)
            assert await dev.finish() == -signal.SIGKILL
        assert "BURROW_TOKEN" in configuration(url, "api")[0]
        saved = json.loads(journal.read_text())
        assert sorted(e["name"] for e in saved["entries"]) == ["api", "worker"]
        assert all(e["state"] == "applied" for e in saved["entries"])
        assert (
            next(e for e in saved["entries"] if e["name"] == "api")["original_env"]
            == (before["api"][0])
        )
        return {"layers": dev.named("layer_ready"), "tokens": saved["tokens"]}

    first = await session_killed()
    assert [e["published"] for e in first["layers"]] == [True]

    # burrow dev restore puts them back, and revokes the dead session's tokens.
    result = await asyncio.to_thread(
        run_cli,
        ["dev", "restore", "--state-dir", str(world.tmp / "dev-state"), "--json"],
        aws.env(),
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(e["function"] for e in events if e["event"] == "function_restored") == [
        "api",
        "worker",
    ]
    assert {name: configuration(url, name) for name in before} == before
    assert not journal.exists()
    assert set(first["tokens"]) <= load_deny(world.key_dir)

    # Again; this time the next burrow dev restores first (here a dry run: it then stops).
    second = await session_killed()
    assert [e["published"] for e in second["layers"]] == [False]  # the same zip: reused
    async with burrow_dev([*args, "--dry-run"], aws.env()) as dev:
        assert await dev.finish() == 0
    assert any(
        "ended without restoring 2 function(s)" in e["message"] for e in dev.named("warning")
    )
    assert len(dev.named("function_restored")) == 2
    assert dev.named("dev_plan")[0]["dry_run"] is True
    assert {name: configuration(url, name) for name in before} == before
    assert not journal.exists()
    assert set(second["tokens"]) <= load_deny(world.key_dir)


async def test_conflicts_races_and_updates_in_progress(aws: Aws, world: World) -> None:
    """Lambda refuses an update while another is in progress, and a deploy may land between
    burrow's read and its write: burrow waits for LastUpdateStatus, retries the conflicts,
    and journals the deploy's configuration as the one to restore."""
    url = aws.url
    strict = aws.strict
    deploy(url, "api", {"DATABASE_URL": DATABASE_URL})
    deploy(url, "orders", {"AWS_ENDPOINT_URL_DYNAMODB": "http://127.0.0.1:8000"})
    strict.settle_reads = 2
    strict.conflicts["api"] = 2
    strict.throttles["orders"] = 1
    strict.races["orders"] = {"T": "deployed"}
    args = world.args("--local", "pg=5432,ddb=8000")
    async with burrow_dev(args, aws.env()) as dev:
        ready = await dev.wait("dev_ready")
        assert sorted(ready["functions"]) == ["api", "orders"]
        retries = [(e["function"], e["code"]) for e in dev.named("function_retry")]
        assert retries == [("api", "ResourceConflictException")] * 2
        assert strict.in_progress_reads > 0  # it saw updates in progress, and waited
        assert strict.throttles["orders"] == 0  # throttled once, retried
        orders_env, _ = configuration(url, "orders")
        assert orders_env["T"] == "deployed" and "BURROW_TOKEN" in orders_env
        dev.proc.send_signal(signal.SIGTERM)
        assert await dev.finish() == 0
    assert strict.refused_in_progress == 0  # never an update while one was in progress
    assert configuration(url, "api") == ({"DATABASE_URL": DATABASE_URL}, [])
    assert configuration(url, "orders") == (
        {"AWS_ENDPOINT_URL_DYNAMODB": "http://127.0.0.1:8000", "T": "deployed"},
        [],
    )


async def test_public_mode(aws: Aws, world: World) -> None:
    """--public: connection strings point at the relay's public ports, no layer; the same
    PostgreSQL answers there."""
    url = aws.url
    original = {"DB_HOST": "host.docker.internal", "DB_PORT": "5432", "DB_NAME": "test"}
    deploy(url, "api", original)
    args = [a for a in world.args("--local", "pg=5432", "--public") if a != "--layer-zip"]
    args.remove(str(world.layer_zip))
    async with burrow_dev(args, aws.env()) as dev:
        ready = await dev.wait("dev_ready")
        assert "reachable from the internet" in dev.named("warning")[-1]["message"]
        public = ready["resources"][0]["public"]
        env, layers = configuration(url, "api")
        assert f"{env['DB_HOST']}:{env['DB_PORT']}" == public
        assert layers == [] and not [k for k in env if k.startswith("BURROW_")]
        assert await asyncio.to_thread(query, int(env["DB_PORT"]), env["DB_HOST"]) == 1
        dev.proc.send_signal(signal.SIGHUP)  # the terminal closed
        assert await dev.finish() == 0
    assert configuration(url, "api") == (original, [])


async def test_stack_vpc_with_nat_and_dry_run(aws: Aws, world: World) -> None:
    url = aws.url
    _, subnet, group = vpc_subnet(url, nat=True)
    template = {
        "Resources": {
            "Api": {
                "Type": "AWS::Lambda::Function",
                "Properties": {
                    "FunctionName": "stack-api",
                    "Runtime": "nodejs20.x",
                    "Role": "arn:aws:iam::123456789012:role/lambda",
                    "Handler": "index.handler",
                    "Code": {"ZipFile": "exports.handler = async () => 1;"},
                    "Environment": {"Variables": {"REDIS_URL": "redis://localhost:6379/0"}},
                    "VpcConfig": {"SubnetIds": [subnet], "SecurityGroupIds": [group]},
                },
            }
        }
    }
    deploy(url, "elsewhere", {"DATABASE_URL": DATABASE_URL})
    client(url, "cloudformation").create_stack(StackName="app", TemplateBody=json.dumps(template))
    before = configuration(url, "stack-api")
    args = world.args("--local", "cache=6379", "--stack", "app", "--dry-run")
    async with burrow_dev(args, aws.env()) as dev:
        assert await dev.finish() == 0
    assert [e["function"] for e in dev.named("function_found")] == ["stack-api"]
    assert not dev.named("function_skipped")  # the NAT gives it a way out
    assert configuration(url, "stack-api") == before
    assert not dev.named("dev_ready")


@pytest.mark.parametrize(
    ("setup", "args", "code", "message"),
    [
        ("creds", ["--local", "pg=5432"], 1, "no AWS credentials"),
        ("", ["--local", "pg=5432"], 1, f"no Lambda functions in {REGION}"),
        ("api", ["--local", "pg=5432", "--function", "nope"], 1, "function 'nope' is not deployed"),
        ("api", ["--local", "pg=5432", "RELAY-DOWN"], 1, "the relay is unreachable"),
        ("api", ["--local", "pg=5432", "NO-KEY"], 2, "the relay's token key, and there is none"),
        ("api", ["--local", "redis=6379"], 1, "no function refers to a local resource"),
        ("", ["--local", "pg"], 2, "--local 'pg': expected NAME=PORT"),
        ("", [], 2, "burrow dev needs --local NAME=PORT"),
        ("", ["--local", "pg=5432", "WSS", "--public"], 2, "--public needs a burrow relay"),
        ("", ["--local", "pg=5432", "WSS", "NO-KEY-DIR"], 2, "with the serverless stack's token"),
        ("", ["--local", "pg=5432", "WSS"], 2, "--fingerprint is for a burrow relay"),
        ("", ["--local", "pg=5432", "WS-ELSEWHERE"], 2, "is plaintext to another machine"),
    ],
)
async def test_errors_are_one_line(
    aws: Aws, world: World, setup: str, args: list[str], code: int, message: str
) -> None:
    env = aws.env()
    if setup == "creds":
        env = {
            k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        }
    if setup == "api":
        deploy(aws.url, "api", {"DATABASE_URL": DATABASE_URL})
    markers = ("RELAY-DOWN", "NO-KEY", "WSS", "NO-KEY-DIR", "WS-ELSEWHERE")
    full = world.args(*[a for a in args if a not in markers])
    if "RELAY-DOWN" in args:
        full[full.index("--to") + 1] = f"127.0.0.1:{free_port()}"
        full += ["--connect-timeout", "1"]
    if "NO-KEY" in args:
        full[full.index("--token-key-dir") + 1] = str(world.tmp / "elsewhere")
    if "WSS" in args:
        full[full.index("--to") + 1] = "wss://abc.execute-api.eu-west-1.amazonaws.com/dev"
        if "--public" in args:
            del full[full.index("--layer-zip") : full.index("--layer-zip") + 2]
    if "NO-KEY-DIR" in args:
        del full[full.index("--token-key-dir") : full.index("--token-key-dir") + 2]
    if "WS-ELSEWHERE" in args:
        full[full.index("--to") + 1] = "ws://relay.example:8001/local"
    result = await asyncio.to_thread(run_cli, ["dev", *full], env)
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("burrow: error: "), result.stderr
    assert message in lines[0]
    if setup == "api":
        assert "BURROW_TOKEN" not in configuration(aws.url, "api")[0]
    assert not (world.tmp / "dev-state" / "journal.json").exists()


async def test_ctrl_c_while_applying(aws: Aws, world: World) -> None:
    """Ctrl+C before the session is ready: what was changed goes back, the rest is left alone,
    and the session never reports ready."""
    url = aws.url
    deploy(url, "api", {"DATABASE_URL": DATABASE_URL})
    deploy(url, "worker", {"PGHOST": "localhost", "PGPORT": "5432"})
    before = {name: configuration(url, name) for name in ("api", "worker")}
    aws.strict.conflicts["worker"] = 3  # keeps burrow busy on the second function
    async with burrow_dev(world.args("--local", "pg=5432"), aws.env()) as dev:
        await dev.wait("function_updated")
        dev.proc.send_signal(signal.SIGINT)
        assert await dev.finish() == 0
    assert not dev.named("dev_ready")
    assert {e["function"] for e in dev.named("function_restored")} == {
        e["function"] for e in dev.named("function_updated")
    }
    assert {name: configuration(url, name) for name in before} == before
    assert not (world.tmp / "dev-state" / "journal.json").exists()


# --- the serverless relay ------------------------------------------------------------------


def psql(port: int, sql: str) -> str:
    """The real psql, as a function's database client would connect to localhost."""
    where = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "test"]
    result = subprocess.run(
        ["psql", "-XAt", *where, "-c", sql],
        env={**os.environ, "PGCONNECT_TIMEOUT": "20"},
        capture_output=True,
        text=True,
        timeout=60 * SCALE,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def serverless_dev_args(
    emulator: EmulatorProcess, stack_key: Path, world: World, state: Path
) -> list[str]:
    """``burrow dev`` against the emulated serverless relay, tokens minted with the stack's
    key, the local PostgreSQL as ``pg``."""
    return [
        "--to",
        emulator.ws_url,
        "--token-key-dir",
        str(stack_key),
        "--layer-zip",
        str(world.layer_zip),
        "--state-dir",
        str(state),
        "--local",
        "pg=5432",
        "--json",
    ]


async def test_session_through_the_serverless_relay(aws: Aws, world: World) -> None:
    """``burrow dev --to ws://EMULATOR``: `burrow serverless emulate` in its own process is the
    relay; the function gets the URL, a token minted with the stack's key and its listeners;
    the Python extension with that environment lets psql reach the real PostgreSQL; SIGINT
    restores the function exactly, and the tokens are said to expire (the stack's deny list
    is a CloudFormation parameter burrow dev does not change)."""
    url = aws.url
    deploy(url, "api", {"DATABASE_URL": DATABASE_URL, "NODE_ENV": "development"})
    deploy(url, "plain", {"TABLE_NAME": "orders"})
    before = {name: configuration(url, name) for name in ("api", "plain")}
    stack_key = world.tmp / "stack-key"
    with EmulatorProcess(stack_key) as emulator:
        args = serverless_dev_args(emulator, stack_key, world, world.tmp / "dev-state")
        async with burrow_dev([*args, "--ttl", "1h"], aws.env()) as dev:
            ready = await dev.wait("dev_ready")
            assert ready["functions"] == ["api"] and ready["relay"] == emulator.ws_url
            service = ready["resources"][0]["service"]
            env, layers = configuration(url, "api")
            assert env["BURROW_RELAY"] == emulator.ws_url
            assert env["BURROW_CONNECT"] == f"{service}=127.0.0.1:5432"
            assert "BURROW_FINGERPRINT" not in env and "BURROW_INSECURE" not in env
            assert env["DATABASE_URL"] == DATABASE_URL and len(layers) == 1
            claims, _, _ = parse_token(env["BURROW_TOKEN"])
            assert claims["connect"] == [service] and claims["expose"] == []
            assert claims["exp"] - claims["iat"] == 3600

            # The function's side: the extension (listening off 5432, which PostgreSQL holds
            # here) with the environment burrow dev wrote, and psql through it.
            fake = FakeExtensionsAPI()
            await fake.start()
            pg_port = free_port()
            ext_env = function_env(url, "api", **{"127.0.0.1:5432": f"127.0.0.1:{pg_port}"})
            try:
                async with extension(
                    {**ext_env, "AWS_LAMBDA_RUNTIME_API": fake.address}, fake
                ) as ext:
                    await fake.wait_call("next", timeout=20)
                    sql = "SELECT 'via ' || current_database(), inet_server_port()"
                    assert await asyncio.to_thread(psql, pg_port, sql) == "via test|5432"
                    fake.push("INVOKE")
                    await fake.wait_call("next", 2, timeout=15)
                    assert await asyncio.to_thread(psql, pg_port, "SELECT 6 * 7") == "42"
                    fake.push("SHUTDOWN", shutdownReason="spindown")
                    assert await ext.exited(5) == 0
            finally:
                await fake.close()
            assert not fake.violations

            dev.proc.send_signal(signal.SIGINT)
            assert await dev.finish() == 0
    assert [e["function"] for e in dev.named("function_restored")] == ["api"]
    assert {name: configuration(url, name) for name in before} == before  # exactly
    assert not (world.tmp / "dev-state" / "journal.json").exists()
    note = dev.named("tokens_not_revoked")
    assert len(note) == 1 and parse_token(env["BURROW_TOKEN"])[0]["id"] in note[0]["tokens"]
    assert "RevokedTokens" in note[0]["message"] and note[0]["expires"] == claims["exp"]
    assert not (stack_key / "token.deny").exists()  # nothing pretends to revoke there
    assert not dev.stderr, dev.stderr


async def test_a_serverless_session_killed_is_restored_by_burrow_dev_restore(
    aws: Aws, world: World
) -> None:
    """``kill -9`` of ``burrow dev --to ws://``: the journal survives, ``burrow dev restore``
    puts the function back exactly, and says when its tokens expire (the journal keeps it)
    rather than writing a deny list the serverless relay never reads."""
    url = aws.url
    deploy(url, "api", {"DATABASE_URL": DATABASE_URL})
    before = configuration(url, "api")
    stack_key = world.tmp / "stack-key"
    state = world.tmp / "dev-state"
    with EmulatorProcess(stack_key) as emulator:
        async with burrow_dev(
            serverless_dev_args(emulator, stack_key, world, state), aws.env()
        ) as dev:
            await dev.wait("dev_ready")
            token = configuration(url, "api")[0]["BURROW_TOKEN"]
            dev.proc.send_signal(signal.SIGKILL)
            assert await dev.finish() == -signal.SIGKILL
    assert configuration(url, "api") != before
    result = await asyncio.to_thread(
        run_cli, ["dev", "restore", "--state-dir", str(state), "--json"], aws.env()
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["function"] for e in events if e["event"] == "function_restored"] == ["api"]
    assert configuration(url, "api") == before  # exactly
    assert not (state / "journal.json").exists()
    note = [e for e in events if e["event"] == "tokens_not_revoked"]
    assert len(note) == 1 and parse_token(token)[0]["id"] in note[0]["tokens"], events
    assert note[0]["expires"] == parse_token(token)[0]["exp"]  # from the journal
    assert not (stack_key / "token.deny").exists()


def test_a_serverless_relay_url_in_the_plan_and_at_the_end() -> None:
    """The VPC route check takes the host from a wss:// URL (API Gateway is outside any VPC:
    a function without a NAT cannot reach it); a journal with tokens and no key directory (a
    serverless session's) says they expire, and writes no deny list anywhere."""
    from burrow.aws.dev import _host_of, revoke_tokens
    from burrow.aws.devplan import FunctionInfo, Resource, Skip, plan
    from burrow.aws.journal import Journal
    from helpers import Events

    url = "wss://abc123.execute-api.eu-west-1.amazonaws.com/relay"
    assert _host_of(url) == "abc123.execute-api.eu-west-1.amazonaws.com"
    assert _host_of("ws://127.0.0.1:8001/local") == "127.0.0.1"
    assert _host_of("relay.example.com:7835") == "relay.example.com"
    info = FunctionInfo(
        name="in-vpc",
        arn="arn:aws:lambda:eu-west-1:1:function:in-vpc",
        env={"DATABASE_URL": DATABASE_URL},
        layers=(),
        runtime="nodejs20.x",
        subnets=("subnet-1",),
        vpc_id="vpc-1",
    )
    resources = [Resource("pg", 5432, "dev-x-pg")]
    skipped = plan(info, resources, "private", routes={"subnet-1": False}, relay_host=_host_of(url))
    assert isinstance(skipped, Skip) and "no route to the internet" in skipped.reason
    routed = plan(info, resources, "private", routes={"subnet-1": True}, relay_host=_host_of(url))
    assert not isinstance(routed, Skip)

    journal = Journal.at(Path(os.environ["BURROW_HOME"]) / "dev-state")
    journal.path.parent.mkdir(parents=True, exist_ok=True)
    journal.tokens = ["t1", "t2"]
    events = Events()
    revoke_tokens(journal, events, expires=1_900_000_000)
    [note] = events.named("tokens_not_revoked")
    assert note["tokens"] == ["t1", "t2"] and note["expires"] == 1_900_000_000
    assert "add t1 t2 to the stack's RevokedTokens parameter" in note["message"]
    assert journal.tokens == [] and not list(journal.path.parent.glob("token.deny"))

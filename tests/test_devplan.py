"""What ``burrow dev`` decides for each function, and how it puts functions back (sans-I/O),
and its journal on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from burrow.aws.devplan import (
    FunctionInfo,
    LayerNeed,
    Resource,
    Skip,
    Target,
    desired,
    plan,
    restore,
)
from burrow.aws.journal import Entry, Journal, JournalBusy, locked
from burrow.aws.lambdas import _routes_out
from burrow.errors import ConfigError

PG = Resource("pg", 5432, "dev-abc123-pg", ("relay.example.com", 20001))
DDB = Resource("ddb", 8000, "dev-abc123-ddb", ("relay.example.com", 20002))
RESOURCES = [PG, DDB]


def fn(env: dict[str, str], **kw: object) -> FunctionInfo:
    fields: dict[str, object] = {
        "name": "api",
        "arn": "arn:aws:lambda:eu-west-1:1:function:api",
        "env": env,
        "layers": (),
        "runtime": "nodejs20.x",
    }
    fields.update(kw)
    return FunctionInfo(**fields)  # type: ignore[arg-type]


def test_from_aws_configuration() -> None:
    info = FunctionInfo.from_aws(
        {
            "FunctionName": "api",
            "FunctionArn": "arn:x",
            "Runtime": "python3.12",
            "Environment": {"Variables": {"A": "1"}},
            "Layers": [{"Arn": "arn:layer:1", "CodeSize": 3}],
            "VpcConfig": {"SubnetIds": ["subnet-1"], "SecurityGroupIds": [], "VpcId": "vpc-1"},
            "Architectures": ["arm64"],
            "RevisionId": "r1",
            "LastUpdateStatus": "Successful",
        }
    )
    assert info.env == {"A": "1"} and info.layers == ("arn:layer:1",)
    assert info.subnets == ("subnet-1",) and info.vpc_id == "vpc-1" and info.arch == "arm64"
    bare = FunctionInfo.from_aws({"FunctionName": "x", "VpcConfig": {"SubnetIds": []}})
    assert bare.env == {} and bare.layers == () and bare.subnets == ()


def test_plan_kinds_of_function() -> None:
    node = plan(fn({"DATABASE_URL": "postgres://app:pw@localhost:5432/app"}), RESOURCES, "private")
    assert isinstance(node, Target)
    assert node.layer == LayerNeed("standalone", "x86_64")
    python = plan(
        fn({"DB_HOST": "localhost", "DB_PORT": "5432"}, runtime="python3.12"), RESOURCES, "private"
    )
    assert isinstance(python, Target) and python.layer == LayerNeed("python", "x86_64", "3.12")
    nothing = plan(fn({"TABLE": "orders"}), RESOURCES, "private")
    assert isinstance(nothing, Skip) and nothing.quiet


@pytest.mark.parametrize(
    ("info", "kw", "reason"),
    [
        (fn({"R": "redis://localhost:6379"}), {}, "local port 6379, which no --local names"),
        (fn({"U": "postgres://localhost/x", "BURROW_RELAY": "r:1"}), {}, "already set up"),
        (
            fn({"U": "postgres://localhost/x"}, subnets=("subnet-1",), vpc_id="vpc-1"),
            {"routes": {"subnet-1": False}, "relay_host": "relay.example.com"},
            "subnet subnet-1 has no route to the internet",
        ),
        (
            fn({"U": "postgres://localhost/x"}, subnets=("subnet-1",)),
            {"routes": {"subnet-1": None}, "relay_host": "relay.example.com"},
            "cannot tell whether subnet subnet-1",
        ),
        (
            fn({"U": "postgres://localhost/x"}),
            {"relay_host": "10.0.0.5"},
            "not in a VPC, so it cannot reach the relay's private address",
        ),
        (fn({"U": "postgres://localhost/x"}, package_type="Image"), {}, "container image"),
        (fn({"U": "postgres://localhost/x"}, layers=("a", "b", "c", "d", "e")), {}, "5 layers"),
        (fn({"U": "postgres://localhost/x"}), {"standalone": False}, "needs burrow's standalone"),
        (
            fn({"U": "postgres://localhost/x", "BIG": "x" * 3800}),
            {},
            "Lambda's 4096-byte limit",
        ),
    ],
)
def test_plan_skips_with_a_reason(info: FunctionInfo, kw: dict[str, object], reason: str) -> None:
    result = plan(info, RESOURCES, "private", **kw)  # type: ignore[arg-type]
    assert isinstance(result, Skip)
    assert reason in result.reason


def test_plan_vpc_that_can_reach_the_relay() -> None:
    info = fn({"U": "postgres://localhost/x"}, subnets=("s1", "s2"), vpc_id="vpc-1")
    assert isinstance(plan(info, RESOURCES, "private", routes={"s1": True, "s2": True}), Target)
    # a relay inside the VPC needs no NAT
    assert isinstance(plan(info, RESOURCES, "private", relay_host="10.0.3.7"), Target)
    # --public puts no layer on, so images and full layer lists are fine
    image = fn({"U": "postgres://localhost/x"}, package_type="Image")
    assert isinstance(plan(image, RESOURCES, "public"), Target)
    named = fn({"U": "postgres://localhost/x"})
    assert isinstance(plan(named, RESOURCES, "private", standalone=False, layer_given=True), Target)


def test_desired_private() -> None:
    info = fn(
        {
            "DATABASE_URL": "postgres://app:pw@host.docker.internal:5432/app",
            "AWS_ENDPOINT_URL_DYNAMODB": "http://[::1]:8000",
            "KEEP": "x",
        },
        layers=("arn:other:1",),
    )
    target = plan(info, RESOURCES, "private")
    assert isinstance(target, Target)
    env, layers = desired(
        target,
        RESOURCES,
        "private",
        relay="relay.example.com:7835",
        token="bt1.t",
        fingerprint="sha256:ab",
        layer_arn="arn:burrow:3",
    )
    assert env == {
        "DATABASE_URL": "postgres://app:pw@127.0.0.1:5432/app",
        "AWS_ENDPOINT_URL_DYNAMODB": "http://[::1]:8000",
        "KEEP": "x",
        "BURROW_RELAY": "relay.example.com:7835",
        "BURROW_TOKEN": "bt1.t",
        "BURROW_CONNECT": "dev-abc123-pg=127.0.0.1:5432,dev-abc123-ddb=[::1]:8000",
        "BURROW_FINGERPRINT": "sha256:ab",
    }
    assert layers == ("arn:other:1", "arn:burrow:3")
    insecure, _ = desired(target, RESOURCES, "private", relay="r:1", insecure=True)
    assert insecure["BURROW_INSECURE"] == "1" and "BURROW_FINGERPRINT" not in insecure


def test_desired_private_mixed_spellings_listen_on_ipv4() -> None:
    info = fn({"A": "postgres://[::1]:5432/x", "B": "postgres://localhost:5432/x"})
    target = plan(info, RESOURCES, "private")
    assert isinstance(target, Target)
    env, _ = desired(target, RESOURCES, "private", relay="r:1", token="t")
    assert env["BURROW_CONNECT"] == "dev-abc123-pg=127.0.0.1:5432"
    assert env["A"] == "postgres://127.0.0.1:5432/x"
    assert env["B"] == "postgres://localhost:5432/x"


def test_desired_public() -> None:
    info = fn({"DB_HOST": "localhost", "DB_PORT": "5432", "D": "http://localhost:8000/x"})
    target = plan(info, RESOURCES, "public")
    assert isinstance(target, Target)
    env, layers = desired(target, RESOURCES, "public")
    assert env == {
        "DB_HOST": "relay.example.com",
        "DB_PORT": "20001",
        "D": "http://relay.example.com:20002/x",
    }
    assert layers == ()


# --- restore -------------------------------------------------------------------------------

ORIGINAL = ({"DATABASE_URL": "postgres://host.docker.internal:5432/x", "A": "1"}, ["arn:l:1"])
APPLIED = (
    {"DATABASE_URL": "postgres://127.0.0.1:5432/x", "A": "1", "BURROW_TOKEN": "t"},
    ["arn:l:1", "arn:burrow:1"],
)


def test_restore_untouched_is_exact() -> None:
    result = restore(ORIGINAL, APPLIED, APPLIED)
    assert result.env == ORIGINAL[0] and list(result.layers) == ORIGINAL[1]
    assert result.kept == [] and result.needed


def test_restore_keeps_what_others_changed() -> None:
    current = (
        {
            "DATABASE_URL": "postgres://db.internal:5432/x",  # changed by a deploy
            "A": "2",  # never touched by burrow: whatever it is now
            "NEW": "y",  # added meanwhile
            "BURROW_TOKEN": "t",
        },
        ["arn:l:2", "arn:burrow:1", "arn:extra:1"],
    )
    result = restore(ORIGINAL, APPLIED, current)
    assert result.env == {"DATABASE_URL": "postgres://db.internal:5432/x", "A": "2", "NEW": "y"}
    assert list(result.layers) == ["arn:l:2", "arn:extra:1"]
    assert result.kept == ["DATABASE_URL", "Layers"]


def test_restore_when_nothing_of_burrow_is_left() -> None:
    result = restore(ORIGINAL, APPLIED, ORIGINAL)  # a crash before the update happened
    assert not result.needed and result.kept == []
    deployed = ({"DATABASE_URL": "postgres://prod:5432/x"}, ["arn:l:9"])  # a deploy since
    result = restore(ORIGINAL, APPLIED, deployed)
    assert not result.needed
    assert "DATABASE_URL" in result.kept


# --- the journal ---------------------------------------------------------------------------


def entry(arn: str = "arn:f:1") -> Entry:
    return Entry(arn, "api", "eu-west-1", {"A": "1"}, [], {"A": "1", "B": "2"}, ["arn:b:1"])


def test_journal_round_trip(tmp_path: Path) -> None:
    journal = Journal.at(tmp_path)
    journal.tokens, journal.key_dir = ["0123456789ab"], str(tmp_path / "relay")
    journal.put(entry())
    assert (tmp_path / "journal.json").stat().st_mode & 0o777 == 0o600
    loaded = Journal.load(tmp_path)
    assert loaded is not None
    assert loaded.entries == journal.entries and loaded.tokens == journal.tokens
    loaded.drop("arn:f:1")
    loaded.tokens = []
    loaded.save()
    assert not (tmp_path / "journal.json").exists()
    assert Journal.load(tmp_path) is None


@pytest.mark.parametrize(
    "text",
    ["{", "[]", '{"version": 9}', '{"version": 1, "entries": [{"arn": 1}]}'],
)
def test_damaged_journal_is_never_dropped(tmp_path: Path, text: str) -> None:
    (tmp_path / "journal.json").write_text(text)
    with pytest.raises(ConfigError, match="damaged"):
        Journal.load(tmp_path)
    assert (tmp_path / "journal.json").read_text() == text


def test_lock_tells_a_live_session_from_a_dead_one(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from burrow.aws.journal import locked\n"
        "with locked(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(30)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(JournalBusy, match=f"pid {holder.pid}"), locked(tmp_path):
            pass
    finally:
        holder.kill()  # as kill -9: the kernel drops the lock
        holder.wait()
    with locked(tmp_path):
        assert (tmp_path / "dev.lock").read_text() == f"{os.getpid()}\n"


def test_routes_out() -> None:
    local = {"DestinationCidrBlock": "10.0.0.0/16", "GatewayId": "local", "State": "active"}
    igw = {"DestinationCidrBlock": "0.0.0.0/0", "GatewayId": "igw-1", "State": "active"}
    nat = {"DestinationCidrBlock": "0.0.0.0/0", "NatGatewayId": "nat-1", "State": "active"}
    dead = {**nat, "State": "blackhole"}
    assert not _routes_out({"Routes": [local]})
    assert not _routes_out({"Routes": [local, igw]})  # no public address on a Lambda's ENI
    assert _routes_out({"Routes": [local, nat]})
    assert not _routes_out({"Routes": [local, dead]})

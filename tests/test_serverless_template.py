"""The serverless relay's infrastructure and package: the CloudFormation template passes
cfn-lint (offline) in both forms, every IAM permission is scoped to a resource of the
template, the Lambda zip holds exactly what the handlers import and nothing heavy, and the
``burrow serverless`` commands answer a user's mistakes with one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from burrow.aws.serverless.package import MODULES, build_package
from burrow.aws.serverless.template import build_template, dump

CERT = "arn:aws:acm:us-east-1:123456789012:certificate/12345678-1234-1234-1234-123456789012"
CFN_LINT = Path(sys.executable).with_name("cfn-lint")


def test_template_passes_cfn_lint(tmp_path: Path) -> None:
    """Three variants (the default, a custom domain as JSON, no bucket), linted offline."""
    paths = []
    for i, (options, fmt) in enumerate(
        [
            ({}, "yaml"),
            ({"domain": "tunnels.example.com", "certificate_arn": CERT}, "json"),
            ({"bucket": False}, "yaml"),
        ]
    ):
        path = tmp_path / f"relay{i}.{fmt}"
        path.write_text(dump(build_template(**options), fmt))
        paths.append(str(path))
    result = subprocess.run([str(CFN_LINT), *paths], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _names_in(value: Any) -> set[str]:
    """The template resources an IAM Resource value points at."""
    if isinstance(value, dict):
        if "Ref" in value:
            return {value["Ref"]}
        if "Fn::GetAtt" in value:
            return {value["Fn::GetAtt"][0]}
        if "Fn::Sub" in value:
            found = re.findall(r"\$\{([A-Za-z0-9]+)(?:\.[A-Za-z]+)?\}", value["Fn::Sub"])
            return {n for n in found}
    return set()


def test_every_iam_action_is_scoped_to_a_resource_of_the_template() -> None:
    document = build_template(domain="tunnels.example.com", certificate_arn=CERT)
    resources = document["Resources"]
    roles = [r for r in resources.values() if r["Type"] == "AWS::IAM::Role"]
    assert len(roles) == 4  # one per function
    seen_actions = set()
    for role in roles:
        for policy in role["Properties"]["Policies"]:
            for statement in policy["PolicyDocument"]["Statement"]:
                assert statement["Effect"] == "Allow"
                actions = statement["Action"]
                assert all("*" not in action for action in actions), actions
                seen_actions.update(actions)
                targets = _names_in(statement["Resource"])
                assert targets, statement
                assert targets <= set(resources), (statement, targets)
                text = json.dumps(statement["Resource"])
                if "execute-api" in text:
                    assert "${WsApi}/relay/" in text  # this API, this stage only
    assert "execute-api:ManageConnections" in seen_actions
    assert not any(a.startswith("dynamodb:Scan") or a == "dynamodb:*" for a in seen_actions)
    functions = [r for r in resources.values() if r["Type"] == "AWS::Lambda::Function"]
    assert {f["Properties"]["Runtime"] for f in functions} == {"python3.12"}
    assert {tuple(f["Properties"]["Architectures"]) for f in functions} == {("arm64",)}
    table = resources["Table"]["Properties"]
    assert table["TimeToLiveSpecification"] == {"AttributeName": "ttl", "Enabled": True}
    groups = [r for r in resources.values() if r["Type"] == "AWS::Logs::LogGroup"]
    assert len(groups) == 4 and all(g["Properties"]["RetentionInDays"] for g in groups)
    permissions = [r for r in resources.values() if r["Type"] == "AWS::Lambda::Permission"]
    assert all(
        "/*/" in r["Properties"]["SourceArn"]["Fn::Sub"]
        or r["Properties"]["SourceArn"]["Fn::Sub"].endswith("${HttpApi}/*")
        for r in permissions
    )


def test_the_package_holds_what_the_handlers_import(tmp_path: Path) -> None:
    """Unzipped alone (with only the standard library and boto3 beside it, as on Lambda),
    the handlers import and run their lazy imports; every burrow module they load came from
    the zip, and nothing heavy (asyncio, h11, cryptography, websockets, boto3) loads at
    import time. The import time is printed (bench/serverless.py reports it)."""
    path = build_package(tmp_path / "build")
    assert re.fullmatch(r"burrow-serverless-.+-[0-9a-f]{12}\.zip", path.name)
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == sorted(MODULES)
        archive.extractall(tmp_path / "unzipped")
    assert build_package(tmp_path / "again").read_bytes() == path.read_bytes()
    code = f"""
import sys, time
sys.path.insert(0, {str(tmp_path / "unzipped")!r})
started = time.perf_counter()
import burrow.aws.serverless.handlers as h
elapsed = time.perf_counter() - started
at_import = sorted(m for m in sys.modules if m.split('.')[0] in
                   ('asyncio', 'h11', 'cryptography', 'websockets', 'boto3', 'botocore', 'msgspec'))
import burrow.aws.serverless.gateway, burrow.tokens
h._valid_name("x"); h._random_name()
mine = sorted(m.__file__ for n, m in sys.modules.items() if n.startswith('burrow') and
              getattr(m, '__file__', None))
print(repr((elapsed, at_import, mine)))
"""
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    elapsed, at_import, files = eval(result.stdout)
    assert at_import == []
    assert all(f.startswith(str(tmp_path / "unzipped")) for f in files), files
    print(f"handler import: {elapsed * 1000:.1f} ms")
    importtime = subprocess.run(
        [
            sys.executable,
            "-I",
            "-X",
            "importtime",
            "-c",
            f"import sys; sys.path.insert(0, {str(tmp_path / 'unzipped')!r}); "
            "import burrow.aws.serverless.handlers",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    last = [
        line for line in importtime.stderr.splitlines() if "burrow.aws.serverless.handlers" in line
    ]
    assert last, importtime.stderr[-500:]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "burrow.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_template_package_and_mistakes(tmp_path: Path) -> None:
    result = _cli("serverless", "template", "--format", "json")
    assert result.returncode == 0 and "WsApi" in json.loads(result.stdout)["Resources"]
    result = _cli("serverless", "package", "-o", str(tmp_path))
    assert result.returncode == 0 and "CodeKey=burrow-serverless-" in result.stdout
    for args, words in [
        (("serverless", "template", "--domain", "example.com"), "go together"),
        (
            ("serverless", "template", "--domain", "bad_domain", "--certificate-arn", CERT),
            "invalid --domain",
        ),
        (
            ("serverless", "template", "--domain", "example.com", "--certificate-arn", "arn:x"),
            "invalid --certificate-arn",
        ),
        (("serverless", "emulate", "--speed", "0"), "--speed must be positive"),
        (("serverless", "emulate", "--ws-listen", "nowhere:x"), "--ws-listen"),
        (("http", "3000", "--to", "wss://api.example/relay", "--secret", "s"), "takes tokens"),
        (("http", "3000", "--to", "wss://api.example/relay"), "needs --token"),
        (
            ("http", "3000", "--to", "ws://10.9.8.7/relay", "--token", "bt1.x.y"),
            "plaintext to another machine",
        ),
        (
            ("tcp", "3000", "--to", "wss://api.example/relay", "--token", "bt1.x.y"),
            "carries HTTP tunnels",
        ),
        (
            ("http", "3000", "--to", "wss://api.example/relay", "--token", "bt1.x.y"),
            "malformed token",
        ),
    ]:
        result = _cli(*args)
        expected = 1 if words == "malformed token" else 2  # as for a burrow relay
        assert result.returncode == expected, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_cli_emulate_prints_ready(tmp_path: Path) -> None:
    from helpers import burrow_cli, read_event, stop

    proc = burrow_cli(
        "serverless",
        "emulate",
        "--ws-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--state-dir",
        str(tmp_path),
        "--json",
    )
    try:
        ready = read_event(proc, "emulator_ready", timeout=60)
        assert ready["ws"].startswith("ws://127.0.0.1:") and ready["http"].startswith("http://")
        assert (tmp_path / "token.key").is_file()
    finally:
        stop(proc)

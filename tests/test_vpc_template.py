"""``burrow relay template --vpc``: the CloudFormation template passes cfn-lint (offline, in
both ingress variants and both formats), its security groups, load balancer, outputs and IAM
policy are what the README promises, its user data is valid shell that installs the unit in
packaging/systemd, and the instance's bootstrap (``burrow.aws.vpc_relay``) keeps the relay's
certificate and token key in the secret, so a replaced instance accepts the same tokens and
shows the same fingerprint. AWS itself is played by a stand-in for the ``aws`` command."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from burrow.aws import vpc_relay
from burrow.aws.vpc_template import RELAY_UNIT, build, render, user_data
from burrow.aws.yamlout import to_yaml
from burrow.cli import main
from burrow.net.tls import TrustPolicy
from burrow.roles.agent import Agent, AgentConfig, TcpTunnelSpec
from burrow.tokens import TokenKey, mint
from helpers import running_relay

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent
INGRESSES = ["public-ip", "nlb"]


def _cfn_lint(*paths: Path) -> subprocess.CompletedProcess[str]:
    command = Path(sys.executable).parent / "cfn-lint"  # the test extra installs it
    assert command.is_file(), "cfn-lint is missing: bash scripts/venv.sh test"
    return subprocess.run(
        [str(command), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=110,
    )


def test_cfn_lint_passes_every_variant(tmp_path: Path) -> None:
    files = []
    for ingress in INGRESSES:
        for fmt in ("yaml", "json"):
            path = tmp_path / f"relay-{ingress}.{fmt}"
            path.write_text(render(build(ingress), fmt))
            files.append(path)
    broken = build("nlb")
    del broken["Parameters"]["PublicSubnetIds"]  # still referenced by the load balancer
    bad = tmp_path / "broken.json"
    bad.write_text(render(broken, "json"))
    good = _cfn_lint(*files)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.strip() == ""  # not even a warning
    wrong = _cfn_lint(bad)  # the check can fail: a dangling Ref is an error
    assert wrong.returncode != 0 and "PublicSubnetIds" in wrong.stdout, wrong.stdout


@pytest.mark.parametrize("ingress", INGRESSES)
def test_both_formats_read_back_equal(ingress: str) -> None:
    template = build(ingress)
    assert yaml.safe_load(render(template, "yaml")) == template
    assert json.loads(render(template, "json")) == template


def test_yaml_writer_quotes_what_yaml_would_misread() -> None:
    data = {
        "yes": "no",
        "k": ["on", "null", "- dash", "a: b", "#hash", "", "\x07bell", "\U0001f600", 7, True],
        "block": "#!/bin/bash\n  indented\n\nlast\n",
        "noend": "a\nb",
        "leading": " a\nb\n",
        "nested": [[], {}, [{"a": [1, {"b": "x\ny\n"}]}]],
    }
    assert yaml.safe_load(to_yaml(data)) == data


def _security_group(template: dict[str, Any], name: str) -> dict[str, Any]:
    resource = template["Resources"][name]
    assert resource["Type"] == "AWS::EC2::SecurityGroup"
    return dict(resource["Properties"])


CONTROL = {"Ref": "ControlPort"}


def test_public_ip_relay_security_group() -> None:
    template = build("public-ip")
    group = _security_group(template, "RelaySecurityGroup")
    sources = []
    for rule in group["SecurityGroupIngress"]:
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", CONTROL, CONTROL)
        sources.append({k: v for k, v in rule.items() if k in ("CidrIp", "SourceSecurityGroupId")})
    assert sources == [
        {"SourceSecurityGroupId": {"Ref": "LambdaSecurityGroupId"}},
        {"CidrIp": {"Ref": "AgentCidr"}},
    ]
    assert [(r["FromPort"], r["ToPort"]) for r in group["SecurityGroupEgress"]] == [(443, 443)]
    resources = template["Resources"]
    assert not any("LoadBalancer" in r["Type"] for r in resources.values())
    assert resources["RelayAddressAssociation"]["Properties"]["NetworkInterfaceId"] == {
        "Ref": "RelayInterface"
    }
    assert resources["RelayInstance"]["DependsOn"] == "RelayAddressAssociation"
    outputs = template["Outputs"]
    assert outputs["AgentRelay"]["Value"] == {"Fn::Sub": "${RelayAddress}:${ControlPort}"}


def test_nlb_variant() -> None:
    template = build("nlb")
    resources = template["Resources"]
    relay = _security_group(template, "RelaySecurityGroup")
    assert [r["SourceSecurityGroupId"] for r in relay["SecurityGroupIngress"]] == [
        {"Ref": "LambdaSecurityGroupId"}
    ]
    extra = resources["RelayFromLoadBalancer"]["Properties"]
    assert extra["GroupId"] == {"Ref": "RelaySecurityGroup"}
    assert extra["SourceSecurityGroupId"] == {
        "Fn::GetAtt": ["LoadBalancerSecurityGroup", "GroupId"]
    }
    assert (extra["FromPort"], extra["ToPort"]) == (CONTROL, CONTROL)
    nlb_group = _security_group(template, "LoadBalancerSecurityGroup")
    (agents,) = nlb_group["SecurityGroupIngress"]
    assert (agents["CidrIp"], agents["FromPort"]) == ({"Ref": "AgentCidr"}, CONTROL)
    (out,) = nlb_group["SecurityGroupEgress"]
    assert out["DestinationSecurityGroupId"] == {"Ref": "RelaySecurityGroup"}

    balancer = resources["RelayLoadBalancer"]["Properties"]
    assert (balancer["Type"], balancer["Scheme"]) == ("network", "internet-facing")
    assert balancer["Subnets"] == {"Ref": "PublicSubnetIds"}
    assert balancer["SecurityGroups"] == [{"Ref": "LoadBalancerSecurityGroup"}]
    listener = resources["RelayListener"]["Properties"]
    assert (listener["Protocol"], listener["Port"]) == ("TCP", CONTROL)
    assert listener["DefaultActions"] == [
        {"Type": "forward", "TargetGroupArn": {"Ref": "RelayTargetGroup"}}
    ]
    group = resources["RelayTargetGroup"]["Properties"]
    assert group["Targets"] == [{"Id": {"Ref": "RelayInstance"}, "Port": CONTROL}]
    assert (group["Protocol"], group["TargetType"]) == ("TCP", "instance")
    assert "RelayAddress" not in resources  # no public address on the instance
    assert template["Outputs"]["AgentRelay"]["Value"] == {
        "Fn::Sub": "${RelayLoadBalancer.DNSName}:${ControlPort}"
    }


@pytest.mark.parametrize("ingress", INGRESSES)
def test_outputs_and_iam(ingress: str) -> None:
    template = build(ingress)
    outputs = template["Outputs"]
    assert outputs["BurrowRelay"]["Value"] == {
        "Fn::Sub": "${RelayInterface.PrimaryPrivateIpAddress}:${ControlPort}"
    }
    assert "BURROW_RELAY" in outputs["BurrowRelay"]["Description"]
    assert outputs["FingerprintParameter"]["Value"] == {"Ref": "FingerprintParameter"}
    parameter = template["Resources"]["FingerprintParameter"]["Properties"]
    assert parameter["Name"] == {"Fn::Sub": "/burrow/${AWS::StackName}/relay-fingerprint"}

    roles = [r for r in template["Resources"].values() if r["Type"] == "AWS::IAM::Role"]
    assert len(roles) == 1
    role = roles[0]["Properties"]
    assert "ManagedPolicyArns" not in role
    statements = [s for p in role["Policies"] for s in p["PolicyDocument"]["Statement"]]
    granted = {}
    for statement in statements:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"]
        for action in [actions] if isinstance(actions, str) else actions:
            assert "*" not in action
            granted[action] = statement["Resource"]
    assert "*" not in json.dumps([s["Resource"] for s in statements])
    assert granted == {
        "secretsmanager:GetSecretValue": {"Ref": "RelaySecret"},
        "secretsmanager:PutSecretValue": {"Ref": "RelaySecret"},
        "ssm:PutParameter": {
            "Fn::Sub": "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:"
            "parameter${FingerprintParameter}"
        },
    }
    options = template["Resources"]["RelayLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert options["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2 only


def test_user_data_installs_the_packaged_unit(tmp_path: Path) -> None:
    """The unit the instance writes is packaging/systemd's, and the script is valid bash."""
    assert (ROOT / "packaging/systemd/burrow-relay.service").read_text() == RELAY_UNIT
    script = user_data()
    assert "<<'UNIT'\n" + RELAY_UNIT + "UNIT\n" in script
    template = build("public-ip")
    sub = template["Resources"]["RelayInstance"]["Properties"]["UserData"]["Fn::Base64"]
    assert sub == {"Fn::Sub": script}
    names = set(re.findall(r"\$\{([^}]+)\}", script))
    assert names == {"BurrowPackage", "AWS::Region", "RelaySecret", "FingerprintParameter",
                     "ControlPort"}  # fmt: skip
    filled = script
    for name in names:
        filled = filled.replace("${" + name + "}", "x")
    bash = shutil.which("bash")
    assert bash is not None
    path = tmp_path / "user-data.sh"
    path.write_text(filled)
    checked = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True, timeout=10)
    assert checked.returncode == 0, checked.stderr
    assert "python -m burrow.aws.vpc_relay restore" in script


def test_package_parameter_refuses_shell_quotes() -> None:
    pattern = build()["Parameters"]["BurrowPackage"]["AllowedPattern"]
    for good in ["burrow==0.1.0", "burrow[fast]>=0.1", "https://example.com/burrow-0.1.0.whl"]:
        assert re.fullmatch(pattern, good), good
    for bad in ["burrow'; rm -rf /; '", "burrow 0.1", 'a"b', "a$(b)", "a`b`"]:
        assert not re.fullmatch(pattern, bad), bad


def test_cli_prints_the_template(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["relay", "template", "--vpc"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output) == build("public-ip")
    result = runner.invoke(
        main, ["relay", "template", "--vpc", "--ingress", "nlb", "--format", "json",
               "--package", "burrow[fast]==9"],
    )  # fmt: skip
    assert result.exit_code == 0
    assert json.loads(result.output) == build("nlb", package="burrow[fast]==9")
    missing = runner.invoke(main, ["relay", "template"])
    assert missing.exit_code == 2 and "--vpc" in missing.output
    quoted = runner.invoke(main, ["relay", "template", "--vpc", "--package", "x'y"])
    assert quoted.exit_code == 2 and "--package" in quoted.output
    mixed = runner.invoke(main, ["relay", "--listen", "0.0.0.0:1", "template", "--vpc"])
    assert mixed.exit_code == 2 and "--listen" in mixed.output


# --- the instance's bootstrap, against a stand-in for the AWS CLI ------------------------------

FAKE_AWS = r'''#!PYTHON
"""Stands in for the AWS CLI: a secret and a parameter in a JSON file."""
import json, os, sys
state_path = os.environ["FAKE_AWS_STATE"]
state = json.load(open(state_path)) if os.path.exists(state_path) else {}
state.setdefault("calls", []).append(sys.argv[1:])
args = sys.argv[1:]
def opt(name):
    return args[args.index(name) + 1]
def save():
    json.dump(state, open(state_path, "w"))
if os.environ.get("FAKE_AWS_FAIL"):
    save()
    sys.stderr.write("\nAn error occurred (AccessDeniedException) when calling the "
                     "GetSecretValue operation: not authorized\n")
    sys.exit(254)
if args[:2] == ["secretsmanager", "get-secret-value"]:
    save()
    if "secret" not in state:
        sys.stderr.write("\nAn error occurred (ResourceNotFoundException) when calling the "
                         "GetSecretValue operation: Secrets Manager can't find the specified "
                         "secret value for staging label: AWSCURRENT\n")
        sys.exit(254)
    print(state["secret"])
elif args[:2] == ["secretsmanager", "put-secret-value"]:
    source = opt("--secret-string")
    assert source.startswith("file://"), source
    state["secret"] = open(source[len("file://"):]).read()
    save()
    print("VERSIONID")
elif args[:2] == ["ssm", "put-parameter"]:
    assert "--overwrite" in args and opt("--type") == "String"
    state["parameter"] = {opt("--name"): opt("--value")}
    save()
    print("1\tStandard")
else:
    sys.exit(f"fake aws: unexpected {args}")
'''


@pytest.fixture
def fake_aws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    script = tmp_path / "aws"
    script.write_text(FAKE_AWS.replace("PYTHON", sys.executable, 1))
    script.chmod(0o755)
    state = tmp_path / "aws-state.json"
    monkeypatch.setenv("FAKE_AWS_STATE", str(state))
    return script, state


SECRET = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:burrow-relay-AbCdEf"
PARAMETER = "/burrow/stack/relay-fingerprint"


def _restore(aws: Path, state_dir: Path) -> int:
    return vpc_relay.main(
        [
            "restore",
            "--secret-id",
            SECRET,
            "--fingerprint-parameter",
            PARAMETER,
            "--state-dir",
            str(state_dir),
            "--region",
            "eu-west-1",
            "--aws",
            str(aws),
        ]
    )


async def test_a_replaced_instance_keeps_fingerprint_and_tokens(
    tmp_path: Path, fake_aws: tuple[Path, Path]
) -> None:
    """First boot: the relay's state is made and stored; a second instance (an empty disk)
    gets it back. A token minted from the key fetched to an admin's machine opens a tunnel on
    a relay running from the restored state, pinned by the published fingerprint."""
    aws, state_file = fake_aws
    first, second, admin = tmp_path / "first", tmp_path / "second", tmp_path / "admin"
    assert _restore(aws, first) == 0
    stored = json.loads(json.loads(state_file.read_text())["secret"])
    assert set(stored) == {"relay.crt", "relay.key", "token.key"}
    fingerprint = json.loads(state_file.read_text())["parameter"][PARAMETER]
    assert fingerprint.startswith("sha256:")

    assert _restore(aws, second) == 0
    for name in ("relay.crt", "relay.key", "token.key"):
        assert (second / name).read_bytes() == (first / name).read_bytes()
    assert oct((second / "relay.key").stat().st_mode & 0o777) == "0o600"
    calls = json.loads(state_file.read_text())["calls"]
    assert all("--region" in call for call in calls)
    key_line = stored["relay.key"].splitlines()[1]  # base64 of the private key itself
    assert not any(key_line in " ".join(call) for call in calls)  # never on a command line

    assert (
        vpc_relay.main(
            ["fetch-token-key", "--secret-id", SECRET, "--state-dir", str(admin), "--aws", str(aws)]
        )
        == 0
    )
    assert not (admin / "relay.key").exists()  # the admin never needs the TLS key
    token = mint(TokenKey.load(admin), ["opsdb"], [], 3600, time.time())

    async with running_relay(tmp_path, state_dir=second, secret=None) as relay:
        assert relay.fingerprint == fingerprint
        config = AgentConfig(
            relay=relay.control_address,
            token=token,
            trust=TrustPolicy(fingerprint=fingerprint),
            tunnels=[TcpTunnelSpec(local=("127.0.0.1", 5432), name="opsdb", private=True)],
        )
        async with Agent(config) as agent:
            assert agent.tunnels[0].name == "opsdb"


def test_bootstrap_failures_are_one_line(
    tmp_path: Path, fake_aws: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    aws, state_file = fake_aws
    os.environ["FAKE_AWS_FAIL"] = "1"
    try:
        assert _restore(aws, tmp_path / "state") == 1
    finally:
        del os.environ["FAKE_AWS_FAIL"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "AccessDeniedException" in err and SECRET in err

    state_file.write_text(json.dumps({"secret": json.dumps({"relay.crt": "x"})}))
    assert _restore(aws, tmp_path / "state") == 2
    assert "should hold" in capsys.readouterr().err
    state_file.write_text(json.dumps({"secret": "{}"}))  # emptied on purpose: start afresh
    assert _restore(aws, tmp_path / "fresh") == 0
    with pytest.raises(SystemExit):
        vpc_relay.main(["restore"])  # argparse: usage error, exit 2

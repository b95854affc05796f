"""``burrow relay template --vpc``: a CloudFormation template for a relay inside a VPC, so
Lambdas in private subnets with no NAT reach on-premises services through it (the agents dial
out to it), in place of a site-to-site VPN.

The stack: one EC2 instance (Amazon Linux 2023, arm64) that installs burrow with pip from user
data and runs it under ``packaging/systemd/burrow-relay.service``; its certificate and token key
in a Secrets Manager secret (made on the first boot, restored on every later one, so a
replaced instance keeps the fingerprint agents pin); the fingerprint in an SSM parameter; a
network interface whose private address the Lambdas use; and one way in for agents:

- ``public-ip`` (default): the relay in a public subnet with an Elastic IP. It needs no NAT
  gateway, no NLB and no VPC endpoint: its own address carries pip and the AWS API calls.
- ``nlb``: the relay in a private subnet behind an internet-facing Network Load Balancer in the
  public subnets, for teams whose instances may not have public addresses; the private subnet
  then needs its own way out for pip and the AWS APIs (a NAT gateway or a proxy it has).

Security groups: agents reach the control port from ``AgentCidr`` only (through the NLB's
group with ``nlb``), the Lambdas' group reaches it from inside the VPC, and the relay itself
may only open HTTPS connections. Its role may read and write its one secret and write its one
parameter, nothing else. ``build`` returns the template as a dict; ``render`` as text.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from burrow.aws.yamlout import to_yaml
from burrow.version import __version__

Ingress = Literal["public-ip", "nlb"]
INGRESSES: tuple[str, ...] = ("public-ip", "nlb")
INSTANCE_TYPES = ["t4g.nano", "t4g.micro", "t4g.small", "t4g.medium", "c7g.medium"]
AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64"
STATE_DIR = "/var/lib/burrow-relay"
#: What pip may be given: names, versions, extras, URLs; no quote or space, so the value can
#: never leave the user data's single quotes.
PACKAGE_PATTERN = r"^[A-Za-z0-9_.\[\],=<>!~:/@+%-]+$"
_OCTET = r"([0-9]|[1-9][0-9]|1[0-9]{2}|2[0-4][0-9]|25[0-5])"
CIDR_PATTERN = rf"^({_OCTET}\.){{3}}{_OCTET}/([0-9]|[12][0-9]|3[0-2])$"

#: packaging/systemd/burrow-relay.service as the instance installs it (a test keeps the two
#: the same).
RELAY_UNIT = """\
# burrow relay as a systemd service. Install (packaging/systemd/README.md):
#   python3 -m venv /opt/burrow && /opt/burrow/bin/pip install burrow
#   install -m 644 burrow.sysusers /etc/sysusers.d/burrow.conf && systemd-sysusers
#   install -m 644 burrow-relay.service /etc/systemd/system/ && systemctl enable --now burrow-relay
# Settings: BURROW_* variables in /etc/burrow/relay.env (one per flag: `burrow relay --help`).
[Unit]
Description=burrow relay (the rendezvous burrow agents dial out to)
Wants=network-online.target
After=network-online.target

[Service]
# READY=1 once the control port listens, STOPPING=1 at shutdown (sd_notify).
Type=notify
NotifyAccess=main
User=burrow
Group=burrow
ExecStart=/opt/burrow/bin/burrow relay
EnvironmentFile=-/etc/burrow/relay.env
# Certificate, token key and revocations live here; tokens: sudo -u burrow
# /opt/burrow/bin/burrow token issue --state-dir /var/lib/burrow-relay --expose NAME
StateDirectory=burrow-relay
StateDirectoryMode=0700
Environment=BURROW_STATE_DIR=%S/burrow-relay BURROW_HOME=%S/burrow-relay
ConfigurationDirectory=burrow
ReadOnlyPaths=/etc/burrow
Restart=on-failure
RestartSec=2s
# Exit status 2 is a usage or configuration error: restarting would not fix it.
RestartPreventExitStatus=2
TimeoutStopSec=15s
LimitNOFILE=65536

# Hardening: no capabilities (ports >= 1024). For a port below 1024 (--https-listen
# 0.0.0.0:443), set both lines below to CAP_NET_BIND_SERVICE and remove PrivateUsers=yes.
CapabilityBoundingSet=
AmbientCapabilities=
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateMounts=yes
PrivateDevices=yes
PrivateUsers=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
UMask=0077

[Install]
WantedBy=multi-user.target
"""

#: The instance's user data (``Fn::Sub`` fills in ``${...}``; ``$((...))`` is the shell's).
USER_DATA = r"""#!/bin/bash
# burrow relay bootstrap, from `burrow relay template --vpc`: Python, burrow, the relay's
# state from its secret, and its systemd unit. Log: /var/log/burrow-bootstrap.log
set -euo pipefail
exec >>/var/log/burrow-bootstrap.log 2>&1
retry() {
  for attempt in 1 2 3 4 5; do "$@" && return 0; sleep $((attempt * 10)); done
  return 1
}
retry dnf install -y python3.11 python3.11-pip
[ -x /opt/burrow/bin/python ] || python3.11 -m venv /opt/burrow
retry /opt/burrow/bin/pip install --no-cache-dir '${BurrowPackage}'
id burrow >/dev/null 2>&1 ||
  useradd --system --no-create-home --home-dir / --shell /usr/sbin/nologin burrow
retry /opt/burrow/bin/python -m burrow.aws.vpc_relay restore --region '${AWS::Region}' \
  --secret-id '${RelaySecret}' --fingerprint-parameter '${FingerprintParameter}' \
  --state-dir @STATE_DIR@
chown -R burrow:burrow @STATE_DIR@
install -d -m 755 /etc/burrow
echo 'BURROW_LISTEN=0.0.0.0:${ControlPort}' >/etc/burrow/relay.env
cat >/etc/systemd/system/burrow-relay.service <<'UNIT'
@UNIT@UNIT
systemctl daemon-reload
systemctl enable --now burrow-relay.service
"""


def user_data() -> str:
    return USER_DATA.replace("@STATE_DIR@", STATE_DIR).replace("@UNIT@", RELAY_UNIT)


def _ref(name: str) -> dict[str, Any]:
    return {"Ref": name}


def _sub(text: str) -> dict[str, Any]:
    return {"Fn::Sub": text}


def _port_rule(source: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "IpProtocol": "tcp",
        "FromPort": _ref("ControlPort"),
        "ToPort": _ref("ControlPort"),
        **source,
        "Description": description,
    }


def build(ingress: str = "public-ip", *, package: str | None = None) -> dict[str, Any]:
    """The template for ``ingress`` (``public-ip`` or ``nlb``) as a dict."""
    if ingress not in INGRESSES:
        raise ValueError(f"ingress is one of {', '.join(INGRESSES)}, not {ingress!r}")
    nlb = ingress == "nlb"
    parameters: dict[str, Any] = {
        "VpcId": {"Type": "AWS::EC2::VPC::Id", "Description": "The VPC of the Lambdas."},
        "RelaySubnetId": {
            "Type": "AWS::EC2::Subnet::Id",
            "Description": (
                "A private subnet for the relay; it needs outbound HTTPS (NAT or proxy) for "
                "pip and the AWS APIs."
                if nlb
                else "A public subnet (a route to an internet gateway) for the relay."
            ),
        },
        "LambdaSecurityGroupId": {
            "Type": "AWS::EC2::SecurityGroup::Id",
            "Description": "The Lambdas' security group: it may reach the relay's control port.",
        },
        "AgentCidr": {
            "Type": "String",
            "Description": "Addresses the on-premises agents come from (their NAT's public "
            "address, e.g. 203.0.113.7/32).",
            "AllowedPattern": CIDR_PATTERN,
            "ConstraintDescription": "an IPv4 CIDR such as 203.0.113.7/32",
        },
        "ControlPort": {
            "Type": "Number",
            "Default": 7835,
            "MinValue": 1024,
            "MaxValue": 65535,
            "Description": "The relay's control port (agents and Lambdas dial it).",
        },
        "InstanceType": {
            "Type": "String",
            "Default": INSTANCE_TYPES[0],
            "AllowedValues": INSTANCE_TYPES,
            "Description": "An arm64 (Graviton) type, to match the image.",
        },
        "ImageId": {
            "Type": "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>",
            "Default": AMI_PARAMETER,
            "Description": "Amazon Linux 2023 for arm64 (its latest image, resolved at deploy).",
        },
        "BurrowPackage": {
            "Type": "String",
            "Default": package or f"burrow=={__version__}",
            "AllowedPattern": PACKAGE_PATTERN,
            "ConstraintDescription": "a pip requirement or URL without spaces or quotes",
            "Description": "What `pip install` installs on the relay.",
        },
    }
    if nlb:
        parameters["PublicSubnetIds"] = {
            "Type": "List<AWS::EC2::Subnet::Id>",
            "Description": "Public subnets (one per zone) for the Network Load Balancer.",
        }

    agents_in = (
        {"SourceSecurityGroupId": {"Fn::GetAtt": ["LoadBalancerSecurityGroup", "GroupId"]}}
        if nlb
        else {"CidrIp": _ref("AgentCidr")}
    )
    resources: dict[str, Any] = {
        "RelaySecret": {
            "Type": "AWS::SecretsManager::Secret",
            "DeletionPolicy": "Delete",
            "UpdateReplacePolicy": "Retain",
            "Properties": {
                "Description": _sub(
                    "burrow relay ${AWS::StackName}: its certificate, key and token key "
                    "(written by the instance on its first boot)"
                ),
            },
        },
        "FingerprintParameter": {
            "Type": "AWS::SSM::Parameter",
            "Properties": {
                "Name": _sub("/burrow/${AWS::StackName}/relay-fingerprint"),
                "Type": "String",
                "Value": "pending: the relay writes its fingerprint here on its first boot",
                "Description": "The burrow relay's certificate fingerprint (BURROW_FINGERPRINT)",
            },
        },
        "RelayRole": {
            "Type": "AWS::IAM::Role",
            "Properties": {
                "AssumeRolePolicyDocument": {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "ec2.amazonaws.com"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                },
                "Policies": [
                    {
                        "PolicyName": "burrow-relay-state",
                        "PolicyDocument": {
                            "Version": "2012-10-17",
                            "Statement": [
                                {
                                    "Sid": "RelayState",
                                    "Effect": "Allow",
                                    "Action": [
                                        "secretsmanager:GetSecretValue",
                                        "secretsmanager:PutSecretValue",
                                    ],
                                    "Resource": _ref("RelaySecret"),
                                },
                                {
                                    "Sid": "PublishFingerprint",
                                    "Effect": "Allow",
                                    "Action": "ssm:PutParameter",
                                    "Resource": _sub(
                                        "arn:${AWS::Partition}:ssm:${AWS::Region}:"
                                        "${AWS::AccountId}:parameter${FingerprintParameter}"
                                    ),
                                },
                            ],
                        },
                    }
                ],
            },
        },
        "RelayInstanceProfile": {
            "Type": "AWS::IAM::InstanceProfile",
            "Properties": {"Roles": [_ref("RelayRole")]},
        },
        "RelaySecurityGroup": {
            "Type": "AWS::EC2::SecurityGroup",
            "Properties": {
                "GroupDescription": "burrow relay: its control port for agents and Lambdas",
                "VpcId": _ref("VpcId"),
                "SecurityGroupIngress": [
                    _port_rule(
                        {"SourceSecurityGroupId": _ref("LambdaSecurityGroupId")},
                        "Lambdas reach private services through the relay",
                    ),
                    *([] if nlb else [_port_rule(agents_in, "on-premises agents")]),
                ],
                "SecurityGroupEgress": [
                    {
                        "IpProtocol": "tcp",
                        "FromPort": 443,
                        "ToPort": 443,
                        "CidrIp": "0.0.0.0/0",
                        "Description": "pip, dnf and the AWS APIs (HTTPS only)",
                    }
                ],
            },
        },
        "RelayInterface": {
            "Type": "AWS::EC2::NetworkInterface",
            "Properties": {
                "Description": "burrow relay: a private address that outlives the instance",
                "SubnetId": _ref("RelaySubnetId"),
                "GroupSet": [_ref("RelaySecurityGroup")],
            },
        },
        "RelayLaunchTemplate": {
            "Type": "AWS::EC2::LaunchTemplate",
            "Properties": {
                "LaunchTemplateData": {
                    "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
                    "BlockDeviceMappings": [
                        {
                            "DeviceName": "/dev/xvda",
                            "Ebs": {
                                "VolumeType": "gp3",
                                "VolumeSize": 8,
                                "Encrypted": True,
                                "DeleteOnTermination": True,
                            },
                        }
                    ],
                }
            },
        },
        "RelayInstance": {
            "Type": "AWS::EC2::Instance",
            "Properties": {
                "ImageId": _ref("ImageId"),
                "InstanceType": _ref("InstanceType"),
                "IamInstanceProfile": _ref("RelayInstanceProfile"),
                "LaunchTemplate": {
                    "LaunchTemplateId": _ref("RelayLaunchTemplate"),
                    "Version": {"Fn::GetAtt": ["RelayLaunchTemplate", "LatestVersionNumber"]},
                },
                "NetworkInterfaces": [
                    {"NetworkInterfaceId": _ref("RelayInterface"), "DeviceIndex": "0"}
                ],
                "UserData": {"Fn::Base64": _sub(user_data())},
                "Tags": [{"Key": "Name", "Value": _sub("${AWS::StackName}-burrow-relay")}],
            },
        },
    }
    outputs: dict[str, Any] = {
        "BurrowRelay": {
            "Description": "BURROW_RELAY for the Lambdas: the relay's private address",
            "Value": _sub("${RelayInterface.PrimaryPrivateIpAddress}:${ControlPort}"),
        },
        "FingerprintParameter": {
            "Description": "SSM parameter with the relay's fingerprint (BURROW_FINGERPRINT, "
            "agents' --fingerprint)",
            "Value": _ref("FingerprintParameter"),
        },
        "RelaySecretArn": {
            "Description": "The relay's state; python -m burrow.aws.vpc_relay fetch-token-key "
            "--secret-id THIS --state-dir DIR, then burrow token issue --state-dir DIR",
            "Value": _ref("RelaySecret"),
        },
        "RelaySecurityGroupId": {
            "Description": "The relay's security group",
            "Value": _ref("RelaySecurityGroup"),
        },
    }
    if nlb:
        resources["LoadBalancerSecurityGroup"] = {
            "Type": "AWS::EC2::SecurityGroup",
            "Properties": {
                "GroupDescription": "burrow relay NLB: agents in, the relay out",
                "VpcId": _ref("VpcId"),
                "SecurityGroupIngress": [
                    _port_rule({"CidrIp": _ref("AgentCidr")}, "on-premises agents")
                ],
                "SecurityGroupEgress": [
                    _port_rule(
                        {"DestinationSecurityGroupId": _ref("RelaySecurityGroup")},
                        "to the relay (and its health checks)",
                    )
                ],
            },
        }
        resources["RelayFromLoadBalancer"] = {
            "Type": "AWS::EC2::SecurityGroupIngress",
            "Properties": {
                "GroupId": _ref("RelaySecurityGroup"),
                **_port_rule(agents_in, "agents through the NLB"),
            },
        }
        resources["RelayLoadBalancer"] = {
            "Type": "AWS::ElasticLoadBalancingV2::LoadBalancer",
            "Properties": {
                "Type": "network",
                "Scheme": "internet-facing",
                "Subnets": _ref("PublicSubnetIds"),
                "SecurityGroups": [_ref("LoadBalancerSecurityGroup")],
                "LoadBalancerAttributes": [
                    {"Key": "load_balancing.cross_zone.enabled", "Value": "true"}
                ],
            },
        }
        resources["RelayTargetGroup"] = {
            "Type": "AWS::ElasticLoadBalancingV2::TargetGroup",
            "Properties": {
                "Protocol": "TCP",
                "Port": _ref("ControlPort"),
                "VpcId": _ref("VpcId"),
                "TargetType": "instance",
                "Targets": [{"Id": _ref("RelayInstance"), "Port": _ref("ControlPort")}],
                "HealthCheckProtocol": "TCP",
                "TargetGroupAttributes": [
                    {"Key": "deregistration_delay.timeout_seconds", "Value": "30"}
                ],
            },
        }
        resources["RelayListener"] = {
            "Type": "AWS::ElasticLoadBalancingV2::Listener",
            "Properties": {
                "LoadBalancerArn": _ref("RelayLoadBalancer"),
                "Port": _ref("ControlPort"),
                "Protocol": "TCP",
                "DefaultActions": [{"Type": "forward", "TargetGroupArn": _ref("RelayTargetGroup")}],
            },
        }
        outputs["AgentRelay"] = {
            "Description": "The on-premises agents' --to (BURROW_RELAY): the NLB",
            "Value": _sub("${RelayLoadBalancer.DNSName}:${ControlPort}"),
        }
    else:
        resources["RelayAddress"] = {
            "Type": "AWS::EC2::EIP",
            "Properties": {
                "Domain": "vpc",
                "Tags": [{"Key": "Name", "Value": _sub("${AWS::StackName}-burrow-relay")}],
            },
        }
        resources["RelayAddressAssociation"] = {
            "Type": "AWS::EC2::EIPAssociation",
            "Properties": {
                "AllocationId": {"Fn::GetAtt": ["RelayAddress", "AllocationId"]},
                "NetworkInterfaceId": _ref("RelayInterface"),
            },
        }
        # The address is on the interface before the instance boots: user data needs it.
        resources["RelayInstance"]["DependsOn"] = "RelayAddressAssociation"
        outputs["AgentRelay"] = {
            "Description": "The on-premises agents' --to (BURROW_RELAY): the Elastic IP",
            "Value": _sub("${RelayAddress}:${ControlPort}"),
        }
    description = (
        "burrow relay in a VPC: on-premises agents dial out to it, Lambdas reach their private "
        f"services on its private address (burrow {__version__}; agents in through "
        f"{'a Network Load Balancer' if nlb else 'an Elastic IP'})"
    )
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": description,
        "Parameters": parameters,
        "Resources": resources,
        "Outputs": outputs,
    }


def render(template: dict[str, Any], fmt: str = "yaml") -> str:
    """The template as CloudFormation reads it: ``yaml`` or ``json``."""
    if fmt == "json":
        return json.dumps(template, indent=2) + "\n"
    if fmt == "yaml":
        return to_yaml(template)
    raise ValueError(f"format is yaml or json, not {fmt!r}")

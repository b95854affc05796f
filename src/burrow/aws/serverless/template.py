"""The serverless relay's CloudFormation template, built as data (so tests can read it) and
printed as YAML or JSON.

What it makes: a WebSocket API (``$connect``/``$disconnect``/``$default``) and an HTTP API
(``$default``, payload format 2.0) on API Gateway; four Lambda functions (Python 3.12, arm64)
from the zip ``burrow serverless package`` builds, each with its own role allowing only what
it calls, on this stack's resources (its log group, the table, the token key's secret, this
API's ``@connections``, the answers bucket); a DynamoDB table with TTL; a Secrets Manager
secret holding the token key (64 hex digits, generated); an S3 bucket for large answers
(objects expire after a day); log groups with a retention; optionally a wildcard custom
domain for NAME.DOMAIN.
"""

from __future__ import annotations

import json
import re
from typing import Any

from burrow.errors import ConfigError

STAGE = "relay"
RUNTIME = "python3.12"
LOG_RETENTION_DAYS = 14
_DOMAIN_RE = re.compile(r"(?=.{1,200}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")
_ARN_RE = re.compile(r"arn:aws[a-z-]*:acm:[a-z0-9-]+:[0-9]{12}:certificate/[0-9a-f-]{36}")
_LAMBDA_HANDLERS = {
    "Connect": ("connect", 10, 256),
    "Disconnect": ("disconnect", 10, 256),
    "Default": ("default", 10, 256),
    "Http": ("http", 30, 256),
}
_TABLE_ACTIONS = {
    "Connect": ["dynamodb:PutItem"],
    "Disconnect": ["dynamodb:DeleteItem", "dynamodb:UpdateItem"],
    "Default": ["dynamodb:GetItem", "dynamodb:UpdateItem"],
    "Http": ["dynamodb:GetItem", "dynamodb:UpdateItem"],
}


def _sub(text: str) -> dict[str, Any]:
    return {"Fn::Sub": text}


def _ref(name: str) -> dict[str, Any]:
    return {"Ref": name}


def _arn(name: str) -> dict[str, Any]:
    return {"Fn::GetAtt": [name, "Arn"]}


def build_template(
    *, domain: str | None = None, certificate_arn: str | None = None, bucket: bool = True
) -> dict[str, Any]:
    if bool(domain) != bool(certificate_arn):
        raise ConfigError(
            "--domain and --certificate-arn go together: the custom domain needs an ACM "
            "certificate for *.DOMAIN in the stack's region"
        )
    if domain:
        domain = domain.lower().strip(".")
        if not _DOMAIN_RE.fullmatch(domain):
            raise ConfigError(f"invalid --domain {domain!r}: expected a DNS name like example.com")
    if certificate_arn and not _ARN_RE.fullmatch(certificate_arn):
        raise ConfigError(
            f"invalid --certificate-arn {certificate_arn!r}: expected "
            "arn:aws:acm:REGION:ACCOUNT:certificate/ID"
        )
    host = "${WsApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}"
    environment: dict[str, Any] = {
        "BURROW_TABLE": _ref("Table"),
        "BURROW_TOKEN_KEY_SECRET": _ref("TokenKey"),
        "BURROW_WS_URL": _sub(f"wss://{host}/{STAGE}"),
        "BURROW_MANAGEMENT_URL": _sub(f"https://{host}/{STAGE}"),
        "BURROW_HTTP_URL": {"Fn::GetAtt": ["HttpApi", "ApiEndpoint"]},
        "BURROW_DOMAIN": domain or "",
        "BURROW_BUCKET": _ref("Answers") if bucket else "",
        "BURROW_TOKEN_DENY": _ref("RevokedTokens"),
    }
    resources: dict[str, Any] = {
        "Table": {
            "Type": "AWS::DynamoDB::Table",
            "DeletionPolicy": "Delete",
            "UpdateReplacePolicy": "Delete",
            "Properties": {
                "BillingMode": "PAY_PER_REQUEST",
                "AttributeDefinitions": [{"AttributeName": "pk", "AttributeType": "S"}],
                "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
                "TimeToLiveSpecification": {"AttributeName": "ttl", "Enabled": True},
                "SSESpecification": {"SSEEnabled": True},
            },
        },
        "TokenKey": {
            "Type": "AWS::SecretsManager::Secret",
            "DeletionPolicy": "Delete",
            "UpdateReplacePolicy": "Delete",
            "Properties": {
                "Description": "burrow serverless relay: the token key (mint tokens with it)",
                "GenerateSecretString": {
                    "PasswordLength": 64,
                    "ExcludeUppercase": True,
                    "ExcludePunctuation": True,
                    "IncludeSpace": False,
                    "RequireEachIncludedType": False,
                    "ExcludeCharacters": "ghijklmnopqrstuvwxyz",
                },
            },
        },
        "WsApi": {
            "Type": "AWS::ApiGatewayV2::Api",
            "Properties": {
                "Name": _sub("${AWS::StackName}-relay"),
                "ProtocolType": "WEBSOCKET",
                "RouteSelectionExpression": "$request.body.action",
            },
        },
        "WsDeployment": {
            "Type": "AWS::ApiGatewayV2::Deployment",
            "DependsOn": ["ConnectRoute", "DisconnectRoute", "DefaultRoute"],
            "Properties": {"ApiId": _ref("WsApi")},
        },
        "WsStage": {
            "Type": "AWS::ApiGatewayV2::Stage",
            "Properties": {
                "ApiId": _ref("WsApi"),
                "StageName": STAGE,
                "DeploymentId": _ref("WsDeployment"),
                "DefaultRouteSettings": {
                    "ThrottlingBurstLimit": 5000,
                    "ThrottlingRateLimit": 10000,
                },
            },
        },
        "HttpApi": {
            "Type": "AWS::ApiGatewayV2::Api",
            "Properties": {"Name": _sub("${AWS::StackName}-http"), "ProtocolType": "HTTP"},
        },
        "HttpIntegration": {
            "Type": "AWS::ApiGatewayV2::Integration",
            "Properties": {
                "ApiId": _ref("HttpApi"),
                "IntegrationType": "AWS_PROXY",
                "IntegrationUri": _arn("HttpFunction"),
                "PayloadFormatVersion": "2.0",
                "TimeoutInMillis": 30000,
            },
        },
        "HttpRoute": {
            "Type": "AWS::ApiGatewayV2::Route",
            "Properties": {
                "ApiId": _ref("HttpApi"),
                "RouteKey": "$default",
                "Target": _sub("integrations/${HttpIntegration}"),
            },
        },
        "HttpStage": {
            "Type": "AWS::ApiGatewayV2::Stage",
            "Properties": {"ApiId": _ref("HttpApi"), "StageName": "$default", "AutoDeploy": True},
        },
        "HttpPermission": {
            "Type": "AWS::Lambda::Permission",
            "Properties": {
                "Action": "lambda:InvokeFunction",
                "FunctionName": _ref("HttpFunction"),
                "Principal": "apigateway.amazonaws.com",
                "SourceArn": _sub(
                    "arn:${AWS::Partition}:execute-api:${AWS::Region}:${AWS::AccountId}:"
                    "${HttpApi}/*"
                ),
            },
        },
    }
    if bucket:
        resources["Answers"] = {
            "Type": "AWS::S3::Bucket",
            "DeletionPolicy": "Delete",
            "UpdateReplacePolicy": "Delete",
            "Properties": {
                "LifecycleConfiguration": {
                    "Rules": [
                        {
                            "Id": "expire-answers",
                            "Status": "Enabled",
                            "ExpirationInDays": 1,
                            "Prefix": "r/",
                        }
                    ]
                },
                "PublicAccessBlockConfiguration": {
                    "BlockPublicAcls": True,
                    "BlockPublicPolicy": True,
                    "IgnorePublicAcls": True,
                    "RestrictPublicBuckets": True,
                },
                "BucketEncryption": {
                    "ServerSideEncryptionConfiguration": [
                        {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
                    ]
                },
                "OwnershipControls": {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]},
            },
        }
    for name, (handler, timeout, memory) in _LAMBDA_HANDLERS.items():
        function = f"{name}Function"
        resources[f"{name}Logs"] = {
            "Type": "AWS::Logs::LogGroup",
            "DeletionPolicy": "Delete",
            "UpdateReplacePolicy": "Delete",
            "Properties": {"RetentionInDays": LOG_RETENTION_DAYS},
        }
        resources[f"{name}Role"] = _role(name, bucket)
        resources[function] = {
            "Type": "AWS::Lambda::Function",
            "Properties": {
                "Description": f"burrow serverless relay: {handler}",
                "Runtime": RUNTIME,
                "Architectures": ["arm64"],
                "Handler": f"burrow.aws.serverless.handlers.{handler}",
                "Code": {"S3Bucket": _ref("CodeBucket"), "S3Key": _ref("CodeKey")},
                "Role": _arn(f"{name}Role"),
                "MemorySize": memory,
                "Timeout": timeout,
                "Environment": {"Variables": environment},
                "LoggingConfig": {"LogGroup": _ref(f"{name}Logs"), "LogFormat": "Text"},
            },
        }
        if name == "Http":
            continue
        route = {"Connect": "$connect", "Disconnect": "$disconnect", "Default": "$default"}[name]
        resources[f"{name}Integration"] = {
            "Type": "AWS::ApiGatewayV2::Integration",
            "Properties": {
                "ApiId": _ref("WsApi"),
                "IntegrationType": "AWS_PROXY",
                "IntegrationUri": _sub(
                    "arn:${AWS::Partition}:apigateway:${AWS::Region}:lambda:path/2015-03-31/"
                    f"functions/${{{function}.Arn}}/invocations"
                ),
            },
        }
        resources[f"{name}Route"] = {
            "Type": "AWS::ApiGatewayV2::Route",
            "Properties": {
                "ApiId": _ref("WsApi"),
                "RouteKey": route,
                "AuthorizationType": "NONE",
                "Target": _sub(f"integrations/${{{name}Integration}}"),
            },
        }
        resources[f"{name}Permission"] = {
            "Type": "AWS::Lambda::Permission",
            "Properties": {
                "Action": "lambda:InvokeFunction",
                "FunctionName": _ref(function),
                "Principal": "apigateway.amazonaws.com",
                # With the stage as a wildcard: a SourceArn without it fails $connect silently.
                "SourceArn": _sub(
                    "arn:${AWS::Partition}:execute-api:${AWS::Region}:${AWS::AccountId}:"
                    f"${{WsApi}}/*/{route}"
                ),
            },
        }
    outputs: dict[str, Any] = {
        "RelayUrl": {
            "Description": "Agents: burrow http PORT --to THIS --token T",
            "Value": _sub(f"wss://{host}/{STAGE}"),
        },
        "HttpUrl": {
            "Description": "Visitors: THIS/t/NAME/",
            "Value": {"Fn::GetAtt": ["HttpApi", "ApiEndpoint"]},
        },
        "TokenKeySecret": {
            "Description": "The token key (aws secretsmanager get-secret-value --secret-id THIS)",
            "Value": _ref("TokenKey"),
        },
    }
    if domain:
        resources["HttpDomain"] = {
            "Type": "AWS::ApiGatewayV2::DomainName",
            "Properties": {
                "DomainName": f"*.{domain}",
                "DomainNameConfigurations": [
                    {
                        "CertificateArn": certificate_arn,
                        "EndpointType": "REGIONAL",
                        "SecurityPolicy": "TLS_1_2",
                    }
                ],
            },
        }
        resources["HttpMapping"] = {
            "Type": "AWS::ApiGatewayV2::ApiMapping",
            "DependsOn": ["HttpStage"],
            "Properties": {
                "ApiId": _ref("HttpApi"),
                "DomainName": _ref("HttpDomain"),
                "Stage": "$default",
            },
        }
        outputs["CnameTarget"] = {
            "Description": f"Point *.{domain} (CNAME) here",
            "Value": {"Fn::GetAtt": ["HttpDomain", "RegionalDomainName"]},
        }
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": "burrow serverless relay: HTTP tunnels on API Gateway, Lambda, DynamoDB",
        "Parameters": {
            "CodeBucket": {
                "Type": "String",
                "Description": "S3 bucket holding the zip from `burrow serverless package`",
            },
            "CodeKey": {"Type": "String", "Description": "Its key (the zip's file name)"},
            "RevokedTokens": {
                "Type": "String",
                "Default": "",
                "Description": "Token ids refused (space-separated)",
            },
        },
        "Resources": resources,
        "Outputs": outputs,
    }


def _role(name: str, bucket: bool) -> dict[str, Any]:
    """The function's role: only the calls it makes, only on this stack's resources."""
    statements: list[dict[str, Any]] = [
        {
            "Effect": "Allow",
            "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
            "Resource": _arn(f"{name}Logs"),
        },
        {"Effect": "Allow", "Action": _TABLE_ACTIONS[name], "Resource": _arn("Table")},
        {
            "Effect": "Allow",
            "Action": ["secretsmanager:GetSecretValue"],
            "Resource": _ref("TokenKey"),
        },
    ]
    if name in ("Default", "Http"):
        statements.append(
            {
                "Effect": "Allow",
                "Action": ["execute-api:ManageConnections"],
                "Resource": _sub(
                    "arn:${AWS::Partition}:execute-api:${AWS::Region}:${AWS::AccountId}:"
                    f"${{WsApi}}/{STAGE}/*/@connections/*"
                ),
            }
        )
    if name == "Http" and bucket:
        statements.append(
            {
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:GetObject"],
                "Resource": _sub("${Answers.Arn}/r/*"),
            }
        )
    return {
        "Type": "AWS::IAM::Role",
        "Properties": {
            "AssumeRolePolicyDocument": {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "lambda.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            },
            "Policies": [
                {
                    "PolicyName": "burrow-relay",
                    "PolicyDocument": {"Version": "2012-10-17", "Statement": statements},
                }
            ],
        },
    }


# --- output ------------------------------------------------------------------------------------

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_:.-]+")


def dump(document: dict[str, Any], output_format: str = "yaml") -> str:
    if output_format == "json":
        return json.dumps(document, indent=2) + "\n"
    return "\n".join(_yaml(document, 0)) + "\n"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))  # a double-quoted YAML scalar is JSON's string


def _yaml(value: Any, indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            name = key if _PLAIN_KEY.fullmatch(key) else json.dumps(key)
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{name}:")
                lines.extend(_yaml(item, indent + 1))
            else:
                lines.append(f"{pad}{name}: {_empty(item)}")
        return lines
    for item in value:
        if isinstance(item, dict | list) and item:
            inner = _yaml(item, indent + 1)
            lines.append(f"{pad}- {inner[0].lstrip()}")
            lines.extend(inner[1:])
        else:
            lines.append(f"{pad}- {_empty(item)}")
    return lines


def _empty(item: Any) -> str:
    if isinstance(item, dict):
        return "{}"
    if isinstance(item, list):
        return "[]"
    return _scalar(item)

"""The AWS calls of ``burrow dev``, with the user's normal credentials and region (boto3's own
chain: environment, profile, SSO, instance role) and ``AWS_ENDPOINT_URL`` honoured.

Blocking (boto3 is); the session runs these in a thread. Every AWS failure becomes an
``AwsError`` with one line that names the call and what to do. Updates wait for the function's
``LastUpdateStatus`` to settle first (Lambda refuses an update while one is in progress) and
retry ``ResourceConflictException`` and throttling with backoff, within a bounded time.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from burrow.aws.devplan import FunctionInfo, LayerNeed
from burrow.errors import BurrowError, ConfigError

__all__ = ["Aws", "AwsError", "Gone", "Stale"]

#: Conflicts and throttling retried this many times (backoff from 0.25 s, capped at 5 s).
UPDATE_ATTEMPTS: Final = 8
#: How long a function may stay "InProgress" before burrow gives up on it.
SETTLE_TIMEOUT: Final = 120.0
RETRYABLE: Final = frozenset(
    {
        "ResourceConflictException",
        "TooManyRequestsException",
        "ThrottlingException",
        "Throttling",
        "ServiceException",
    }
)
#: Lambda takes a layer zip inline up to 50 MB (larger ones go through S3).
MAX_INLINE_ZIP: Final = 50 * 1000 * 1000


class AwsError(BurrowError):
    """An AWS call failed; ``code`` is AWS's error code when there is one."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class Gone(AwsError):
    """The function no longer exists."""


class Stale(AwsError):
    """The function changed between reading and writing it (its RevisionId moved)."""


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Code") or "")


def _message(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Message") or exc).splitlines()[0][:300]


class Aws:
    """boto3 clients for one region; ``sleep`` and ``clock`` are replaceable for tests."""

    def __init__(self, session: Any, region: str) -> None:
        from botocore.config import Config

        self.region = region
        config = Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=10)
        self._session = session
        self._config = config
        self.lam = session.client("lambda", region_name=region, config=config)
        self._clients: dict[str, Any] = {}
        self.sleep: Callable[[float], None] = time.sleep
        self.clock: Callable[[], float] = time.monotonic

    @classmethod
    def connect(cls, region: str | None = None, profile: str | None = None) -> Aws:
        """A session from the user's normal configuration; a one-line error if it has no
        credentials or no region."""
        try:
            import boto3
            import botocore.exceptions as bx
        except ImportError:
            raise ConfigError(
                "burrow dev needs boto3: pip install 'burrow[aws]' (or pip install boto3)"
            ) from None
        try:
            session = boto3.Session(profile_name=profile, region_name=region)
        except bx.ProfileNotFound:
            raise ConfigError(f"no AWS profile {profile!r} (see ~/.aws/config)") from None
        try:
            credentials = session.get_credentials()
        except bx.BotoCoreError as exc:
            raise AwsError(f"cannot load AWS credentials: {exc}") from None
        if credentials is None:
            raise AwsError(
                "no AWS credentials: run `aws configure` (or `aws sso login`), or set "
                "AWS_PROFILE / AWS_ACCESS_KEY_ID"
            )
        chosen = region or session.region_name
        if not chosen:
            raise ConfigError("no AWS region: pass --region or set AWS_REGION")
        return cls(session, chosen)

    def for_region(self, region: str) -> Aws:
        """The same credentials in another region (a journal entry's)."""
        other = Aws(self._session, region)
        other.sleep, other.clock = self.sleep, self.clock
        return other

    def client(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = self._session.client(
                service, region_name=self.region, config=self._config
            )
        return self._clients[service]

    def call(self, what: str, method: Callable[..., Any], **kwargs: Any) -> Any:
        """One API call; its failure as an ``AwsError`` naming ``what``."""
        import botocore.exceptions as bx

        try:
            return method(**kwargs)
        except bx.ClientError as exc:
            code = _code(exc)
            if code == "ResourceNotFoundException":
                raise Gone(f"{what}: {_message(exc)}", code) from None
            if code == "PreconditionFailedException":
                raise Stale(f"{what}: {_message(exc)}", code) from None
            hint = ""
            if code in ("AccessDeniedException", "AccessDenied", "UnauthorizedOperation"):
                hint = " (your AWS identity lacks this permission)"
            elif code in ("UnrecognizedClientException", "InvalidClientTokenId"):
                hint = " (are the AWS credentials valid? try `aws sts get-caller-identity`)"
            elif code == "ExpiredTokenException":
                hint = " (the AWS session expired: log in again)"
            raise AwsError(f"{what} failed: {code}: {_message(exc)}{hint}", code) from None
        except bx.NoCredentialsError:
            raise AwsError("no AWS credentials: run `aws configure` or set AWS_PROFILE") from None
        except bx.EndpointConnectionError as exc:
            raise AwsError(f"{what}: cannot reach AWS ({exc})", "connection") from None
        except bx.BotoCoreError as exc:
            raise AwsError(f"{what} failed: {exc}") from None

    # --- functions -----------------------------------------------------------------------

    def list_functions(self) -> list[FunctionInfo]:
        found: list[FunctionInfo] = []
        marker: str | None = None
        for _ in range(1000):  # 50 a page: bounded at 50,000 functions
            kwargs: dict[str, Any] = {"MaxItems": 50}
            if marker:
                kwargs["Marker"] = marker
            page = self.call("lambda:ListFunctions", self.lam.list_functions, **kwargs)
            found += [FunctionInfo.from_aws(item) for item in page.get("Functions", [])]
            marker = page.get("NextMarker")
            if not marker:
                break
        return found

    def stack_functions(self, stack: str) -> list[str]:
        """The physical names of the Lambda functions of a CloudFormation stack."""
        cfn = self.client("cloudformation")
        names: list[str] = []
        token: str | None = None
        for _ in range(1000):
            kwargs: dict[str, Any] = {"StackName": stack}
            if token:
                kwargs["NextToken"] = token
            try:
                page = self.call(
                    f"cloudformation:ListStackResources {stack}",
                    cfn.list_stack_resources,
                    **kwargs,
                )
            except AwsError as exc:
                if exc.code == "ValidationError":
                    raise AwsError(
                        f"no CloudFormation stack {stack!r} in {self.region}", exc.code
                    ) from None
                raise
            names += [
                str(item["PhysicalResourceId"])
                for item in page.get("StackResourceSummaries", [])
                if item.get("ResourceType") == "AWS::Lambda::Function"
                and item.get("PhysicalResourceId")
                and not str(item.get("ResourceStatus", "")).startswith("DELETE")
            ]
            token = page.get("NextToken")
            if not token:
                break
        return names

    def get_function(self, name: str) -> FunctionInfo:
        config = self.call(
            f"lambda:GetFunctionConfiguration {name}",
            self.lam.get_function_configuration,
            FunctionName=name,
        )
        return FunctionInfo.from_aws(config)

    def wait_settled(self, name: str, timeout: float = SETTLE_TIMEOUT) -> FunctionInfo:
        """The function's configuration once no update is in progress."""
        deadline = self.clock() + timeout
        delay = 0.1
        while True:  # bounded by the deadline
            info = self.get_function(name)
            if info.last_update != "InProgress":
                return info
            if self.clock() >= deadline:
                raise AwsError(
                    f"function {name} is still updating after {timeout:.0f} s "
                    "(LastUpdateStatus InProgress); try again later",
                    "InProgress",
                )
            self.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def update(
        self,
        name: str,
        env: dict[str, str],
        layers: tuple[str, ...],
        revision: str | None,
        on_retry: Callable[[str, int, float], None] | None = None,
    ) -> FunctionInfo:
        """Write ``env`` and ``layers``; ``revision`` (when Lambda gave one) makes the write
        fail with ``Stale`` if the function changed since it was read."""
        kwargs: dict[str, Any] = {
            "FunctionName": name,
            "Environment": {"Variables": env},
            "Layers": list(layers),
        }
        if revision:
            kwargs["RevisionId"] = revision
        for attempt in range(1, UPDATE_ATTEMPTS + 1):
            settled = self.wait_settled(name)
            if revision and settled.revision and settled.revision != revision:
                raise Stale(f"function {name} changed while burrow was working on it")
            try:
                config = self.call(
                    f"lambda:UpdateFunctionConfiguration {name}",
                    self.lam.update_function_configuration,
                    **kwargs,
                )
            except AwsError as exc:
                if exc.code not in RETRYABLE or attempt == UPDATE_ATTEMPTS:
                    raise
                delay = random.uniform(0.5, 1.0) * min(5.0, 0.25 * 2 ** (attempt - 1))
                if on_retry is not None:
                    on_retry(exc.code, attempt, delay)
                self.sleep(delay)
                continue
            return FunctionInfo.from_aws(config)
        raise AssertionError("unreachable")

    # --- networks ------------------------------------------------------------------------

    def routes(self, vpc_id: str | None, subnets: tuple[str, ...]) -> dict[str, bool | None]:
        """For each subnet: does its route table send 0.0.0.0/0 somewhere a Lambda can use
        (a NAT gateway or instance, a transit gateway, a peering)? An internet gateway alone
        is not enough: a function's network interfaces have no public address. None where
        this cannot be read."""
        ec2 = self.client("ec2")
        result: dict[str, bool | None] = {}
        try:
            # The subnets say which VPC they are in (a function's VpcId may be missing).
            described = self.call(
                "ec2:DescribeSubnets", ec2.describe_subnets, SubnetIds=list(subnets)
            ).get("Subnets", [])
            vpcs = {str(s["SubnetId"]): str(s.get("VpcId") or vpc_id) for s in described}
            mains: dict[str, Any] = {}
            for subnet in subnets:
                tables = self.call(
                    "ec2:DescribeRouteTables",
                    ec2.describe_route_tables,
                    Filters=[{"Name": "association.subnet-id", "Values": [subnet]}],
                ).get("RouteTables", [])
                vpc = vpcs.get(subnet) or vpc_id
                if not tables and vpc:  # no table of its own: the VPC's main one
                    if vpc not in mains:
                        mains[vpc] = self.call(
                            "ec2:DescribeRouteTables",
                            ec2.describe_route_tables,
                            Filters=[
                                {"Name": "vpc-id", "Values": [vpc]},
                                {"Name": "association.main", "Values": ["true"]},
                            ],
                        ).get("RouteTables", [])
                    tables = mains[vpc]
                result[subnet] = _routes_out(tables[0]) if tables else None
        except AwsError:
            return {subnet: result.get(subnet) for subnet in subnets}
        return result

    # --- layers --------------------------------------------------------------------------

    def layer(self, need: LayerNeed, zip_path: Path, version: str) -> tuple[str, bool]:
        """The ARN of a layer version with exactly this zip, published if there is none yet;
        and whether this call published it. The content hash is in the description."""
        data = zip_path.read_bytes()
        if len(data) > MAX_INLINE_ZIP:
            raise AwsError(
                f"the layer zip {zip_path} is {len(data) // 1_000_000} MB, over Lambda's 50 MB "
                "for a direct upload"
            )
        digest = hashlib.sha256(data).hexdigest()
        name = layer_name(need)
        marker: str | None = None
        for _ in range(100):
            kwargs: dict[str, Any] = {"LayerName": name}
            if marker:
                kwargs["Marker"] = marker
            try:
                page = self.call(
                    f"lambda:ListLayerVersions {name}", self.lam.list_layer_versions, **kwargs
                )
            except Gone:
                break
            for item in page.get("LayerVersions", []):
                if f"sha256:{digest}" in str(item.get("Description", "")):
                    return str(item["LayerVersionArn"]), False
            marker = page.get("NextMarker")
            if not marker:
                break
        published = self.call(
            f"lambda:PublishLayerVersion {name}",
            self.lam.publish_layer_version,
            LayerName=name,
            Description=f"burrow {version} extension ({need.describe()}) sha256:{digest}",
            Content={"ZipFile": data},
            CompatibleArchitectures=[need.arch],
        )
        return str(published["LayerVersionArn"]), True


def layer_name(need: LayerNeed) -> str:
    python = (need.python or "").replace(".", "")
    kind = f"python{python}" if need.kind == "python" else "standalone"
    return f"burrow-dev-{kind}-{need.arch}"


def _routes_out(table: dict[str, Any]) -> bool:
    for route in table.get("Routes", []):
        if route.get("DestinationCidrBlock") != "0.0.0.0/0":
            continue
        if route.get("State", "active") != "active":
            continue
        if any(
            route.get(key)
            for key in (
                "NatGatewayId",
                "InstanceId",
                "NetworkInterfaceId",
                "TransitGatewayId",
                "VpcPeeringConnectionId",
            )
        ):
            return True
    return False

"""moto's server on loopback, with its Lambda made to behave like AWS where moto does not.

The server runs in a thread of the test process, so the tests can patch moto's models while
``burrow dev`` (a subprocess) talks to it over HTTP with boto3, as it would to AWS. The patch
(``StrictLambda``) adds what ``burrow dev`` must cope with and moto leaves out:

- a ``RevisionId`` that changes with every update, checked when an update names one
  (``PreconditionFailedException``);
- ``LastUpdateStatus`` ``InProgress`` for a number of reads after each update, and
  ``ResourceConflictException`` for an update made meanwhile (as AWS refuses one);
- injected ``ResourceConflictException`` / ``TooManyRequestsException`` for the next updates
  of a function.
"""

from __future__ import annotations

import io
import json
import threading
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

REGION = "eu-west-1"
ACCOUNT_ROLE = "arn:aws:iam::123456789012:role/lambda"


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def reset(url: str) -> None:
    request = urllib.request.Request(f"{url}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def aws_env(url: str) -> dict[str, str]:
    """What a developer's shell would have: credentials, a region, and the endpoint."""
    return {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def client(url: str, service: str) -> Any:
    import boto3

    return boto3.client(
        service,
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def code_zip(source: str = "exports.handler = async () => ({ statusCode: 200 });\n") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("index.js", source)
    return buffer.getvalue()


def deploy(url: str, name: str, env: dict[str, str] | None, **kw: Any) -> dict[str, Any]:
    """Create a function as a deploy would (a zip, an environment)."""
    iam = client(url, "iam")
    try:
        iam.create_role(RoleName="lambda", AssumeRolePolicyDocument=json.dumps({}))
    except iam.exceptions.EntityAlreadyExistsException:
        pass
    options: dict[str, Any] = {
        "FunctionName": name,
        "Runtime": "nodejs20.x",
        "Role": ACCOUNT_ROLE,
        "Handler": "index.handler",
        "Code": {"ZipFile": code_zip()},
    }
    if env is not None:
        options["Environment"] = {"Variables": env}
    options.update(kw)
    return dict(client(url, "lambda").create_function(**options))


def configuration(url: str, name: str) -> tuple[dict[str, str], list[str]]:
    """A function's environment and layers, as AWS reports them now."""
    config = client(url, "lambda").get_function_configuration(FunctionName=name)
    env = (config.get("Environment") or {}).get("Variables") or {}
    return dict(env), [layer["Arn"] for layer in config.get("Layers") or []]


def revision(fn: Any) -> str:
    """The function's RevisionId (moto keeps none for functions)."""
    value: str = fn.__dict__.setdefault("_strict_revision", str(uuid.uuid4()))
    return value


@dataclass
class StrictLambda:
    settle_reads: int = 0  # reads reporting InProgress after each update
    conflicts: dict[str, int] = field(default_factory=dict)  # injected, per function name
    throttles: dict[str, int] = field(default_factory=dict)
    #: A deploy that lands between burrow's read and its write: these variables are set (and
    #: the revision moves) just before the next update of the function is checked.
    races: dict[str, dict[str, str]] = field(default_factory=dict)
    in_progress: dict[str, int] = field(default_factory=dict)
    updates: list[str] = field(default_factory=list)  # accepted, in order
    refused_in_progress: int = 0  # updates that came while one was in progress
    in_progress_reads: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from moto.awslambda import models
        from moto.awslambda.exceptions import LambdaClientError, PreconditionFailedException

        class Conflict(LambdaClientError):
            code = 409

            def __init__(self, message: str) -> None:
                super().__init__("ResourceConflictException", message)

        class Throttled(LambdaClientError):
            code = 429

            def __init__(self) -> None:
                super().__init__("TooManyRequestsException", "Rate exceeded")

        original_get = models.LambdaFunction.get_configuration
        original_update = models.LambdaBackend.update_function_configuration
        hook = self

        def get_configuration(fn: Any, on_create: bool = False) -> dict[str, Any]:
            config: dict[str, Any] = original_get(fn, on_create)
            config["RevisionId"] = revision(fn)
            with hook.lock:
                left = hook.in_progress.get(fn.function_name, 0)
                if left > 0 and not on_create:
                    hook.in_progress[fn.function_name] = left - 1
                    hook.in_progress_reads += 1
                    config["LastUpdateStatus"] = "InProgress"
            return config

        def update_function_configuration(
            backend: Any, function_name: str, qualifier: str, body: dict[str, Any]
        ) -> dict[str, Any] | None:
            fn = backend.get_function(function_name, qualifier)
            name = fn.function_name
            with hook.lock:
                if hook.in_progress.get(name, 0) > 0:
                    hook.refused_in_progress += 1
                    raise Conflict(
                        "The operation cannot be performed at this time. An update is in "
                        f"progress for resource: {fn.function_arn}"
                    )
                if hook.conflicts.get(name, 0) > 0:
                    hook.conflicts[name] -= 1
                    raise Conflict(
                        "The operation cannot be performed at this time. The function is "
                        "currently in the following state: Pending"
                    )
                if hook.throttles.get(name, 0) > 0:
                    hook.throttles[name] -= 1
                    raise Throttled()
                race = hook.races.pop(name, None)
                if race is not None:
                    fn.environment_vars = {**(fn.environment_vars or {}), **race}
                    fn._strict_revision = str(uuid.uuid4())
                wanted = body.get("RevisionId")
                if wanted and wanted != revision(fn):
                    raise PreconditionFailedException(
                        "The Revision Id provided does not match the latest Revision Id."
                    )
            result = original_update(backend, function_name, qualifier, body)
            with hook.lock:
                fn._strict_revision = str(uuid.uuid4())
                hook.in_progress[name] = hook.settle_reads
                hook.updates.append(name)
            if result is not None:
                result["RevisionId"] = revision(fn)
                if hook.settle_reads:
                    result["LastUpdateStatus"] = "InProgress"
            return result

        monkeypatch.setattr(models.LambdaFunction, "get_configuration", get_configuration)
        monkeypatch.setattr(
            models.LambdaBackend, "update_function_configuration", update_function_configuration
        )

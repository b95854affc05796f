"""``burrow serverless``: the serverless relay's CloudFormation template, its Lambda package,
and the local emulator to try it (and test it) without AWS."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from burrow.cli.common import fail, json_option, main, option, verbose_option
from burrow.cli_output import Reporter
from burrow.errors import BurrowError, ConfigError


@main.group()
def serverless() -> None:
    """The serverless relay: API Gateway + Lambda + DynamoDB in your AWS account."""


@serverless.command()
@option(
    "--domain",
    envvar="BURROW_SERVERLESS_DOMAIN",
    help="Serve tunnels as NAME.DOMAIN (needs a wildcard certificate).",
)
@option(
    "--certificate-arn",
    envvar="BURROW_SERVERLESS_CERTIFICATE_ARN",
    help="ACM certificate for *.DOMAIN (same region).",
)
@option(
    "--format",
    "output_format",
    type=click.Choice(["yaml", "json"]),
    default="yaml",
    show_default=True,
    envvar="BURROW_SERVERLESS_FORMAT",
    help="Template syntax.",
)
@option(
    "--no-bucket",
    is_flag=True,
    envvar="BURROW_SERVERLESS_NO_BUCKET",
    help="No S3 bucket: answers larger than a Lambda response fail with 502.",
)
def template(
    domain: str | None, certificate_arn: str | None, output_format: str, no_bucket: bool
) -> None:
    """Print the CloudFormation template (deploy it with `aws cloudformation deploy`)."""
    from burrow.aws.serverless.template import build_template, dump

    reporter = Reporter(as_json=False)
    try:
        document = build_template(
            domain=domain, certificate_arn=certificate_arn, bucket=not no_bucket
        )
    except BurrowError as exc:
        fail(reporter, exc)
    sys.stdout.write(dump(document, output_format))


@serverless.command()
@option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default="build",
    show_default=True,
    envvar="BURROW_SERVERLESS_OUTPUT",
    help="Directory for the zip.",
)
def package(output: Path) -> None:
    """Build the handlers' zip the template names (upload it to the CodeBucket)."""
    from burrow.aws.serverless.package import build_package

    reporter = Reporter(as_json=False)
    try:
        path = build_package(output)
    except BurrowError as exc:
        fail(reporter, exc)
    click.echo(f"{path} {path.stat().st_size} bytes (CodeKey={path.name})")


def _listen(text: str, flag: str) -> tuple[str, int]:
    from burrow.addresses import parse_hostport

    try:
        return parse_hostport(text, 0, listen=True)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


@serverless.command()
@option(
    "--ws-listen",
    default="127.0.0.1:8001",
    show_default=True,
    envvar="BURROW_EMULATOR_WS",
    help="The WebSocket API (agents use --to ws://...).",
)
@option(
    "--http-listen",
    default="127.0.0.1:8000",
    show_default=True,
    envvar="BURROW_EMULATOR_HTTP",
    help="The HTTP API (visitors).",
)
@option(
    "--manage-listen",
    default="127.0.0.1:0",
    show_default=True,
    envvar="BURROW_EMULATOR_MANAGE",
    help="The @connections API.",
)
@option(
    "--domain",
    default="",
    envvar="BURROW_EMULATOR_DOMAIN",
    help="Route NAME.DOMAIN by Host (else /t/NAME/ only).",
)
@option(
    "--state-dir",
    type=click.Path(path_type=Path),
    envvar="BURROW_STATE_DIR",
    help="Where the token key lives [default: ~/.local/state/burrow/serverless].",
)
@option(
    "--speed",
    type=float,
    default=1.0,
    show_default=True,
    envvar="BURROW_EMULATOR_SPEED",
    help="Run the emulated clock this many times faster (idle and 2-hour limits).",
)
@option(
    "--no-bucket",
    is_flag=True,
    envvar="BURROW_EMULATOR_NO_BUCKET",
    help="No S3 bucket for large answers.",
)
@option(
    "--concurrency",
    type=int,
    default=1000,
    show_default=True,
    envvar="BURROW_EMULATOR_CONCURRENCY",
    help="Lambda containers per function (more requests wait for one).",
)
@json_option
@verbose_option
def emulate(
    ws_listen: str,
    http_listen: str,
    manage_listen: str,
    domain: str,
    state_dir: Path | None,
    speed: float,
    no_bucket: bool,
    concurrency: int,
    as_json: bool,
    verbose: int,
) -> None:
    """Run the serverless relay locally: the real handlers behind a fake API Gateway, with
    DynamoDB and S3 from moto. Mint tokens with `burrow token issue --state-dir DIR`."""
    from burrow.cli.common import run, setup_logging

    reporter = Reporter(as_json=as_json)
    setup_logging(verbose)
    try:
        if speed <= 0:
            raise ConfigError("--speed must be positive")
        if not 1 <= concurrency <= 10000:
            raise ConfigError("--concurrency must be from 1 to 10000")
        options: dict[str, Any] = {
            "ws_listen": _listen(ws_listen, "--ws-listen"),
            "http_listen": _listen(http_listen, "--http-listen"),
            "manage_listen": _listen(manage_listen, "--manage-listen"),
            "domain": domain,
            "speed": speed,
            "bucket": not no_bucket,
            "concurrency": concurrency,
        }
    except BurrowError as exc:
        fail(reporter, exc)

    async def serve() -> int:
        from burrow.aws.serverless.emulator import Emulator
        from burrow.cli.common import Stopper
        from burrow.net.tls import default_state_dir

        stopper = Stopper()
        directory = state_dir or default_state_dir("serverless")
        emulator = Emulator(state_dir=directory, **options)
        try:
            await emulator.start()
            reporter.event(
                {
                    "event": "emulator_ready",
                    "ws": emulator.ws_url,
                    "http": emulator.http_url,
                    "manage": emulator.management_url,
                    "state_dir": str(directory),
                }
            )
            await stopper.event.wait()
        finally:
            await emulator.close()
        return 0

    try:
        code = run(serve)
    except BurrowError as exc:
        fail(reporter, exc)
    sys.exit(code)

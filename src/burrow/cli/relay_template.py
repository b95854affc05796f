"""``burrow relay template``: infrastructure for a relay, printed for the user to deploy with
their own tools (``aws cloudformation deploy``, the console); burrow calls no AWS API here."""

from __future__ import annotations

from pathlib import Path

import click

from burrow.cli.common import option


@click.command(name="template")
@option(
    "--vpc",
    is_flag=True,
    envvar="BURROW_TEMPLATE_VPC",
    help="A relay inside a VPC: on-premises agents dial out to it, Lambdas in private subnets "
    "reach it on its private address (no VPN, no NAT gateway).",
)
@option(
    "--ingress",
    type=click.Choice(["public-ip", "nlb"]),
    default="public-ip",
    show_default=True,
    envvar="BURROW_TEMPLATE_INGRESS",
    help="How agents reach the relay: an Elastic IP on the relay in a public subnet, or a "
    "Network Load Balancer in front of it in a private subnet (which then needs its own "
    "way out for pip).",
)
@option(
    "--format",
    "fmt",
    type=click.Choice(["yaml", "json"]),
    default="yaml",
    show_default=True,
    envvar="BURROW_TEMPLATE_FORMAT",
    help="CloudFormation reads either.",
)
@option(
    "--package",
    envvar="BURROW_TEMPLATE_PACKAGE",
    help="The BurrowPackage parameter's default: what pip installs on the relay "
    "[default: burrow==THIS_VERSION].",
)
@option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="BURROW_TEMPLATE_OUTPUT",
    help="Write the template here instead of stdout.",
)
def template(vpc: bool, ingress: str, fmt: str, package: str | None, output: Path | None) -> None:
    """Print a CloudFormation template for a relay (--vpc)."""
    import re

    from burrow.aws.vpc_template import PACKAGE_PATTERN, build, render

    if not vpc:
        raise click.UsageError("say which template: --vpc (a relay inside a VPC)")
    if package is not None and not re.fullmatch(PACKAGE_PATTERN, package):
        raise click.BadParameter(
            f"{package!r}: give a pip requirement or URL with no spaces or quotes",
            param_hint="--package",
        )
    text = render(build(ingress, package=package), fmt)
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        raise click.FileError(str(output), exc.strerror or str(exc)) from None
    click.echo(
        f"wrote {output} ({len(text)} bytes); deploy it with: aws cloudformation deploy "
        f"--template-file {output} --stack-name burrow-relay --capabilities CAPABILITY_IAM "
        "--parameter-overrides VpcId=... RelaySubnetId=... LambdaSecurityGroupId=... "
        "AgentCidr=...",
        err=True,
    )

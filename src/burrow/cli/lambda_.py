"""``burrow lambda``: the Lambda extension's layer."""

from __future__ import annotations

from pathlib import Path

import click

from burrow.cli.common import fail, main, option
from burrow.cli_output import Reporter
from burrow.errors import BurrowError


@main.group(name="lambda")
def lambda_group() -> None:
    """AWS Lambda: burrow as an extension that gives the function private services."""


@lambda_group.group(name="layer")
def lambda_layer() -> None:
    """The layer that installs the extension (extensions/burrow and python/)."""


@lambda_layer.command(name="build")
@option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default="layer.zip",
    show_default=True,
    envvar="BURROW_LAYER_OUTPUT",
)
@option(
    "--python-version",
    default="3.12",
    show_default=True,
    envvar="BURROW_LAYER_PYTHON",
    help="The runtime's Python.",
)
@option(
    "--arch",
    default="x86_64",
    show_default=True,
    envvar="BURROW_LAYER_ARCH",
    help="x86_64 or arm64.",
)
@option(
    "--no-deps",
    is_flag=True,
    envvar="BURROW_LAYER_NO_DEPS",
    help="Only the burrow package (no download).",
)
def lambda_layer_build(output: Path, python_version: str, arch: str, no_deps: bool) -> None:
    """Build the layer zip; prints its path and size."""
    from burrow.aws.layer import build_layer

    reporter = Reporter(as_json=False)
    try:
        path = build_layer(output, python_version=python_version, arch=arch, no_deps=no_deps)
    except BurrowError as exc:
        fail(reporter, exc)
    click.echo(f"{path} {path.stat().st_size} bytes")

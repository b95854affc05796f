"""``burrow lambda``: the Lambda extension's layer."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from burrow.cli.common import fail, main, option
from burrow.cli_output import Reporter
from burrow.errors import BurrowError, ConfigError


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
    help="Where to write the layer zip.",
)
@option(
    "--python-version",
    default="3.12",
    show_default=True,
    envvar="BURROW_LAYER_PYTHON",
    help="The runtime's Python (not with --standalone).",
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
    help="Only the burrow package (no download; not with --standalone).",
)
@option(
    "--standalone",
    is_flag=True,
    envvar="BURROW_LAYER_STANDALONE",
    help="A self-contained extension for any runtime (Node.js, Java, Go, ...): builds an "
    "interpreter for old glibc once (minutes; cached in ~/.cache/burrow/standalone).",
)
@click.pass_context
def layer_build(
    ctx: click.Context,
    output: Path,
    python_version: str,
    arch: str,
    no_deps: bool,
    standalone: bool,
) -> None:
    """Build the layer zip; prints its path and size."""
    reporter = Reporter(as_json=False)
    try:
        if standalone:
            _check_standalone_options(ctx)
            from burrow.aws.standalone import build_standalone_layer

            path = build_standalone_layer(output, arch=arch, log=_progress)
        else:
            from burrow.aws.layer import build_layer

            path = build_layer(output, python_version=python_version, arch=arch, no_deps=no_deps)
    except BurrowError as exc:
        fail(reporter, exc)
    click.echo(f"{path} {path.stat().st_size} bytes")


def _check_standalone_options(ctx: click.Context) -> None:
    """Options of the Python-runtime layer mean nothing here: say so instead of ignoring them."""
    default = click.core.ParameterSource.DEFAULT
    for name, flag in (("python_version", "--python-version"), ("no_deps", "--no-deps")):
        if ctx.get_parameter_source(name) not in (default, None):
            raise ConfigError(
                f"{flag} is for the Python-runtime layer; drop it with --standalone "
                "(the standalone extension carries its own Python)"
            )


def _progress(message: str) -> None:
    sys.stderr.write(f"burrow: {message}\n")
    sys.stderr.flush()

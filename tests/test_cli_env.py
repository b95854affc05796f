"""bore's rule: every flag of every command also reads an environment variable."""

from __future__ import annotations

from collections.abc import Iterator

import click
from click.testing import CliRunner

from burrow.cli import main


def _options(command: click.Command, path: str) -> Iterator[tuple[str, click.Option]]:
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _options(sub, f"{path} {name}".strip())
        return
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in ("help", "version"):
            yield path, param


def test_every_option_has_an_environment_variable() -> None:
    missing = [f"{path} {'/'.join(opt.opts)}" for path, opt in _options(main, "") if not opt.envvar]
    assert missing == []


def test_environment_variables_are_burrow_prefixed() -> None:
    for path, option in _options(main, ""):
        names = [option.envvar] if isinstance(option.envvar, str) else list(option.envvar or [])
        assert all(name.startswith("BURROW_") for name in names), (path, option.opts)


def test_header_rules_from_the_environment_keep_their_spaces() -> None:
    """One rule per line: 'Name: value' has a space that must not split it."""
    from burrow.cli import agent as cli

    seen: dict[str, object] = {}

    def fake_run_agent(reporter: object, specs: list[object], common: object, **kw: object) -> None:
        seen["options"] = specs[0].options  # type: ignore[attr-defined]

    original = cli._run_agent
    cli._run_agent = fake_run_agent  # type: ignore[assignment]
    try:
        result = CliRunner().invoke(
            main,
            ["http", "3000", "--no-inspect"],
            env={"BURROW_REQUEST_HEADER_ADD": "X-One: 1\nX-Two: two words"},
        )
    finally:
        cli._run_agent = original
    assert result.exit_code == 0, result.output
    options = seen["options"]
    assert options.request_header_add == ["X-One: 1", "X-Two: two words"]  # type: ignore[attr-defined]

"""``burrow doctor URL``: the command line face of ``burrow.doctor`` (defined here, attached
to the group in ``burrow.cli``).

On a terminal a live checklist (rich, imported only then), plain lines on a pipe, or one JSON
object per line with ``--json``; the same facts in each. Exit 0 when every phase passed, 1 when
one failed, 2 for bad input.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from burrow.cli.common import option
from burrow.errors import BurrowError, ConfigError

_MARKS = {"ok": ("✓", "green"), "failed": ("✗", "red"), "skipped": ("·", "dim")}
_PLAIN = {"ok": "ok  ", "failed": "FAIL", "skipped": "skip"}


class _Output:
    """Prints phases as they complete and the verdict, never a secret."""

    def __init__(self, as_json: bool, secrets: list[str]) -> None:
        self.as_json = as_json
        self.secrets = [s for s in secrets if s and len(s) >= 3]
        self.console: Any = None
        if not as_json and sys.stdout.isatty():
            from rich.console import Console

            self.console = Console(highlight=False)

    def _scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def _line(self, text: str, style: str | None = None) -> None:
        text = self._scrub(text)
        if self.console is not None:
            from rich.text import Text

            self.console.print(Text(text, style=style or ""))
        else:
            click.echo(text)

    def header(self, target: str, via: str) -> None:
        if not self.as_json:
            self._line(
                f"burrow doctor {target}" + ("" if via == "direct" else f" via {via}"), "bold"
            )

    def phase(self, result: Any) -> None:
        import json

        if self.as_json:
            click.echo(self._scrub(json.dumps(result.event())))
            return
        ms = f"{result.ms:8.1f} ms" if result.status != "skipped" else " " * 11
        if self.console is not None:
            mark, style = _MARKS[result.status]
            self._line(f"  {mark} {result.phase:<8}{ms}  {result.detail}", style)
        else:
            self._line(f"{_PLAIN[result.status]}  {result.phase:<8}{ms}  {result.detail}")

    def verdict(self, verdict: Any, target: str) -> None:
        import json

        if self.as_json:
            click.echo(self._scrub(json.dumps(verdict.event(target))))
            return
        if verdict.ok:
            head = "verdict: OK" + (f" (note on {verdict.layer})" if verdict.layer else "")
            style = "bold green"
        else:
            head = f"verdict: FAILED at {verdict.layer}"
            style = "bold red"
        self._line(head, style)
        self._line(f"  cause: {verdict.cause}")
        self._line(f"  fix:   {verdict.fix}")

    def error(self, message: str) -> None:
        import json

        message = self._scrub(message)
        if self.as_json:
            click.echo(json.dumps({"event": "error", "message": message}))
        click.echo(f"burrow doctor: {message}", err=True)


@click.command()
@click.argument("url", envvar="BURROW_DOCTOR_URL")
@option(
    "--via",
    envvar="BURROW_VIA",
    metavar="PROXY",
    help="socks5://HOST:PORT, http://HOST:PORT (CONNECT) or burrow:NAME (a private service or "
    "exit, through the relay named with --to).",
)
@option(
    "--idle",
    type=float,
    envvar="BURROW_IDLE",
    metavar="SECONDS",
    help="Hold the connection idle this long, then query: tells a server's idle timeout from a "
    "NAT or proxy that drops idle connections.",
)
@option(
    "--json",
    "as_json",
    is_flag=True,
    envvar="BURROW_JSON",
    help="One JSON object per line: a phase event each, then the verdict.",
)
@option(
    "--password-env",
    envvar="BURROW_PASSWORD_ENV",
    metavar="VAR",
    help="Read the password from this environment variable (it is never printed).",
)
@option(
    "--timeout",
    type=float,
    default=5.0,
    show_default=True,
    envvar="BURROW_TIMEOUT",
    help="Seconds each step may wait for an answer.",
)
@option(
    "--no-payload",
    is_flag=True,
    envvar="BURROW_NO_PAYLOAD",
    help="Skip the payload ladder (it moves about 2 MiB each way).",
)
@option(
    "--to",
    "relay",
    envvar="BURROW_RELAY",
    metavar="RELAY",
    help="For --via burrow:NAME: the relay's HOST[:PORT].",
)
@option("--token", envvar="BURROW_TOKEN", help="A scoped token.")
@option("--secret", envvar="BURROW_SECRET", help="The relay's secret.")
@option(
    "--fingerprint",
    envvar="BURROW_FINGERPRINT",
    help="Pin the relay's certificate (sha256:...).",
)
@option(
    "--ca",
    type=click.Path(path_type=Path),
    envvar="BURROW_CA",
    help="Verify the relay's certificate against this CA (PEM).",
)
@option(
    "--insecure",
    is_flag=True,
    envvar="BURROW_INSECURE",
    help="Plaintext to the relay (only for a relay started with --insecure).",
)
def doctor(
    url: str,
    via: str | None,
    idle: float | None,
    as_json: bool,
    password_env: str | None,
    timeout: float,
    no_payload: bool,
    relay: str | None,
    token: str | None,
    secret: str | None,
    fingerprint: str | None,
    ca: Path | None,
    insecure: bool,
) -> None:
    """Diagnose a connection to URL layer by layer (dns, dial, hello, tls, auth, session, query,
    payload, idle) and name the failing layer, its cause and the fix.

    URL: postgres://, postgresql://, mysql://, mariadb://, redis://, rediss://, tcp://,
    http://, https://. Passwords are never printed."""
    import asyncio

    from burrow.doctor import Options, diagnose, parse_target, parse_via, redact
    from burrow.roles.settings import ClientSettings

    password = None
    secrets = [s for s in (secret, token) if s]
    out = _Output(as_json, secrets)
    try:
        if password_env is not None:
            password = os.environ.get(password_env)
            if password is None:
                raise ConfigError(f"--password-env {password_env}: that variable is not set")
            secrets.append(password)
        target = parse_target(url, password=password)
        if target.password:
            secrets.append(target.password)
        out.secrets = [s for s in secrets if len(s) >= 3]
        via_spec = parse_via(via)
        if timeout <= 0:
            raise ConfigError("--timeout must be positive")
        if idle is not None and idle <= 0:
            raise ConfigError("--idle must be a positive number of seconds")
        settings = ClientSettings(
            relay=relay,
            secret=secret,
            token=token,
            fingerprint=fingerprint,
            ca=ca,
            insecure=insecure,
            keep_identity=False,
        )
        if via_spec.kind == "burrow":
            if not relay:
                raise ConfigError("--via burrow:NAME needs the relay: pass --to RELAY")
            settings.check()
        elif _given_on_the_command_line(
            "relay", "token", "secret", "fingerprint", "ca", "insecure"
        ):
            # (from BURROW_* variables they are the environment's connector settings: ignored)
            raise ConfigError(
                "--to/--token/--secret/--fingerprint/--ca/--insecure go with --via burrow:NAME"
            )
    except BurrowError as exc:
        out.error(str(exc) if isinstance(exc, ConfigError) else redact(str(exc)))
        sys.exit(exc.exit_code)

    options = Options(timeout=timeout, idle=idle, payload=not no_payload)
    out.header(target.display, via_spec.display)

    status: Any = None

    def started(phase: str) -> None:
        if status is not None:
            status.update(f"{phase} …")

    async def run() -> Any:
        return await diagnose(
            target, via_spec, options, burrow=settings, on_phase=out.phase, on_start=started
        )

    try:
        if out.console is not None:
            with out.console.status("starting …", spinner="dots") as status:
                checklist = asyncio.run(run())
        else:
            checklist = asyncio.run(run())
    except BurrowError as exc:
        out.error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        out.error("interrupted")
        sys.exit(130)
    out.verdict(checklist.verdict(), target.display)
    sys.exit(0 if checklist.passed else 1)


def _given_on_the_command_line(*names: str) -> bool:
    from click.core import ParameterSource

    context = click.get_current_context()
    return any(context.get_parameter_source(name) == ParameterSource.COMMANDLINE for name in names)

"""The VPC relay's state in the stack's secret, so a replaced instance keeps the certificate
agents pin and the token key that signed their tokens.

On the instance, from user data (``burrow relay template --vpc`` writes the call), as root::

    python -m burrow.aws.vpc_relay restore --secret-id ARN --fingerprint-parameter NAME \\
        --state-dir /var/lib/burrow-relay

restores ``relay.crt``, ``relay.key`` and ``token.key`` from the secret, or on the first boot
makes them and stores them there; either way it publishes the certificate's fingerprint in
the SSM parameter. On an admin's machine, to mint tokens::

    python -m burrow.aws.vpc_relay fetch-token-key --secret-id ARN --state-dir DIR
    burrow token issue --state-dir DIR --expose opsdb

AWS is reached through the AWS CLI (Amazon Linux has it), so burrow needs no boto3 here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from burrow.errors import BurrowError, ConfigError
from burrow.net.tls import fingerprint_of_pem_file, load_or_create_relay_cert
from burrow.statefiles import write_replace
from burrow.tokens import TokenKey

#: The files of a relay's state directory kept in the secret, with their modes.
FILES = {"relay.crt": 0o644, "relay.key": 0o600, "token.key": 0o600}
#: Secrets Manager's own limit for a secret value.
MAX_SECRET = 65536
AWS_TIMEOUT = 60.0

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


class AwsCli:
    """The few AWS calls the relay's bootstrap makes, through the ``aws`` command."""

    def __init__(
        self, region: str | None = None, *, aws: str = "aws", runner: Runner = subprocess.run
    ) -> None:
        self.region = region
        self.aws = aws
        self.runner = runner

    def _call(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [self.aws, *args, "--output", "text"]
        if self.region:
            command += ["--region", self.region]
        try:
            return self.runner(command, capture_output=True, text=True, timeout=AWS_TIMEOUT)
        except FileNotFoundError:
            raise ConfigError(f"{self.aws}: no such command; install the AWS CLI") from None
        except subprocess.TimeoutExpired:
            raise BurrowError(f"aws {args[0]} {args[1]} took over {AWS_TIMEOUT:.0f} s") from None

    def _check(self, done: subprocess.CompletedProcess[str], what: str) -> str:
        if done.returncode != 0:
            reason = (done.stderr or "").strip().splitlines()[-1:] or ["no message"]
            raise BurrowError(f"{what} failed: {reason[0][:300]}")
        return done.stdout

    def get_secret(self, secret_id: str) -> str | None:
        """The secret's current value, or None while it has none (a new, empty secret)."""
        done = self._call(
            "secretsmanager",
            "get-secret-value",
            "--secret-id",
            secret_id,
            "--query",
            "SecretString",
        )
        if done.returncode != 0 and "ResourceNotFoundException" in (done.stderr or ""):
            return None
        return self._check(done, f"reading secret {secret_id}").rstrip("\n")

    def put_secret(self, secret_id: str, value: str) -> None:
        """Store ``value`` from a private file (``file://``), never on a command line."""
        fd, name = tempfile.mkstemp(prefix="burrow-secret-")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(value)
            done = self._call(
                "secretsmanager",
                "put-secret-value",
                "--secret-id",
                secret_id,
                "--secret-string",
                f"file://{name}",
            )
        finally:
            os.unlink(name)
        self._check(done, f"storing secret {secret_id}")

    def put_parameter(self, name: str, value: str) -> None:
        done = self._call(
            "ssm", "put-parameter", "--name", name, "--type", "String", "--value", value,
            "--overwrite",
        )  # fmt: skip
        self._check(done, f"writing parameter {name}")


def parse_state(text: str | None) -> dict[str, str] | None:
    """The files stored in the secret, or None if it holds none yet (empty, ``{}``)."""
    if text is None or not text.strip() or text.strip() == "{}":
        return None
    if len(text) > MAX_SECRET:
        raise ConfigError(f"the relay's secret is larger than {MAX_SECRET} bytes")
    try:
        data = json.loads(text)
    except ValueError:
        raise ConfigError("the relay's secret is not JSON; empty it to start afresh") from None
    if not isinstance(data, dict) or set(data) != set(FILES):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"the relay's secret should hold {sorted(FILES)}, not {found}")
    if not all(isinstance(value, str) for value in data.values()):
        raise ConfigError("the relay's secret holds a value that is not text")
    return data


def restore(cli: AwsCli, secret_id: str, state_dir: Path, parameter: str | None) -> str:
    """Put the relay's state from the secret into ``state_dir`` (or make it and store it);
    publish and return the certificate's fingerprint."""
    state = parse_state(cli.get_secret(secret_id))
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if state is not None:
        for name, mode in FILES.items():
            write_replace(state_dir / name, state[name].encode(), mode)
        TokenKey.load(state_dir)  # a damaged key fails here, not at the first agent
    else:
        load_or_create_relay_cert(state_dir)
        TokenKey.create(state_dir)
        made = {name: (state_dir / name).read_text() for name in FILES}
        cli.put_secret(secret_id, json.dumps(made))
    fingerprint = fingerprint_of_pem_file(state_dir / "relay.crt")
    if parameter:
        cli.put_parameter(parameter, fingerprint)
    return fingerprint


def fetch_token_key(cli: AwsCli, secret_id: str, state_dir: Path) -> str:
    """Copy the token key (and the certificate, for its fingerprint) to ``state_dir``."""
    state = parse_state(cli.get_secret(secret_id))
    if state is None:
        raise ConfigError(
            f"secret {secret_id} is still empty: the relay stores its keys there on its "
            "first boot; wait for the instance to start"
        )
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("token.key", "relay.crt"):
        write_replace(state_dir / name, state[name].encode(), FILES[name])
    return fingerprint_of_pem_file(state_dir / "relay.crt")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m burrow.aws.vpc_relay",
        description="The VPC relay's certificate and token key, kept in Secrets Manager.",
    )
    parser.add_argument("command", choices=["restore", "fetch-token-key"])
    parser.add_argument("--secret-id", required=True, help="The stack's RelaySecret (ARN).")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--fingerprint-parameter", help="SSM parameter for the fingerprint.")
    parser.add_argument("--region", default=os.environ.get("AWS_REGION"))
    parser.add_argument("--aws", default="aws", help="The AWS CLI command.")
    args: Any = parser.parse_args(argv)
    cli = AwsCli(args.region, aws=args.aws)
    try:
        if args.command == "restore":
            fingerprint = restore(cli, args.secret_id, args.state_dir, args.fingerprint_parameter)
            print(f"relay state in {args.state_dir}, fingerprint {fingerprint}")
        else:
            fingerprint = fetch_token_key(cli, args.secret_id, args.state_dir)
            print(
                f"token key in {args.state_dir} (relay fingerprint {fingerprint}); mint tokens "
                f"with: burrow token issue --state-dir {args.state_dir} ..."
            )
    except BurrowError as exc:
        sys.stderr.write(f"burrow: error: {exc}\n")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``burrow`` command, one module per command group; each is a thin face over the role
objects. Importing this package stays cheap: commands import what they use when they run."""

from __future__ import annotations

from burrow.cli import agent, connect, lambda_, pg, relay, serverless, token
from burrow.cli.common import main
from burrow.cli.doctor import doctor

__all__ = ["agent", "connect", "lambda_", "main", "pg", "relay", "serverless", "token"]

main.add_command(doctor)  # defined in cli/doctor.py; attached here

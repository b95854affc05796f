"""The ``burrow`` command, one module per command group; each is a thin face over the role
objects. Importing this package stays cheap: commands import what they use when they run."""

from __future__ import annotations

from burrow.cli import agent, connect, dev, lambda_, pg, relay, serverless, token
from burrow.cli.common import main
from burrow.cli.doctor import doctor
from burrow.cli.relay_status import status
from burrow.cli.relay_template import template

__all__ = ["agent", "connect", "dev", "lambda_", "main", "pg", "relay", "serverless", "token"]

main.add_command(doctor)  # defined in cli/doctor.py; attached here
relay.relay.add_command(template)  # `burrow relay template`, defined in cli/relay_template.py
relay.relay.add_command(status)  # `burrow relay status`, defined in cli/relay_status.py

"""``python -m burrow.cli``: the same as the ``burrow`` command."""

from burrow.cli import main

main()

"""The ``qadapter`` command line: ``qadapter --help`` (or ``python -m qadapter --help``) lists the subcommands."""
from qadapter.cli import main

__all__ = ["main"]

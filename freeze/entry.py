"""Entry point of the frozen binary."""

from unlocker.cli import entry

entry()

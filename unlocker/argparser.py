"""argparse's parser with our usage errors; imported only for a command line that is not the boot's (cli.py)."""

from __future__ import annotations

import argparse

from unlocker import TYPE_CHECKING
from unlocker.errors import UsageError

if TYPE_CHECKING:
    from typing import NoReturn


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2; usage errors are 1 here
        raise UsageError(f"{message} (see '{self.prog} --help')")

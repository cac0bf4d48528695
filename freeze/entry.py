"""Entry point of the frozen binary."""

import sys

from unlocker.boot import warmup

# first, before the imports below: under a cold CPU cache (or an emulated CPU) they take long enough
# for the kernel to load and self-test the cipher meanwhile
warmup.start_early(sys.argv[1:])

from unlocker.cli import entry  # noqa: E402

entry()

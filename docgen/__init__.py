"""Build-time documents generated from the option table (unlocker/options.py): the man page
tpm2-unlocker(8) (manpage.py, argparse-manpage) and the bash and zsh completions (completion.py,
shtab). The Makefile runs them; neither is part of the frozen binary."""

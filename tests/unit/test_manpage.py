"""tpm2-unlocker(8), generated from the code's tables (docgen/manpage.py): readable by man without
warnings, complete, and the README's exit codes and the Makefile's files held to it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from docgen import manpage
from unlocker import options
from unlocker.errors import EXIT_CODES

REPO = Path(__file__).resolve().parents[2]


def man(page: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # one line per paragraph: nothing the checks below look for is hyphenated or broken
    env = {**os.environ, "MANWIDTH": "2000", "MAN_KEEP_FORMATTING": ""}
    return subprocess.run(["man", *extra, "-E", "UTF-8", "-l", str(page)], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("man") / "tpm2-unlocker.8"
    subprocess.run([sys.executable, "-m", "docgen.manpage", str(out)], cwd=REPO, check=True)
    return out


@pytest.fixture(scope="module")
def text(page: Path) -> str:
    shown = man(page)
    assert shown.returncode == 0, shown.stderr
    return shown.stdout.replace("\u2010", "-").replace("\u2212", "-")


def test_man_page_renders_without_warnings(page: Path, tmp_path: Path) -> None:
    # the check sees a warning where there is one: an unknown request in a copy of the page
    broken = tmp_path / "broken.8"
    broken.write_text(page.read_text() + ".XYZZY\n\\f(ZZbad font\n")
    assert man(broken, "--warnings").stderr.strip()
    checked = man(page, "--warnings")
    assert checked.returncode == 0
    assert checked.stderr == ""


def test_man_page_names_every_verb_option_store_exit_code_and_kernel_parameter(text: str) -> None:
    sections = set(re.findall(r"^([A-Z][A-Z ]+)$", text, re.M))
    assert {"NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "STORES", "KERNEL PARAMETERS", "EXIT STATUS",
            "ENVIRONMENT", "FILES"} <= sections
    for verb in options.VERBS:
        assert f"tpm2-unlocker {verb.name}\n" in text, verb.name
        for arg in verb.args:
            if not arg.hidden and not arg.positional:
                assert re.search(rf"COMMAND 'tpm2-unlocker {verb.name}'.*?\n\s+{arg.name}\b", text, re.S), \
                    (verb.name, arg.name)
    stores = text.split("\nSTORES\n")[1].split("\nKERNEL PARAMETERS\n")[0]
    for name, _ in options.STORES:
        assert re.search(rf"^\s+{re.escape(name)}(\s|$)", stores, re.M), name
    params = text.split("\nKERNEL PARAMETERS\n")[1].split("\nEXIT STATUS\n")[0]
    for param in options.kernel_params():
        assert re.search(rf"^\s+{re.escape(param.syntax)}\s*$", params, re.M), param.syntax
    codes = text.split("\nEXIT STATUS\n")[1].split("\nENVIRONMENT\n")[0]
    assert [int(c) for c in re.findall(r"^\s{7}(\d+)\s", codes, re.M)] == [code for code, _ in EXIT_CODES]


def test_every_kernel_parameter_of_an_option_names_its_value() -> None:
    derived = [p.syntax for p in options.kernel_params() if "=" in p.syntax and p.syntax.startswith("tpm2_unlocker.")]
    assert derived == ["tpm2_unlocker.tries=N", "tpm2_unlocker.timeout=S"]


def test_readme_exit_codes_are_the_code_table() -> None:
    readme = (REPO / "README.md").read_text().split("## Exit codes")[1].split("\n## ")[0]
    said = [int(n) for n in re.findall(r"(?:^|· )(\d+) ", readme.replace("\n", " ").strip())]
    said += [int(n) for n in re.findall(r"exits (\d+)", readme)]
    assert said == [code for code, _ in EXIT_CODES]


def installed_paths(**make_vars: str) -> list[str]:
    """Where `make install` puts each file, from its dry run (nothing is built or copied)."""
    args = [f"{k}={v}" for k, v in {"DESTDIR": "/DESTDIR", "PREFIX": "/usr", **make_vars}.items()]
    dry = subprocess.run(["make", "-s", "-n", "-C", str(REPO), "install", *args], capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[-1].removeprefix("/DESTDIR") for line in dry.splitlines() if line.startswith("install -D")]


def test_man_page_files_name_every_path_make_install_fills() -> None:
    paths = installed_paths(ZSHCOMPDIR="/usr/share/zsh/vendor-completions")
    assert "/usr/bin/tpm2-unlocker" in paths and len(paths) >= 15
    listed = [path for path, _ in manpage.FILES]
    for path in paths:
        assert any(path == f or (f.endswith("/") and path.startswith(f)) for f in listed), path

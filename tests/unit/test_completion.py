"""bash and zsh completion generated from the option table (docgen/completion.py), run in the real
shells: the generated bash function is called as bash calls it (COMP_WORDS, COMP_CWORD)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unlocker import options
from unlocker.tpm.policy import BANKS

REPO = Path(__file__).resolve().parents[2]
# The host's kernel has no device-mapper and our LUKS images are files: no block device here is
# LUKS. This lsblk prints what the real one prints for a machine with two (its -nrpo PATH,FSTYPE form).
LSBLK = """#!/bin/sh
[ "$*" = "-nrpo PATH,FSTYPE" ] || exit 1
printf '%s\\n' '/dev/vda ' '/dev/vda1 vfat' '/dev/vda2 crypto_LUKS' '/dev/mapper/root ext4' '/dev/nvme0n1p3 crypto_LUKS'
"""


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("completion")
    made = {}
    for shell, name in (("bash", "tpm2-unlocker"), ("zsh", "_tpm2-unlocker")):
        made[shell] = out / name
        subprocess.run([sys.executable, "-m", "docgen.completion", shell, str(made[shell])], cwd=REPO, check=True)
    stub = out / "bin"
    stub.mkdir()
    (stub / "lsblk").write_text(LSBLK)
    (stub / "lsblk").chmod(0o755)
    made["stub"] = stub
    return made


def complete(scripts: dict[str, Path], *words: str, cwd: Path | None = None, stub: bool = True) -> list[str]:
    """The candidates bash offers for the command line `words` (the last one being typed)."""
    array = " ".join(f"'{w}'" for w in ("tpm2-unlocker", *words))
    program = (f'source {scripts["bash"]}\nCOMP_WORDS=({array}); COMP_CWORD={len(words)}; COMPREPLY=()\n'
               f'_shtab_tpm2_unlocker; printf "%s\\n" "${{COMPREPLY[@]}}"\n')
    path = f"{scripts['stub']}:/usr/bin:/bin" if stub else "/usr/bin:/bin:/usr/sbin:/sbin"
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True, text=True,
                          env={"PATH": path}, cwd=cwd, check=True)
    assert done.stderr == ""
    return [line for line in done.stdout.splitlines() if line]


def test_bash_completes_the_verbs_of_the_table(scripts: dict[str, Path]) -> None:
    assert complete(scripts, "") == [v.name for v in options.VERBS]
    assert complete(scripts, "re") == ["recovery-key", "reseal", "remove"]


def test_bash_completes_each_verbs_options_from_the_table(scripts: dict[str, Path]) -> None:
    for verb in options.VERBS:
        shown = set(complete(scripts, verb.name, "--"))
        table = {a.name for a in verb.args if not a.positional and not a.hidden}
        assert shown == table | {"--help"}, verb.name


def test_bash_completes_a_device_argument_to_the_luks_devices_only(scripts: dict[str, Path]) -> None:
    for verb in ("enroll", "reseal", "status", "remove", "adopt", "recovery-key", "unlock"):
        assert complete(scripts, verb, "") == ["/dev/vda2", "/dev/nvme0n1p3"], verb
    assert complete(scripts, "enroll", "--store", "nv", "/dev/n") == ["/dev/nvme0n1p3"]


def test_the_real_lsblk_takes_the_query_the_completion_makes(scripts: dict[str, Path]) -> None:
    # the stub above stands in for the output; the query itself must be one this lsblk answers
    if shutil.which("lsblk") is None:
        pytest.fail("lsblk is not installed (util-linux)")
    assert subprocess.run(["lsblk", "-nrpo", "PATH,FSTYPE"], capture_output=True).returncode == 0
    assert complete(scripts, "enroll", "", stub=False) == []  # no LUKS block device on this host


def test_bash_completes_pcrs_to_a_selection_per_bank(scripts: dict[str, Path]) -> None:
    # no TPM on this host (no /sys/class/tpm): every bank the parser takes
    assert not Path("/sys/class/tpm/tpm0").exists()
    assert complete(scripts, "enroll", "--pcrs", "") == [f"{bank}:0,2,4,7" for bank in BANKS]
    assert complete(scripts, "reseal", "/dev/vda2", "--pcrs", "sha2") == ["sha256:0,2,4,7"]
    for bank in complete(scripts, "adopt", "--pcrs", ""):
        options.pcr_selection(bank)  # each candidate is a selection the option takes


def test_bash_completes_files_stores_and_lock_pcrs(scripts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "passphrase").write_text("x")
    (tmp_path / "keys").mkdir()
    assert complete(scripts, "enroll", "--unlock-key-file", "pa", cwd=tmp_path) == ["passphrase"]
    assert set(complete(scripts, "adopt", "--blob", "", cwd=tmp_path)) == {"passphrase", "keys"}
    assert complete(scripts, "unpack", "", cwd=tmp_path) == ["keys"]
    assert complete(scripts, "enroll", "--store", "") == ["token", "nv", "nv=", "file="]
    assert complete(scripts, "enroll", "--lock-pcr", "") == ["15", "none"]


def zsh(scripts: dict[str, Path], body: str) -> list[str]:
    """Run `body` in zsh after compinit found the completion in fpath; the script's own functions are
    then defined by running it once outside a completion (its _arguments call stubbed), and compadd
    prints what it is given."""
    if shutil.which("zsh") is None:
        pytest.fail("zsh is not installed (run ./run setup)")
    folder = scripts["zsh"].parent
    program = (f"fpath=({folder} $fpath)\nautoload -Uz compinit && compinit -u -d {folder}/zcompdump\n"
               "print -r -- compdef=${_comps[tpm2-unlocker]}\n"
               f"_arguments() {{ : }}\nsource {scripts['zsh']}\n"
               "compadd() { if [[ $1 == -a ]]; then print -l -- ${(P)2}; else [[ $1 == -- ]] && shift; "
               "print -l -- $@; fi }\n" + body)
    done = subprocess.run(["zsh", "-f", "-c", program], capture_output=True, text=True, check=True,
                          env={"PATH": f"{scripts['stub']}:/usr/bin:/bin", "HOME": str(scripts["zsh"].parent)})
    assert done.stderr == ""
    return done.stdout.split()


def test_zsh_completion_loads_and_offers_luks_devices_and_pcr_selections(scripts: dict[str, Path]) -> None:
    # compinit registers the file by its #compdef line, as it does from the distributions' folders
    assert zsh(scripts, "whence -w _shtab_tpm2_unlocker") == ["compdef=_tpm2-unlocker", "_shtab_tpm2_unlocker:", "function"]
    assert zsh(scripts, "_tpm2_unlocker_luks_devices")[1:] == ["/dev/vda2", "/dev/nvme0n1p3"]
    assert zsh(scripts, "_tpm2_unlocker_pcr_selections")[1:] == [f"{bank}:0,2,4,7" for bank in BANKS]
    text = scripts["zsh"].read_text()
    for verb in options.VERBS:
        assert f"{verb.name}:" in text or f"'{verb.name}'" in text, verb.name

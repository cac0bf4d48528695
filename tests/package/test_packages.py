"""The packages: the Debian package from `./run deb` (lintian, its files, dpkg -i, man and Tab
completion once installed, the word at removal) and the Arch PKGBUILD's package() against it.

The .deb is $TPM2_UNLOCKER_DEB (CI builds it once, before the suite), else built here by ./run deb.
With TPM2_UNLOCKER_FROM=installed (CI) the package must already be installed and stays so for the
VM tests; otherwise it is installed for these tests only, and purged after them.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from unlocker import __version__
from vm.source import FROM_ENV

REPO = Path(__file__).resolve().parents[2]
DEB_ENV = "TPM2_UNLOCKER_DEB"
# What each distribution adds beside what `make install` puts: its own documents, and zsh's folder.
DEBIAN_ONLY = {"/usr/share/doc/tpm2-unlocker/changelog.gz", "/usr/share/doc/tpm2-unlocker/copyright",
               "/usr/share/lintian/overrides/tpm2-unlocker",
               # the hooks of Debian's kernel install and initramfs rebuild (make install-debian)
               "/etc/kernel/postinst.d/zz-tpm2-unlocker", "/etc/initramfs/post-update.d/tpm2-unlocker"}
ARCH_ONLY = {"/usr/share/licenses/tpm2-unlocker/LICENSE"}
ZSH = {"debian": "/usr/share/zsh/vendor-completions/_tpm2-unlocker", "arch": "/usr/share/zsh/site-functions/_tpm2-unlocker"}
# lintian's warnings that stay, each explained in CONTRIBUTING.md (Packages)
LINTIAN_WARNINGS = {"hardening-no-pie [usr/bin/tpm2-unlocker]",
                    "script-not-executable [usr/lib/initcpio/hooks/tpm2-unlocker]",
                    "script-not-executable [usr/lib/initcpio/install/tpm2-unlocker]"}


def run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="session")
def deb() -> Path:
    given = os.environ.get(DEB_ENV)
    if given:
        return Path(given)
    built = run("bash", REPO / "run", "deb", cwd=REPO)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    return REPO / built.stdout.strip().splitlines()[-1]


def deb_files(deb: Path, root: Path) -> dict[str, Path]:
    """The package's regular files by installed path, unpacked under `root` (dpkg-deb -x)."""
    listing = run("dpkg-deb", "-c", deb, check=True).stdout
    run("dpkg-deb", "-x", deb, root, check=True)
    paths = [line.split()[-1].removeprefix(".") for line in listing.splitlines() if line.startswith("-")]
    return {path: root / path.lstrip("/") for path in paths}


def normal(path: str) -> str:
    """The path as `make install` names it: the packagers gzip the man page afterwards."""
    return path.removesuffix(".gz") if "/share/man/" in path else path


def content(file: Path) -> bytes:
    data = file.read_bytes()
    return gzip.decompress(data) if file.suffix == ".gz" and "/share/man/" in str(file) else data


def test_lintian_accepts_the_deb_without_errors(deb: Path) -> None:
    said = run("lintian", "--fail-on", "none", "--show-overrides", deb).stdout.splitlines()
    # the check sees an error where there is one: the one our overrides file quiets, shown as such
    assert "O: tpm2-unlocker: wrong-path-for-interpreter /usr/bin/ash != /bin/ash " \
           "[usr/lib/initcpio/hooks/tpm2-unlocker]" in said
    assert [line for line in said if line.startswith("E:")] == []
    assert {line.removeprefix("W: tpm2-unlocker: ") for line in said if line.startswith("W:")} == LINTIAN_WARNINGS


def installed_paths() -> list[str]:
    """Where `make install` puts each file, from its dry run (Debian's zsh folder)."""
    dry = run("make", "-s", "-n", "-C", REPO, "install", "DESTDIR=/DESTDIR", "PREFIX=/usr",
              f"ZSHCOMPDIR={Path(ZSH['debian']).parent}", check=True).stdout
    return [line.split()[-1].removeprefix("/DESTDIR") for line in dry.splitlines() if line.startswith("install -D")]


def test_the_deb_holds_what_make_install_puts_and_debians_documents(deb: Path, tmp_path: Path) -> None:
    files = deb_files(deb, tmp_path / "root")
    assert {normal(p) for p in files} == set(installed_paths()) | DEBIAN_ONLY
    assert os.access(files["/usr/bin/tpm2-unlocker"], os.X_OK)
    # the binary is the frozen one, whole (strip would have cut PyInstaller's archive off)
    shown = run(files["/usr/bin/tpm2-unlocker"], "--version")
    assert shown.stdout.strip() == f"tpm2-unlocker {__version__}"


def test_the_versions_of_the_packages_are_the_programs() -> None:
    debian = run("dpkg-parsechangelog", "-l", REPO / "debian" / "changelog", "-S", "Version", check=True).stdout.strip()
    pkgver = re.search(r"^pkgver=(.+)$", (REPO / "packaging" / "arch" / "PKGBUILD").read_text(), re.M)
    assert debian == __version__
    assert pkgver is not None and pkgver.group(1) == __version__


def test_the_pkgbuild_package_lays_out_the_debs_files(deb: Path, tmp_path: Path) -> None:
    """package() as makepkg runs it (sourced by bash with srcdir, pkgdir and startdir set, -e),
    into a pkgdir: the same files as the Debian package, byte for byte, the same modes."""
    pkgdir, srcdir = tmp_path / "pkg", tmp_path / "src"
    srcdir.mkdir()
    script = "set -e\nsource PKGBUILD\npackage\n"
    done = run("bash", "-c", script, cwd=REPO / "packaging" / "arch",
               env={"PATH": os.environ["PATH"], "startdir": str(REPO / "packaging" / "arch"), "srcdir": str(srcdir),
                    "pkgdir": str(pkgdir), "pkgname": "tpm2-unlocker"})
    assert done.returncode == 0, done.stdout + done.stderr
    arch = {"/" + str(f.relative_to(pkgdir)): f for f in pkgdir.rglob("*") if f.is_file()}
    debian = deb_files(deb, tmp_path / "deb")
    debian = {normal(p): f for p, f in debian.items()}
    assert set(arch) - ARCH_ONLY - {ZSH["arch"]} == set(debian) - DEBIAN_ONLY - {ZSH["debian"]}
    assert (pkgdir / "usr/share/licenses/tpm2-unlocker/LICENSE").read_text() == (REPO / "LICENSE").read_text()
    debian[ZSH["arch"]] = debian[ZSH["debian"]]
    for path, file in arch.items():
        if path in ARCH_ONLY:
            continue
        assert hashlib.sha256(content(file)).digest() == hashlib.sha256(content(debian[path])).digest(), path
        assert file.stat().st_mode & 0o7777 == debian[path].stat().st_mode & 0o7777, path


def test_the_arch_install_file_says_where_the_hook_goes() -> None:
    script = REPO / "packaging" / "arch" / "tpm2-unlocker.install"
    said = run("bash", "-c", f"source {script}; post_install", check=True).stdout
    assert "HOOKS" in said and "'encrypt'" in said and "'sd-encrypt'" in said and "mkinitcpio -P" in said
    removal = run("bash", "-c", f"source {script}; pre_remove", check=True).stdout
    assert "still open from the TPM" in removal
    assert "while HOOKS names it, mkinitcpio fails with \"Hook 'tpm2-unlocker' cannot be found\"" in " ".join(removal.split())


# What would rebuild an initramfs from a maintainer script: stand-ins that only write down being run
REBUILDERS = ("dracut", "update-initramfs", "mkinitcpio", "dpkg-trigger")


@pytest.fixture
def dpkg_root(tmp_path: Path) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """The real dpkg over a database and install tree of its own (--root, the maintainer scripts run
    chrootless with the host's sh): the package's real scripts run at install, upgrade and purge,
    whether or not the host has the package (CI keeps it installed), and the host's package state is
    never touched. The rebuilders are stand-ins on the scripts' PATH that write down being run; the
    host's /boot is the same afterwards."""
    root, bindir, log = tmp_path / "root", tmp_path / "bin", tmp_path / "rebuilders.log"
    for folder in ("info", "updates", "triggers"):
        (root / "var/lib/dpkg" / folder).mkdir(parents=True)
    (root / "var/lib/dpkg/status").touch()
    bindir.mkdir()
    for name in REBUILDERS:
        (bindir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n')
        (bindir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    # the stand-ins are what a script would find, and they write down being run
    assert run("sh", "-c", "dracut --regenerate-all --force", env=env).returncode == 0
    assert log.read_text() == "dracut --regenerate-all --force\n"
    log.unlink()
    boot = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path("/boot").iterdir())

    def dpkg(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return run("dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends", *args, env=env)

    yield dpkg
    assert not log.exists(), log.read_text()
    assert sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path("/boot").iterdir()) == boot


def repacked(deb: Path, version: str, work: Path) -> Path:
    """The same package under another version (an older one, to upgrade from)."""
    tree = work / f"tree-{version}"
    run("dpkg-deb", "-R", deb, tree, check=True)
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {version}", control.read_text(), flags=re.M))
    out = work / f"tpm2-unlocker_{version}_amd64.deb"
    run("dpkg-deb", "-Zgzip", "-z1", "-b", tree, out, check=True)
    return out


def test_upgrading_the_deb_says_in_one_line_to_rebuild_the_images_and_rebuilds_none(
        deb: Path, tmp_path: Path, dpkg_root: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """The images keep the version they were built with: an upgrade says so, in one line with the
    command, and leaves the rebuild to the admin (no maintainer script runs a rebuilder)."""
    older = repacked(deb, "0.0.1", tmp_path)
    first = dpkg_root("-i", older)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "rebuilt" not in first.stderr  # a first install has no image of ours to rebuild
    upgrade = dpkg_root("-i", deb)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert f"Unpacking tpm2-unlocker ({__version__}) over (0.0.1)" in upgrade.stdout
    said = [line for line in upgrade.stderr.splitlines() if line.startswith("tpm2-unlocker:")]
    assert said == ["tpm2-unlocker: upgraded from 0.0.1: the initramfs images still boot 0.0.1 until they are "
                    "rebuilt: run 'dracut --regenerate-all --force' (mkinitcpio: 'mkinitcpio -P') for this version "
                    "to boot"], upgrade.stderr
    assert "still open from the TPM" not in upgrade.stderr  # the old prerm, at upgrade, says nothing


def test_purging_the_deb_says_that_a_dracut_conf_still_naming_it_fails_every_rebuild(
        deb: Path, dpkg_root: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    installed = dpkg_root("-i", deb)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    purged = dpkg_root("--purge", "tpm2-unlocker")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    words = " ".join(purged.stderr.split())
    assert "still open from the TPM with the initramfs images built so far" in words
    assert "Before the next image rebuild (a kernel update), take tpm2-unlocker out of add_dracutmodules in " \
           "/etc/dracut.conf.d (mkinitcpio: out of HOOKS in /etc/mkinitcpio.conf, with 'encrypt' back)" in words
    # what dracut 059 does while the conf names a module that is gone (the next test shows it)
    assert "every dracut run fails (\"dracut module 'tpm2-unlocker' cannot be found or installed\", exit 1) and " \
           "writes no image, so kernel updates fail to configure" in words
    assert "Images rebuilt without it ask for the passphrase at boot" in words
    assert "tpm2-unlocker remove DEVICE" in words


def test_dracut_fails_and_writes_no_image_while_its_conf_names_the_removed_module(tmp_path: Path) -> None:
    """What the prerm says of dracut, on the real dracut, as it is once the package is gone: its
    module folders without ours (linked from the host's), a conf naming ours, an image asked for."""
    base, confdir, image = tmp_path / "dracut", tmp_path / "conf.d", tmp_path / "initrd.img"
    (base / "modules.d").mkdir(parents=True)
    for entry in Path("/usr/lib/dracut").iterdir():
        if entry.name != "modules.d":
            (base / entry.name).symlink_to(entry)
    for module in Path("/usr/lib/dracut/modules.d").iterdir():
        if module.name != "90tpm2-unlocker":
            (base / "modules.d" / module.name).symlink_to(module)
    confdir.mkdir()
    (confdir / "tpm2-unlocker.conf").write_text('add_dracutmodules+=" tpm2-unlocker "\n')
    done = run("dracut", "--conf", "/dev/null", "--confdir", confdir, "--no-kernel", "--force", image,
               env={**os.environ, "dracutbasedir": str(base)}, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "dracut module 'tpm2-unlocker' cannot be found or installed" in done.stderr
    assert not image.exists()
    # with the module's folder there (as the package installs it) the same conf passes that check
    # (--print-cmdline runs dracut's module checks, then stops before building an image)
    (base / "modules.d" / "90tpm2-unlocker").symlink_to(REPO / "dracut" / "90tpm2-unlocker")
    found = run("dracut", "--conf", "/dev/null", "--confdir", confdir, "--no-kernel", "--print-cmdline",
                env={**os.environ, "dracutbasedir": str(base), "TPM2_UNLOCKER_BINARY": "/bin/true"}, timeout=300)
    assert found.returncode == 0, found.stderr
    assert "cannot be found" not in found.stderr


@pytest.fixture(scope="session")
def installed(deb: Path) -> Iterator[Path]:
    """The package installed with dpkg -i: already (TPM2_UNLOCKER_FROM=installed), else for these
    tests only (other developers' tests on this machine never see it for long)."""
    version = run("dpkg-deb", "-f", deb, "Version", check=True).stdout.strip()
    status = run("dpkg-query", "-W", "-f", "${Status} ${Version}", "tpm2-unlocker").stdout
    if os.environ.get(FROM_ENV) == "installed":
        assert status == f"install ok installed {version}", f"{FROM_ENV}=installed, but dpkg says: {status!r}"
        yield deb
        return
    assert "installed" not in status.split()[:3], "tpm2-unlocker is installed on this host: purge it first"
    done = run("dpkg", "-i", deb)
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        yield deb
    finally:
        removed = run("dpkg", "--purge", "tpm2-unlocker")
        assert removed.returncode == 0, removed.stderr
        assert "still open from the TPM" in removed.stderr


def test_the_deb_installs_with_dpkg_and_the_program_runs(installed: Path) -> None:
    listed = run("dpkg", "-L", "tpm2-unlocker", check=True).stdout.splitlines()
    assert "/usr/bin/tpm2-unlocker" in listed
    assert "/usr/lib/dracut/modules.d/90tpm2-unlocker/module-setup.sh" in listed
    assert run("tpm2-unlocker", "--version", env={"PATH": "/usr/bin:/bin"}).stdout.strip() == f"tpm2-unlocker {__version__}"


def test_man_tpm2_unlocker_reads_without_warnings_once_installed(installed: Path) -> None:
    shown = run("man", "--warnings", "-E", "UTF-8", "8", "tpm2-unlocker", env={**os.environ, "MANPAGER": "cat",
                                                                              "MANWIDTH": "100"})
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr == ""
    assert "KERNEL PARAMETERS" in shown.stdout and "EXIT STATUS" in shown.stdout
    assert run("man", "-w", "tpm2-unlocker").stdout.strip() == "/usr/share/man/man8/tpm2-unlocker.8.gz"


def test_tab_completion_works_once_installed(installed: Path) -> None:
    # bash-completion loads ours on first Tab, by the command's name, from where the package put it
    program = ("source /usr/share/bash-completion/bash_completion\n_completion_loader tpm2-unlocker\n"
               "complete -p tpm2-unlocker\nCOMP_WORDS=(tpm2-unlocker res); COMP_CWORD=1; COMPREPLY=()\n"
               "_shtab_tpm2_unlocker; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    done = run("bash", "--norc", "--noprofile", "-c", program)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["complete -o bashdefault -F _shtab_tpm2_unlocker tpm2-unlocker", "reseal"]
    # zsh's compinit finds ours in Debian's vendor folder, in its default fpath
    folder = Path(installed).parent
    zsh = run("zsh", "-f", "-c", f"autoload -Uz compinit && compinit -u -d {folder}/.zcompdump-test && "
                                 "print -r -- ${_comps[tpm2-unlocker]}")
    (folder / ".zcompdump-test").unlink(missing_ok=True)
    assert zsh.stdout.strip() == "_tpm2-unlocker", zsh.stderr

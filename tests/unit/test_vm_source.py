"""The harness's explicit choice of the copy it boots (vm/source.py): the checkout's by default,
the installed one when asked, and a host copy never taken by accident."""

from __future__ import annotations

from pathlib import Path

import pytest

from vm import initramfs, source
from vm.source import CHECKOUT, FROM_ENV, Source, chosen
from vm.tools import HarnessError


def test_the_checkout_is_used_unless_installed_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FROM_ENV, raising=False)
    assert chosen() is CHECKOUT
    assert CHECKOUT.binary is None  # frozen from the tree
    assert "from the checkout" in CHECKOUT.describe()
    monkeypatch.setenv(FROM_ENV, "checkout")
    assert chosen() is CHECKOUT


def test_a_value_not_checkout_or_installed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FROM_ENV, "host")
    with pytest.raises(HarnessError, match="'checkout' or 'installed', not 'host'"):
        chosen()


def test_installed_is_refused_with_the_missing_files_when_not_installed(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    absent = Source("installed", tmp_path / "modules.d" / "90tpm2-unlocker", tmp_path / "initcpio", tmp_path / "bin",
                    tmp_path / "lib" / "reseal-predict", tmp_path / "postinst.d" / "zz-tpm2-unlocker",
                    tmp_path / "post-update.d" / "tpm2-unlocker")
    monkeypatch.setattr(source, "INSTALLED", absent)
    monkeypatch.setenv(FROM_ENV, "installed")
    with pytest.raises(HarnessError, match=r"is not installed \(./run deb, then dpkg -i"):
        chosen()
    # the same files present: taken
    (tmp_path / "bin").write_text("")
    for f in absent.files()[1:]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("")
    assert chosen() is absent


def fake_host_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host modules.d with dracut's crypt module and an installed copy of ours."""
    host = tmp_path / "host" / "modules.d"
    for name in ("90crypt", "90tpm2-unlocker"):
        (host / name).mkdir(parents=True)
        (host / name / "module-setup.sh").write_text(f"# host {name}\n")
    monkeypatch.setattr(initramfs, "DRACUT_MODULES", host)
    return host


def test_dracut_images_take_the_checkouts_module_over_an_installed_copy(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    host = fake_host_modules(tmp_path, monkeypatch)
    base = initramfs._dracut_base_dir(tmp_path / "work", CHECKOUT.dracut_module)
    ours = base / "modules.d" / "90tpm2-unlocker"
    assert not ours.is_symlink()
    assert (ours / "module-setup.sh").read_text() == (CHECKOUT.dracut_module / "module-setup.sh").read_text()
    assert (base / "modules.d" / "90crypt").resolve() == (host / "90crypt").resolve()


def test_dracut_images_take_the_installed_module_when_it_is_the_one_chosen(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    host = fake_host_modules(tmp_path, monkeypatch)
    base = initramfs._dracut_base_dir(tmp_path / "work", host / "90tpm2-unlocker")
    ours = base / "modules.d" / "90tpm2-unlocker"
    assert ours.is_symlink() and ours.resolve() == (host / "90tpm2-unlocker").resolve()
    assert (ours / "module-setup.sh").read_text() == "# host 90tpm2-unlocker\n"

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vm.guest import PASSPHRASE, Guest
from vm.images import Artifacts, build_artifacts
from vm.rootfs import build_root_image

KINDS = ("dracut", "mkinitcpio", "dracut-shell", "mkinitcpio-bare")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    for tool in ("qemu-system-x86_64", "swtpm", "dracut"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (run ./run setup)")
    return build_artifacts(tmp_path_factory.mktemp("vm-artifacts"), KINDS)


def _enrolled(artifacts: Artifacts, kind: str, store: str, work: Path) -> Guest:
    root = build_root_image(work, artifacts.binary, PASSPHRASE)
    guest = Guest(artifacts.kernel, artifacts.kind(kind), root, work / "tpm", work)
    guest.enroll(store=store)
    return guest


class _Golden(dict):
    """Per image kind, a guest enrolled (token store) inside its own first boot, made on first use."""

    def __init__(self, artifacts: Artifacts, factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.artifacts, self.factory = artifacts, factory

    def __missing__(self, kind: str) -> Guest:
        self[kind] = _enrolled(self.artifacts, kind, "token", self.factory.mktemp(f"golden-{kind}"))
        return self[kind]


@pytest.fixture(scope="session")
def enrolled(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Guest]:
    return _Golden(artifacts, tmp_path_factory)


@pytest.fixture
def guest_of(enrolled: dict[str, Guest], tmp_path: Path):  # type: ignore[no-untyped-def]
    """A scenario's own copy of the golden guest of a kind."""
    return lambda kind: enrolled[kind].clone(tmp_path)

"""The frozen binary the VM images carry, checked on the host."""

from __future__ import annotations

from PyInstaller.archive.readers import CArchiveReader

from vm.images import Artifacts


def test_python_in_the_binary_does_not_wait_for_the_kernels_random_pool(artifacts: Artifacts) -> None:
    """Python reads a hash seed from the kernel before it runs anything, and early in boot on a
    machine without a CPU RNG that read waits ~1 s for the pool; the binary runs with a fixed seed
    (the secrets still come from the seeded pool, which the warm-up waits for beside the start)."""
    assert "hash_seed=0" in CArchiveReader(str(artifacts.binary)).options

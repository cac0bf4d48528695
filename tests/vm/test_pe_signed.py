"""Authenticode digest of a signed EFI image: Debian's kernel as it ships (signed), the guest kernel
the VM tests download; the digest is the one its signature signs, as pesign computes it."""

from __future__ import annotations

import subprocess

from unlocker.measure.pe import authenticode_digests
from vm.images import Artifacts


def test_a_signed_images_signature_is_not_hashed(artifacts: Artifacts) -> None:
    kernel = artifacts.kernel.vmlinuz
    out = subprocess.run(["pesign", "--hash", "--in", str(kernel)], capture_output=True, check=True, text=True).stdout
    assert authenticode_digests(str(kernel), ["sha256"])["sha256"] == bytes.fromhex(out.split("hash:")[1].strip())
    listed = subprocess.run(["pesign", "--show-signature", "--in", str(kernel)], capture_output=True, text=True)
    assert "Debian Secure Boot Signer" in listed.stdout + listed.stderr, "Debian's kernel image is signed"

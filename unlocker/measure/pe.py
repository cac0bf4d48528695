"""The Authenticode digest of a PE/COFF image: what UEFI firmware extends into PCR 4 when it starts
an EFI application (EV_EFI_BOOT_SERVICES_APPLICATION) — a boot loader, a kernel's EFI stub, a UKI.

The file is parsed by pefile; what is hashed follows the Authenticode specification ("Calculating
the PE Image Hash", as EDK2's DxeTpm2MeasureBootLib does it): the headers without the checksum and
the certificate table's directory entry, then the sections in file order, then any data after them
that is not the certificate table. Off the boot path.
"""

from __future__ import annotations

import hashlib
import os

from unlocker.errors import UsageError

# Kernels are ~10 MB, UKIs with an initrd inside ~100 MB; past this it is no EFI image we boot.
MAX_IMAGE_SIZE = 1 << 30
_SECURITY_DIRECTORY = 4  # IMAGE_DIRECTORY_ENTRY_SECURITY: the certificate table


class PeError(UsageError):
    """A file given as an EFI image is none (or cannot be read)."""


def _read(path: str) -> bytes:
    try:
        if os.path.getsize(path) > MAX_IMAGE_SIZE:
            raise PeError(f"{path} is larger than any EFI image ({MAX_IMAGE_SIZE >> 20} MiB)")
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise PeError(f"cannot read {path}: {exc.strerror or exc}") from None


def authenticode_digests(path: str, banks: list[str]) -> dict[str, bytes]:
    """The Authenticode digest of the PE image at `path`, per hash algorithm in `banks` (hashlib names)."""
    data = _read(path)
    return authenticode_digests_of(data, banks, path)


def authenticode_digests_of(data: bytes, banks: list[str], name: str = "the image") -> dict[str, bytes]:
    import pefile

    try:
        pe = pefile.PE(data=data, fast_load=True)
    except pefile.PEFormatError as exc:
        raise PeError(f"{name} is not a PE/COFF image (an EFI binary): {exc.value}") from None
    try:
        hashers = {bank: hashlib.new(bank) for bank in banks}
        optional = pe.OPTIONAL_HEADER
        checksum = optional.get_field_absolute_offset("CheckSum")
        headers_end = optional.SizeOfHeaders
        ranges = [(0, checksum)]
        directories = optional.DATA_DIRECTORY
        cert_size = 0
        if len(directories) > _SECURITY_DIRECTORY:
            entry = directories[_SECURITY_DIRECTORY]
            entry_offset = entry.get_file_offset()
            ranges += [(checksum + 4, entry_offset), (entry_offset + 8, headers_end)]
            cert_size = entry.Size
        else:
            ranges.append((checksum + 4, headers_end))
        hashed = headers_end
        for section in sorted(pe.sections, key=lambda s: s.PointerToRawData):
            if section.SizeOfRawData == 0:
                continue
            start = section.PointerToRawData
            ranges.append((start, start + section.SizeOfRawData))
            hashed += section.SizeOfRawData
        # whatever follows the sections, up to the certificate table (which is not hashed)
        if len(data) > hashed + cert_size:
            ranges.append((hashed, len(data) - cert_size))
        for start, end in ranges:
            if not 0 <= start <= end <= len(data):
                raise PeError(f"{name} is not a well-formed PE image (a header or section lies outside the file)")
            chunk = memoryview(data)[start:end]
            for h in hashers.values():
                h.update(chunk)
    finally:
        pe.close()
    return {bank: h.digest() for bank, h in hashers.items()}

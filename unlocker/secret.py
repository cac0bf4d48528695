"""Key material in a mutable buffer that is overwritten when done (as far as Python allows)."""

from __future__ import annotations

import os

from unlocker import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self


class Secret:
    """Bytes of a key or passphrase in a bytearray. Use as a context manager; wiped on exit."""

    __slots__ = ("data",)

    def __init__(self, data: bytearray) -> None:
        self.data = data

    @classmethod
    def random(cls, size: int = 32) -> Secret:
        data = bytearray(size)
        data[:] = os.urandom(size)
        return cls(data)

    @classmethod
    def read_file(cls, path: str) -> Secret:
        """The whole file (or stdin for '-'), byte for byte, as cryptsetup --key-file reads it."""
        fd = 0 if path == "-" else os.open(path, os.O_RDONLY)
        data = bytearray()
        try:
            chunk = bytearray(4096)
            while True:
                n = os.readv(fd, [chunk])
                if n == 0:
                    break
                data += chunk[:n]
                if len(data) > 8 * 1024 * 1024:
                    raise ValueError("key file larger than cryptsetup's 8 MiB limit")
        finally:
            chunk[:] = bytes(len(chunk))
            if fd != 0:
                os.close(fd)
        return cls(data)

    def __len__(self) -> int:
        return len(self.data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and self.data == other.data

    def __hash__(self) -> int:  # never used as a dict key: keep secrets out of hashes
        raise TypeError("Secret is not hashable")

    def __repr__(self) -> str:
        return f"<Secret {len(self.data)} bytes>"

    def wipe(self) -> None:
        self.data[:] = bytes(len(self.data))
        self.data.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

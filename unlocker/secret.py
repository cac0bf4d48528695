"""Key material in a mutable buffer that is overwritten when done (as far as Python allows)."""

from __future__ import annotations

import os

from unlocker import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self


MAX_KEY_FILE = 8 * 1024 * 1024  # cryptsetup's limit for --key-file


class Secret:
    """Bytes of a key or passphrase in a bytearray. Use as a context manager; wiped on exit."""

    __slots__ = ("data",)

    def __init__(self, data: bytearray) -> None:
        self.data = data

    @classmethod
    def random(cls, size: int = 32) -> Secret:
        """`size` bytes from the kernel's RNG, read straight into the Secret's own buffer (os.urandom
        would hand them over in an immutable bytes, never wiped)."""
        data = bytearray(size)
        fd = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)
        try:
            view, got = memoryview(data), 0
            while got < size:
                got += os.readv(fd, [view[got:]])
        finally:
            os.close(fd)
        return cls(data)

    @classmethod
    def read_file(cls, path: str) -> Secret:
        """The whole file (or stdin for '-'), byte for byte, as cryptsetup --key-file reads it."""
        fd = 0 if path == "-" else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        buffer = SecretBuffer(4096)
        try:
            while buffer.read_from(fd, 65536):
                if len(buffer) > MAX_KEY_FILE:
                    raise ValueError("key file larger than cryptsetup's 8 MiB limit")
            return buffer.take()
        finally:
            buffer.wipe()
            if fd != 0:
                os.close(fd)

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


class SecretBuffer:
    """A secret of a length not known ahead (a typed passphrase, a key file, an agent's answer), read
    in place. When it must grow, the old buffer is wiped after the copy, and take() wipes it too:
    no copy is left behind unwiped (a bytearray grown by += leaves its old memory to the allocator)."""

    __slots__ = ("_data", "_size")

    def __init__(self, capacity: int) -> None:
        self._data = bytearray(max(capacity, 1))
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _room(self, more: int) -> None:
        if self._size + more > len(self._data):
            grown = bytearray(max(2 * len(self._data), self._size + more))
            grown[:self._size] = memoryview(self._data)[:self._size]
            self._data[:] = bytes(len(self._data))
            self._data = grown

    def read_from(self, fd: int, most: int) -> int:
        """Read up to `most` bytes from `fd` straight into the buffer; how many came (0: the end)."""
        self._room(most)
        got = os.readv(fd, [memoryview(self._data)[self._size:self._size + most]])
        self._size += got
        return got

    def last(self) -> int | None:
        return self._data[self._size - 1] if self._size else None

    def drop_last(self) -> None:
        """Forget the last byte (a line's end), zeroing it."""
        if self._size:
            self._size -= 1
            self._data[self._size] = 0

    def take(self) -> Secret:
        """The bytes read, as a Secret of their exact size; this buffer is wiped."""
        data = bytearray(self._size)
        data[:] = memoryview(self._data)[:self._size]
        self.wipe()
        return Secret(data)

    def wipe(self) -> None:
        self._data[:] = bytes(len(self._data))
        self._size = 0

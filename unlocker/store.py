"""The three places a sealed key can live, behind one interface: token, NV index, blob files.

`put` seals a key and returns the token fields that find it again; `take` unseals it; `destroy`
removes what `put` made. Blob files are marshalled exactly as `tpm2_create --public/--private`
writes them, so tpm2-tools reads ours and we read theirs.
"""

from __future__ import annotations

import os

from unlocker.errors import CorruptError, UsageError
from unlocker.lean.record import record
from unlocker.secret import Secret
from unlocker.token import Token, parse_nv_index
from unlocker.tpm.client import Tpm
from unlocker.tpm.nv import DEFAULT_NV_INDEX
from unlocker.tpm.seal import SealedObject

PUB_NAME, PRIV_NAME = "key.pub", "key.priv"
PENDING = ".new"


@record(frozen=True)
class StoreSpec:
    """What `--store` asked for: token, nv[=INDEX] or file=DIR."""

    kind: str
    nv_index: int = DEFAULT_NV_INDEX
    blob_dir: str = ""

    @classmethod
    def parse(cls, text: str) -> StoreSpec:
        kind, sep, arg = text.partition("=")
        if kind == "token" and not sep:
            return cls("token")
        if kind == "nv":
            return cls("nv", nv_index=parse_nv_index(arg)) if sep else cls("nv")
        if kind == "file" and sep and arg:
            return cls("file", blob_dir=os.path.abspath(arg))
        raise UsageError(f"unknown store '{text}' (use token, nv, nv=INDEX or file=DIR)")

    @classmethod
    def of_token(cls, token: Token) -> StoreSpec:
        return cls(token.store, nv_index=token.nv_index or DEFAULT_NV_INDEX, blob_dir=token.blob_dir)


@record
class Placement:
    """The token fields that say where the sealed key went."""

    store: str
    public: bytes = b""
    private: bytes = b""
    nv_index: int = 0
    blob_dir: str = ""


def put(tpm: Tpm, spec: StoreSpec, key: Secret, policy: bytes, *, next_free_nv: bool = False) -> Placement:
    """Seal `key` under `policy` in the store `spec` names.

    With `next_free_nv`, an NV store takes the first free index after the one named (re-seal writes
    its new index beside the old one, which is removed only afterwards).
    """
    if spec.kind == "nv":
        index = tpm.free_nv_index(spec.nv_index + 1) if next_free_nv else spec.nv_index
        tpm.nv_define_and_write(index, key, policy)
        return Placement("nv", nv_index=index)
    sealed = tpm.seal(key, policy)
    if spec.kind == "file":
        write_blob_files(spec.blob_dir, sealed)
        return Placement("file", blob_dir=spec.blob_dir)
    return Placement("token", public=sealed.public, private=sealed.private)


def take(tpm: Tpm, token: Token) -> Secret:
    """Unseal the key a token points at, over a session salted with the SRK the token pinned.
    Raises PolicyError, CorruptError, LockoutError, NoTpmError."""
    pinned = token.srk_name
    if token.store == "nv":
        return tpm.nv_read(token.nv_index, token.selection, pinned)
    if token.store == "file":
        try:
            return tpm.unseal(read_blob_files(token.blob_dir), token.selection, pinned)
        except CorruptError:
            # A re-seal interrupted between its two renames leaves the new public part pending.
            pending = os.path.join(token.blob_dir, PUB_NAME + PENDING)
            if not os.path.exists(pending):
                raise
            with open(pending, "rb") as f:
                public = f.read()
            return tpm.unseal(SealedObject(public, read_blob_files(token.blob_dir).private), token.selection, pinned)
    return tpm.unseal(SealedObject(token.public, token.private), token.selection, pinned)


def destroy(tpm: Tpm | None, token: Token) -> None:
    """Remove the sealed key a token points at (an NV index, or the blob files)."""
    if token.store == "nv" and tpm is not None:
        tpm.nv_undefine(token.nv_index)
    elif token.store == "file":
        for name in (PUB_NAME, PRIV_NAME, PUB_NAME + PENDING, PRIV_NAME + PENDING):
            try:
                os.unlink(os.path.join(token.blob_dir, name))
            except FileNotFoundError:
                pass


def read_blob_files(blob_dir: str) -> SealedObject:
    return read_blob_pair(os.path.join(blob_dir, PUB_NAME), os.path.join(blob_dir, PRIV_NAME))


def read_blob_pair(pub_path: str, priv_path: str) -> SealedObject:
    parts = []
    for path in (pub_path, priv_path):
        try:
            with open(path, "rb") as f:
                parts.append(f.read(8192))
        except FileNotFoundError:
            raise CorruptError(f"sealed blob file {path} is missing") from None
        except OSError as exc:
            raise CorruptError(f"sealed blob file {path} cannot be read ({exc.strerror})") from None
    return SealedObject(parts[0], parts[1])


def write_blob_files(blob_dir: str, sealed: SealedObject) -> None:
    """Write key.pub/key.priv so that a crash leaves the old pair or a recoverable new one.

    Both go to *.new first and are synced; then the private part is renamed into place and the
    public part last (take() retries with the pending public part if the pair does not load).
    """
    try:
        os.makedirs(blob_dir, mode=0o700, exist_ok=True)
        for name, data in ((PRIV_NAME, sealed.private), (PUB_NAME, sealed.public)):
            tmp = os.path.join(blob_dir, name + PENDING)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in (PRIV_NAME, PUB_NAME):
            os.rename(os.path.join(blob_dir, name + PENDING), os.path.join(blob_dir, name))
        dir_fd = os.open(blob_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise UsageError(f"cannot write the sealed blob to {blob_dir}: {exc.strerror}") from None

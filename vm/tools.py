"""Small helpers for the harness: the one run() for its children, and copying programs with their libraries."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

CACHE = Path(os.environ.get("TPM2_UNLOCKER_VM_CACHE", Path(__file__).resolve().parent / "cache"))


class HarnessError(RuntimeError):
    pass


def run(argv: Sequence[str | os.PathLike], *, input: bytes | None = None, cwd: Path | None = None,
        env: dict[str, str] | None = None, quiet: bool = True) -> subprocess.CompletedProcess:
    """Run a build step; raise HarnessError with its stderr when it fails."""
    done = subprocess.run([str(a) for a in argv], input=input, cwd=cwd, capture_output=quiet, check=False,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace")[-3000:] if quiet else ""
        raise HarnessError(f"{' '.join(str(a) for a in argv)} failed ({done.returncode}): {err}")
    return done


def shared_libraries(binary: Path) -> list[Path]:
    out = run(["ldd", binary]).stdout.decode()
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def install_program(binary: Path, root: Path, dest: str | None = None) -> None:
    """Copy `binary` into `root` (at `dest`, default its own path) with the libraries it links."""
    target = root / (dest or str(binary)).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, target)
    for lib in shared_libraries(binary):
        real = lib.resolve()
        for path in {lib, Path(str(lib).replace("/usr/lib/", "/lib/"))}:
            out = root / str(path).lstrip("/")
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(real, out)

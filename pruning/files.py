"""Atomic writes: a file or directory appears at its path whole, or not at all.

Everything is written to a temporary sibling (same directory, so the rename stays on one filesystem and
is atomic on POSIX) with a unique name (several workers may write the same path), and renamed over the
target only once complete. On any failure the temporary is removed and the target is as it was. The
temporary gets the mode a plain `open()` / `mkdir()` would have made (mkstemp and mkdtemp make 0600 / 0700).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically."""
    with replacing(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; write it in the block, and it replaces `path` on success."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def replacing_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; fill it in the block, and it replaces `path` (a directory
    or a file, removed) on success."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())
        _swap_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_directory(tmp: Path, path: Path) -> None:
    """Move `tmp` to `path`: a directory already there is renamed aside first and removed after (a non-empty
    directory cannot be replaced in one rename), a file is removed."""
    if path.is_dir():
        old = tmp.with_suffix(".old")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        path.unlink(missing_ok=True)
        tmp.rename(path)


def _umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask

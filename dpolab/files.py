"""Files that are never half-written, and dpolab's cache folder.

A file is written beside its destination and moved into place with ``os.replace``; a folder is filled under a
temporary name and renamed when complete. A process killed at any instant (SIGKILL included) leaves the previous
version intact and nothing partial that looks complete. Used by checkpoints, caches, the shipped data's
builder and the experiment's run folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["cache_root", "atomic_write_text", "atomic_directory"]


def cache_root() -> Path:
    """dpolab's cache folder: ``$DPOLAB_CACHE`` if set, else ``~/.cache/dpolab``."""
    return Path(os.environ.get("DPOLAB_CACHE") or Path.home() / ".cache" / "dpolab")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, fsync, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        tmp.write_text(text, encoding="utf-8")
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it is renamed to ``path``, on error it is removed.

    With ``replace=False`` an existing ``path`` (say, built meanwhile by another process) is kept and the new
    folder discarded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        if path.exists():
            if not replace:
                return
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

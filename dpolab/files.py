"""Files that are never half-written, dpolab's cache folder, and text that is safe to write down.

A file is written beside its destination and moved into place with ``os.replace``; a folder is filled under a
temporary name and renamed when complete (an older folder of that name is moved aside first and deleted after).
A process killed at any instant (SIGKILL included) leaves the previous version or the new one, never a mix, and
nothing partial under the destination's name: only hidden ``.<name>.tmp-*`` / ``.<name>.old-*`` leftovers, which
:func:`remove_leftovers` clears. Used by checkpoints, the trained model, caches, histories, reports and figures.

What is written never holds a secret or this machine's layout: :func:`portable_path` writes a path under the
cache or the home folder as ``$DPOLAB_CACHE/...`` or ``~/...``, :func:`portable_text` does so inside any text,
and :func:`redact_url` drops a URL's credentials, query and fragment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "cache_root",
    "atomic_write_text",
    "atomic_path",
    "atomic_directory",
    "remove_leftovers",
    "save_pretrained_atomically",
    "read_jsonl",
    "portable_path",
    "portable_text",
    "redact_url",
]

_LEFTOVER = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{32}(\.\w+)?$")  # what the writers below leave behind when killed


def cache_root() -> Path:
    """dpolab's cache folder: ``$DPOLAB_CACHE`` if set, else ``~/.cache/dpolab``."""
    return Path(os.environ.get("DPOLAB_CACHE") or Path.home() / ".cache" / "dpolab")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sibling(path: Path, kind: str, keep_suffix: bool = False) -> Path:
    """A hidden name beside ``path``: ``.<name>.<kind>-<hex>`` (plus the suffix, for writers that read it)."""
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex}{path.suffix if keep_suffix else ''}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` (same suffix, so writers that infer the format from it work);
    once the block ends without error it is fsync'ed and moved onto ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp", keep_suffix=True)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, fsync, os.replace)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_directory(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it is renamed to ``path``, on error it is removed.

    An existing ``path`` is moved aside, the new folder renamed into place, then the old one deleted: a kill in
    between leaves either folder whole. With ``replace=False`` an existing ``path`` (say, built meanwhile by
    another process) is kept and the new folder discarded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        old = None
        if path.exists():
            if not replace:
                return
            old = _sibling(path, "old")
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained_atomically(path: str | Path, *objects) -> Path:
    """``obj.save_pretrained`` of each object (a model, its tokenizer) into one folder, renamed into place when
    complete (:func:`atomic_directory`): a kill leaves the earlier folder or the new one, never a mix."""
    with atomic_directory(path) as tmp:
        for obj in objects:
            obj.save_pretrained(tmp)
    return Path(path)


def remove_leftovers(folder: str | Path) -> list[str]:
    """Delete what a killed :func:`atomic_path` / :func:`atomic_directory` left in ``folder``; return the names."""
    folder = Path(folder)
    found = [p for p in folder.iterdir() if _LEFTOVER.match(p.name)] if folder.is_dir() else []
    for leftover in found:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return sorted(p.name for p in found)


def read_jsonl(path: str | Path) -> list:
    """The records of a JSON Lines file, split on newline only (``str.splitlines`` would also split at U+2028 and
    U+0085, which ``json.dumps(..., ensure_ascii=False)`` leaves inside strings); blank lines skipped."""
    text = Path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n") if line.strip()]


# ------------------------------------------------------------------------------------------ portable text


def _roots() -> list[tuple[str, str]]:
    """(absolute prefix, how it is written), the most specific first: the cache, then the home folder."""
    home = str(Path.home())
    cache = str(cache_root().expanduser().absolute())
    named = "$DPOLAB_CACHE" if os.environ.get("DPOLAB_CACHE") else None
    roots = []
    if named:
        roots.append((cache, named))
    if len(home) > 1:  # a home of "/" would turn every absolute path into "~"
        roots.append((home, "~"))
    return sorted(roots, key=lambda root: -len(root[0]))


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as it should be written down: under ``$DPOLAB_CACHE`` (when set) as ``$DPOLAB_CACHE/...``, under
    the home folder as ``~/...`` (so ``~/.cache/dpolab/...`` by default); any other path unchanged."""
    return portable_text(os.fspath(path))


def portable_text(text: str) -> str:
    """``text`` with every absolute path under the cache or the home folder written as in :func:`portable_path`."""
    for prefix, name in _roots():
        text = re.sub(re.escape(prefix) + r"(?![\w.-])", name.replace("\\", "\\\\"), text)
    return text


def redact_url(url: str) -> str:
    """``url`` without user, password, query and fragment: ``https://u:p@host/v1?key=k`` -> ``https://host/v1``."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal goes back in brackets
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: keep the host alone
        port = None
    netloc = host + (f":{port}" if port is not None else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))

"""``make bench ARGS="--against REF"``: dpolab as it was at a git ref, beside dpolab as it is now, in lockstep.

The ref's tree is exported (``git archive``) into a temporary folder and its bench worker runs from there: the
worker's process puts that folder first on ``PYTHONPATH``, so ``import dpolab`` there is the ref's code, with this
environment's packages. The two workers get the same spec (the same random GPT-2, pairs, order and hyperparameters),
so their first losses must agree as TRL's and dpolab's do. The ref must have the lockstep bench
(``dpolab/bench/lockstep.py``, commit 0d865d1 or later).
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

__all__ = ["export_ref"]

REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        raise ValueError(lines[-1] if lines else f"git {args[0]} failed with status {proc.returncode}")
    return proc.stdout.decode() if args[0] != "archive" else proc.stdout


def export_ref(ref: str, dest: Path) -> tuple[str, Path]:
    """Export the tree of git ref ``ref`` into ``dest``; returns (its full commit id, the folder to put on PYTHONPATH)."""
    try:
        commit = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").strip()
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(
            f"--against {ref}: not a commit of the git checkout at {REPO} ({err or 'unknown ref'}): pass a commit, "
            "branch or tag of this repository (git log --oneline lists them)"
        ) from None
    with tarfile.open(fileobj=io.BytesIO(_git("archive", "--format=tar", commit)), mode="r:") as tar:
        tar.extractall(dest, filter="data")
    if not (dest / "dpolab" / "bench" / "lockstep.py").is_file():
        raise ValueError(
            f"--against {ref}: dpolab at {commit[:10]} has no lockstep bench (dpolab/bench/lockstep.py, added in "
            "0d865d1): pass a later commit"
        )
    return commit, dest

"""Atomic files and checkpoints.

Nothing is ever half-written: a file is written beside its destination and moved into place with
``os.replace``; a checkpoint is a folder filled under a temporary name and renamed when complete, so a
process killed at any instant (SIGKILL included) leaves the previous checkpoint intact and no partial one
that looks complete.

A checkpoint folder ``checkpoint-<step>`` holds
- ``model.safetensors``: the model's parameters and buffers (tied weights stored once);
- ``trainer_state.pt``: optimizer, scheduler, RNG states (python, numpy, torch, cuda; one set per process),
  the data position (``step``; the data order is a function of the seed and the epoch), the metrics history
  and the config. It contains only tensors and plain Python values, and is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from ..files import atomic_directory

__all__ = [
    "rng_state",
    "set_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
]

CHECKPOINT_PREFIX = "checkpoint-"


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) RNG states as tensors and plain values."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step:08d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``output_dir`` (temporary folders are ignored)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), default=None)


def save_checkpoint(
    output_dir: str | Path, step: int, model: torch.nn.Module, state: dict[str, Any], keep: int = 1
) -> Path:
    """Write ``checkpoint-<step>`` atomically, then delete all but the ``keep`` most recent checkpoints.

    ``state`` holds the rest (optimizer, scheduler, RNG states, history, config): tensors and plain values only.
    """
    path = checkpoint_path(output_dir, step)
    with atomic_directory(path) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"step": step, **state}, tmp / "trainer_state.pt")
        (tmp / "step.json").write_text(json.dumps({"step": step}))
    older = sorted(p for p in Path(output_dir).iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))
    for stale in older[: max(0, len(older) - keep)]:
        shutil.rmtree(stale, ignore_errors=True)
    return path


def load_checkpoint(path: str | Path, model: torch.nn.Module, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load the parameters of checkpoint ``path`` into ``model`` and return its trainer state."""
    path = Path(path)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
    if missing or unexpected:  # load_model(strict=True) raises already; this guards against API drift
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)

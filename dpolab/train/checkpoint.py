"""Checkpoints that are never half-written and never trusted unverified.

A checkpoint is a folder filled under a temporary name and renamed when complete (``dpolab.files``), so a process
killed at any instant (SIGKILL included) leaves the previous checkpoint intact and no partial one that looks
complete. Its last file is ``manifest.json``, the size and sha256 of every other file: resuming verifies it before
trusting the checkpoint (a copy cut short, a disk error, a file edited by hand), and falls back to the newest intact
one, as transformers' ``Trainer`` resumes only from a complete checkpoint.

A checkpoint folder ``checkpoint-<step>`` holds
- ``model.safetensors``: the model's parameters and buffers (tied weights stored once); for a PEFT model, only its
  adapter instead, as peft saves it (``adapter_model.safetensors`` and ``adapter_config.json``, ``adapters.py``): the
  base weights never change, and the checkpoint is a folder ``PeftModel.from_pretrained`` loads;
- ``trainer_state.pt``: optimizer, scheduler, RNG states (python, numpy, torch, cuda; one set per process),
  the data position (``step``; the data order is a function of the seed and the epoch), the metrics history
  and the config. It contains only tensors and plain Python values, and is loaded with ``weights_only=True``;
- ``manifest.json``, written last: the layout, the step, the config, the data's fingerprint (so a resume can be
  checked before any model loads) and ``{"files": {name: {"bytes": n, "sha256": hex}}}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_model

from ..files import atomic_directory

__all__ = [
    "CheckpointError",
    "LAYOUT",
    "rng_state",
    "set_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "checkpoints",
    "read_manifest",
    "verify_checkpoint",
    "newest_intact_checkpoint",
]

CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
LAYOUT = 2  # 1: no manifest (before checksums); 2: manifest.json with the sha256 of every file
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or read; the message names it and says why."""


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


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-<step>`` folder of ``output_dir``, the highest step first (temporary folders ignored)."""
    folder = Path(output_dir)
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: -int(_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``output_dir``, intact or not (see :func:`newest_intact_checkpoint`)."""
    return next(iter(checkpoints(output_dir)), None)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path, step: int, info: dict[str, Any]) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir())}
    manifest = {"layout": LAYOUT, "step": step, **info, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path``, unverified; raises :class:`CheckpointError` when it is not readable."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: {MANIFEST} cannot be read ({err})") from err


def verify_checkpoint(path: str | Path) -> str | None:
    """Why checkpoint ``path`` cannot be trusted (a file missing, of another size or sha256 than its manifest
    says, an older layout), or None when every file is as its manifest says."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        if (path / "step.json").is_file():
            return f"it has the older layout 1 (no {MANIFEST}: its files cannot be verified)"
        return f"it has no {MANIFEST} (written last: the checkpoint is incomplete)"
    try:
        manifest = read_manifest(path)
        layout, files, step = manifest.get("layout"), manifest["files"], manifest["step"]
    except (CheckpointError, KeyError, TypeError, AttributeError) as err:
        return f"its {MANIFEST} is damaged ({err})"
    if layout != LAYOUT:
        return f"it has layout {layout}; this dpolab reads layout {LAYOUT}"
    if _NAME.match(path.name) and step != int(_NAME.match(path.name).group(1)):
        return f"its {MANIFEST} says step {step}, its name another"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size:,} bytes, its manifest says {expected['bytes']:,} (cut short or overwritten)"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest (damaged)"
    return None


def newest_intact_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint that verifies, [(each newer one skipped, why)])."""
    skipped = []
    for path in checkpoints(output_dir):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def _discard(path: Path) -> None:
    """Rename ``path`` out of the checkpoints' names, then delete it: a kill half-way leaves a hidden leftover."""
    trash = path.with_name(f".{path.name}.old-{os.urandom(16).hex()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    keep: int = 1,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically, its manifest last, then delete all but the ``keep`` most recent.

    ``state`` holds the rest (optimizer, scheduler, RNG states, history, config): tensors and plain values only.
    ``info`` (JSON values, e.g. the config and the data's fingerprint) goes into the manifest.
    """
    from .adapters import is_peft_model, save_adapter

    path = checkpoint_path(output_dir, step)
    with atomic_directory(path) as tmp:
        if is_peft_model(model):
            save_adapter(model, tmp)  # the adapter alone: the base weights are frozen
        else:
            save_model(model, str(tmp / "model.safetensors"))
        torch.save({"step": step, **state}, tmp / "trainer_state.pt")
        _write_manifest(tmp, step, info or {})
    for stale in checkpoints(output_dir)[keep:]:
        _discard(stale)
    return path


def load_checkpoint(path: str | Path, model: torch.nn.Module, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Verify checkpoint ``path``, load its parameters into ``model`` and return its trainer state.

    Raises :class:`CheckpointError` naming the checkpoint when it does not verify or cannot be read.
    """
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"cannot load checkpoint {path}: {problem}")
    from .adapters import ADAPTER_WEIGHTS, is_peft_model, load_adapter_state_dict

    adapter = (path / ADAPTER_WEIGHTS).is_file()
    if adapter != is_peft_model(model):
        held, given = ("an adapter", "a model without one") if adapter else ("a whole model", "a PEFT model")
        raise CheckpointError(f"checkpoint {path} holds {held}, the model to load it into is {given}")
    missing = unexpected = ()
    try:
        if adapter:
            load_adapter_state_dict(model, load_file(str(path / ADAPTER_WEIGHTS), device=str(device)))
        else:
            missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and torch errors alike: name the checkpoint
        raise CheckpointError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}") from err
    if missing or unexpected:  # load_model(strict=True) raises already; this guards against API drift
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
    return state

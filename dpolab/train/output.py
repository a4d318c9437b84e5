"""The run folder ``config.output_dir``: checked before any work, claimed, checkpointed, resumed.

    check_output_dir   before any work: may the run write there, and which checkpoint does it continue?
    claim_output_dir   rank 0, before the first step: mark the folder as a run's, clear a run it starts over
    resume             load the checkpoint into the model, optimizer, scheduler and RNGs
    save               every save_steps and at the end: a checkpoint (checkpoint.py) and the history (history.py)

A folder is a run folder when it holds ``RUN_MARKER``; anything else in a non-empty folder needs ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from ..files import atomic_write_text, portable_text, remove_leftovers
from .checkpoint import (
    LAYOUT,
    CheckpointError,
    checkpoints,
    load_checkpoint,
    newest_intact_checkpoint,
    read_manifest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import TrainConfig
from .history import write_history

__all__ = ["RUN_MARKER", "check_output_dir", "check_resumed_data", "claim_output_dir", "resume", "save"]

log = logging.getLogger(__name__)

# Names a folder as a dpolab.train run folder, of this checkpoint layout; written before anything else in it.
RUN_MARKER = "dpolab_run.json"
# What a run writes in its folder besides checkpoints: cleared when a run starts over (overwrite=True).
_RUN_OUTPUTS = ("history.json", "history.csv", "config.json", "model_info.json", "model")
# Config fields that may change between a run and its resumption (how, not what: the numbers agree to float
# tolerance with any speed-up on or off).
_RESUMABLE_CHANGES = {
    "resume",
    "progress",
    "save_steps",
    "save_total_limit",
    "ref_cache_dir",
    "use_ref_cache",
    "output_dir",
    "overwrite",
    "speedups",
    "gradient_checkpointing",
    "report_to",
    "eval_strategy",  # evaluation reads the policy, never changes it
    "eval_steps",
    "eval_on_start",
    # truncation: its effect is in the data hash (the token ids after truncation), which must not change
    "max_length",
    "truncation_mode",
    "max_prompt_length",
}


def _writable_ancestor(folder: Path) -> None:
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"output_dir {folder}: {existing} is a file, not a folder: choose another output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"output_dir {folder}: {existing} is not writable (permission denied): fix its permissions or choose "
            "another output_dir"
        )


def _listing(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _marker_layout(folder: Path):
    try:
        return json.loads((folder / RUN_MARKER).read_text()).get("layout")
    except (OSError, ValueError, AttributeError):
        return "unknown (its marker is damaged)"


def check_output_dir(config: TrainConfig) -> tuple[Path | None, list[tuple[Path, str]]]:
    """Every check of ``config.output_dir`` that can refuse a run, done before any work (``dpolab train`` calls it
    before the model loads, ``train`` first): the folder can be written; it is new, empty, or a dpolab run folder
    of this layout (anything else needs ``overwrite=True``, as git refuses to clone into a non-empty folder); an
    earlier run in it is continued only with ``resume=True`` and the same settings, started over only with
    ``overwrite=True``. Resuming takes the newest checkpoint whose manifest verifies (as transformers' Trainer
    resumes only from a complete checkpoint).

    Returns (the checkpoint to resume from, or None to start fresh; [(each newer checkpoint skipped, why)]).
    """
    if config.output_dir is None:
        return None, []
    folder = Path(config.output_dir)
    _writable_ancestor(folder)
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    found, marked = checkpoints(folder), (folder / RUN_MARKER).is_file()
    if names and not marked and not config.overwrite:
        if found:
            raise ValueError(
                f"output_dir {folder} holds {found[0].name} of an older dpolab layout (no {RUN_MARKER}, checkpoints "
                "without checksums): it is not resumed; choose another output_dir, or pass overwrite=True "
                "(--overwrite) to start over in it"
            )
        raise FileExistsError(
            f"output_dir {folder} holds files dpolab did not write ({_listing(names)}): choose a new or empty "
            "output_dir, or pass overwrite=True (--overwrite) to write dpolab's files among them"
        )
    if marked and not config.overwrite:
        layout = _marker_layout(folder)
        if layout != LAYOUT:
            raise ValueError(
                f"output_dir {folder} is a dpolab run folder of layout {layout}; this dpolab reads layout {LAYOUT}: "
                "choose another output_dir, or pass overwrite=True (--overwrite) to start over in it"
            )
    if not found or config.overwrite:
        return None, []
    if not config.resume:
        raise FileExistsError(
            f"output_dir {folder} already holds {found[0].name}: pass resume=True (--resume) to continue it, "
            "overwrite=True (--overwrite) to start over, or choose another output_dir"
        )
    path, skipped = newest_intact_checkpoint(folder)
    if path is None:
        why = "; ".join(f"{p.name}: {problem}" for p, problem in skipped)
        raise CheckpointError(
            f"cannot resume in {folder}: no checkpoint is intact ({why}); pass overwrite=True (--overwrite) to start "
            "over, or choose another output_dir"
        )
    _check_same_config(path, config)
    return path, skipped


def _check_same_config(path: Path, config: TrainConfig) -> None:
    """The checkpoint's config, its fields missing there at their defaults, equals ``config`` but for the fields
    that may change on resumption (``_RESUMABLE_CHANGES``)."""

    def as_json(c: TrainConfig) -> dict:
        return json.loads(json.dumps(c.to_dict(), default=str))

    saved = {**as_json(TrainConfig()), **read_manifest(path).get("config", {})}
    changed = {
        k: (saved.get(k), v) for k, v in as_json(config).items() if k not in _RESUMABLE_CHANGES and saved.get(k) != v
    }
    if changed:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"cannot resume {path}: the config changed ({listed}); resume with the settings it was made with, or "
            "choose another output_dir"
        )


def check_resumed_data(path: Path | None, data_hash: str) -> None:
    """The checkpoint ``path`` (if any) was trained on the data of fingerprint ``data_hash``."""
    if path is not None and read_manifest(path).get("data_hash") != data_hash:
        raise ValueError(
            f"cannot resume {path}: the training data (or the tokenizer, max_length, per-example loss parameters) "
            "differ from the run's; resume with the same data, or choose another output_dir"
        )


def claim_output_dir(config: TrainConfig, resuming: bool) -> None:
    """Rank 0, after every check and before any work: mark the folder as a run folder, clear what killed writes
    left, and when starting fresh remove an earlier run's outputs, so that two runs never mix in one folder."""
    folder = Path(config.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder)
    if not resuming:
        for stale in checkpoints(folder):
            shutil.rmtree(stale)
        for name in _RUN_OUTPUTS:
            path = folder / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    atomic_write_text(folder / RUN_MARKER, json.dumps({"layout": LAYOUT, "written_by": "dpolab.train"}, indent=1))
    atomic_write_text(folder / "config.json", portable_text(json.dumps(config.to_dict(), indent=1, default=str)))


def resume(path: Path, skipped, model, optimizer, scheduler, rank: int, device) -> tuple[int, list, list]:
    """Load checkpoint ``path`` (verified by check_output_dir) into the model, optimizer, scheduler and RNGs; returns
    (its step, its history, its eval history)."""
    if rank == 0:
        for stale, problem in skipped:
            log.warning("skipped %s: %s; resuming from %s", stale.name, problem, path.name)
    state = load_checkpoint(path, model, device=device)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ranks = state["rng"]
    set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
    return state["step"], state["history"], state.get("eval_history", [])


def save(config, step, model, optimizer, scheduler, history, eval_history, data_hash, rank, world_size) -> None:
    """Every process contributes its RNG state; rank 0 writes the checkpoint and the history."""
    states = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if rank == 0:
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": states,
            "history": history,
            "eval_history": eval_history,
            "config": config.to_dict(),
            "data_hash": data_hash,
        }
        info = {"config": config.to_dict(), "data_hash": data_hash}
        save_checkpoint(config.output_dir, step, model, state, keep=config.save_total_limit, info=info)
        write_history(config.output_dir, history, eval_history)
    if world_size > 1:
        dist.barrier()

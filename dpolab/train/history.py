"""Where a run's history rows go: history.json and history.csv (the one writer of both, also the Penn experiment's),
and TensorBoard under TRL's names."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist
from tqdm.auto import tqdm

from ..files import atomic_write_text
from .objective import METRICS

__all__ = ["write_history", "TensorBoard", "Reports"]


def write_history(output_dir: str | Path, history: Sequence[dict], eval_history: Sequence[dict] = ()) -> None:
    """history.json: the rows in TRL's ``log_history`` layout, each step's row (``METRICS``, or a ranking run's
    listwise_metrics(K)) followed, where the policy was evaluated, by its eval row (``EVAL_METRICS``; eval_on_start's
    at step 0 first); without evaluation, the step rows alone. history.csv: one line per step, the step rows'
    columns, then the eval_ columns when there are evaluations (empty cells where none ran; eval_on_start's line has
    only step, epoch and the eval_ columns); each value as Python writes it (``repr``)."""
    rows = sorted([*history, *eval_history], key=lambda row: (row["step"], "eval_loss" in row))  # stable
    atomic_write_text(Path(output_dir) / "history.json", json.dumps(rows, indent=1))
    columns = list(history[0]) if history else list(METRICS)
    columns += list(eval_history[0])[2:] if eval_history else []
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["step"], {}).update(row)
    lines = [",".join(columns)] + [
        ",".join(repr(row[k]) if k in row else "" for k in columns) for row in by_step.values()
    ]
    atomic_write_text(Path(output_dir) / "history.csv", "\n".join(lines) + "\n")


class TensorBoard:
    """``report_to="tensorboard"``: each history row as TensorBoard scalars at its step, under TRL's names as
    transformers' TensorBoardCallback writes them (``train/loss``, ``train/rewards/chosen``, ...; an eval row's
    ``eval_loss`` as ``eval/loss``, ...), through ``torch.utils.tensorboard.SummaryWriter`` on
    ``$TENSORBOARD_LOGGING_DIR`` (transformers' variable) or ``output_dir/runs``. The writer (and its event file) comes
    with the first row, on rank 0 only."""

    def __init__(self, output_dir: str):
        self.log_dir = os.path.expanduser(os.environ.get("TENSORBOARD_LOGGING_DIR") or Path(output_dir) / "runs")
        self.writer = None

    def _scalars(self, row: dict[str, float], tags: dict[str, str]) -> None:
        """Write ``row[name]`` as ``tag`` at ``row["step"]`` for each name -> tag (rank 0)."""
        if (not dist.is_initialized() or dist.get_rank() == 0) and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir)
        if self.writer is not None:
            for name, tag in tags.items():
                self.writer.add_scalar(tag, row[name], row["step"])
            self.writer.flush()

    def step(self, row: dict[str, float]) -> None:
        self._scalars(row, {name: f"train/{name}" for name in list(row)[1:]})  # every column but the step

    def evaluation(self, row: dict[str, float]) -> None:
        self._scalars(row, {name: "eval/" + name.removeprefix("eval_") for name in list(row)[2:]})  # not step, epoch

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Reports:
    """Each history row, as the loop makes it, to the caller's ``on_step``, TensorBoard (``report_to``) and the
    progress bar (tqdm, with the live metrics of ``postfix(row)`` and the last evaluation's loss); ``close()`` closes
    the bar and TensorBoard's writer."""

    def __init__(self, config, on_step, total_steps: int, start_step: int, show: bool, postfix):
        self.on_step, self.postfix = on_step, postfix
        self.tensorboard = TensorBoard(config.output_dir) if config.report_to == "tensorboard" else None
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="+".join(config.losses),
            unit="step",
            dynamic_ncols=True,
            disable=not show,
        )
        self.shown_eval: dict[str, str] = {}

    def step(self, row: dict[str, float]) -> None:
        if self.tensorboard is not None:
            self.tensorboard.step(row)
        if self.on_step is not None:
            self.on_step(row)

    def evaluation(self, row: dict[str, float]) -> None:
        if self.tensorboard is not None:
            self.tensorboard.evaluation(row)
        self.shown_eval = {"eval_loss": f"{row['eval_loss']:.4f}"}

    def progress(self, row: dict[str, float]) -> None:
        """One step more on the bar, with the step's loss, live metrics and learning rate."""
        lr = f"{row['learning_rate']:.2e}"
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", **self.postfix(row), lr=lr, **self.shown_eval, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

"""The baseline: Hugging Face TRL's own DPOTrainer, as the article ran it (DPOConfig defaults, lr 1e-5, 5 epochs).

What we set and why (ENVIRONMENT.md, "TRL DPOTrainer offline"):
- ``bf16``: the experiment's precision (``Hyper.precision``), the same as dpolab's methods: DPOConfig's default
  bf16=True where the experiment trains in bf16 (auto: on a CUDA device that supports it), else fp32.
- ``ref_model``: an explicit frozen copy of the initial weights (with ``None`` TRL reloads the model by name from
  the hub, which is unreachable here).
- ``report_to="none"``: no experiment trackers.
- ``logging_steps=1``: one history row per optimizer step, like dpolab.train (DPOConfig logs every 10 steps).
- ``gradient_checkpointing=False``: DPOConfig's default recomputes activations to save GPU memory; it changes no
  number and runs each layer's forward twice.
- ``precompute_ref_log_probs=True`` (``TRLSettings``): TRL scores the training pairs under the frozen reference
  once, before the first step, instead of running the reference in every step; the same numbers (dropout is off),
  one forward less per step. dpolab's loop does the same.
- ``data``: the rows as they are (TRL's standard format: each completion carries its leading space); TRL appends
  EOS itself, as dpolab.data.tokenize does, so both trainers see the same token sequences.
Everything else (AdamW, linear decay without warm-up, gradient clipping at 1.0, batch size 8, sigmoid loss on
summed log-probs) is TRL's default. TRL logs under the names dpolab.train
uses (loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, ...), so its log
history maps onto the same history table.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from pathlib import Path

from ...models import context_length
from ...train import METRICS
from .config import Experiment
from .methods import TrainingInputs, Unit

__all__ = ["train_trl", "history_from_log"]


def history_from_log(log_history: list[dict]) -> list[dict[str, float]]:
    """TRL's ``trainer.state.log_history`` -> rows of dpolab.train.METRICS (training steps only, NaN if absent)."""
    rows = [entry for entry in log_history if "loss" in entry and "step" in entry and "train_runtime" not in entry]
    by_step = {int(entry["step"]): entry for entry in rows}  # a resumed run may log a step twice: keep the last
    return [
        {k: int(entry[k]) if k == "step" else float(entry.get(k, math.nan)) for k in METRICS}
        for _, entry in sorted(by_step.items())
    ]


def _progress_callback():
    """A tqdm bar with the loss and margin, in place of TRL's printing of every log line (logging_steps=1)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="trl", unit="step")

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}", margin=f"{logs.get('rewards/margins', math.nan):.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return Progress()


@contextlib.contextmanager
def _quiet(quiet: bool):
    """Without progress output: no datasets map bars (TRL tokenizes with them) and no bar from TRL's reference
    log-prob pass (which reads ``TQDM_DISABLE`` when it starts); both restored afterwards."""
    import datasets

    if not quiet:
        yield
        return
    was_enabled, saved = datasets.utils.logging.is_progress_bar_enabled(), os.environ.get("TQDM_DISABLE")
    datasets.utils.logging.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()


def train_trl(unit: Unit, exp: Experiment, inputs: TrainingInputs, work: str):
    """Train a copy of the initial model with TRL's DPOTrainer; returns (policy, history rows).

    Checkpoints every ``save_steps`` in ``work``; a rerun resumes from the latest one (TRL's resume_from_checkpoint).
    """
    from datasets import Dataset
    from transformers import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import DPOConfig, DPOTrainer

    s = exp.trl
    rows = inputs.train_data
    data = Dataset.from_dict({key: list(rows[key]) for key in ("prompt", "chosen", "rejected")})
    context = context_length(inputs.model) or 1024
    device = next(inputs.model.parameters()).device
    args = DPOConfig(
        output_dir=work,
        beta=unit.beta or s.beta,
        learning_rate=s.learning_rate,
        num_train_epochs=s.epochs,
        per_device_train_batch_size=s.batch_size,
        max_steps=s.max_steps or -1,
        seed=unit.seed,
        max_length=min(1024, context),
        bf16=exp.hyper.precision == "bf16",
        use_cpu=device.type == "cpu",  # the model's device (dpolab.device.choose_device)
        report_to="none",
        logging_steps=1,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=1,
        gradient_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=device.type == "cuda",
        precompute_ref_log_probs=s.precompute_ref_log_probs,
    )
    policy, reference = copy.deepcopy(inputs.model), copy.deepcopy(inputs.model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    with _quiet(not inputs.progress):
        trainer = DPOTrainer(
            model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=inputs.tokenizer
        )
        trainer.remove_callback(PrinterCallback)  # it prints every log line; the history files hold them
        if inputs.progress:
            trainer.add_callback(_progress_callback())
        last = get_last_checkpoint(work) if Path(work).is_dir() else None
        if last:
            print(f"[penn] {unit.name} seed {unit.seed} resumes from {Path(last).name}", flush=True)
        trainer.train(resume_from_checkpoint=last)
    history = history_from_log(trainer.state.log_history)
    model = trainer.model
    del trainer, reference
    return model.eval(), history

"""The training loop: one explicit loop for the DPO family, SFT and KL-SFT.

    precompute log pi_ref(y_w|x), log pi_ref(y_l|x) for every pair, once                  (setup.py, reference.py)
    for step in 1..T:                                                                             (run_steps below)
        batch  <- the step's B pairs, in a seeded per-epoch order, split over processes and micro-batches
        log pi_theta(y_w|x), log pi_theta(y_l|x) <- one forward over the batch                       (eq. 6.1)
        losses <- sum_k w_k LOSSES[loss_k](policy logps, reference logps; beta, ...)        (eq. 4.2 for DPO)
        backward(mean of losses over the global batch), accumulated over micro-batches
        clip the gradient norm; AdamW step; learning rate <- warm-up then cosine  (or a transformers schedule)
        metrics under TRL's names; on eval_strategy's steps, TRL's eval_ metrics on eval_data
        checkpoint every save_steps

Rankings of K completions (``listwise.py``) take the same loop with a listwise loss (Plackett-Luce, eq. 5.2 of
notebook 05) on (B, K) log-probs from one forward over packed segments prompt + y_1 + ... + y_K.

How it differs from TRL's DPOTrainer: the reference model never runs during training (its log-probs are
precomputed and cached on disk), log-probs are taken with the LM head on completion positions only
(``dpolab.logprobs``), and the loop is this file; the tokens are TRL's (``dpolab.data.tokenize``). Devices: CUDA
(bf16 autocast where supported), MPS and CPU (fp32) share the code path. Several GPUs: launch with ``torchrun
--nproc_per_node N`` (or ``accelerate launch``); each process takes every N-th pair of the global batch (like
DistributedSampler) and DDP averages the gradients, so N processes take the same steps as one process on the same
global batch. LoRA: ``TrainConfig(peft_config=...)`` (``adapters.py``). The rest lives beside this file: the
setup (``setup.py``), the objective and metrics (``objective.py``), the model's preparation (``prepare.py``), the
run folder and checkpoints (``output.py``), the history files and TensorBoard (``history.py``).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..device import check_device
from .config import TrainConfig
from .examples import check_eval_data, training_data
from .history import Reports
from .objective import EVAL_METRICS, METRICS, NonFiniteError, evaluate, raise_nonfinite
from .output import check_output_dir, check_resumed_data, save
from .prepare import check_trainable, prepared
from .setup import TrainState, setup

__all__ = ["train", "TrainResult", "run_steps", "NonFiniteError", "METRICS", "EVAL_METRICS"]


@dataclass
class TrainResult:
    model: torch.nn.Module  # the trained policy: the object passed in, trained in place (peft_config: its PeftModel)
    history: list[dict[str, float]]  # one row of METRICS (rankings: listwise_metrics(K)) per optimizer step, from 1
    resumed_from_step: int | None = None  # the checkpoint step this run continued from, if any
    output_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # steps_per_epoch, total_steps, world_size
    eval_history: list[dict[str, float]] = field(default_factory=list)  # one row of EVAL_METRICS per evaluation


def run_steps(s: TrainState, config: TrainConfig, report: Reports) -> None:
    """Optimizer steps ``s.start_step + 1`` to ``s.total_steps`` on the prepared state ``s`` (``setup.py``): the
    pseudocode of the module docstring, with each step's metrics as the mean over its global batch. The host reads
    the device once per step: the metrics, the count of non-finite values and the gradient norm, in one tensor."""
    batches = s.batches()  # the micro-batches in step order, collated ahead (DataLoader workers on CUDA)
    for step in range(s.start_step + 1, s.total_steps + 1):  # step = optimizer steps taken after this one, as TRL logs
        batch_indices, micro_batches = s.step_rows(step)  # the step's B pairs: its epoch's seeded order, sliced
        scale = s.world_size / len(batch_indices)  # DDP averages over processes: the result is the global-batch mean
        sums = torch.zeros(len(s.objective.summed) + 1, dtype=torch.float64, device=s.device)  # metrics, non-finite
        checks = []  # (rows, what, values): what the error names if a value is not finite
        learning_rate = s.optimizer.param_groups[0]["lr"]
        for i, rows in enumerate(micro_batches):
            batch = next(batches)
            with s.gradient_sync(last=i == len(micro_batches) - 1):
                with s.autocast():
                    logps = s.policy(batch)  # log pi_theta(y|x) of every completion, one forward (eq. 6.1)
                losses, stats, checked = s.objective(logps, batch["rows"])  # eq. 4.2 against cached log pi_ref
                (losses.sum() * scale).backward()  # accumulates into .grad over the micro-batches
            sums += stats
            checks += [(rows, what, values) for what, values in checked]
        grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), config.max_grad_norm or math.inf)
        if s.world_size > 1:
            dist.all_reduce(sums)
        # the step's one host synchronisation
        *means, nonfinite, grad_norm = torch.cat(
            [sums[:-1] / len(batch_indices), sums[-1:], grad_norm.double()[None]]
        ).tolist()
        if nonfinite:  # a NaN or inf log-prob or loss: name its examples (on every process: the count is global)
            raise_nonfinite(step, checks, batch_indices)
        if not math.isfinite(grad_norm):  # the norm before clipping
            raise NonFiniteError(step, f"the gradient (norm {grad_norm})", batch_indices.tolist(), batch_indices)
        s.optimizer.step()  # AdamW
        s.scheduler.step()  # the next step's learning rate
        s.optimizer.zero_grad(set_to_none=True)
        row = {"step": step, "epoch": step / s.steps_per_epoch, **dict(zip(s.objective.summed, means))}  # TRL's names
        row |= {"learning_rate": learning_rate, "grad_norm": grad_norm}
        s.history.append({k: row[k] for k in s.objective.columns})
        report.step(s.history[-1])
        if s.evaluation is not None and s.evaluation.due(step):
            _evaluation(s, config, report, step)
        report.progress(row)
        if config.output_dir is not None and (
            step == s.total_steps or (config.save_steps and step % config.save_steps == 0)
        ):
            save(
                config,
                step,
                s.model,
                s.optimizer,
                s.scheduler,
                s.history,
                s.eval_history,
                s.data_hash,
                s.rank,
                s.world_size,
            )


def _evaluation(s: TrainState, config: TrainConfig, report: Reports, step: int) -> None:
    """TRL's eval_ metrics of the policy after optimizer step ``step`` (0: before the first), into the eval history."""
    row = evaluate(
        s.model,
        s.evaluation.examples,
        s.evaluation.objective,
        s.tokenizer,
        config,
        step,
        step / s.steps_per_epoch,
        device=s.device,
        autocast_dtype=s.autocast_dtype,
        rank=s.rank,
        world_size=s.world_size,
    )
    s.eval_history.append(row)
    report.evaluation(row)


def train(
    model: torch.nn.Module,
    tokenizer,
    train_data,
    config: TrainConfig = TrainConfig(),
    *,
    ref_model: torch.nn.Module | None = None,
    example_loss_kwargs=None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    eval_data=None,
) -> TrainResult:
    """Train ``model`` in place on preference pairs ``train_data``: rows in one of TRL's formats (standard,
    conversational, implicit prompt; ``dpolab.data.formats``), tokenized as TRL's DPOTrainer tokenizes them.

    ``ref_model`` is the frozen reference pi_ref; by default the policy before training. Its log-probs are
    computed once, before the first step (cached on disk), and it is not used afterwards.
    ``example_loss_kwargs`` maps a loss parameter to one value per pair, in dataset order (e.g. ODPO's
    ``{"offset": offsets}``); each batch passes the values of its own pairs.
    ``on_step`` is called with each step's history row right after its optimizer step (logging, timing).
    ``eval_data``: preference pairs (or rankings) in the training rows' format, scored on ``config.eval_strategy``'s
    steps (each epoch's end by default; ``eval_steps``, ``eval_on_start``) with TRL's eval_ metrics (``EVAL_METRICS``:
    the step rows' loss, rewards and log-probs, the means over the eval pairs, against their own reference log-probs,
    precomputed and cached as the training pairs' are), into ``TrainResult.eval_history``, the history files, the
    progress bar and TensorBoard. Evaluating changes nothing in the training run.

    The models are left as they were: the reference is only read (and put back on its device); the policy's
    dropout, speed-ups (``config.speedups``, ``speedups.py``) and gradient checkpointing hold while ``train`` runs and
    are undone when it returns or raises, so only its weights (and their device) change.
    ``config.report_to="tensorboard"`` also writes each history row as TensorBoard scalars (``TrainConfig.report_to``).

    LoRA: with ``config.peft_config``, the model is wrapped by peft's ``get_peft_model`` (its adapter layers put into
    it in place and its own weights frozen, as TRL does) and ``TrainResult.model`` is that PeftModel; only the
    adapter trains, and the reference is the base model with the adapter disabled (unless ``ref_model`` is given).
    If ``train`` raises, the adapter is taken out again. A model that already is a PeftModel trains its adapter; its
    reference is the model as given (``adapters.py``).

    Whatever can refuse the run is checked before any work: the device, the output folder and the checkpoint to
    resume (``output.check_output_dir``), max_length against the model's context, the tokenizer against the
    embedding, the data against the resumed run's, the eval data (``examples.check_eval_data``), the PEFT config
    against the model.
    """
    check_device(config.device)
    resume_from = check_output_dir(config)
    check_eval_data(config, train_data, eval_data, example_loss_kwargs)
    check_trainable(model, config)
    data = training_data(model, tokenizer, train_data, config, example_loss_kwargs, eval_data)
    check_resumed_data(resume_from[0], data.data_hash)
    base_reference = config.peft_config is not None and ref_model is None  # the reference: the adapter disabled
    handed_over = [ref_model]  # this frame keeps no reference to it: setup lets it go once its log-probs are in
    del ref_model
    with prepared(model, config) as model:
        s = setup(model, tokenizer, data, config, handed_over, resume_from, base_reference)
        report = Reports(
            config, on_step, s.total_steps, s.start_step, config.progress and s.rank == 0, s.objective.postfix
        )
        try:
            if s.evaluation is not None and config.eval_on_start and s.start_step == 0:
                _evaluation(s, config, report, 0)
            s.model.train()
            run_steps(s, config, report)
        finally:
            report.close()
        if s.world_size > 1:  # free DDP's reducer while the group is registered: a reducer holding the last reference
            s.policy = (
                None  # to a gloo group runs the group's destructor under the GIL and can deadlock (pytorch#56297)
            )
            gc.collect()
        if s.owns_group:
            dist.destroy_process_group()
        return TrainResult(
            model,
            s.history,
            resumed_from_step=s.start_step or None,
            output_dir=config.output_dir,
            extra={
                "steps_per_epoch": s.steps_per_epoch,
                "total_steps": s.total_steps,
                "world_size": s.world_size,
                "skipped_checkpoints": [(p.name, problem) for p, problem in s.skipped],
            },
            eval_history=s.eval_history,
        )

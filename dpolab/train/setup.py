"""Everything the step loop (``loop.py``) needs, made once before the first step: a :class:`TrainState`.

the device (a process of a torchrun launch: its GPU), autocast, the seeds
the examples, tokenized; the collator (packed: eq. 6.9 of appendix notebook 12); the steps
log pi_ref of every completion, once, cached on disk (reference.py); the reference model is then let go
the policy module (one forward per batch), the objective (eq. 4.2 of notebook 04 against those log-probs)
AdamW and its learning-rate schedule; a checkpoint's state when resuming
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..data.collate import PreferenceCollator, n_completions
from ..data.packing import PackedPreferenceCollator
from ..device import autocast, autocast_dtype, choose_device, init_distributed
from ..logprobs import check_completion_mask, check_packed_batch, scored_positions
from ..schedules import warmup_cosine
from .config import WARMUP_COSINE, TrainConfig
from .examples import TrainData, epoch_order, steps_per_epoch
from .objective import CHOSEN_ONLY_LOSSES, evaluation_steps, objective, policy_module
from .output import claim_output_dir, resume
from .reference import reference_logps
from .speedups import fused_adamw

__all__ = [
    "TrainState",
    "Evaluation",
    "setup",
    "learning_rate_schedule",
    "warmup_cosine",
]


COLLATE_WORKERS = 2  # DataLoader processes that collate the batches on CUDA (on other devices: the main process)


@dataclass
class Evaluation:
    """The eval pairs (or rankings), tokenized, and their objective against their own cached reference log-probs."""

    examples: list[dict]
    objective: Any
    due: Callable[[int], bool]  # whether to evaluate after optimizer step s (eval_strategy)


@dataclass
class TrainState:
    """What the step loop reads and updates."""

    model: torch.nn.Module  # the policy pi_theta, trained in place
    policy: torch.nn.Module  # batch -> log pi_theta(y|x) of every completion, one forward; under DDP, its wrapper
    tokenizer: Any  # the policy's; its pad token pads the batches
    examples: list[dict]  # the training pairs (or rankings), tokenized, in dataset order
    collate: Callable  # examples -> a batch of tensors (packed: one segment per pair, eq. 6.9)
    config: TrainConfig
    objective: Any  # (step, policy logps, rows, batch) -> (losses (b,), metric sums); reference log-probs inside
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    total_steps: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 autocast, or None: the weights' own precision
    rank: int = 0  # this process among world_size (torchrun); each takes every world_size-th pair of a batch
    world_size: int = 1
    owns_group: bool = False  # train() initialised torch.distributed and destroys it at the end
    start_step: int = 0  # the checkpoint's step when resuming
    history: list[dict] = field(default_factory=list)  # one row per optimizer step
    eval_history: list[dict] = field(default_factory=list)
    evaluation: Evaluation | None = None
    data_hash: str = ""  # the examples' fingerprint, checked when a checkpoint resumes
    skipped: list = field(default_factory=list)  # newer checkpoints that did not verify: (path, why)

    def step_rows(self, step: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Optimizer step ``step``'s B examples (positions in ``examples``), a slice of its epoch's seeded
        permutation, and this process's share of them split into its micro-batches."""
        config = self.config
        epoch, position = divmod(step - 1, self.steps_per_epoch)
        order = epoch_order(config.seed, epoch, len(self.examples))
        batch_indices = order[position * config.batch_size : (position + 1) * config.batch_size]
        return batch_indices, np.array_split(batch_indices[self.rank :: self.world_size], config.grad_accum_steps)

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The micro-batches of steps ``start_step + 1`` to ``total_steps`` in the order the step loop takes them,
        collated (on CUDA: in ``COLLATE_WORKERS`` DataLoader worker processes, into pinned memory) and on the device;
        each batch's ``rows`` holds its examples' positions."""
        steps = range(self.start_step + 1, self.total_steps + 1)
        rows = [r.tolist() for step in steps for r in self.step_rows(step)[1]]
        cuda = self.device.type == "cuda"
        loader = DataLoader(
            range(len(self.examples)),
            batch_sampler=rows,
            collate_fn=_Collate(self.examples, self.collate),
            num_workers=COLLATE_WORKERS if cuda else 0,
            pin_memory=cuda,
            generator=torch.Generator(),  # its workers' seeds: drawn from its own generator, not torch's global one,
        )  # whose state (dropout's) a checkpoint saves and a resumed run restores
        for batch in loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def autocast(self):
        return autocast(self.device, self.autocast_dtype)

    def gradient_sync(self, last: bool):
        """DDP all-reduces the gradients in the backward of a step's last micro-batch only."""
        return contextlib.nullcontext() if last or self.world_size == 1 else self.policy.no_sync()


class _Collate:
    """positions -> the batch of those examples, with ``rows``: the positions (a DataLoader's collate_fn; a class,
    so that worker processes can take it). A batch is checked here, on the host (``check_packed_batch``,
    ``check_completion_mask``), and a padded one gets its scored positions (``scored_positions``; of pairs: also
    ``scored_chosen`` and ``scored_rejected``, each half's own): the step then reads nothing from the device."""

    def __init__(self, examples: list[dict], collate: Callable):
        self.examples, self.collate, self.n_completions = examples, collate, n_completions(examples)

    def __call__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        batch = self.collate([self.examples[j] for j in rows])
        if "score_sequence" in batch:
            check_packed_batch(batch, self.n_completions)
        else:
            check_completion_mask(batch["completion_mask"])
            scored = batch["scored"] = scored_positions(batch["completion_mask"])
            half = batch["completion_mask"].shape[0] // 2
            chosen = scored[:, 0] < half
            batch["scored_chosen"], batch["scored_rejected"] = scored[chosen], scored[~chosen] - torch.tensor([half, 0])
        return {**batch, "rows": torch.tensor(rows, dtype=torch.long)}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def learning_rate_schedule(optimizer, config: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The config's schedule over ``total_steps`` optimizer steps: dpolab's :func:`warmup_cosine`, or the named
    transformers schedule as TRL's Trainer builds it (a fractional ``warmup_steps`` is a share of the steps)."""
    w = config.warmup_steps
    warmup = int(w) if w >= 1 else math.ceil(total_steps * w)
    if config.lr_scheduler_type == WARMUP_COSINE:
        return warmup_cosine(optimizer, total_steps, warmup, config.min_learning_rate)
    from transformers import get_scheduler

    return get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=config.lr_scheduler_kwargs or None,
    )


def _collator(config: TrainConfig, pad: int):
    """Packed shared-prefix segments (a speed-up) for every loss that trains on the rejected completions too (SFT:
    the chosen rows alone carry gradients), else the padded 2B-row batch."""
    chosen_only = all(name in CHOSEN_ONLY_LOSSES for name in config.losses)
    s = config.speedups
    if s.packing and not chosen_only:
        return PackedPreferenceCollator(
            pad, row_tokens=s.packed_row_tokens, pad_to_multiple_of=config.pad_to_multiple_of
        )
    return PreferenceCollator(pad_token_id=pad, pad_to_multiple_of=config.pad_to_multiple_of)


def _reference_logps(model, ref_model, examples, eval_examples, tokenizer, config, device, rank, world_size, base):
    """log pi_ref of every completion of the training (and eval) examples, (N, K) each, from ``ref_model`` (None: the
    policy before training; ``base``: the PEFT policy with its adapter disabled), computed once and cached on disk
    (``reference.reference_logps``); the caller's reference model goes back to its device."""
    ref_device = None if ref_model is None else next(ref_model.parameters()).device
    reference = model if ref_model is None else ref_model.to(device)
    note = "adapter disabled" if base else None

    def logps(examples):
        return reference_logps(
            reference, examples, tokenizer, config, device, rank=rank, world_size=world_size, cache_note=note
        )

    with model.disable_adapter() if base else contextlib.nullcontext():  # pi_ref: the base model
        ref_logps = logps(examples)
        eval_ref_logps = None if eval_examples is None else logps(eval_examples)
    if ref_model is not None and ref_model is not model:  # the caller's reference goes back where it was
        ref_model.to(ref_device)
    return ref_logps, eval_ref_logps


def setup(
    model,
    tokenizer,
    data: TrainData,
    config: TrainConfig,
    handed_over: list,
    resume_from: tuple[Path | None, list] = (None, []),
    base_reference: bool = False,
) -> TrainState:
    """The state of a run of ``train`` on a policy prepared for it (``prepare.py``) and its checked data
    (``examples.training_data``). ``handed_over`` holds the reference model (or None), which this function takes out
    and lets go once its log-probs are computed; ``resume_from`` is ``check_output_dir``'s answer;
    ``base_reference``: the reference is the PEFT policy with its adapter disabled."""
    ref_model = handed_over.pop()
    checkpoint, skipped = resume_from
    device = choose_device(config.device)
    rank, world_size, owns_group = init_distributed(device)
    dtype = autocast_dtype(config.precision, device)
    _seed_everything(config.seed)
    epoch_steps = steps_per_epoch(len(data.examples), config.batch_size, world_size * config.grad_accum_steps)
    total_steps = min(config.epochs * epoch_steps, config.max_steps or math.inf)
    if config.output_dir is not None and rank == 0:
        claim_output_dir(config, resuming=checkpoint is not None)

    model.to(device)
    policy = policy_module(model, config, data.examples)
    if world_size > 1:  # DDP broadcasts rank 0's weights, so every process also starts from the same reference
        policy = DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)
    ref_logps, eval_ref_logps = _reference_logps(
        model, ref_model, data.examples, data.eval_examples, tokenizer, config, device, rank, world_size, base_reference
    )
    del ref_model  # the reference's work is done; training never runs it
    evaluation = None
    if data.eval_examples is not None:
        due = evaluation_steps(config, total_steps, epoch_steps)
        evaluation = Evaluation(data.eval_examples, objective(config, eval_ref_logps.to(device), {}), due)

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],  # all of them, or a PEFT model's adapter
        lr=config.learning_rate,
        betas=config.adam_betas,
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
        fused=fused_adamw(model, device) if config.speedups.fused_optimizer else None,
    )
    scheduler = learning_rate_schedule(optimizer, config, total_steps)
    example_params = {k: v.to(device) for k, v in data.example_params.items()}
    state = TrainState(
        model=model,
        policy=policy,
        tokenizer=tokenizer,
        examples=data.examples,
        collate=_collator(config, tokenizer.pad_token_id or 0),
        config=config,
        objective=objective(config, ref_logps.to(device), example_params),
        optimizer=optimizer,
        scheduler=scheduler,
        steps_per_epoch=epoch_steps,
        total_steps=total_steps,
        device=device,
        autocast_dtype=dtype,
        rank=rank,
        world_size=world_size,
        owns_group=owns_group,
        evaluation=evaluation,
        data_hash=data.data_hash,
        skipped=skipped,
    )
    if checkpoint is not None:
        state.start_step, state.history, state.eval_history = resume(
            checkpoint, skipped, model, optimizer, scheduler, rank, device
        )
    return state

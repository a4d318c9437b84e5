"""The training loop: one explicit loop for the DPO family, SFT and KL-SFT.

    precompute log pi_ref(y_w|x), log pi_ref(y_l|x) for every pair, once          (reference.py)
    for step in 1..T:
        batch  <- the step's B pairs, in a seeded per-epoch order, split over processes and micro-batches
        log pi_theta(y_w|x), log pi_theta(y_l|x) <- one forward over the 2B concatenated rows    (eq. 6.1)
        losses <- sum_k w_k LOSSES[loss_k](policy logps, reference logps; beta, ...)   (eq. 4.2 for DPO)
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
global batch. LoRA: ``TrainConfig(peft_config=...)`` (``adapters.py``).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..data.collate import PreferenceCollator, completion_parts, n_completions
from ..data.formats import row_format
from ..data.packing import PackedPreferenceCollator
from ..data.tokenize import tokenize_preferences
from ..logprobs import concatenated_logps, packed_logps, sequence_logps
from ..losses import LossOutput, weighted_loss
from ..files import atomic_write_text, portable_text, remove_leftovers
from ..schedules import warmup_cosine
from .adapters import adapter_added
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
from .config import WARMUP_COSINE, TrainConfig, loss_parameters
from .listwise import ListwiseObjective, ListwisePolicy, as_rankings, training_rows
from .reference import examples_hash, precompute_reference_list_logps, score_completions
from .speedups import fused_adamw, native_bf16, speedups_applied

__all__ = [
    "train",
    "TrainResult",
    "NonFiniteError",
    "warmup_cosine",
    "epoch_order",
    "training_examples",
    "METRICS",
    "EVAL_METRICS",
    "check_device",
    "check_eval_data",
    "check_output_dir",
    "RUN_MARKER",
]

log = logging.getLogger(__name__)

# The losses that never look at the rejected completion: its log-prob is computed without gradient, for metrics.
CHOSEN_ONLY_LOSSES = frozenset({"sft", "kl_sft"})
# Per-step metrics, TRL's names first; history.csv has these columns in this order (rankings: listwise_metrics(K)).
METRICS = (
    "step",
    "epoch",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "learning_rate",
    "grad_norm",
)
_SUMMED = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
# TRL's evaluation metrics of pairs, one row per evaluation: the step rows' metrics on eval_data, prefixed "eval_" as
# TRL logs them (rankings: "eval_" and the listwise metrics, listwise.py).
EVAL_METRICS = ("step", "epoch", *(f"eval_{name}" for name in _SUMMED))
# Config fields that may change between a run and its resumption (how, not what: the numbers agree to float
# tolerance with packing on or off).
_RESUMABLE_CHANGES = {
    "resume",
    "progress",
    "save_steps",
    "save_total_limit",
    "ref_cache_dir",
    "use_ref_cache",
    "output_dir",
    "overwrite",
    "packing",
    "packed_row_tokens",
    "fuse_activations",
    "fused_optimizer",
    "inplace_tied_embedding_grad",
    "recompute_layer_norms",
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


# Names a folder as a dpolab.train run folder, of this checkpoint layout; written before anything else in it.
RUN_MARKER = "dpolab_run.json"
# What a run writes in its folder besides checkpoints: cleared when a run starts over (overwrite=True).
_RUN_OUTPUTS = ("history.json", "history.csv", "config.json", "model_info.json", "model")


class NonFiniteError(FloatingPointError):
    """A NaN or inf loss, log-prob or gradient; names the optimizer step (1-based) and the examples."""

    def __init__(self, step: int, what: str, indices: Sequence[int], batch: Sequence[int]):
        self.step, self.indices = step, list(indices)
        super().__init__(
            f"step {step}: {what} is not finite (NaN or inf) for examples {self.indices} "
            f"(dataset indices; the step's batch held {list(batch)}); the last checkpoint is untouched"
        )


@dataclass
class TrainResult:
    model: torch.nn.Module  # the trained policy: the object passed in, trained in place (peft_config: its PeftModel)
    history: list[dict[str, float]]  # one row of METRICS (rankings: listwise_metrics(K)) per optimizer step, from 1
    resumed_from_step: int | None = None  # the checkpoint step this run continued from, if any
    output_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # steps_per_epoch, total_steps, world_size
    eval_history: list[dict[str, float]] = field(default_factory=list)  # one row of EVAL_METRICS per evaluation


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


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the n training pairs in ``epoch``: a permutation that depends on (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _steps_per_epoch(n: int, batch_size: int, min_batch: int) -> int:
    """Full batches, plus the last partial one if each process's micro-batch gets at least one pair."""
    full, rest = divmod(n, batch_size)
    steps = full + (rest >= min_batch)
    if steps == 0:
        raise ValueError(f"{n} training pairs cannot fill one batch of {min_batch} (processes x grad_accum_steps)")
    return steps


class _PolicyLogps(torch.nn.Module):
    """batch -> (policy_chosen_logps, policy_rejected_logps): the module DDP wraps, so its forward syncs gradients."""

    def __init__(self, model: torch.nn.Module, reduction: str, chosen_only: bool):
        super().__init__()
        self.model, self.reduction, self.chosen_only = model, reduction, chosen_only

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "score_index" in batch:  # shared-prefix packed (dpolab.data.packing): one forward, prompt once
            return packed_logps(self.model, batch, reduction=self.reduction)
        if not self.chosen_only:
            return concatenated_logps(self.model, batch, reduction=self.reduction)  # one forward, 2B rows
        b = batch["input_ids"].shape[0] // 2
        chosen, rejected = ({k: v[rows] for k, v in batch.items()} for rows in (slice(None, b), slice(b, None)))
        policy_chosen_logps = sequence_logps(self.model, **chosen, reduction=self.reduction)
        with torch.no_grad():  # the loss ignores it; the metrics report it
            policy_rejected_logps = sequence_logps(self.model, **rejected, reduction=self.reduction)
        return policy_chosen_logps, policy_rejected_logps


class _PairwiseObjective:
    """One micro-batch of pairs: its loss (B,) and the sums of its metrics (``summed``, TRL's names), against the
    precomputed reference log-probs (N,) of the chosen and rejected completions, indexed by dataset index."""

    columns, summed = METRICS, _SUMMED

    def __init__(self, config: TrainConfig, ref_chosen_logps, ref_rejected_logps, example_params):
        self.config, self.example_params = config, example_params
        self.ref_chosen_logps, self.ref_rejected_logps = ref_chosen_logps, ref_rejected_logps
        self.loss_kwargs = {"beta": config.beta, **config.loss_kwargs}

    def __call__(self, step: int, logps, rows: np.ndarray, batch_indices: np.ndarray):
        policy_chosen_logps, policy_rejected_logps = logps[0].float(), logps[1].float()
        _check_finite(step, "log pi_theta(y_w|x)", policy_chosen_logps, rows, batch_indices)
        _check_finite(step, "log pi_theta(y_l|x)", policy_rejected_logps, rows, batch_indices)
        idx = torch.as_tensor(rows, device=policy_chosen_logps.device)
        out: LossOutput = weighted_loss(
            self.config.losses,
            self.config.weights,
            policy_chosen_logps,
            policy_rejected_logps,
            self.ref_chosen_logps[idx],
            self.ref_rejected_logps[idx],
            **self.loss_kwargs,
            **{k: v[idx] for k, v in self.example_params.items()},
        )
        _check_finite(step, "the loss", out.losses, rows, batch_indices)
        with torch.no_grad():
            margins = out.chosen_rewards - out.rejected_rewards
            stats = torch.stack(
                [
                    t.double().sum()
                    for t in (
                        out.losses,
                        out.chosen_rewards,
                        out.rejected_rewards,
                        margins,
                        (margins > 0).double(),
                        policy_chosen_logps,
                        policy_rejected_logps,
                    )
                ]
            )
        return out.losses, stats

    @staticmethod
    def postfix(row: dict[str, float]) -> dict[str, str]:
        """The progress bar's live metrics."""
        return {"margin": f"{row['rewards/margins']:.3f}", "acc": f"{row['rewards/accuracies']:.2f}"}


def _init_distributed(config: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, we_initialised_the_group). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = config.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(kind, local_rank) if kind == "cuda" else torch.device(kind)
    if kind == "cuda":
        torch.cuda.set_device(device)
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo")
        owns_group = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device, owns_group


def _autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for precision="bf16" (where the device has native bf16) and for "auto" on CUDA; else fp32."""
    if config.precision == "bf16" and not native_bf16(device):
        raise ValueError(
            f"precision='bf16' needs native bf16 (a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX); "
            f"{device} has none"
        )
    auto = config.precision == "auto" and device.type == "cuda" and native_bf16(device)
    return torch.bfloat16 if config.precision == "bf16" or auto else None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def _dropout_disabled(model: torch.nn.Module, disable: bool):
    """Every nn.Dropout's p set to 0 inside the block (as TRL does), its own p back afterwards."""
    dropouts = [(module, module.p) for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    for module, _ in dropouts if disable else ():
        module.p = 0.0
    try:
        yield
    finally:
        for module, p in dropouts:
            module.p = p


def _checkpointing_on(model: torch.nn.Module) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


@contextlib.contextmanager
def _gradient_checkpointing(model: torch.nn.Module, enable: bool):
    """transformers' activation checkpointing (non-reentrant) inside the block, where asked and not already on;
    switched off again afterwards, with the input-embedding hook transformers adds for it."""
    if not enable or _checkpointing_on(model):
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"gradient_checkpointing: {type(model).__name__} does not support it (transformers' "
            "supports_gradient_checkpointing is False); train with gradient_checkpointing=False"
        )
    hooked = bool(getattr(model, "_require_grads_hooks", None))
    enable_checkpointing = getattr(model, "activation_checkpointing_enable", None)  # gradient_checkpointing_enable's
    # current name in transformers (the old one is its deprecated alias)
    if enable_checkpointing is not None:
        enable_checkpointing(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
        if not hooked and hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()


def _context_length(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _max_length(config: TrainConfig, model: torch.nn.Module | None) -> int | None:
    """The tokens kept per sequence: ``config.max_length`` within the model's context. TRL's default of 1024 is cut to
    a shorter context; any other value above it is an error (positions past the context do not exist)."""
    context = _context_length(model) if model is not None else None
    if config.max_length is None or context is None or config.max_length <= context:
        return config.max_length or context
    if config.max_length == TrainConfig().max_length:
        return context
    raise ValueError(
        f"max_length {config.max_length} exceeds the model's context of {context} positions: pass max_length <= "
        f"{context} (--max-length {context})"
    )


def training_examples(
    train_data, tokenizer, config: TrainConfig, model: torch.nn.Module | None = None, source: str = "train_data"
) -> list[dict]:
    """The token ids ``train`` trains on (and evaluates on, for eval_data): TRL's tokenization and truncation
    (``dpolab.data.tokenize``) with the config's ``max_length`` (within the model's context, ``_max_length``),
    ``truncation_mode`` and ``max_prompt_length``; rankings as ``listwise.training_rows`` and ``as_rankings`` take
    them."""
    examples = tokenize_preferences(
        training_rows(train_data, config, source),
        tokenizer,
        source=source,
        max_length=_max_length(config, model),
        truncation_mode=config.truncation_mode,
        max_prompt_length=config.max_prompt_length,
    )
    return as_rankings(examples) if config.listwise else examples


def _check_vocabulary(examples, model: torch.nn.Module) -> None:
    """Every token id must have a row in the model's input embedding (else torch fails with an IndexError)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None:
        return
    top = max(
        (max(ids) for e in examples for ids in (e["prompt_ids"], *(i for p in completion_parts(e) for i in p)) if ids),
        default=-1,
    )
    if top >= rows:
        raise ValueError(
            f"the tokenizer gives token id {top}, but the model's embedding has {rows} rows: the tokenizer is not the "
            "model's own; load the tokenizer saved with the model"
        )


def _example_loss_kwargs(given, n: int, loss: str, fixed: dict, device) -> dict[str, torch.Tensor]:
    """Per-example loss parameters (e.g. ODPO's offsets), one value per pair by dataset index, as (N,) tensors."""
    accepted = loss_parameters(loss)
    out = {}
    for key, values in (given or {}).items():
        if key not in accepted or key in fixed:
            raise ValueError(
                f"example_loss_kwargs: {loss} takes {accepted} and loss_kwargs already sets "
                f"{sorted(fixed)}; got {key!r}"
            )
        t = torch.as_tensor(np.asarray(values, dtype=np.float32))
        if t.shape != (n,):
            raise ValueError(
                f"example_loss_kwargs[{key!r}] must hold one value per pair ({n}), got shape {tuple(t.shape)}"
            )
        bad = (~torch.isfinite(t)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"example_loss_kwargs[{key!r}] is not finite for examples {bad[:10]}")
        out[key] = t.to(device)
    return out


def _fingerprint(examples, example_params: dict[str, torch.Tensor]) -> str:
    """What a checkpoint must be resumed on: the token ids and the per-example loss parameters."""
    digest = hashlib.sha256(examples_hash(examples).encode())
    for key, t in sorted(example_params.items()):
        digest.update(key.encode() + t.cpu().numpy().tobytes())
    return digest.hexdigest()


def _check_finite(step: int, what: str, values: torch.Tensor, rows: np.ndarray, batch: np.ndarray) -> None:
    bad = ~torch.isfinite(values.detach())
    if bad.any():
        raise NonFiniteError(step, what, rows[bad.cpu().numpy()].tolist(), batch.tolist())


def _write_history(output_dir: str, history: list[dict[str, float]], eval_history: Sequence[dict] = ()) -> None:
    """history.json: the rows in TRL's ``log_history`` layout, each step's row (METRICS, or a ranking run's
    listwise_metrics(K)) followed, where the policy was evaluated, by its eval row (EVAL_METRICS; eval_on_start's at
    step 0 first); without evaluation, the step rows alone. history.csv: one line per step, the step rows' columns,
    then the eval_ columns when there are evaluations (empty cells where none ran; eval_on_start's line has only
    step, epoch and the eval_ columns)."""
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


def check_device(config: TrainConfig) -> None:
    """Refuse a device this machine does not have (before any model loads): ValueError saying what to pass."""
    if config.device == "cuda" and not torch.cuda.is_available():
        why = "sees no CUDA device" if torch.backends.cuda.is_built() else "is a build without CUDA"
        raise ValueError(
            f"device 'cuda' is not available: this torch {torch.__version__} {why}; pass --device cpu "
            "(device='cpu') or --device auto"
        )
    if config.device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' is not available on this machine; pass --device cpu (device='cpu') or auto")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.device == "cuda" and local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {local_rank} has no CUDA device (this machine has {torch.cuda.device_count()}): "
            "launch at most that many processes per node"
        )


def _first_row(rows):
    """The first row of an indexable dataset (a datasets.Dataset, a list), else None (an iterator is not consumed)."""
    indexable = hasattr(rows, "__getitem__") and hasattr(rows, "__len__") and not isinstance(rows, (str, bytes))
    return rows[0] if indexable and len(rows) else None


def check_eval_data(
    config: TrainConfig,
    train_data,
    eval_data,
    example_loss_kwargs=None,
    names: tuple[str, str] = ("train_data", "eval_data"),
) -> None:
    """Refuse, before any work, an evaluation that cannot be what it says: eval settings without eval_data, eval_data
    that ``eval_strategy='no'`` would leave unused, per-example loss parameters (the eval pairs have none), no eval
    rows, or eval rows in another of TRL's formats than the training rows (their tokens would not be comparable).
    ``names`` name the two data sets in the messages (``dpolab train`` passes its options)."""
    train_name, eval_name = names
    asked = config.eval_strategy in ("steps", "epoch") or config.eval_steps is not None or config.eval_on_start
    if eval_data is None:
        if asked:
            raise ValueError(
                "eval_strategy, eval_steps or eval_on_start asks for evaluation, but no eval data was given: pass "
                "eval_data= (dpolab train --eval-data FILE), or unset them"
            )
        return
    if config.eval_strategy == "no":
        raise ValueError(
            f"{eval_name} is given but eval_strategy='no' evaluates nothing: leave eval_strategy None (each epoch) or "
            "set 'steps' with eval_steps, or do not pass it"
        )
    if example_loss_kwargs:
        raise ValueError(
            f"{eval_name} with example_loss_kwargs: the eval pairs have no per-example loss parameters "
            f"({', '.join(example_loss_kwargs)}); train without eval data and evaluate the trained model afterwards"
        )
    first_eval, first_train = _first_row(eval_data), _first_row(train_data)
    if hasattr(eval_data, "__len__") and len(eval_data) == 0:
        raise ValueError(f"{eval_name} has no rows: give at least one preference pair, or no eval data")
    if isinstance(first_eval, Mapping) and isinstance(first_train, Mapping):
        if row_format(first_eval) != row_format(first_train):
            raise ValueError(
                f"{eval_name} is in the {row_format(first_eval)} format, {train_name} in the {row_format(first_train)} "
                f"format: give the eval rows in the training rows' format (TRL's formats, dpolab.data.formats), so "
                "that they are tokenized alike"
            )


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
    as_json = lambda c: json.loads(json.dumps(c.to_dict(), default=str))  # noqa: E731
    saved = {**as_json(TrainConfig()), **read_manifest(path).get("config", {})}  # newer fields: their defaults
    changed = {
        k: (saved.get(k), v) for k, v in as_json(config).items() if k not in _RESUMABLE_CHANGES and saved.get(k) != v
    }
    if changed:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"cannot resume {path}: the config changed ({listed}); resume with the settings it was made with, or "
            "choose another output_dir"
        )
    return path, skipped


def _marker_layout(folder: Path):
    try:
        return json.loads((folder / RUN_MARKER).read_text()).get("layout")
    except (OSError, ValueError, AttributeError):
        return "unknown (its marker is damaged)"


def _check_resumed_data(path: Path | None, data_hash: str) -> None:
    if path is not None and read_manifest(path).get("data_hash") != data_hash:
        raise ValueError(
            f"cannot resume {path}: the training data (or the tokenizer, max_length, per-example loss parameters) "
            "differ from the run's; resume with the same data, or choose another output_dir"
        )


def _claim_output_dir(config: TrainConfig, resuming: bool) -> None:
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


def _resume(path: Path, skipped, model, optimizer, scheduler, rank: int, device) -> tuple[int, list, list]:
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


def _save(config, step, model, optimizer, scheduler, history, eval_history, data_hash, rank, world_size) -> None:
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
        _write_history(config.output_dir, history, eval_history)
    if world_size > 1:
        dist.barrier()


class _TensorBoard:
    """``report_to="tensorboard"``: each history row as TensorBoard scalars at its step, under TRL's names as
    transformers' TensorBoardCallback writes them (``train/loss``, ``train/rewards/chosen``, ...; an eval row's
    ``eval_loss`` as ``eval/loss``, ...), through ``torch.utils.tensorboard.SummaryWriter`` on
    ``$TENSORBOARD_LOGGING_DIR`` (transformers' variable) or ``output_dir/runs``. The writer (and its event file) comes
    with the first row, on rank 0 only."""

    def __init__(self, config: TrainConfig, on_step: Callable[[dict[str, float]], None] | None):
        self.log_dir = os.path.expanduser(os.environ.get("TENSORBOARD_LOGGING_DIR") or Path(config.output_dir) / "runs")
        self.on_step, self.writer = on_step, None

    def _scalars(self, row: dict[str, float], tags: dict[str, str]) -> None:
        """Write ``row[name]`` as ``tag`` at ``row["step"]`` for each name -> tag (rank 0)."""
        if (not dist.is_initialized() or dist.get_rank() == 0) and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir)
        if self.writer is not None:
            for name, tag in tags.items():
                self.writer.add_scalar(tag, row[name], row["step"])
            self.writer.flush()

    def __call__(self, row: dict[str, float]) -> None:
        self._scalars(row, {name: f"train/{name}" for name in list(row)[1:]})  # every column but the step
        if self.on_step is not None:
            self.on_step(row)

    def evaluation(self, row: dict[str, float]) -> None:
        self._scalars(row, {name: "eval/" + name.removeprefix("eval_") for name in list(row)[2:]})  # not step, epoch

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
    dropout, speed-ups (``speedups.py``) and gradient checkpointing hold while ``train`` runs and are undone when it
    returns or raises, so only its weights (and their device) change. ``config.report_to="tensorboard"`` also writes
    each history row as TensorBoard scalars (``TrainConfig.report_to``).

    LoRA: with ``config.peft_config``, the model is wrapped by peft's ``get_peft_model`` (its adapter layers put into
    it in place and its own weights frozen, as TRL does) and ``TrainResult.model`` is that PeftModel; only the
    adapter trains, and the reference is the base model with the adapter disabled (unless ``ref_model`` is given).
    If ``train`` raises, the adapter is taken out again. A model that already is a PeftModel trains its adapter; its
    reference is the model as given (``adapters.py``).

    Whatever can refuse the run is checked before any work: the device, the output folder and the checkpoint to
    resume (:func:`check_output_dir`), max_length against the model's context, the tokenizer against the
    embedding, the data against the resumed run's, the eval data (:func:`check_eval_data`), the PEFT config against
    the model.
    """
    check_device(config)
    resume = check_output_dir(config)
    _max_length(config, model)
    check_eval_data(config, train_data, eval_data, example_loss_kwargs)
    base_reference = config.peft_config is not None and ref_model is None  # the reference: the adapter disabled
    if config.peft_config is None and not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"no parameter of {type(model).__name__} requires a gradient: nothing would train (a PeftModel loaded "
            "without is_trainable=True?); set requires_grad on the weights to train"
        )
    if config.report_to == "tensorboard":
        on_step = _TensorBoard(config, on_step)
    with contextlib.ExitStack() as restore:
        if config.peft_config is not None:  # kept when train returns: the trained adapter is in it
            model = restore.enter_context(adapter_added(model, config.peft_config))
        restore.enter_context(_dropout_disabled(model, config.disable_dropout))
        restore.enter_context(
            speedups_applied(
                model,
                activations=config.fuse_activations,  # the same functions in fused kernels
                tied_embedding_grad=config.inplace_tied_embedding_grad,  # a plain lookup under DDP
                layer_norms=config.recompute_layer_norms,
            )
        )
        restore.enter_context(_gradient_checkpointing(model, config.gradient_checkpointing))
        if isinstance(on_step, _TensorBoard):
            restore.callback(on_step.close)
        handed_over = [ref_model]  # this frame keeps no reference to it: _train frees it once its log-probs are in
        del ref_model
        return _train(
            model,
            tokenizer,
            train_data,
            config,
            handed_over,
            example_loss_kwargs,
            on_step,
            resume,
            eval_data=eval_data,
            base_reference=base_reference,
        )


def _objective(config: TrainConfig, ref_logps: torch.Tensor, example_params: dict[str, torch.Tensor]):
    """The loss and metrics of one micro-batch against reference log-probs ``ref_logps`` (N, K): pairs' or rankings'."""
    if config.listwise:
        return ListwiseObjective(config, ref_logps, _check_finite)
    return _PairwiseObjective(config, ref_logps[:, 0], ref_logps[:, 1], example_params)


def _evaluation_steps(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], bool]:
    """Whether to evaluate after optimizer step s, as TRL's eval_strategy decides: "steps", every eval_steps steps
    (a fraction: of total_steps, rounded up); "epoch", at each epoch's end and at the last step (max_steps may end an
    epoch early). The default (None) is "steps" when eval_steps is set, else "epoch"."""
    strategy = config.eval_strategy or ("steps" if config.eval_steps is not None else "epoch")
    if strategy == "steps":
        every = config.eval_steps if isinstance(config.eval_steps, int) else math.ceil(total_steps * config.eval_steps)
        return lambda step: step % every == 0
    if strategy == "epoch":
        return lambda step: step % steps_per_epoch == 0 or step == total_steps
    return lambda step: False


def _evaluate(model, examples, objective, tokenizer, config: TrainConfig, step: int, epoch: float, **scoring):
    """TRL's eval_ metrics after optimizer step ``step``: the step rows' loss, rewards and log-probs of the policy on
    the eval examples (``objective``, against their reference log-probs, precomputed once), each the mean over all of
    them. The policy is scored without gradients in eval mode (``score_completions``: no random numbers are drawn, so
    training continues as without evaluation). TRL averages each eval batch, then the batches: the same numbers when
    the batches are of one size. ``scoring``: score_completions' device, precision and process arguments."""
    logps = score_completions(  # (K, N)
        model,
        examples,
        tokenizer,
        batch_size=2 * config.batch_size,
        reduction=config.reduction,
        packing=config.packing,
        **scoring,
    )
    everything = np.arange(len(examples))
    _, stats = objective(step, logps.t() if config.listwise else logps, everything, everything)
    means = (stats / len(examples)).tolist()
    return {"step": step, "epoch": epoch, **{f"eval_{name}": value for name, value in zip(objective.summed, means)}}


def _train(
    model,
    tokenizer,
    train_data,
    config: TrainConfig,
    handed_over: list,
    example_loss_kwargs,
    on_step,
    resume,
    eval_data=None,
    base_reference: bool = False,
):
    """``train`` on a policy prepared for it (dropout off, speed-ups, gradient checkpointing); ``handed_over`` holds
    the reference model (or None), which this function takes out; ``resume`` is check_output_dir's answer;
    ``base_reference``: the reference is the PEFT policy with its adapter disabled."""
    ref_model = handed_over.pop()
    resume_from, skipped = resume
    rank, world_size, device, owns_group = _init_distributed(config)
    autocast_dtype = _autocast_dtype(config, device)
    _seed_everything(config.seed)
    examples = training_examples(train_data, tokenizer, config, model)
    _check_vocabulary(examples, model)
    eval_examples = None
    if eval_data is not None:
        eval_examples = training_examples(eval_data, tokenizer, config, model, source="eval_data")
        _check_vocabulary(eval_examples, model)
    n = len(examples)
    pad = tokenizer.pad_token_id or 0
    chosen_only = all(name in CHOSEN_ONLY_LOSSES for name in config.losses)  # never a listwise loss
    if config.packing and not chosen_only:  # SFT: the chosen rows alone carry gradients
        collate = PackedPreferenceCollator(
            pad, row_tokens=config.packed_row_tokens, pad_to_multiple_of=config.pad_to_multiple_of
        )
    else:
        collate = PreferenceCollator(pad_token_id=pad, pad_to_multiple_of=config.pad_to_multiple_of)
    steps_per_epoch = _steps_per_epoch(n, config.batch_size, world_size * config.grad_accum_steps)
    total_steps = min(config.epochs * steps_per_epoch, config.max_steps or math.inf)

    example_params = _example_loss_kwargs(example_loss_kwargs, n, config.loss, config.loss_kwargs, device)
    data_hash = _fingerprint(examples, example_params)
    _check_resumed_data(resume_from, data_hash)
    if config.output_dir is not None and rank == 0:
        _claim_output_dir(config, resuming=resume_from is not None)
    model.to(device)
    if config.listwise:
        policy = ListwisePolicy(model, config.reduction, n_completions(examples))
    else:
        policy = _PolicyLogps(model, config.reduction, chosen_only=chosen_only)
    if world_size > 1:  # DDP broadcasts rank 0's weights, so every process also starts from the same reference
        policy = DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)
    ref_device = None if ref_model is None else next(ref_model.parameters()).device
    reference = model if ref_model is None else ref_model.to(device)
    reference_logps = functools.partial(  # (N, K): (chosen, rejected) for pairs
        precompute_reference_list_logps,
        reference,
        tokenizer=tokenizer,
        batch_size=2 * config.batch_size,
        device=device,
        autocast_dtype=autocast_dtype,
        reduction=config.reduction,
        cache_dir=config.ref_cache_dir,
        use_cache=config.use_ref_cache,
        rank=rank,
        world_size=world_size,
        packing=config.packing,
        cache_note="adapter disabled" if base_reference else None,
    )
    with model.disable_adapter() if base_reference else contextlib.nullcontext():  # pi_ref: the base model
        ref_logps = reference_logps(examples)
        eval_ref_logps = None if eval_examples is None else reference_logps(eval_examples)
    if ref_model is not None and ref_model is not model:  # the caller's reference goes back where it was
        ref_model.to(ref_device)
    del reference, ref_model, reference_logps  # the reference's work is done; training never runs it
    objective = _objective(config, ref_logps.to(device), example_params)
    eval_objective = None if eval_examples is None else _objective(config, eval_ref_logps.to(device), {})

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],  # all of them, or a PEFT model's adapter
        lr=config.learning_rate,
        betas=config.adam_betas,
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
        fused=fused_adamw(model, device) if config.fused_optimizer else None,
    )
    scheduler = learning_rate_schedule(optimizer, config, total_steps)
    start_step, history, eval_history = 0, [], []
    if resume_from is not None:
        start_step, history, eval_history = _resume(resume_from, skipped, model, optimizer, scheduler, rank, device)
    evaluates_at = _evaluation_steps(config, total_steps, steps_per_epoch)
    scoring = {"device": device, "autocast_dtype": autocast_dtype, "rank": rank, "world_size": world_size}
    shown_eval: dict[str, str] = {}  # the last evaluation's loss, on the progress bar

    def evaluation(step: int) -> None:
        row = _evaluate(
            model, eval_examples, eval_objective, tokenizer, config, step, step / steps_per_epoch, **scoring
        )
        eval_history.append(row)
        if isinstance(on_step, _TensorBoard):
            on_step.evaluation(row)
        shown_eval.update(eval_loss=f"{row['eval_loss']:.4f}")

    max_norm = config.max_grad_norm or math.inf
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="+".join(config.losses),
        unit="step",
        dynamic_ncols=True,
        disable=not config.progress or rank != 0,
    )
    if eval_examples is not None and config.eval_on_start and start_step == 0:
        evaluation(0)
    model.train()
    for step in range(start_step + 1, total_steps + 1):  # step = optimizer steps taken after this one, as TRL logs
        epoch, position = divmod(step - 1, steps_per_epoch)
        batch_indices = epoch_order(config.seed, epoch, n)[
            position * config.batch_size : (position + 1) * config.batch_size
        ]
        micro_batches = np.array_split(batch_indices[rank::world_size], config.grad_accum_steps)
        scale = world_size / len(batch_indices)  # DDP averages over processes: the result is the global-batch mean
        sums = torch.zeros(len(objective.summed), dtype=torch.float64, device=device)
        learning_rate = optimizer.param_groups[0]["lr"]
        for i, rows in enumerate(micro_batches):
            batch = {k: v.to(device) for k, v in collate([examples[j] for j in rows]).items() if k != "index"}
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last or world_size == 1 else policy.no_sync():
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logps = policy(batch)
                losses, stats = objective(step, logps, rows, batch_indices)
                (losses.sum() * scale).backward()
            sums += stats
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # the norm before clipping
        if not torch.isfinite(grad_norm):
            raise NonFiniteError(step, f"the gradient (norm {grad_norm.item()})", batch_indices.tolist(), batch_indices)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world_size > 1:
            dist.all_reduce(sums)
        row = {
            "step": step,
            "epoch": step / steps_per_epoch,
            **dict(zip(objective.summed, (sums / len(batch_indices)).tolist())),
            "learning_rate": learning_rate,
            "grad_norm": grad_norm.item(),
        }
        history.append({k: row[k] for k in objective.columns})
        if on_step is not None:
            on_step(history[-1])
        if eval_examples is not None and evaluates_at(step):
            evaluation(step)
        bar.set_postfix(
            loss=f"{row['loss']:.4f}", **objective.postfix(row), lr=f"{learning_rate:.2e}", **shown_eval, refresh=False
        )
        bar.update(1)
        if config.output_dir is not None and (
            step == total_steps or (config.save_steps and step % config.save_steps == 0)
        ):
            _save(config, step, model, optimizer, scheduler, history, eval_history, data_hash, rank, world_size)
    bar.close()
    if world_size > 1:  # free DDP's reducer while the group is registered: a reducer holding the last reference
        del policy  # to a gloo group runs the group's destructor under the GIL and can deadlock (pytorch#56297)
        gc.collect()
    if owns_group:
        dist.destroy_process_group()
    return TrainResult(
        model,
        history,
        resumed_from_step=start_step or None,
        output_dir=config.output_dir,
        extra={
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "world_size": world_size,
            "skipped_checkpoints": [(p.name, problem) for p, problem in skipped],
        },
        eval_history=eval_history,
    )

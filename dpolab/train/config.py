"""The training configuration: one frozen dataclass, every field commented once, validated on creation.

Defaults are the seed article's hyperparameters (lr 1e-4 with cosine decay to 1e-7, batch 16, 2 epochs,
beta 0.5) and TRL's DPOConfig where the article says nothing (AdamW betas and eps, gradient clipping at 1.0,
dropout disabled, log-probs summed over completion tokens, max_length 1024 with keep_start truncation).
``TrainConfig.from_trl(dpo_config)`` converts a ``trl.DPOConfig`` (``from_trl.py``).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ..data.tokenize import TRUNCATION_MODES
from ..device import DEVICES, PRECISIONS
from ..logprobs import LM_HEADS
from ..losses import LISTWISE_LOSSES, LOSSES, PAIR_EXPANSIONS

__all__ = ["TrainConfig", "Speedups", "loss_parameters", "WARMUP_COSINE", "EVAL_STRATEGIES"]

WARMUP_COSINE = "warmup_cosine"  # dpolab's schedule (the seed article's): warm-up, then cosine to min_learning_rate

_REPORT_TO = ("none", "tensorboard")
EVAL_STRATEGIES = (None, "no", "steps", "epoch")


_LOG_PROB_ARGUMENTS = ("pc", "pr", "rc", "rr", "policy_logps", "ref_logps", "beta")


def _loss_function(name: str):
    """The function of registry loss ``name``, pairwise (``LOSSES``) or listwise (``LISTWISE_LOSSES``)."""
    return LOSSES[name] if name in LOSSES else LISTWISE_LOSSES[name]


def loss_parameters(loss: str | tuple[str, ...]) -> list[str]:
    """The keyword parameters of registry loss ``loss`` (or of several) besides beta (["dpop_lambda"] for dpop)."""
    names = (loss,) if isinstance(loss, str) else loss
    params = (p for name in names for p in inspect.signature(_loss_function(name)).parameters)
    return list(dict.fromkeys(p for p in params if p not in _LOG_PROB_ARGUMENTS))


@dataclass(frozen=True)
class Speedups:
    """How a training step is computed, never what: each switch changes no number beyond float rounding
    (``tests/test_train.py`` trains with each off; ``make bench`` measures what each buys). ``Speedups.none()``
    switches every one off: the plain computation. A speed-up a model cannot take exactly is not applied, and that is
    said once (``speedups.py``, ``dpolab.lm_head``)."""

    packing: bool = True  # pairwise losses: each pair one prompt + chosen + rejected segment in packed rows, the prompt
    # computed once (eq. 6.9 of appendix notebook 12; a ranking: prompt + K completions); off: the padded 2B-row batch
    packed_row_tokens: int = 256  # with packing: target tokens per packed row (dpolab.data.packing)
    lm_head: str = "fused"  # with packing, the LM head's log-probs (dpolab.logprobs.LM_HEADS): "fused", the head and
    # log-softmax as one function, its backward written out (eq. 6.8, linear_log_softmax); "chunked", F.linear and a
    # log-softmax in chunks recomputed in the backward; "compiled", the chunked one through torch.compile. "fused" on
    # every device (on CUDA the three are measured by `make bench DEVICE=cuda`, not yet run)
    fuse_activations: bool = True  # GPT-2's Python GELU -> torch's fused tanh GELU, folded into the MLP's projection
    inplace_tied_embedding_grad: bool = True  # a tied input embedding adds its rows into weight.grad (one process only)
    recompute_layer_norms: bool = True  # GPT-2: the linear after a layer norm computes the norm itself, keeping only
    # the norm's input for the backward
    fused_optimizer: bool = True  # AdamW's fused kernel where torch has it (CPU, CUDA)
    onednn_products: bool = True  # on a CPU, the fp32 products inside dpolab's own autograd functions through
    # oneDNN's kernels (dpolab.matmul); off: torch.backends.mkldnn.enabled = False while train runs

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"speedups.{f.name} must be True or False, got {value!r}")
        _at_least("speedups.packed_row_tokens", self.packed_row_tokens, 1)
        if self.lm_head not in LM_HEADS:
            raise ValueError(f"speedups.lm_head must be one of {LM_HEADS}, got {self.lm_head!r}")

    @classmethod
    def none(cls) -> Speedups:
        """Every speed-up off: padded batches, the chunked LM head, the model's own modules, torch's default AdamW and
        torch's own products."""
        return cls(**{f.name: False for f in fields(cls) if f.type == "bool"}, lm_head="chunked")


@dataclass(frozen=True)
class TrainConfig:
    # --- the objective
    loss: str | tuple[str, ...] = "dpo"  # a key of dpolab.losses.LOSSES: dpo (eq. 4.2 of notebook 04), dpop, ipo,
    # sft, kl_sft, ...; or several keys, whose losses are added (TRL's loss_type list); or of LISTWISE_LOSSES:
    # plackett_luce (eq. 5.2 of notebook 05), trained on rankings (a pair is a ranking of 2)
    loss_weights: tuple[float, ...] | None = None  # with several losses: one weight each (TRL's); None: all 1.0
    beta: float = 0.5  # beta of the KL-constrained objective (eq. 1.1); scales the implicit rewards
    loss_kwargs: dict[str, Any] = field(default_factory=dict)  # the losses' own parameters, e.g. {"dpop_lambda": 5.0}
    reduction: str = "sum"  # log pi(y|x) summed over completion tokens (eq. 6.1); "mean" is per-token (eq. 6.2)
    # --- the optimiser and its schedule
    learning_rate: float = 1e-4  # peak learning rate of AdamW, reached after the warm-up
    lr_scheduler_type: str = WARMUP_COSINE  # warmup_cosine (dpolab's), or a transformers/TRL schedule: linear,
    # cosine, constant, constant_with_warmup, ... (transformers.get_scheduler, as TRL's Trainer builds it)
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments of a transformers schedule
    min_learning_rate: float = 1e-7  # warmup_cosine: the cosine decay ends here, at the last step
    warmup_steps: int | float = 0  # linear warm-up over these steps (warmup_cosine: from learning_rate/warmup_steps;
    # transformers' schedules: from 0); a float in (0, 1): that fraction of the steps, rounded up (TRL's)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay; 0 makes it Adam, as in the seed article
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (beta1, beta2), torch's and TRL's defaults
    adam_epsilon: float = 1e-8  # AdamW's epsilon
    max_grad_norm: float | None = 1.0  # clip the global gradient norm to this (TRL's default); None: no clipping
    # --- the data and the batches
    epochs: int = 2  # passes over the training set
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs when smaller)
    batch_size: int = 16  # preference pairs per optimizer step, over all processes and accumulation steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step (per process); the global batch is split evenly
    max_length: int | None = 1024  # tokens kept of each sequence prompt + completion (TRL's); None: all. Never more
    # than the model's context (n_positions / max_position_embeddings)
    truncation_mode: str = "keep_start"  # keep_start: the first max_length tokens; keep_end: the last (TRL's modes)
    max_prompt_length: int | None = None  # tokens of the prompt kept (prompt's start cut) before max_length; None:
    # all (not in TRL 1.16)
    pad_to_multiple_of: int | None = None  # pad each batch's length to a multiple of this
    listwise_pairs: str | None = None  # rankings with a pairwise loss: train on each ranking's "adjacent" (K-1) or
    # "all" (K(K-1)/2) pairs (dpolab.losses.ranking_pairs); None: a pairwise loss refuses rankings
    # --- speed-ups that change no number beyond float rounding (Speedups above; `make bench` measures them)
    speedups: Speedups = field(default_factory=Speedups)  # Speedups.none(): every one off (--no-speedups)
    # --- memory
    gradient_checkpointing: bool = False  # TRL's flag: recompute each layer's activations in the backward
    # (transformers' activation checkpointing, non-reentrant), less memory for more time, the same numbers; off by
    # default (TRL: on)
    # --- parameter-efficient fine-tuning (dpolab/train/adapters.py; needs dpolab[peft])
    peft_config: dict[str, Any] | None = None  # a peft config (peft.LoraConfig(r=8, ...)) or its dict: train() wraps
    # the model with get_peft_model, only the adapter trains, the reference is the base model (adapter disabled), as
    # TRL's peft_config; kept as a dict of peft_type, task_type and the non-default fields
    # --- evaluation during training (train(..., eval_data=...)): TRL's eval_ metrics in the history
    eval_strategy: str | None = None  # TRL's: "steps" (every eval_steps), "epoch" (each epoch's end and the last
    # step), "no"; None: "steps" when eval_steps is set, else "epoch"
    eval_steps: int | float | None = None  # evaluate every this many optimizer steps; a float in (0, 1): that
    # fraction of the steps, rounded up (TRL's)
    eval_on_start: bool = False  # evaluate before the first step too (a row at step 0), as TRL's eval_on_start
    seed: int = 0  # seeds the data order and the torch/numpy/python RNGs
    disable_dropout: bool = True  # set every nn.Dropout's p to 0, as TRL does: the reference log-probs have no dropout
    # --- where it runs (dpolab.device decides both)
    device: str = "auto"  # auto (cuda, else mps, else cpu), cpu, cuda, mps; under torchrun, cuda:LOCAL_RANK
    precision: str = "auto"  # auto: bf16 autocast on a CUDA device that supports it, else fp32; fp32; bf16 (autocast;
    # on a CPU too, slow where it has no native bf16: AVX512-BF16 or AMX)
    # --- files
    output_dir: str | None = None  # checkpoints, history.json, history.csv, config.json; None: write nothing
    save_steps: int | None = None  # write a checkpoint every this many steps (and at the end); None: only at the end
    save_total_limit: int = 1  # keep this many most recent checkpoints (2 or more: an older one to fall back on)
    resume: bool = False  # continue from the newest intact checkpoint in output_dir (start fresh if there is none)
    overwrite: bool = False  # write into an output_dir that holds other files or an earlier run's (replaced)
    ref_cache_dir: str | None = None  # reference log-prob cache; None: $DPOLAB_CACHE/ref-logps or ~/.cache/dpolab/...
    use_ref_cache: bool = True  # read/write the reference log-prob cache
    progress: bool = True  # show a tqdm progress bar with ETA and live metrics
    report_to: str = "none"  # "tensorboard": each step's metrics as TensorBoard scalars under TRL's names (train/loss,
    # ...) in output_dir/runs ($TENSORBOARD_LOGGING_DIR overrides, as in transformers); needs dpolab[tensorboard]

    def __post_init__(self):
        object.__setattr__(self, "loss_kwargs", dict(self.loss_kwargs))
        object.__setattr__(self, "lr_scheduler_kwargs", dict(self.lr_scheduler_kwargs))
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        if not isinstance(self.loss, str):
            object.__setattr__(self, "loss", tuple(self.loss))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(self.loss_weights))
        unknown_losses = [name for name in self.losses if name not in LOSSES and name not in LISTWISE_LOSSES]
        if unknown_losses or not self.losses:
            known = ", ".join(sorted(LOSSES | LISTWISE_LOSSES))
            raise ValueError(f"loss: unknown loss {self.loss!r}; known losses: {known}")
        _check_listwise(self.losses, self.listwise_pairs)
        if self.loss_weights is not None and (
            len(self.loss_weights) != len(self.losses) or not all(_finite(w) for w in self.loss_weights)
        ):
            raise ValueError(
                f"loss_weights must be one finite number per loss of {self.losses}, got {self.loss_weights}"
            )
        accepted = loss_parameters(self.losses)
        unknown = sorted(set(self.loss_kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"loss_kwargs: {self.loss} does not take {unknown}; it takes {accepted}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}")
        _check_scheduler(self.lr_scheduler_type)
        _check_loss_kwargs(self.losses, self.loss_kwargs)
        _positive("beta", self.beta)
        _positive("learning_rate", self.learning_rate)
        if not (math.isfinite(self.min_learning_rate) and 0 <= self.min_learning_rate <= self.learning_rate):
            raise ValueError(
                f"min_learning_rate must be in [0, learning_rate={self.learning_rate}], got {self.min_learning_rate}"
            )
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {self.reduction!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        _positive("adam_epsilon", self.adam_epsilon)
        if self.max_grad_norm is not None:
            _positive("max_grad_norm", self.max_grad_norm)
        if isinstance(self.speedups, Mapping):  # as to_dict() writes it
            known = [f.name for f in fields(Speedups)]
            unknown = sorted(set(self.speedups) - set(known))
            if unknown:
                raise ValueError(f"speedups: unknown switches {unknown}; the switches are {known}")
            object.__setattr__(self, "speedups", Speedups(**self.speedups))
        if not isinstance(self.speedups, Speedups):
            raise ValueError(f"speedups must be a dpolab.train.Speedups, got {self.speedups!r}")
        for name in ("epochs", "batch_size", "grad_accum_steps", "save_total_limit"):
            _at_least(name, getattr(self, name), 1)
        if not (isinstance(self.warmup_steps, float) and 0 <= self.warmup_steps < 1):
            _at_least("warmup_steps", self.warmup_steps, 0)
        for name in ("max_steps", "max_length", "max_prompt_length", "pad_to_multiple_of", "save_steps"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        if self.grad_accum_steps > self.batch_size:
            raise ValueError(f"grad_accum_steps ({self.grad_accum_steps}) cannot exceed batch_size ({self.batch_size})")
        if (
            self.max_length is not None
            and self.max_prompt_length is not None
            and self.max_prompt_length >= self.max_length
        ):
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length}) "
                "to leave room for the completion"
            )
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.output_dir is None and (self.save_steps is not None or self.resume or self.overwrite):
            raise ValueError("save_steps, resume and overwrite need an output_dir")
        if self.resume and self.overwrite:
            raise ValueError(
                "resume and overwrite exclude each other: resume continues the run in output_dir, overwrite starts "
                "it over; pass one of them"
            )
        if self.report_to not in _REPORT_TO:
            raise ValueError(f"report_to must be one of {_REPORT_TO}, got {self.report_to!r}")
        if self.report_to == "tensorboard" and self.output_dir is None:
            raise ValueError("report_to='tensorboard' needs an output_dir: its event files go to output_dir/runs")
        if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ValueError(
                "report_to='tensorboard' needs the tensorboard package, which is not installed: "
                "pip install 'dpolab[tensorboard]' (or pip install tensorboard), or report_to='none'"
            )
        if self.peft_config is not None:
            from .adapters import peft_config_dict

            object.__setattr__(self, "peft_config", peft_config_dict(self.peft_config))
        _check_evaluation(self.eval_strategy, self.eval_steps, self.eval_on_start)
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    @property
    def listwise(self) -> bool:
        """Whether the objective is a listwise loss (``LISTWISE_LOSSES``), trained on rankings."""
        return self.losses[0] in LISTWISE_LOSSES

    @property
    def losses(self) -> tuple[str, ...]:
        """The registry losses whose weighted sum is the objective (one, usually)."""
        return (self.loss,) if isinstance(self.loss, str) else self.loss

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per loss of :attr:`losses` (1.0 each unless ``loss_weights`` says otherwise)."""
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.losses)

    @classmethod
    def from_trl(cls, dpo_config, **overrides) -> TrainConfig:
        """The TrainConfig of a ``trl.DPOConfig``: every field dpolab honours is converted, any other field that is
        not at its default is refused by name (``dpolab.train.from_trl``); ``overrides`` set TrainConfig fields."""
        from .from_trl import config_from_trl

        return config_from_trl(cls, dpo_config, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        for key in ("adam_betas", "loss_weights", "loss"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_listwise(losses: tuple[str, ...], listwise_pairs: str | None) -> None:
    """Listwise and pairwise losses do not mix; ``listwise_pairs`` is for a pairwise loss only."""
    listwise = [name for name in losses if name in LISTWISE_LOSSES]
    if listwise and len(listwise) != len(losses):
        raise ValueError(
            f"loss: {list(losses)} mixes listwise {listwise} and pairwise losses: a listwise loss scores rankings, a "
            "pairwise loss pairs; choose one kind"
        )
    if listwise_pairs is not None and listwise_pairs not in PAIR_EXPANSIONS:
        raise ValueError(f"listwise_pairs must be one of {PAIR_EXPANSIONS} or None, got {listwise_pairs!r}")
    if listwise and listwise_pairs is not None:
        raise ValueError(
            f"listwise_pairs={listwise_pairs!r} expands rankings into pairs for a pairwise loss, but {listwise[0]} "
            "trains on the rankings themselves: drop listwise_pairs (--listwise-pairs) or choose a pairwise loss"
        )


def _check_scheduler(name: str) -> None:
    from transformers import SchedulerType

    known = [WARMUP_COSINE, *(t.value for t in SchedulerType)]
    if name not in known:
        raise ValueError(f"lr_scheduler_type must be one of {', '.join(known)}; got {name!r}")


def _check_loss_kwargs(losses: tuple[str, ...], loss_kwargs: dict[str, Any]) -> None:
    """A loss parameter whose default (or annotation) is a number must be given a number, not text."""
    for loss, name, parameter in (
        (one, name, parameter)
        for one in losses
        for name, parameter in inspect.signature(_loss_function(one)).parameters.items()
    ):
        if name not in loss_kwargs:
            continue
        value, default = loss_kwargs[name], parameter.default
        numeric = (isinstance(default, (int, float)) and not isinstance(default, bool)) or (
            default is inspect.Parameter.empty and "float" in str(parameter.annotation)
        )
        if numeric and (isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor))):
            raise ValueError(
                f"loss_kwargs: {loss}'s {name} must be a number, got {value!r} (--loss-param {name}=<number>)"
            )


def _check_evaluation(strategy, steps, on_start: bool) -> None:
    if strategy not in EVAL_STRATEGIES:
        raise ValueError(f"eval_strategy must be one of {EVAL_STRATEGIES}, got {strategy!r}")
    if steps is not None and not (isinstance(steps, float) and 0 < steps < 1):
        _at_least("eval_steps", steps, 1)
    if strategy == "steps" and steps is None:
        raise ValueError("eval_strategy='steps' needs eval_steps: a number of steps, or a fraction of them in (0, 1)")
    if strategy == "no" and (steps is not None or on_start):
        raise ValueError(
            "eval_strategy='no' evaluates nothing, yet eval_steps or eval_on_start is set: leave eval_strategy None "
            "(or 'steps'), or unset them"
        )


def _positive(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _at_least(name: str, value, low: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

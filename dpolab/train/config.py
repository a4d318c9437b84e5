"""The training configuration: one frozen dataclass, every field commented once, validated on creation.

Defaults are the seed article's hyperparameters (lr 1e-4 with cosine decay to 1e-7, batch 16, 2 epochs,
beta 0.5) and TRL's DPOConfig where the article says nothing (AdamW betas and eps, gradient clipping at 1.0,
dropout disabled, log-probs summed over completion tokens).
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..losses import LOSSES

__all__ = ["TrainConfig", "loss_parameters"]

_PRECISIONS = ("auto", "fp32", "bf16")
_DEVICES = ("auto", "cpu", "cuda", "mps")


def loss_parameters(loss: str) -> list[str]:
    """The keyword parameters of registry loss ``loss`` besides beta (e.g. ["dpop_lambda"] for dpop)."""
    return [p for p in inspect.signature(LOSSES[loss]).parameters if p not in ("pc", "pr", "rc", "rr", "beta")]


@dataclass(frozen=True)
class TrainConfig:
    # --- the objective
    loss: str = "dpo"  # a key of dpolab.losses.LOSSES: dpo (eq. 4.2 of notebook 04), dpop, ipo, sft, kl_sft, ...
    beta: float = 0.5  # beta of the KL-constrained objective (eq. 1.1); scales the implicit rewards
    loss_kwargs: dict[str, Any] = field(default_factory=dict)  # the loss's own parameters, e.g. {"dpop_lambda": 5.0}
    reduction: str = "sum"  # log pi(y|x) summed over completion tokens (eq. 6.1); "mean" is per-token (eq. 6.2)
    # --- the optimiser and its schedule
    learning_rate: float = 1e-4  # peak learning rate of AdamW, reached after the warm-up
    min_learning_rate: float = 1e-7  # the cosine decay ends here, at the last step
    warmup_steps: int = 0  # linear warm-up from learning_rate/warmup_steps to learning_rate over these steps
    weight_decay: float = 0.0  # AdamW's decoupled weight decay; 0 makes it Adam, as in the seed article
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (beta1, beta2), torch's and TRL's defaults
    adam_epsilon: float = 1e-8  # AdamW's epsilon
    max_grad_norm: float | None = 1.0  # clip the global gradient norm to this (TRL's default); None: no clipping
    # --- the data and the batches
    epochs: int = 2  # passes over the training set
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs when smaller)
    batch_size: int = 16  # preference pairs per optimizer step, over all processes and accumulation steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step (per process); the global batch is split evenly
    max_length: int | None = (
        None  # tokens of prompt + completion kept (completion's end cut); None: the model's context
    )
    max_prompt_length: int | None = None  # tokens of the prompt kept (prompt's start cut); None: no limit
    pad_to_multiple_of: int | None = None  # pad each batch's length to a multiple of this
    packing: bool = True  # pairwise losses: each pair one prompt+chosen+rejected segment, packed rows (eq. 6.9)
    packed_row_tokens: int = 256  # with packing: target tokens per packed row (dpolab.data.packing)
    # --- speed-ups that change no number beyond float rounding (dpolab/train/speedups.py; `make bench` measures them)
    fuse_activations: bool = True  # GPT-2's Python GELU -> torch's fused tanh GELU, folded into the MLP's projection
    inplace_tied_embedding_grad: bool = True  # a tied input embedding adds its rows into weight.grad (one process only)
    recompute_layer_norms: bool = True  # GPT-2: the linear after a layer norm keeps the norm's input, not its output
    fused_optimizer: bool = True  # AdamW's fused kernel where torch has it (CPU, CUDA)
    seed: int = 0  # seeds the data order and the torch/numpy/python RNGs
    disable_dropout: bool = True  # set every nn.Dropout's p to 0, as TRL does: the reference log-probs have no dropout
    # --- where it runs
    device: str = "auto"  # auto (cuda, else mps, else cpu), cpu, cuda, mps; under torchrun, cuda:LOCAL_RANK
    precision: str = "auto"  # auto: bf16 autocast on CUDA when supported, else fp32; fp32; bf16 (autocast, also on a
    # CPU with native bf16: AVX512-BF16 or AMX)
    # --- files
    output_dir: str | None = None  # checkpoints, history.json, history.csv, config.json; None: write nothing
    save_steps: int | None = None  # write a checkpoint every this many steps (and at the end); None: only at the end
    save_total_limit: int = 1  # keep this many most recent checkpoints (2 or more: an older one to fall back on)
    resume: bool = False  # continue from the newest intact checkpoint in output_dir (start fresh if there is none)
    overwrite: bool = False  # write into an output_dir that holds other files or an earlier run's (replaced)
    ref_cache_dir: str | None = None  # reference log-prob cache; None: $DPOLAB_CACHE/ref-logps or ~/.cache/dpolab/...
    use_ref_cache: bool = True  # read/write the reference log-prob cache
    progress: bool = True  # show a tqdm progress bar with ETA and live metrics

    def __post_init__(self):
        object.__setattr__(self, "loss_kwargs", dict(self.loss_kwargs))
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        if self.loss not in LOSSES:
            raise ValueError(f"loss: unknown loss {self.loss!r}; known losses: {', '.join(sorted(LOSSES))}")
        accepted = loss_parameters(self.loss)
        unknown = sorted(set(self.loss_kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"loss_kwargs: {self.loss} does not take {unknown}; it takes {accepted}")
        _check_loss_kwargs(self.loss, self.loss_kwargs)
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
        for name in ("epochs", "batch_size", "grad_accum_steps", "save_total_limit", "packed_row_tokens"):
            _at_least(name, getattr(self, name), 1)
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
        if self.device not in _DEVICES:
            raise ValueError(f"device must be one of {_DEVICES}, got {self.device!r}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {self.precision!r}")
        if self.output_dir is None and (self.save_steps is not None or self.resume or self.overwrite):
            raise ValueError("save_steps, resume and overwrite need an output_dir")
        if self.resume and self.overwrite:
            raise ValueError(
                "resume and overwrite exclude each other: resume continues the run in output_dir, overwrite starts "
                "it over; pass one of them"
            )
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out


def _check_loss_kwargs(loss: str, loss_kwargs: dict[str, Any]) -> None:
    """A loss parameter whose default (or annotation) is a number must be given a number, not text."""
    for name, parameter in inspect.signature(LOSSES[loss]).parameters.items():
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


def _positive(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _at_least(name: str, value, low: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

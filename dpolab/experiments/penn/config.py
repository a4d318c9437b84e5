"""The experiment's settings: one small frozen dataclass per concern, each field commented once.

Defaults are the article's (seeds/README.md, "Facts about the 001 experiment"): the dpolab methods train with
AdamW at lr 1e-4, cosine decay to 1e-7, batch 16, 2 epochs, beta 0.5, DPOP lambda 5; the TRL baseline uses
DPOConfig's defaults (beta 0.1, TRL's batch size 8, linear decay) with lr 1e-5 and 5 epochs; generation samples
30 new tokens with top-k 30 at temperature 1. Our own choices where the article has none:

- KL-SFT ``kl_coef = 0.05``. The loss -log pi(y_w) + c (log pi(y_w) - log pi_ref(y_w))^2 is stationary where the
  chosen log-ratio is 1/(2c) = 10 nats: the margin at which DPO's loss at beta 0.5 has fallen to
  log(1 + e^-5) = 0.007. So KL-SFT may move the chosen continuation as far as DPO typically does, and no further.
- IPO ``beta = the DPO beta`` (0.5, so the frontier compares the three methods at equal beta) on **per-token mean**
  log-probs, as TRL and the IPO authors do: its target margin h* = 1/(2 beta) = 1 nat per token.
- ODPO offset ``Delta = alpha * max(0, s(y_w) - s(y_l))`` with ``alpha = 5``, where s(y) is the MiniLM cosine of the
  continuation to the phrase "the University of Pennsylvania" (see ``methods.odpo_offsets``). On the Penn set the
  cosine gap has median 0.25 (range -0.12 to 0.75): the median pair must reach an implicit-reward margin of 1.25
  (sigma = 0.78) before its gradient weight falls as DPO's does at 0, the widest gap 3.7; the 3% of pairs whose
  rejected continuation is closer to the phrase get no offset (plain DPO).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ...device import PRECISIONS
from ...eval import SamplingConfig

__all__ = [
    "Hyper",
    "TRLSettings",
    "FrontierConfig",
    "RunConfig",
    "Experiment",
    "QUICK",
    "JUDGES",
    "PRECISIONS",
]

JUDGES = ("offline", "endpoint")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive(name: str, value: float) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class Hyper:
    """Training of the dpolab methods (DPO, DPOP, SFT, KL-SFT, IPO, ODPO): the article's settings."""

    learning_rate: float = 1e-4  # peak AdamW learning rate
    min_learning_rate: float = 1e-7  # end of the cosine decay
    epochs: int = 2  # passes over the training pairs
    batch_size: int = 16  # pairs per optimizer step
    max_steps: int | None = None  # cap on optimizer steps (--quick: 30); None: the epochs decide
    beta: float = 0.5  # beta of DPO, DPOP, ODPO (and of the rewards SFT/KL-SFT report)
    dpop_lambda: float = 5.0  # DPOP's lambda
    kl_coef: float = 0.05  # KL-SFT's coefficient (module docstring)
    ipo_beta: float | None = None  # IPO's beta; None: the same as beta
    ipo_reduction: str = "mean"  # IPO's log-probs: per-token mean (TRL, the IPO authors) or sum
    odpo_alpha: float = 5.0  # ODPO's offset scale (module docstring)
    save_steps: int = 25  # checkpoint every this many steps, so an interrupted training resumes
    precision: str = "auto"  # every trainer, TRL's too: auto = bf16 autocast on a CUDA device that supports it, else
    # fp32 (as dpolab.train resolves it); or fp32, bf16 (on a CPU too: slow where it has no native bf16)

    def __post_init__(self):
        _check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("learning_rate", "beta", "kl_coef", "odpo_alpha"):
            _positive(name, getattr(self, name))
        _check(0 <= self.min_learning_rate <= self.learning_rate, "min-lr must be in [0, lr]")
        _check(self.dpop_lambda >= 0, f"dpop-lambda must be >= 0, got {self.dpop_lambda}")
        for name in ("epochs", "batch_size", "save_steps"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.max_steps is None or self.max_steps >= 1, f"max-steps must be >= 1, got {self.max_steps}")
        if self.ipo_beta is not None:
            _positive("ipo_beta", self.ipo_beta)
        _check(self.ipo_reduction in ("sum", "mean"), f"ipo-reduction must be sum or mean, got {self.ipo_reduction!r}")


@dataclass(frozen=True)
class TRLSettings:
    """The TRL DPOTrainer baseline: DPOConfig's defaults except what the article set (lr 1e-5, 5 epochs) and where
    the reference's log-probs are computed (once, by TRL itself)."""

    beta: float = 0.1  # DPOConfig's default beta
    learning_rate: float = 1e-5  # the article's TRL run
    epochs: int = 5  # the article's TRL run
    batch_size: int = 8  # TrainingArguments' per_device_train_batch_size default
    max_steps: int | None = None  # cap on optimizer steps; None: the epochs decide
    save_steps: int = 25  # checkpoint interval (resume)
    precompute_ref_log_probs: bool = True  # TRL's own option: the frozen reference's log-probs computed once, before
    # training, instead of a reference forward every step; no number changes (dropout is off), a quarter of the time

    def __post_init__(self):
        _positive("trl-beta", self.beta)
        _positive("trl-lr", self.learning_rate)
        _check(self.epochs >= 1 and self.batch_size >= 1 and self.save_steps >= 1, "trl epochs/batch/save >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, f"max-steps must be >= 1, got {self.max_steps}")


@dataclass(frozen=True)
class FrontierConfig:
    """The alignment-vs-KL frontier: alignment accuracy against KL to the reference across beta (first seed only)."""

    betas: tuple[float, ...] = (0.1, 0.5, 1.0)  # empty: no frontier
    methods: tuple[str, ...] = ("dpo", "dpop", "ipo")  # those of --methods among these are swept

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for b in self.betas:
            _positive("each of --betas", b)


@dataclass(frozen=True)
class RunConfig:
    """What runs, on what, and where the files go."""

    model: str = "auto"  # auto, gpt2, smollm2-135m, tiny, a folder or a hub id (dpolab.models.load_model)
    data: str = "penn"  # penn, a .json/.jsonl file, a {"train","test"} dataset or a hub id
    test_data: str | None = None  # the test prompts when --data holds no test split
    methods: tuple[str, ...] = ("trl", "dpo", "dpop", "sft", "kl_sft", "ipo", "odpo")
    seeds: int = 1  # seeds 0..seeds-1: data order, initialisation of nothing (same weights), sampling
    judge: str = "offline"  # offline (dpolab.judge.OfflineJudge) or endpoint (DPOLAB_JUDGE_* env vars)
    output_dir: str = ""  # the run folder (small files only); "": runs/penn-<model loaded>[-quick]
    work_dir: str = ""  # checkpoints and kept weights, never inside the run folder; "" means a cache folder
    quick: bool = False  # the smoke run: tiny model, 30 steps per method, 2 betas
    keep_weights: bool = False  # keep each trained policy (in work_dir/<unit>/model)
    max_test_prompts: int | None = None  # dev only: evaluate on the first N test prompts
    progress: bool = True  # tqdm bars while training

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        _check(self.seeds >= 1, f"seeds must be >= 1, got {self.seeds}")
        _check(self.judge in JUDGES, f"judge must be one of {JUDGES}, got {self.judge!r}")
        _check(bool(self.methods), "give at least one method")


@dataclass(frozen=True)
class Experiment:
    """Everything one run of the experiment needs, as a tree of the dataclasses above."""

    run: RunConfig = field(default_factory=RunConfig)
    hyper: Hyper = field(default_factory=Hyper)
    trl: TRLSettings = field(default_factory=TRLSettings)
    frontier: FrontierConfig = field(default_factory=FrontierConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# What --quick changes (anything given explicitly on the command line wins).
QUICK = {"model": "tiny", "max_steps": 30, "seeds": 1, "betas": (0.1, 0.5)}

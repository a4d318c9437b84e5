"""The methods compared, as one dict ``METHODS`` (name -> spec), and how a dpolab method is trained.

Every method starts from the same weights (a copy of the loaded model), sees the same training pairs in the same
seeded order (dpolab's), and is evaluated with the same sampling seed. What differs is the objective:

| name    | objective                                                                        | log-probs |
| ------- | -------------------------------------------------------------------------------- | --------- |
| trl     | TRL's DPOTrainer, DPOConfig defaults (its own loop; see ``trl_baseline.py``)     | sum       |
| dpo     | -log sigma(beta h)                                                               | sum       |
| dpop    | -log sigma(beta [h - lambda max(0, log pi_ref(y_w) - log pi(y_w))])             | sum       |
| sft     | -log pi(y_w)                                                                     | sum       |
| kl_sft  | -log pi(y_w) + c (log pi(y_w) - log pi_ref(y_w))^2  (the reference's y_w, not y_l) | sum     |
| ipo     | (h - 1/(2 beta))^2                                                               | mean      |
| odpo    | -log sigma(beta h - Delta), Delta = alpha max(0, s(y_w) - s(y_l))                 | sum       |

with h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l). Choices and their reasons: ``config.py``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...files import atomic_write_text, cache_root
from ...train import TrainConfig, train
from .config import Experiment

__all__ = [
    "MethodSpec",
    "METHODS",
    "REFERENCE",
    "Unit",
    "ODPO_ANCHOR",
    "odpo_offsets",
    "odpo_note",
    "unit_settings",
    "train_dpolab",
    "dpolab_config",
    "TrainingInputs",
]

# ODPO's score s(y): the MiniLM cosine of a continuation to this phrase.
ODPO_ANCHOR = "the University of Pennsylvania"


@dataclass(frozen=True)
class MethodSpec:
    label: str  # the name in tables and figures
    about: str  # one line for the report
    trainer: str = "dpolab"  # "dpolab" (dpolab.train) or "trl" (TRL's DPOTrainer)
    loss: str | None = None  # the dpolab.losses key
    beta: Callable[[Experiment], float] = lambda e: e.hyper.beta
    params: Callable[[Experiment], dict[str, float]] = lambda e: {}
    reduction: Callable[[Experiment], str] = lambda e: "sum"
    article_alignment: float | None = None  # the article's alignment accuracy, where it reports one


METHODS: dict[str, MethodSpec] = {
    "trl": MethodSpec(
        "TRL DPO",
        "TRL's DPOTrainer with DPOConfig defaults (the article's baseline)",
        trainer="trl",
        beta=lambda e: e.trl.beta,
    ),
    "dpo": MethodSpec("DPO", "DPO (Rafailov et al. 2023), our loop", loss="dpo", article_alignment=1.0),
    "dpop": MethodSpec(
        "DPOP",
        "DPO-Positive (Pal et al. 2024): DPO plus a penalty when log pi(y_w) falls below the reference's",
        loss="dpop",
        params=lambda e: {"dpop_lambda": e.hyper.dpop_lambda},
        article_alignment=1.0,
    ),
    "sft": MethodSpec("SFT", "supervised fine-tuning on the chosen continuations", loss="sft", article_alignment=0.94),
    "kl_sft": MethodSpec(
        "KL-SFT",
        "SFT plus a squared penalty on the chosen log-ratio to the reference",
        loss="kl_sft",
        params=lambda e: {"kl_coef": e.hyper.kl_coef},
        article_alignment=0.88,
    ),
    "ipo": MethodSpec(
        "IPO",
        "IPO (Azar et al. 2023) on per-token mean log-probs",
        loss="ipo",
        beta=lambda e: e.hyper.ipo_beta or e.hyper.beta,
        reduction=lambda e: e.hyper.ipo_reduction,
    ),
    "odpo": MethodSpec("ODPO", "DPO with an offset (Amini et al. 2024) from a MiniLM Penn score", loss="odpo"),
}
REFERENCE = "reference"  # the evaluation row of the untrained model (no spec: it is not trained)


@dataclass(frozen=True)
class Unit:
    """One trained policy (or the reference): a method at a seed, and for the frontier a beta of its own."""

    method: str  # a key of METHODS, or "reference"
    seed: int
    beta: float | None = None  # a frontier unit's beta; None: the method's default

    @property
    def name(self) -> str:
        return self.method if self.beta is None else f"{self.method}@beta={self.beta:g}"

    @property
    def folder(self) -> str:
        """The unit's folder, relative to the run folder and to the work folder."""
        return f"units/{self.name}/seed-{self.seed}"


def unit_beta(unit: Unit, exp: Experiment) -> float | None:
    return None if unit.method == REFERENCE else unit.beta or METHODS[unit.method].beta(exp)


def unit_settings(unit: Unit, exp: Experiment, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Everything a unit's outputs depend on; a rerun whose settings differ must not reuse them."""
    common = {
        "unit": unit.name,
        "seed": unit.seed,
        "sampling": exp.sampling.__dict__,
        **fingerprint,
        "max_test_prompts": exp.run.max_test_prompts,
    }
    if unit.method == REFERENCE:
        return common
    spec = METHODS[unit.method]
    training = (
        {**exp.trl.__dict__, "precision": exp.hyper.precision}
        if spec.trainer == "trl"
        else {
            **exp.hyper.__dict__,
            "loss": spec.loss,
            "loss_kwargs": spec.params(exp),
            "reduction": spec.reduction(exp),
        }
    )
    training = {k: v for k, v in training.items() if k != "save_steps"}  # may change between a run and its resumption
    return {
        **common,
        "method": unit.method,
        "beta": unit_beta(unit, exp),
        "training": training,
        # ODPO's offsets are applied per example (train's example_loss_kwargs). A constant key, kept in the hashed
        # settings so that the hashes of runs already made (the committed one) stay valid.
        "odpo_per_example": True if unit.method == "odpo" else None,
    }


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------- ODPO


def odpo_scores(texts: list[str], embedder=None) -> np.ndarray:
    """s(y) = cos(MiniLM(y), MiniLM("the University of Pennsylvania")), shape (N,)."""
    from ...eval import default_embedder

    embedder = embedder or default_embedder()
    anchor = embedder.encode([ODPO_ANCHOR], normalize_embeddings=True, convert_to_numpy=True)[0]  # (384,)
    return embedder.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True) @ anchor


def odpo_offsets(train_rows, alpha: float) -> np.ndarray:
    """Delta_i = alpha * max(0, s(y_w) - s(y_l)) for every training pair, shape (N,), float32, s scoring the
    continuations' stripped text.

    The scores are computed once per training set and cached in $DPOLAB_CACHE/odpo-scores.
    """
    # the continuations' text, without the space that joins them to the prompt (MiniLM's tokenizer ignores a leading
    # space; the cached scores are keyed on the stripped text)
    chosen, rejected = ([text.strip() for text in train_rows[key]] for key in ("chosen", "rejected"))
    key = hashlib.sha256(json.dumps([ODPO_ANCHOR, chosen, rejected]).encode()).hexdigest()[:24]
    path = cache_root() / "odpo-scores" / f"{key}.json"
    if path.exists():
        scores = json.loads(path.read_text())
    else:
        scores = {"chosen": odpo_scores(chosen).tolist(), "rejected": odpo_scores(rejected).tolist()}
        atomic_write_text(path, json.dumps(scores))
    gap = np.asarray(scores["chosen"]) - np.asarray(scores["rejected"])  # (N,)
    return (alpha * np.clip(gap, 0, None)).astype(np.float32)


def odpo_note(offsets: np.ndarray) -> str:
    """One line for the report: the offsets' distribution."""
    return (
        f"ODPO offsets Delta = alpha * max(0, s(y_w) - s(y_l)): mean {offsets.mean():.3f}, median "
        f"{np.median(offsets):.3f}, max {offsets.max():.3f}, {np.mean(offsets == 0):.1%} of pairs at 0. "
        "Applied per example."
    )


# ---------------------------------------------------------------------------------------------- training


@dataclass
class TrainingInputs:
    """What every trainer gets: the initial model (also the frozen reference), its tokenizer, the pairs."""

    model: Any
    tokenizer: Any
    train_data: Any
    odpo_offsets: np.ndarray | None = None
    progress: bool = True
    notes: list[str] = field(default_factory=list)  # things the report must say (e.g. ODPO's offsets)


def dpolab_config(unit: Unit, exp: Experiment, work: str | None = None, progress: bool = False) -> TrainConfig:
    """The TrainConfig of a dpolab method's unit; ``work``: its checkpoint folder (resumed from, if it holds one)."""
    spec = METHODS[unit.method]
    h = exp.hyper
    return TrainConfig(
        loss=spec.loss,
        beta=unit_beta(unit, exp),
        loss_kwargs=spec.params(exp),
        reduction=spec.reduction(exp),
        learning_rate=h.learning_rate,
        min_learning_rate=h.min_learning_rate,
        epochs=h.epochs,
        max_steps=h.max_steps,
        batch_size=h.batch_size,
        seed=unit.seed,
        output_dir=work,
        save_steps=h.save_steps if work else None,
        resume=work is not None,
        progress=progress,
        precision=h.precision,
    )


def train_dpolab(unit: Unit, exp: Experiment, inputs: TrainingInputs, work: str):
    """Train a copy of the initial model with dpolab.train; returns (policy, history rows with TRL's names).

    Checkpoints every ``save_steps`` in ``work``; a rerun resumes from the latest one.
    """
    config = dpolab_config(unit, exp, work, inputs.progress)
    per_example = {"offset": inputs.odpo_offsets} if unit.method == "odpo" else None  # ODPO's Delta_i
    policy = copy.deepcopy(inputs.model)  # same initial weights for every method
    result = train(
        policy, inputs.tokenizer, inputs.train_data, config, ref_model=inputs.model, example_loss_kwargs=per_example
    )
    if result.resumed_from_step:
        print(f"[penn] {unit.name} seed {unit.seed} resumed from its checkpoint at step {result.resumed_from_step}")
    return policy, result.history

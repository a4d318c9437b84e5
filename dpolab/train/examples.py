"""What ``train`` trains on: the tokenized examples, their order, their checks.

    rows       -> token ids as TRL tokenizes them (dpolab.data.tokenize), within max_length and the model's context
    epoch e    -> a permutation of the N examples that depends on (seed, e) only
    step       -> B consecutive examples of that permutation; a last partial batch if every micro-batch gets one

Every check here can refuse a run before any work: data the model cannot read, per-example loss parameters that do
not fit the data, eval data that would not be what it says.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..data.collate import completion_parts
from ..data.formats import row_format
from ..data.tokenize import tokenize_preferences
from ..models import context_length
from .config import TrainConfig, loss_parameters
from .listwise import as_rankings, training_rows
from .reference import examples_hash

__all__ = [
    "TrainData",
    "training_data",
    "training_examples",
    "epoch_order",
    "steps_per_epoch",
    "check_vocabulary",
    "check_eval_data",
    "example_loss_kwargs",
    "fingerprint",
]


def max_length(config: TrainConfig, model: torch.nn.Module | None) -> int | None:
    """The tokens kept per sequence: ``config.max_length`` within the model's context. TRL's default of 1024 is cut to
    a shorter context; any other value above it is an error (positions past the context do not exist)."""
    context = context_length(model) if model is not None else None
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
    (``dpolab.data.tokenize``) with the config's ``max_length`` (within the model's context, :func:`max_length`),
    ``truncation_mode`` and ``max_prompt_length``; rankings as ``listwise.training_rows`` and ``as_rankings`` take
    them."""
    examples = tokenize_preferences(
        training_rows(train_data, config, source),
        tokenizer,
        source=source,
        max_length=max_length(config, model),
        truncation_mode=config.truncation_mode,
        max_prompt_length=config.max_prompt_length,
    )
    return as_rankings(examples) if config.listwise else examples


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the n training pairs in ``epoch``: a permutation that depends on (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, batch_size: int, min_batch: int) -> int:
    """Full batches, plus the last partial one if each process's micro-batch gets at least one pair."""
    full, rest = divmod(n, batch_size)
    steps = full + (rest >= min_batch)
    if steps == 0:
        raise ValueError(f"{n} training pairs cannot fill one batch of {min_batch} (processes x grad_accum_steps)")
    return steps


def check_vocabulary(examples, model: torch.nn.Module) -> None:
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


def example_loss_kwargs(given, n: int, loss, fixed: dict, device) -> dict[str, torch.Tensor]:
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


def fingerprint(examples, example_params: dict[str, torch.Tensor]) -> str:
    """What a checkpoint must be resumed on: the token ids and the per-example loss parameters."""
    digest = hashlib.sha256(examples_hash(examples).encode())
    for key, t in sorted(example_params.items()):
        digest.update(key.encode() + t.cpu().numpy().tobytes())
    return digest.hexdigest()


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


@dataclass
class TrainData:
    """What ``train`` trains and evaluates on, tokenized and checked."""

    examples: list[dict]  # the training pairs (or rankings), in dataset order
    eval_examples: list[dict] | None  # the eval pairs, or None
    example_params: dict[str, torch.Tensor]  # per-example loss parameters (e.g. ODPO's offsets), (N,) each, on the CPU
    data_hash: str  # the fingerprint a checkpoint is resumed on (``fingerprint``)


def training_data(model, tokenizer, train_data, config: TrainConfig, example_losses=None, eval_data=None) -> TrainData:
    """The training (and eval) rows tokenized (:func:`training_examples`) and checked against the model's vocabulary,
    and the per-example loss parameters checked against them: everything about the data that can refuse a run."""
    examples = training_examples(train_data, tokenizer, config, model)
    check_vocabulary(examples, model)
    eval_examples = None
    if eval_data is not None:
        eval_examples = training_examples(eval_data, tokenizer, config, model, source="eval_data")
        check_vocabulary(eval_examples, model)
    params = example_loss_kwargs(example_losses, len(examples), config.loss, config.loss_kwargs, "cpu")
    return TrainData(examples, eval_examples, params, fingerprint(examples, params))

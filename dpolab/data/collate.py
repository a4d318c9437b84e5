"""Collate tokenized preference pairs into one concatenated batch (notebook 06).

Tokenization (``dpolab.data.tokenize``: TRL 1.16's DPOTrainer, token for token) turns a row into an example
``{"prompt_ids", "chosen_ids", "rejected_ids", "index"}`` (plus ``chosen_prompt_ids`` / ``rejected_prompt_ids``
when ``keep_end`` truncation kept different ends of the prompt). The collator stacks B examples into one batch of
2B rows (rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected) padded on the right, the layout of TRL's
``DataCollatorForPreference`` and of ``dpolab.logprobs.concatenated_logps``, so chosen and rejected go through one
forward. SFT uses the same batch and reads only its chosen half. A ranking of K completions (``completions_ids``)
becomes K rows in the same way: rows k*B..(k+1)*B-1 hold every example's k-th completion (k = 0 best), so a pair
batch is the K = 2 case.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .tokenize import common_prefix_length, tokenize_pair, tokenize_preferences

__all__ = [
    "PreferenceCollator",
    "common_prefix_length",
    "sequence_parts",
    "completion_parts",
    "n_completions",
    "tokenize_pair",
    "tokenize_preferences",
]


def sequence_parts(example: Mapping[str, Any], key: str) -> tuple[list[int], list[int]]:
    """(context, completion) token ids of the ``key`` ("chosen" or "rejected") sequence of a tokenized example:
    the shared prompt and the sequence's own kept prompt, then the scored completion."""
    return list(example["prompt_ids"]) + list(example.get(f"{key}_prompt_ids", ())), list(example[f"{key}_ids"])


def completion_parts(example: Mapping[str, Any]) -> list[tuple[list[int], list[int]]]:
    """(own kept prompt, completion) token ids of each sequence of a tokenized example, after the shared
    ``prompt_ids``: [chosen, rejected] for a pair, the K completions best first for a ranking."""
    if "completions_ids" in example:
        own = example.get("completions_prompt_ids") or [()] * len(example["completions_ids"])
        return [(list(o), list(ids)) for o, ids in zip(own, example["completions_ids"], strict=True)]
    return [(list(example.get(f"{key}_prompt_ids", ())), list(example[f"{key}_ids"])) for key in ("chosen", "rejected")]


def n_completions(examples: list[Mapping[str, Any]]) -> int:
    """K, the completions per example (2 for pairs); an error unless every example has as many."""
    counts = {len(ex["completions_ids"]) if "completions_ids" in ex else 2 for ex in examples}
    if len(counts) != 1:
        raise ValueError(f"cannot collate examples with different numbers of completions {sorted(counts)} in one batch")
    return counts.pop()


def _pad_right(rows: list[list[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)


@dataclass(frozen=True)
class PreferenceCollator:
    """Tokenized examples -> one right-padded batch of 2B rows (TRL's ``DataCollatorForPreference`` layout).

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` of shape (2B, L) — rows 0..B-1 prompt+chosen,
    rows B..2B-1 prompt+rejected — and, when every example carries one, ``index`` (B,), their dataset indices.
    Rankings of K completions give K*B rows, completion k of example i in row k*B + i.
    """

    pad_token_id: int  # the id written into padding positions (masked out everywhere)
    pad_to_multiple_of: int | None = None  # round L up to a multiple of this (tensor-core friendly shapes)

    def __post_init__(self):
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {self.pad_to_multiple_of}")

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        n_completions(examples)
        parts = [completion_parts(ex) for ex in examples]
        sequences, masks = [], []
        for k in range(len(parts[0])):
            for ex, own in zip(examples, parts):
                context, completion = list(ex["prompt_ids"]) + own[k][0], own[k][1]
                sequences.append(context + completion)
                masks.append([0] * len(context) + [1] * len(completion))
        length = max(map(len, sequences))
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": _pad_right(sequences, self.pad_token_id, length),  # (2B, L)
            "attention_mask": _pad_right([[1] * len(s) for s in sequences], 0, length),  # (2B, L)
            "completion_mask": _pad_right(masks, 0, length),  # (2B, L)
        }
        if all("index" in ex for ex in examples):
            batch["index"] = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)  # (B,)
        return batch

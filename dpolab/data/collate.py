"""Tokenize preference triples and collate them into one concatenated batch (notebook 06).

A triple (x, y_w, y_l) becomes two token sequences, prompt + chosen and prompt + rejected, tokenized the way
TRL's DPOTrainer does for plain-text data:

- the text of a sequence is ``prompt + sep + continuation`` (``sep = " "``), so the completion text is
  ``" " + continuation``; the tokenizer's EOS token is appended to each completion, so the model also learns
  where a continuation ends;
- ``prompt`` and ``prompt + completion`` are tokenized separately and the completion starts where the two
  token lists diverge (``common_prefix_length``), which is right after the prompt for byte-level BPE;
- truncation keeps the *end* of the prompt (``max_prompt_length``) and cuts the *end* of the completion
  (``max_length``); an example left with no completion token is an error naming its index, never a silent
  zero log-prob.

The collator stacks B examples into one batch of 2B rows (rows 0..B-1 prompt+chosen, rows B..2B-1
prompt+rejected) padded on the right, the layout ``dpolab.logprobs.concatenated_logps`` expects, so chosen
and rejected go through one forward. SFT uses the same batch and reads only its chosen half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

__all__ = ["common_prefix_length", "tokenize_pair", "tokenize_preferences", "PreferenceCollator"]


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """Number of leading tokens the two lists share."""
    n = 0
    for a, b in zip(ids, other_ids):
        if a != b:
            break
        n += 1
    return n


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def tokenize_pair(
    example: Mapping[str, str],
    tokenizer,
    *,
    index: int = 0,
    sep: str = " ",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> dict[str, Any]:
    """Token ids of one preference triple: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and ``index``.

    Args:
        example: a mapping with ``prompt``, ``chosen`` and ``rejected`` strings (continuations without the
            separator: the sequence is ``prompt + sep + chosen``).
        tokenizer: a Hugging Face tokenizer with an ``eos_token``.
        index: the example's position in its dataset, carried along for error messages.
        max_length: keep at most this many tokens of prompt + completion, cutting the completion's end.
        max_prompt_length: keep at most this many tokens of the prompt, cutting the prompt's start.
    """
    for field in ("prompt", "chosen", "rejected"):
        if not isinstance(example.get(field), str):
            raise ValueError(
                f"example {index}: field {field!r} must be a string, got {type(example.get(field)).__name__}"
            )
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token: completions end with EOS")
    prompt = example["prompt"]
    prompt_ids = _ids(tokenizer, prompt)
    full = {key: _ids(tokenizer, prompt + sep + example[key] + tokenizer.eos_token) for key in ("chosen", "rejected")}
    # TRL: the completion starts where prompt and prompt+completion tokenize differently.
    n_prompt = min(common_prefix_length(prompt_ids, ids) for ids in full.values())
    out = {"prompt_ids": prompt_ids[:n_prompt], **{f"{k}_ids": ids[n_prompt:] for k, ids in full.items()}}
    if max_prompt_length is not None:
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
        out["prompt_ids"] = out["prompt_ids"][-max_prompt_length:]
    if max_length is not None:
        room = max_length - len(out["prompt_ids"])
        if room < 1:
            raise ValueError(
                f"example {index}: the prompt has {len(out['prompt_ids'])} tokens and max_length is {max_length}, "
                "so no completion token survives truncation; raise max_length or set max_prompt_length"
            )
        out["chosen_ids"], out["rejected_ids"] = out["chosen_ids"][:room], out["rejected_ids"][:room]
    for key in ("chosen_ids", "rejected_ids"):
        if not out[key]:
            raise ValueError(f"example {index}: the {key[:-4]} completion has no tokens")
    out["index"] = index
    return out


def tokenize_preferences(rows: Iterable[Mapping[str, str]], tokenizer, **kwargs) -> list[dict[str, Any]]:
    """:func:`tokenize_pair` over a dataset (a ``datasets.Dataset`` or any iterable of dicts), indexed 0..N-1."""
    return [tokenize_pair(row, tokenizer, index=i, **kwargs) for i, row in enumerate(rows)]


def _pad_right(rows: list[list[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)


@dataclass(frozen=True)
class PreferenceCollator:
    """Tokenized examples -> one right-padded batch of 2B rows (TRL's ``DataCollatorForPreference`` layout).

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` of shape (2B, L) — rows 0..B-1 prompt+chosen,
    rows B..2B-1 prompt+rejected — and, when every example carries one, ``index`` (B,), their dataset indices.
    """

    pad_token_id: int  # the id written into padding positions (masked out everywhere)
    pad_to_multiple_of: int | None = None  # round L up to a multiple of this (tensor-core friendly shapes)

    def __post_init__(self):
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {self.pad_to_multiple_of}")

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        sequences, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                sequences.append(list(ex["prompt_ids"]) + list(ex[key]))
                masks.append([0] * len(ex["prompt_ids"]) + [1] * len(ex[key]))
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

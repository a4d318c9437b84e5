"""Tokenize preference rows exactly as TRL 1.16's DPOTrainer does, and truncate them as its collator does (notebook 06).

Per row, following ``DPOTrainer._prepare_dataset`` (trl/trainer/dpo_trainer.py) step by step:

1. an implicit prompt is extracted from chosen and rejected (``formats.extract_prompt``);
2. standard rows: the tokenizer's EOS text is appended to chosen and to rejected unless it already ends them;
   conversational rows get no EOS of dpolab's own (the chat template ends the assistant turn);
3. the prompt is tokenized alone, and prompt + chosen, prompt + rejected as wholes: ``tokenizer(text=...)`` for
   strings (the sequence is ``prompt + completion`` exactly as given: a standard completion carries its own
   leading space), ``tokenizer.apply_chat_template(messages, tokenize=True)`` for messages, the prompt alone with
   ``add_generation_prompt=True`` (a row's ``tools`` and ``chat_template_kwargs`` columns are passed, as TRL does);
4. the completion starts where the tokenized prompt and prompt + completion first differ (``common_prefix_length``,
   the smaller of the two): byte-level BPE may merge tokens across the boundary, a template may render the
   prompt alone differently;
5. truncation, per sequence, as ``DataCollatorForPreference``: ``keep_start`` keeps the first ``max_length`` tokens
   of prompt + completion, ``keep_end`` the last ``max_length``. TRL silently drops a row whose prompt alone fills
   ``max_length`` under ``keep_start``; here it is an error naming the row and the fix.

A tokenized example is ``{"prompt_ids", "chosen_ids", "rejected_ids", "index"}``: the chosen sequence is
``prompt_ids + chosen_ids``, only ``chosen_ids`` is scored. Under ``keep_end`` the chosen and the rejected sequence
may keep different ends of a long prompt; then ``prompt_ids`` holds what the two kept sequences share at their start
and ``chosen_prompt_ids`` / ``rejected_prompt_ids`` the rest of each one's kept prompt (present only then), so the
chosen sequence is ``prompt_ids + chosen_prompt_ids + chosen_ids``. ``max_prompt_length`` (not in TRL 1.16; older
TRL had it) first keeps only the prompt's last tokens.

A ranking of K completions (``dpolab.data.formats``; TRL has none) follows the same steps with K sequences
prompt + completion in place of two, best first: the prompt ends where it ends in all K (step 4), each sequence is
truncated alone (step 5) and ``prompt_ids`` is what all K kept sequences share at their start. Its example is
``{"prompt_ids", "completions_ids", "index"}`` with K lists of completion ids, plus ``completions_prompt_ids`` (K
lists) where ``keep_end`` kept different ends of the prompt. With K = 2 the ids are the pair's: a ranking
``[y_w, y_l]`` tokenizes as the pair (y_w, y_l).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from .formats import extract_prompt, is_conversational, is_listwise, ranked_completions
from .io import PreferenceDataError, find_problems

__all__ = [
    "TRUNCATION_MODES",
    "common_prefix_length",
    "truncate_pair",
    "truncate_completions",
    "tokenize_pair",
    "tokenize_preferences",
]

TRUNCATION_MODES = ("keep_start", "keep_end")


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """Number of leading tokens the two lists share (TRL's ``trl.data_utils.common_prefix_length``)."""
    n = 0
    for a, b in zip(ids, other_ids):
        if a != b:
            break
        n += 1
    return n


def _chat_ids(tokenizer, messages: list, **kwargs) -> list[int]:
    """Token ids of messages rendered by the tokenizer's chat template (TRL's ``trl.data_utils._tokenize``)."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def _template_kwargs(row: Mapping[str, Any]) -> dict:
    """TRL's per-row chat template arguments: the ``tools`` column (JSON text or a list), ``chat_template_kwargs``."""
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools, **(row.get("chat_template_kwargs") or {})}


def _completion_ids(row: Mapping[str, Any], prompt, completions: list, tokenizer) -> tuple[list[int], list[list[int]]]:
    """(prompt_ids, [completion_ids, ...]) of a prompt and its completions: steps 2-4 of the module docstring, the
    prompt ending where it ends in every one of the sequences."""
    if is_conversational(prompt):
        kwargs = _template_kwargs(row)
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True, **kwargs)
        full = [_chat_ids(tokenizer, prompt + completion, **kwargs) for completion in completions]
    else:
        eos = tokenizer.eos_token
        completions = [text if text.endswith(eos) else text + eos for text in completions]
        prompt_ids = list(tokenizer(text=prompt)["input_ids"])
        full = [list(tokenizer(text=prompt + completion)["input_ids"]) for completion in completions]
    n = min(common_prefix_length(prompt_ids, ids) for ids in full)
    return prompt_ids[:n], [ids[n:] for ids in full]


def _untruncated(row: Mapping[str, Any], tokenizer) -> tuple[list[int], list[list[int]]]:
    """(prompt_ids, [chosen_ids, rejected_ids]) of a valid pair, or (prompt_ids, the K completions' ids, best first)
    of a valid ranking: steps 1-4 of the module docstring."""
    if is_listwise(row):
        return _completion_ids(row, row["prompt"], ranked_completions(row), tokenizer)
    if "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
    return _completion_ids(row, prompt, [chosen, rejected], tokenizer)


def truncate_completions(
    prompt_ids: list[int], completions_ids: list[list[int]], max_length: int | None, truncation_mode: str
) -> tuple[list[int], list[list[int]], list[list[int]] | None] | None:
    """The tokens of each sequence prompt + completion that ``DataCollatorForPreference(max_length,
    truncation_mode)`` keeps, for any number of completions of one prompt: (shared prompt, kept completions, each
    sequence's own kept prompt or None when they all kept the same), see the module docstring; ``None`` under
    ``keep_start`` when the prompt alone fills ``max_length``."""
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if max_length is None:
        return prompt_ids, completions_ids, None
    P = len(prompt_ids)
    if truncation_mode == "keep_start":
        if P >= max_length:
            return None
        return prompt_ids, [ids[: max_length - P] for ids in completions_ids], None
    kept = []
    for ids in completions_ids:
        cut = max(0, P + len(ids) - max_length)  # tokens dropped from the start of prompt + completion
        kept.append((prompt_ids[min(cut, P) :], ids[max(0, cut - P) :]))
    prompts = [prompt for prompt, _ in kept]
    n = min(common_prefix_length(prompts[0], prompt) for prompt in prompts[1:])
    own = [prompt[n:] for prompt in prompts] if n < max(map(len, prompts)) else None  # each kept its own end
    return prompts[0][:n], [ids for _, ids in kept], own


def truncate_pair(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int | None, truncation_mode: str
) -> dict[str, list[int]] | None:
    """The tokens of the two sequences that ``DataCollatorForPreference(max_length, truncation_mode)`` keeps, as an
    example (module docstring); ``None`` under ``keep_start`` when the prompt alone fills ``max_length``."""
    kept = truncate_completions(prompt_ids, [chosen_ids, rejected_ids], max_length, truncation_mode)
    return None if kept is None else _example(*kept, listwise=False)


def _example(prompt_ids, completions_ids, own_prompts, listwise: bool) -> dict[str, Any]:
    """A tokenized example: a pair's keys (module docstring), or a ranking's ``prompt_ids``, ``completions_ids``
    (K lists, best first) and, where ``keep_end`` kept different ends of the prompt, ``completions_prompt_ids``."""
    if listwise:
        out = {"prompt_ids": prompt_ids, "completions_ids": completions_ids}
        return out if own_prompts is None else {**out, "completions_prompt_ids": own_prompts}
    out = {"prompt_ids": prompt_ids, "chosen_ids": completions_ids[0], "rejected_ids": completions_ids[1]}
    if own_prompts is not None:
        out["chosen_prompt_ids"], out["rejected_prompt_ids"] = own_prompts
    return out


def _check_tokenizer(tokenizer, conversational: bool, where: str) -> None:
    if conversational and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{where}: field 'prompt' is a list of messages (TRL's conversational format) but the tokenizer has no "
            "chat template: set tokenizer.chat_template, or give the rows as text"
        )
    if not conversational and tokenizer.eos_token is None:
        raise ValueError(f"{where}: the tokenizer has no eos_token, which TRL appends to standard completions: set one")


def tokenize_pair(
    example: Mapping[str, Any],
    tokenizer,
    *,
    index: int = 0,
    source: str = "<rows>",
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    max_prompt_length: int | None = None,
) -> dict[str, Any]:
    """One row's token ids, as TRL's DPOTrainer would train on them (module docstring), with ``index``.

    A ranking (``{"prompt", "completions"}``, ``dpolab.data.formats``) is tokenized by the same rules, each
    completion as TRL tokenizes a chosen one, best first: ``{"prompt_ids", "completions_ids", "index"}``.

    Args:
        example: a row in one of TRL's formats (``dpolab.data.formats``), or a ranking.
        tokenizer: a Hugging Face tokenizer (an EOS token for standard rows, a chat template for conversational).
        index: the row's 0-based position in its dataset; errors name its 1-based row in ``source``.
        max_length: tokens kept of each sequence prompt + completion (TRL's ``max_length``); None: all.
        truncation_mode: "keep_start" (TRL's default) or "keep_end".
        max_prompt_length: keep only the prompt's last this many tokens first (dpolab's; None: all).
    """
    where = f"{source}, row {index + 1}"
    problems = find_problems([example], where=[(source, index + 1)])
    if problems:
        raise PreferenceDataError(problems)
    listwise = is_listwise(example)
    _check_tokenizer(tokenizer, is_conversational(example["prompt" if listwise else "chosen"]), where)
    prompt_ids, completions_ids = _untruncated(example, tokenizer)
    if max_prompt_length is not None:
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
        prompt_ids = prompt_ids[-max_prompt_length:]
    kept = truncate_completions(prompt_ids, completions_ids, max_length, truncation_mode)
    if kept is None:
        raise ValueError(
            f"{where}: the prompt has {len(prompt_ids)} tokens and max_length is {max_length}, so keep_start "
            "truncation keeps no completion token (TRL's DPOTrainer drops such rows silently); raise max_length, "
            "shorten the prompt, or set max_prompt_length or truncation_mode='keep_end'"
        )
    shared, kept_ids, own = kept
    names = [f"completion {k}" for k in range(1, len(kept_ids) + 1)] if listwise else ["chosen", "rejected"]
    for k, (name, ids) in enumerate(zip(names, kept_ids)):
        context = len(shared) + (len(own[k]) if own is not None else 0)
        if len(ids) - (context == 0) < 1:  # nothing before its first token: that one is not scored
            raise ValueError(
                f"{where}: no token of the {name} completion is scored (it has {len(ids)} token(s) "
                "and nothing before it); raise max_length or give the row a prompt"
            )
    out = _example(shared, kept_ids, own, listwise)
    out["index"] = index
    return out


def tokenize_preferences(
    rows: Iterable[Mapping[str, Any]], tokenizer, *, source: str = "<rows>", **kwargs
) -> list[dict[str, Any]]:
    """:func:`tokenize_pair` over a dataset (a ``datasets.Dataset`` or any sequence of rows), indexed 0..N-1.

    The rows are validated together first (``dpolab.data.io.find_problems``: one format for all rows, every
    field well formed); any problem raises one ``PreferenceDataError`` naming ``source``, the 1-based row and
    the field. Several pairs per prompt are fine; rankings (all of one K) give listwise examples.
    """
    rows = rows if hasattr(rows, "__len__") and hasattr(rows, "__getitem__") else list(rows)
    problems = find_problems(rows, source=source)
    if problems:
        raise PreferenceDataError(problems)
    return [tokenize_pair(row, tokenizer, index=i, source=source, **kwargs) for i, row in enumerate(rows)]

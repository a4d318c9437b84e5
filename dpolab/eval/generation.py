"""Batched sampling of continuations with the KV cache (``model.generate``), reproducible from a seed.

The article samples 30 new tokens with top-k 30 at temperature 1.0; those are the defaults here. Prompts are
left-padded so that every row's new tokens follow its last real token (right padding would put pad tokens
between a short prompt and its continuation). Generation stops at the tokenizer's EOS token; the EOS that was
sampled is kept in ``completion_ids`` (it is part of y: scoring log pi(y|x) must include it) and dropped from
the decoded ``texts``.

A prompt is a string, or a conversation in TRL's format (a list of ``{"role", "content"}`` messages): that is
rendered with the tokenizer's chat template and its generation prompt, into the very token ids a conversational
training pair's prompt gets (``dpolab.data.tokenize``), so the model continues as the assistant it was trained as.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

__all__ = ["SamplingConfig", "Generations", "generate"]


@dataclass(frozen=True)
class SamplingConfig:
    """How continuations are sampled (defaults: the article's)."""

    max_new_tokens: int = 30  # continuation length cap, in tokens
    top_k: int = 30  # sample from the k most likely tokens; 0 = the whole vocabulary
    temperature: float = 1.0  # logits are divided by this before sampling
    do_sample: bool = True  # False = greedy decoding (top_k and temperature unused)
    batch_size: int = 64  # prompts per model.generate call

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k), got {self.top_k}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def generation_config(self, eos_token_id: int, pad_token_id: int) -> GenerationConfig:
        """A complete transformers GenerationConfig, so no default stored with the model (top_p, repetition
        penalty, ...) changes the sampling distribution."""
        sampling = dict(top_k=self.top_k, temperature=self.temperature, top_p=1.0) if self.do_sample else {}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **sampling,
        )


@dataclass
class Generations:
    """Continuations of ``prompts``, row by row."""

    prompts: list[Any]  # as given: strings, or conversations (lists of messages)
    texts: list[str]  # decoded continuations, special tokens dropped (GPT-2's start with a space)
    prompt_ids: list[list[int]]  # the prompt's tokens, unpadded
    completion_ids: list[list[int]]  # the sampled tokens, through the first EOS when one was sampled
    finished: list[bool]  # True when EOS was sampled within max_new_tokens

    def __len__(self) -> int:
        return len(self.prompts)


def _truncate_at_eos(new_tokens: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lengths of each row through its first EOS (or the whole row) and whether it has one.

    new_tokens (B, T) -> lengths (B,), finished (B,). Everything after the first EOS is padding.
    """
    is_eos = new_tokens == eos_token_id  # (B, T)
    eos_before = is_eos.cumsum(-1) - is_eos.long()  # number of EOS strictly before each position
    lengths = (eos_before == 0).sum(-1)  # tokens up to and including the first EOS
    return lengths, is_eos.any(-1)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(
    model, tokenizer, prompts: Sequence[str], config: SamplingConfig = SamplingConfig(), seed: int = 0
) -> Generations:
    """Sample one continuation per prompt, ``config.batch_size`` prompts per ``model.generate`` call.

    Reproducible: the same model, prompts, config and seed give the same continuations (the global RNG is
    seeded inside ``torch.random.fork_rng``, so the caller's RNG state is left untouched). Batches are
    drawn in order from one seeded stream, so the result also depends on ``batch_size``. A conversation (a list of
    messages) is rendered with the chat template (module docstring).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    prompts = list(prompts)
    empty = [i for i, prompt in enumerate(prompts) if not prompt]
    if empty:
        raise ValueError(f"prompts {empty[:10]} are empty: a continuation needs at least one prompt token")
    if any(isinstance(prompt, list) for prompt in prompts) and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "prompts: a conversation (a list of messages) needs the tokenizer's chat template, and this tokenizer has "
            "none: set tokenizer.chat_template, or give the prompts as text"
        )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no EOS token: generation could not stop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    generation_config = config.generation_config(eos, pad)
    device = _model_device(model)
    was_training = model.training
    model.eval()  # no dropout while sampling; the caller's mode is restored at the end
    out = Generations(prompts, [], [], [], [])
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), config.batch_size):
                _generate_batch(model, tokenizer, prompts[start : start + config.batch_size], generation_config, out)
    finally:
        model.train(was_training)
    return out


def _left_padded(tokenizer, prompts: list) -> dict:
    """The prompts' token ids, left-padded: strings through the tokenizer, conversations through the chat template
    with the generation prompt (``dpolab.data.tokenize``'s prompt ids of a conversational pair)."""
    if all(isinstance(prompt, str) for prompt in prompts):
        return tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    from dpolab.data.tokenize import _chat_ids

    ids = [
        _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        if isinstance(prompt, list)
        else tokenizer(prompt)["input_ids"]
        for prompt in prompts
    ]
    return tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding=True, padding_side="left")


def _generate_batch(model, tokenizer, prompts: list, generation_config: GenerationConfig, out: Generations):
    """One ``model.generate`` call on left-padded prompts; appends its rows to ``out``."""
    eos = generation_config.eos_token_id
    batch = _left_padded(tokenizer, prompts).to(_model_device(model))
    sequences = model.generate(**batch, generation_config=generation_config)  # (B, P + T)
    new_tokens = sequences[:, batch["input_ids"].shape[1] :]  # (B, T), T <= max_new_tokens
    lengths, finished = _truncate_at_eos(new_tokens, eos)
    completion_ids = [row[:n].tolist() for row, n in zip(new_tokens, lengths.tolist())]
    rows = zip(batch["input_ids"], batch["attention_mask"])
    out.prompt_ids += [ids[mask.bool()].tolist() for ids, mask in rows]  # left padding removed
    out.completion_ids += completion_ids
    out.finished += finished.tolist()
    out.texts += tokenizer.batch_decode(completion_ids, skip_special_tokens=True)

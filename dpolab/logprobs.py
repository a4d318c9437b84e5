"""Per-sequence log-probabilities of completions under a causal language model (notebook 06).

For a sequence s = (x_1..x_P, y_1..y_T) of prompt and completion tokens,

    log pi(y | x) = sum_{t=1..T} log pi(y_t | x, y_<t)                                         (6.1)

A causal LM's output at position i predicts token i+1, so logits are shifted one place against the labels.
Only completion tokens are scored: the prompt and the padding are masked out. The sum is log pi(y|x) itself,
which is what the DPO derivation needs; the per-token mean (``reduction="mean"``) is a different quantity
(it rescales beta by the completion length) and is offered only as a named option (6.2).

Memory: a full log-softmax over GPT-2's 50,257-token vocabulary costs B*L*V floats (16 pairs x 64 tokens x
50,257 x 4 bytes = 412 MB for the forward alone, twice that with its gradient). Here the LM head is applied
only at the positions that score a completion token, in chunks, each chunk recomputed in the backward pass
(activation checkpointing), and log pi(y_t) = logit[y_t] - logsumexp(logits) is taken without ever
materialising log-softmax over the vocabulary.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "Reduction",
    "selective_log_softmax",
    "token_logps_from_logits",
    "sequence_logps_from_logits",
    "sequence_logps",
    "concatenated_logps",
    "check_completion_mask",
]

Reduction = Literal["sum", "mean"]


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without a full log-softmax: logits[index] - logsumexp(logits).

    Naive equivalent: ``torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)``.
    Shapes: logits (..., V), index (...) -> (...).
    """
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def check_completion_mask(completion_mask: torch.Tensor) -> None:
    """Raise if any row scores no completion token (e.g. all of it truncated away): its log-prob would be 0
    (sum) or NaN (mean) and silently corrupt the loss."""
    empty = (completion_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"completion_mask is empty for batch rows {empty[:10]}: no completion token is scored "
            "(was the completion truncated away? raise max_length or shorten the prompt)"
        )


def _reduce(token_logps: torch.Tensor, mask: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    total = (token_logps * mask).sum(-1)
    if reduction == "sum":
        return total  # (6.1)
    if reduction == "mean":
        return total / mask.sum(-1)  # (6.2)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def token_logps_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log pi(s_{i+1} | s_<=i) for every position: logits (B, L, V), input_ids (B, L) -> (B, L-1)."""
    return selective_log_softmax(logits[:, :-1], input_ids[:, 1:])


def sequence_logps_from_logits(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor, reduction: Reduction = "sum"
) -> torch.Tensor:
    """log pi(y|x) from full logits, eq. (6.1): the plain computation, used as the reference for the lean one.

    Args:
        logits: (B, L, V) the model's output on input_ids.
        input_ids: (B, L) prompt + completion (+ padding) tokens.
        completion_mask: (B, L) 1 where input_ids[b, i] is a completion token to score, 0 for prompt/padding.
    Returns:
        (B,) summed (or mean) log-probs of the completion tokens.
    """
    check_completion_mask(completion_mask)
    token_logps = token_logps_from_logits(logits.float(), input_ids)
    return _reduce(token_logps, completion_mask[:, 1:].to(token_logps.dtype), reduction)


def _chunk_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor):
    logits = F.linear(hidden, weight, bias).float()  # (n, V), freed after this chunk
    return selective_log_softmax(logits, labels)


def _lm_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(model).__name__}'s output embedding is {type(head).__name__}, not nn.Linear")
    return head.weight, head.bias


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    reduction: Reduction = "sum",
    chunk_size: int = 1024,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """log pi(y|x) of every row under a Hugging Face causal LM, eq. (6.1), memory-lean.

    Runs the transformer body once, gathers the hidden states at the positions i whose next token s_{i+1}
    is a completion token, and applies the LM head to those rows only, ``chunk_size`` rows at a time
    (recomputed in backward). Equals ``sequence_logps_from_logits(model(input_ids).logits, ...)`` to float
    tolerance for models whose logits are ``lm_head(last_hidden_state)`` (GPT-2, Llama, SmolLM2, ...).

    Shapes: input_ids, attention_mask, completion_mask (B, L) -> (B,).
    """
    check_completion_mask(completion_mask)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    body = model.base_model
    kwargs = {"position_ids": position_ids} if position_ids is not None else {}
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
    scored = completion_mask[:, 1:].bool()  # (B, L-1): position i predicts token i+1
    rows, cols = scored.nonzero(as_tuple=True)  # (n,) each
    h = hidden[:, :-1][rows, cols]  # (n, D)
    labels = input_ids[:, 1:][rows, cols]  # (n,)
    weight, bias = _lm_head(model)
    pieces = []
    for start in range(0, h.shape[0], chunk_size):
        hs, ls = h[start : start + chunk_size], labels[start : start + chunk_size]
        if torch.is_grad_enabled() and (hs.requires_grad or weight.requires_grad):
            pieces.append(checkpoint(_chunk_token_logps, hs, weight, bias, ls, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(hs, weight, bias, ls))
    token_logps = torch.cat(pieces) if pieces else h.new_zeros(0)
    totals = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    totals = totals.index_add(0, rows, token_logps)  # sum per row, eq. (6.1)
    if reduction == "sum":
        return totals
    if reduction == "mean":
        return totals / scored.sum(-1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def concatenated_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], reduction: Reduction = "sum", chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs from ONE forward over the concatenated batch.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``completion_mask`` of shape (2B, L): rows 0..B-1
    are prompt+chosen, rows B..2B-1 prompt+rejected (the layout of ``dpolab.data.collate``). Returns
    ``(chosen_logps, rejected_logps)``, each (B,).
    """
    logps = sequence_logps(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        reduction=reduction,
        chunk_size=chunk_size,
        position_ids=batch.get("position_ids"),
    )
    if logps.shape[0] % 2:
        raise ValueError(f"a concatenated batch has an even number of rows (chosen then rejected), got {logps.shape[0]}")
    return logps.chunk(2)

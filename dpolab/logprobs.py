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

Speed (the training path, ``packed_logps``): each pair is one shared-prefix segment (``dpolab.data.packing``,
eq. 6.9), so the prompt runs once and no row is padded, and the LM head is ``linear_log_softmax``: one fused
autograd function with the gradient of eq. (6.8) written out, three matrix products per scored token in all
(no recomputation), its (n, V) softmax kept for the backward only while that fits ``keep_softmax_bytes``.
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
    "linear_log_softmax",
    "shared_prefix_mask",
    "packed_logps",
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


# ------------------------------------------------------------------------------------------ the fused LM head

KEEP_SOFTMAX_BYTES = 512 * 2**20  # keep the (n, V) softmax for the backward up to this size; recompute beyond


class _LinearLogSoftmax(torch.autograd.Function):
    """log_softmax(h W^T + b)[label], row by row, chunked, with the backward of eq. (6.8) written out:

        d log pi(y_t) / d logits_t = onehot(y_t) - softmax(logits_t)                                    (6.8)

    so with g_t the incoming gradient, dlogits = g (onehot - p), dh = dlogits W, dW = dlogits^T h, db = sum dlogits.
    Forward: one product per chunk; each chunk's softmax p is kept (``keep``) or only its log-sum-exp (then the
    chunk's logits are recomputed in the backward).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, keep: bool):
        pieces, saved = [], []
        for start in range(0, hidden.shape[0], chunk_size):
            raw = F.linear(hidden[start : start + chunk_size], weight, bias)  # (c, V), in the autocast dtype if any
            ctx.mm_dtype = raw.dtype
            logits = raw.to(torch.promote_types(raw.dtype, torch.float32))  # at least fp32 (no copy if already)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            pieces.append(logits.gather(1, labels[start : start + chunk_size, None]).squeeze(1) - lse)
            saved.append(logits.sub_(lse[:, None]).exp_() if keep else lse)  # the softmax, in place
        ctx.chunk_size, ctx.keep, ctx.used = chunk_size, keep, False
        ctx.save_for_backward(hidden, weight, bias, labels, *saved)
        return torch.cat(pieces)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.used and ctx.keep:
            raise RuntimeError("linear_log_softmax's backward overwrites its saved softmax: it runs once per forward")
        ctx.used = True
        hidden, weight, bias, labels, *saved = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        mm, acc = ctx.mm_dtype, saved[0].dtype  # the products' dtype; gradients accumulate in at least fp32
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = grad_b = None
        w = weight.to(mm)
        g = grad_out.to(acc)
        for i, start in enumerate(range(0, hidden.shape[0], ctx.chunk_size)):
            end = start + ctx.chunk_size
            h = hidden[start:end].to(mm)
            if ctx.keep:
                p = saved[i]
            else:
                p = F.linear(h, w, None if bias is None else bias.to(mm)).to(acc).sub_(saved[i][:, None]).exp_()
            gc = g[start:end]
            dlogits = p.mul_(-gc[:, None]).scatter_add_(1, labels[start:end, None], gc[:, None])  # (6.8), in place
            dlogits = dlogits.to(mm)
            if need_h:
                grad_h[start:end] = dlogits @ w
            if need_w:  # the first chunk's product allocates dW; later chunks accumulate into it
                if grad_w is None:
                    grad_w = (dlogits.t() @ h).to(acc)
                elif mm == acc:
                    grad_w.addmm_(dlogits.t(), h)
                else:
                    grad_w.add_((dlogits.t() @ h).to(acc))
            if need_b:
                part = dlogits.to(acc).sum(0)
                grad_b = part if grad_b is None else grad_b.add_(part)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None


def linear_log_softmax(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    chunk_size: int = 1024, keep_softmax_bytes: int | None = None,
) -> torch.Tensor:
    """log_softmax(hidden @ weight.T + bias)[i, labels[i]] for every row i, never the full log-softmax.

    Naive equivalent: ``torch.log_softmax(F.linear(hidden, weight, bias), -1).gather(-1, labels[:, None])[:, 0]``.
    With gradients: the fused function of eq. (6.8); its softmax (n x V floats) is kept when it fits in
    ``keep_softmax_bytes`` (default: ``KEEP_SOFTMAX_BYTES``; three products per token), else recomputed chunk by
    chunk (four products, little memory).
    Shapes: hidden (n, D), weight (V, D), bias (V,) or None, labels (n,) -> (n,), in fp32 (fp64 for fp64 inputs).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        pieces = [_chunk_token_logps(hidden[s : s + chunk_size], weight, bias, labels[s : s + chunk_size])
                  for s in range(0, hidden.shape[0], chunk_size)]
        return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    budget = KEEP_SOFTMAX_BYTES if keep_softmax_bytes is None else keep_softmax_bytes
    keep = hidden.shape[0] * weight.shape[0] * 4 <= budget
    return _LinearLogSoftmax.apply(hidden, weight, bias, labels, chunk_size, keep)


# ------------------------------------------------------------------------------- shared-prefix packed batches

_MASK_KINDS = ("sdpa", "eager")


def shared_prefix_mask(batch: dict[str, torch.Tensor], implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D attention mask of eq. (6.9) for a ``dpolab.data.packing`` batch: (R, 1, L, L), query x key.

    A boolean mask (True: attend) for ``sdpa``; an additive float mask (0 or the dtype's minimum) for ``eager``.
    transformers passes a prepared 4D mask to the attention as it is.
    """
    if implementation not in _MASK_KINDS:
        raise ValueError(f"packed batches need attn_implementation in {_MASK_KINDS}, got {implementation!r}: load "
                         "the model with attn_implementation='sdpa', or train with packing=False")
    seg, pos, branch = batch["segment_ids"], batch["position_ids"], batch["branch_ids"]
    same_segment = seg[:, :, None] == seg[:, None, :]  # (R, L, L)
    causal = pos[:, None, :] <= pos[:, :, None]  # key position <= query position
    visible_branch = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])  # prompt, or own branch
    allowed = (same_segment & causal & visible_branch)[:, None]  # (R, 1, L, L)
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def packed_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], reduction: Reduction = "sum", chunk_size: int = 1024,
    keep_softmax_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen_logps, rejected_logps)``, each (B,), from one forward over a shared-prefix packed batch.

    Equals ``concatenated_logps`` on the padded batch of the same pairs (to float tolerance, values and
    gradients): eq. (6.9) gives every token the hidden state it has in its own sequence x + y, and eq. (6.1)
    sums the scored tokens of each sequence. Shapes: see ``dpolab.data.packing``.
    """
    sequence = batch["score_sequence"]
    n_sequences = 2 * batch["index"].shape[0] if "index" in batch else int(sequence.max()) + 1
    counts = torch.bincount(sequence, minlength=n_sequences)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty or n_sequences % 2:
        raise ValueError(f"no completion token is scored for sequences {empty[:10]} of the packed batch "
                         "(0..B-1 chosen, B..2B-1 rejected): an empty prompt and a one-token completion?")
    weight, bias = _lm_head(model)
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    mask = shared_prefix_mask(batch, implementation, weight.dtype)
    body = model.base_model
    hidden = body(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                  use_cache=False).last_hidden_state  # (R, L, D)
    h = hidden.flatten(0, 1)[batch["score_index"]]  # (n, D)
    token_logps = linear_log_softmax(h, weight, bias, batch["labels"], chunk_size, keep_softmax_bytes)
    totals = torch.zeros(n_sequences, dtype=token_logps.dtype, device=token_logps.device)
    totals = totals.index_add(0, sequence, token_logps)  # eq. (6.1) per sequence
    if reduction == "mean":
        totals = totals / counts
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return totals.chunk(2)

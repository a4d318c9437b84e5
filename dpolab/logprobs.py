"""Per-sequence log-probabilities of completions under a causal language model (notebook 06; the fast paths: appendix 12).

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
autograd function with the gradient of eq. (6.8) written out, nothing of size V kept for the backward (four matrix
products per scored token: the logits are recomputed there). Its logits are computed transposed, vocabulary x token,
a few thousand vocabulary rows per product: each product writes one contiguous block that is exponentiated while
still in cache, where one (n x V) product would write n rows of V floats and read them back.

Rankings of K completions (``listwise_logps``) go through the same paths, K branches per packed segment.

Any causal LM: the lean head is the model's own head followed by its post-head transform (Gemma's soft-cap,
Cohere's and Granite's logit scales), checked once per model against its own forward (``dpolab.lm_head``); a model
it does not match is scored from its own forward logits, and a model that cannot take the packed layout exactly is
scored padded, each said once.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .lm_head import LeanHead, LogitTransform, attention_implementation, close, lean_head, probing, say_once
from .matmul import matmul, uses_onednn

__all__ = [
    "Reduction",
    "selective_log_softmax",
    "token_logps_from_logits",
    "sequence_logps_from_logits",
    "sequence_logps",
    "chunked_token_logps",
    "LM_HEADS",
    "concatenated_logps",
    "check_completion_mask",
    "scored_positions",
    "linear_log_softmax",
    "check_packed_batch",
    "shared_prefix_mask",
    "packed_logps",
    "listwise_logps",
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


def _chunk_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    transform: LogitTransform = LogitTransform(),
):
    logits = transform(F.linear(hidden, weight, bias).float())  # (n, V), freed after this chunk
    return selective_log_softmax(logits, labels)


@functools.cache
def _compiled_chunk_token_logps() -> Callable:
    """``torch.compile`` of one chunk's F.linear + log-softmax (compiled on first use, shapes dynamic)."""
    return torch.compile(_chunk_token_logps, dynamic=True)


LM_HEADS = ("fused", "chunked", "compiled")  # the ways of computing the LM head's log-probs (``packed_logps``)


def chunked_token_logps(
    h: torch.Tensor, labels: torch.Tensor, head: LeanHead, chunk_size: int, compiled: bool = False
) -> torch.Tensor:
    """log pi(label_i | h_i) for every row, the LM head (and its post-head transform) applied ``chunk_size`` rows at
    a time, each chunk's logits freed at once and recomputed in the backward; ``compiled``: each chunk's function
    through ``torch.compile``. Shapes: h (n, D), labels (n,) -> (n,)."""
    weight, bias, transform = head.weight, head.bias, head.transform
    chunk = _compiled_chunk_token_logps() if compiled else _chunk_token_logps
    pieces = []
    for start in range(0, h.shape[0], chunk_size):
        hs, ls = h[start : start + chunk_size], labels[start : start + chunk_size]
        if torch.is_grad_enabled() and (hs.requires_grad or weight.requires_grad):
            pieces.append(checkpoint(chunk, hs, weight, bias, ls, transform, use_reentrant=False))
        else:
            pieces.append(chunk(hs, weight, bias, ls, transform))
    return torch.cat(pieces) if pieces else h.new_zeros(0)


def _own_logits(model: torch.nn.Module, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """The model's own forward logits, (R, L, V): the fallback where the lean head is not the model's
    (``dpolab.lm_head``)."""
    kwargs = {"position_ids": position_ids} if position_ids is not None else {}
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    reduction: Reduction = "sum",
    chunk_size: int = 1024,
    position_ids: torch.Tensor | None = None,
    scored: torch.Tensor | None = None,
    check: bool = True,
) -> torch.Tensor:
    """log pi(y|x) of every row under a Hugging Face causal LM, eq. (6.1), memory-lean.

    Runs the transformer body once, gathers the hidden states at the positions i whose next token s_{i+1}
    is a completion token, and applies the LM head (and the model's post-head transform: soft-cap, scale) to
    those rows only, ``chunk_size`` rows at a time (recomputed in backward). Equals
    ``sequence_logps_from_logits(model(input_ids).logits, ...)`` to float tolerance; a model whose logits are not
    its head's output under a known transform (``dpolab.lm_head``) is scored from those full logits.

    Shapes: input_ids, attention_mask, completion_mask (B, L) -> (B,). ``scored``: ``scored_positions(
    completion_mask)``, (n, 2), where it was computed for free (on the host, as ``dpolab.train`` collates); None:
    computed here. ``check``: refuse a row that scores nothing (``check_completion_mask``). Both read the device on
    the host; with ``scored`` given and ``check`` off, nothing is read (after the model's one-time probe).
    """
    if check:
        check_completion_mask(completion_mask)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    head = lean_head(model, input_ids)
    if head is None:  # the model's own logits
        logits = _own_logits(model, input_ids, attention_mask, position_ids)
        return sequence_logps_from_logits(logits, input_ids, completion_mask, reduction)
    kwargs = {"position_ids": position_ids} if position_ids is not None else {}
    hidden = head.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
    rows, cols = (scored_positions(completion_mask) if scored is None else scored).unbind(1)  # (n,) each
    h = hidden[:, :-1][rows, cols]  # (n, D)
    labels = input_ids[:, 1:][rows, cols]  # (n,)
    token_logps = chunked_token_logps(h, labels, head, chunk_size)
    totals = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    totals = totals.index_add(0, rows, token_logps)  # sum per row, eq. (6.1)
    if reduction == "sum":
        return totals
    if reduction == "mean":
        return totals / completion_mask[:, 1:].sum(-1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def scored_positions(completion_mask: torch.Tensor) -> torch.Tensor:
    """(n, 2): the (row, position) pairs, row-major, of every position i whose next token i+1 is a completion token
    (the positions ``sequence_logps`` scores). Shapes: completion_mask (B, L) -> (n, 2)."""
    return completion_mask[:, 1:].bool().nonzero()


def concatenated_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    reduction: Reduction = "sum",
    chunk_size: int = 1024,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs from ONE forward over the concatenated batch.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``completion_mask`` of shape (2B, L): rows 0..B-1
    are prompt+chosen, rows B..2B-1 prompt+rejected (the layout of ``dpolab.data.collate``), and optionally
    ``scored`` (``scored_positions`` of its completion mask). Returns ``(chosen_logps, rejected_logps)``, each (B,).
    ``check``: as :func:`sequence_logps`'s.
    """
    logps = sequence_logps(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        reduction=reduction,
        chunk_size=chunk_size,
        position_ids=batch.get("position_ids"),
        scored=batch.get("scored"),
        check=check,
    )
    if logps.shape[0] % 2:
        raise ValueError(
            f"a concatenated batch has an even number of rows (chosen then rejected), got {logps.shape[0]}"
        )
    return logps.chunk(2)


# ------------------------------------------------------------------------------------------ the fused LM head

VOCAB_CHUNK = 4096  # rows of the LM head per matrix product (a (4096, n) block of logits stays in cache)


def _mm_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the LM head's products run in: autocast's where it is on (bf16), else the tensor's own."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool, onednn: bool = True) -> torch.Tensor:
    """out = a @ b (``first``) or out += a @ b; the product in a's dtype (``dpolab.matmul``, or torch's own ``mm``
    without ``onednn``), the result in out's."""
    if a.dtype == out.dtype and not (onednn and uses_onednn(a, b)):  # written in place
        return torch.mm(a, b, out=out) if first else torch.addmm(out, a, b, out=out)
    product = matmul(a, b)
    return out.copy_(product) if first else out.add_(product)


def _spans(total: int, size: int) -> list[tuple[int, int]]:
    """[(0, size), (size, 2 size), ..., (.., total)]: the blocks of ``size`` that cover range(total)."""
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _logits_t(weight, bias, hidden_t: torch.Tensor, v0: int, v1: int, acc: torch.dtype) -> torch.Tensor:
    """W[v0:v1] h^T + b[v0:v1], (v1-v0, n) in ``acc`` (at least fp32): the logits of vocabulary rows v0..v1-1 for
    every token, transposed (vocabulary x token). ``hidden_t`` is h^T in the products' dtype."""
    z = matmul(weight[v0:v1].to(hidden_t.dtype), hidden_t).to(acc)
    return z if bias is None else z.add_(bias[v0:v1, None].to(acc))


def _transform_(z: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """In place: z <- c tanh(s z / c) with a cap c, else s z (``dpolab.lm_head.LogitTransform``)."""
    if softcap is not None:
        return z.mul_(scale / softcap).tanh_().mul_(softcap)
    return z.mul_(scale) if scale != 1.0 else z


def _capped_exp(z: torch.Tensor, m: torch.Tensor, softcap: float) -> torch.Tensor:
    """exp(z - m) (z: soft-capped logits, overwritten) times the cap's derivative over s, 1 - (z / c)^2."""
    e = (z - m).exp_()
    return e.mul_(z.div_(softcap).square_().neg_().add_(1))


class _LinearLogSoftmax(torch.autograd.Function):
    """log_softmax(T(h W^T + b))[label], token by token, with the backward of eq. (6.8) written out:

        d log pi(y_t) / d logits_t = onehot(y_t) - softmax(logits_t)                                    (6.8)

    so with g_t the incoming gradient, dlogits = g (onehot - p), dh = dlogits W, dW = dlogits^T h, db = sum dlogits.
    T is the model's post-head transform (``dpolab.lm_head.LogitTransform``): the identity, a scale z' = s z, or a
    soft-cap z' = c tanh(s z / c), whose derivative s (1 - (z'/c)^2) multiplies dlogits element by element.
    Tokens go in blocks of ``chunk_size``; each block's logits are computed transposed, vocabulary x token,
    ``vocab_chunk`` vocabulary rows c per product: each chunk's max m_c, exp(z - m_c) and its sums are taken while the
    chunk is in cache, and log-sum-exp combines the chunks (6.10): lse = M + log sum_c exp(m_c - M) sum_{v in c}
    exp(z_v - m_c), M = max_c m_c. The backward recomputes each chunk, where p = exp(z - m_c) exp(m_c - lse): four
    products per token in all, one (vocab_chunk x chunk_size) chunk alive at a time. The one-hot term of (6.8) is a
    gather and an index_add, outside the loops.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, vocab_chunk: int, scale, softcap):
        n = hidden.shape[0]
        mm, acc = _mm_dtype(hidden), torch.promote_types(hidden.dtype, torch.float32)  # products; softmax, gradients
        chunks = _spans(weight.shape[0], vocab_chunk)
        m = hidden.new_empty((len(chunks), n), dtype=acc)  # each chunk's max, per token
        sums = torch.empty_like(m)
        picked = hidden.new_empty(n, dtype=acc)  # z[label]
        label_chunk = torch.div(labels, vocab_chunk, rounding_mode="floor")
        for t0, t1 in _spans(n, chunk_size):
            h_t = hidden[t0:t1].t().to(mm)
            for i, (v0, v1) in enumerate(chunks):
                z = _transform_(_logits_t(weight, bias, h_t, v0, v1, acc), scale, softcap)  # (c, tokens)
                # z[label] of the block's tokens whose label is in this chunk (no host read: a gather and a select)
                rows = (labels[t0:t1] - v0).clamp_(0, v1 - v0 - 1)
                picked[t0:t1] = torch.where(label_chunk[t0:t1] == i, z.gather(0, rows[None])[0], picked[t0:t1])
                m_i = torch.amax(z, 0, out=m[i, t0:t1])
                sums[i, t0:t1] = z.sub_(m_i).exp_().sum(0)
        top = m.amax(0)
        lse = top + (m - top).exp_().mul_(sums).sum(0).log_()  # (6.10)
        ctx.chunk_size, ctx.vocab_chunk, ctx.mm_dtype, ctx.scale, ctx.softcap = (
            chunk_size,
            vocab_chunk,
            mm,
            scale,
            softcap,
        )
        ctx.save_for_backward(hidden, weight, bias, labels, m, lse, picked)
        return picked - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, m, lse, picked = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        mm, acc, scale, softcap = ctx.mm_dtype, m.dtype, ctx.scale, ctx.softcap
        (n, width), vocab = hidden.shape, weight.shape[0]
        g = grad_out.to(acc)
        if scale != 1.0:  # dz = s dz' (a soft-cap's 1 - (z'/c)^2 is applied per logit below)
            g = g * scale
        grad_h = hidden.new_empty((n, width), dtype=acc) if need_h else None
        grad_w = weight.new_empty(weight.shape, dtype=acc) if need_w else None
        grad_b = weight.new_zeros(vocab, dtype=acc) if need_b else None
        for t0, t1 in _spans(n, ctx.chunk_size):
            h = hidden[t0:t1].to(mm)
            h_t = h.t().contiguous() if need_w else None  # dW = d h: oneDNN takes h^T with tokens contiguous
            coef = (
                (m[:, t0:t1] - lse[t0:t1]).exp_().mul_(-g[t0:t1])
            )  # -g exp(m_c - lse): p = exp(z - m_c) exp(m_c - lse)
            for i, (v0, v1) in enumerate(_spans(vocab, ctx.vocab_chunk)):
                e = _transform_(_logits_t(weight, bias, h.t(), v0, v1, acc), scale, softcap)  # as the forward did
                e = e.sub_(m[i, t0:t1]).exp_() if softcap is None else _capped_exp(e, m[i, t0:t1], softcap)
                d = e.mul_(coef[i]).to(mm)  # (c, tokens): -g p, the softmax term of (6.8), transposed
                if need_w:
                    _mm_into(grad_w[v0:v1], d, h_t.t(), first=t0 == 0)
                if need_b:
                    grad_b[v0:v1] += d.to(acc).sum(1)
                if need_h:  # the sum runs down both operands' rows: torch's mm, where oneDNN would copy both
                    _mm_into(grad_h[t0:t1], d.t(), weight[v0:v1].to(mm), first=i == 0, onednn=False)
        if softcap is not None:  # the one-hot term's cap derivative, at each token's label
            g = g * (1 - (picked / softcap).square())
        g_col = g[:, None]  # the one-hot term of (6.8): + g_t at each token's label
        if need_h:
            grad_h += g_col * weight[labels].to(acc)
        if need_w:
            grad_w.index_add_(0, labels, g_col * hidden.to(acc))
        if need_b:
            grad_b.index_add_(0, labels, g)
        grad_h = grad_h.to(hidden.dtype) if need_h else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def linear_log_softmax(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    vocab_chunk: int | None = None,
    transform: LogitTransform = LogitTransform(),
    check_labels: bool = True,
) -> torch.Tensor:
    """log_softmax(T(hidden @ weight.T + bias))[i, labels[i]] for every row i, never the full log-softmax.

    Naive equivalent: ``torch.log_softmax(T(F.linear(hidden, weight, bias)), -1).gather(-1, labels[:, None])[:, 0]``
    with T the model's post-head ``transform`` (the identity by default; a scale, a soft-cap: ``dpolab.lm_head``).
    The fused function of eq. (6.8) (``_LinearLogSoftmax``): ``chunk_size`` tokens at a time, ``vocab_chunk`` (default
    ``VOCAB_CHUNK``) vocabulary rows per product, each chunk recomputed in the backward (four products per token).
    Shapes: hidden (n, D), weight (V, D), bias (V,) or None, labels (n,) -> (n,), in fp32 (fp64 for fp64 inputs).
    ``check_labels``: refuse labels outside the vocabulary (a read on the host; off, nothing is).
    """
    vocab_chunk = VOCAB_CHUNK if vocab_chunk is None else vocab_chunk
    if chunk_size < 1 or vocab_chunk < 1:
        raise ValueError(f"chunk_size and vocab_chunk must be >= 1, got {chunk_size} and {vocab_chunk}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
    bad = ((labels < 0) | (labels >= weight.shape[0])).nonzero().flatten().tolist() if check_labels else []
    if bad:
        raise ValueError(
            f"labels out of the vocabulary [0, {weight.shape[0]}) at rows {bad[:10]}: {labels[bad[:10]].tolist()}"
        )
    return _LinearLogSoftmax.apply(
        hidden, weight, bias, labels, chunk_size, vocab_chunk, transform.scale, transform.softcap
    )


# ------------------------------------------------------------------------------- shared-prefix packed batches

_MASK_KINDS = ("sdpa", "eager")


def shared_prefix_mask(batch: dict[str, torch.Tensor], implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D attention mask of eq. (6.9) for a ``dpolab.data.packing`` batch: (R, 1, L, L), query x key.

    A boolean mask (True: attend) for ``sdpa``; an additive float mask (0 or the dtype's minimum) for ``eager``.
    transformers passes a prepared 4D mask to the attention as it is.
    """
    if implementation not in _MASK_KINDS:
        raise ValueError(
            f"packed batches need attn_implementation in {_MASK_KINDS}, got {implementation!r}: load "
            "the model with attn_implementation='sdpa', or train with packing=False"
        )
    seg, pos, branch = batch["segment_ids"], batch["position_ids"], batch["branch_ids"]
    same_segment = seg[:, :, None] == seg[:, None, :]  # (R, L, L)
    causal = pos[:, None, :] <= pos[:, :, None]  # key position <= query position
    visible_branch = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])  # prompt, or own branch
    allowed = (same_segment & causal & visible_branch)[:, None]  # (R, 1, L, L)
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _sliding_window(model: torch.nn.Module) -> int | None:
    """The attention's sliding window where some layer has one (Mistral; Gemma-2's sliding layers), else None."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not isinstance(window, int) or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return window


_packing_problems: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> str | None (_probe_packing)


def _probe_packing(model: torch.nn.Module, input_ids: torch.Tensor) -> str | None:
    """None if two pairs made of the first row's tokens, packed into one row, get the log-probs of their padded
    layout (eval mode, no gradient, no autocast), else why not: a model that ignores position_ids (ALiBi), the 4D
    mask (recurrent layers) or anything else eq. (6.9) relies on, does not."""
    from .data.collate import PreferenceCollator
    from .data.packing import PackedPreferenceCollator

    tokens = input_ids[0].tolist()
    t = [tokens[i % len(tokens)] for i in range(32)]
    pairs = [  # the rejected continuation restarts 8 positions back; the second pair starts a new segment
        {"prompt_ids": t[0:4], "chosen_ids": t[4:12], "rejected_ids": t[12:18]},
        {"prompt_ids": t[18:23], "chosen_ids": t[23:26], "rejected_ids": t[26:32]},
    ]
    packed = PackedPreferenceCollator(0, row_tokens=len(t))(pairs)
    padded = PreferenceCollator(pad_token_id=0)(pairs)
    device = input_ids.device
    with probing(model):
        theirs = torch.cat(concatenated_logps(model, {k: v.to(device) for k, v in padded.items()}))
        try:
            ours = _packed(model, {k: v.to(device) for k, v in packed.items()}, "sum", 1024, 4)
        except Exception as error:
            return f"its forward fails on a packed batch ({type(error).__name__}: {error})"
    if not close(ours, theirs, _dtype(model)):
        return "its forward gives packed pairs other log-probs than their own sequences (position_ids or 4D mask)"
    return None


def _packing_problem(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> str | None:
    """Why this packed batch cannot give ``model`` the log-probs of the padded layout exactly, or None."""
    implementation = attention_implementation(model)
    if implementation not in _MASK_KINDS:
        return f"its attention implementation {implementation!r} takes no 4D mask (eq. 6.9 needs sdpa or eager)"
    window = _sliding_window(model)
    if window is not None and int(batch["position_ids"].max()) + 1 >= window:
        return f"a sequence reaches its sliding attention window ({window} tokens), which a 4D mask does not apply"
    if model not in _packing_problems:
        _packing_problems[model] = _probe_packing(model, batch["input_ids"])
    return _packing_problems[model]


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _n_examples(batch: dict[str, torch.Tensor]) -> int:
    """B, the pairs or rankings of a packed batch: one segment each, numbered 0..B-1."""
    return batch["index"].shape[0] if "index" in batch else int(batch["segment_ids"].max()) + 1


def _packed(model, batch, reduction, chunk_size, n_sequences: int, lm_head: str = "fused", check=True):
    """The log-probs of the ``n_sequences`` sequences of a packed batch, (n_sequences,), once the packed layout is
    known to be exact for ``model``; the LM head ``lm_head`` (``LM_HEADS``): ``linear_log_softmax`` ("fused"), else
    in recomputed chunks ("chunked", "compiled": ``chunked_token_logps``). ``check``: linear_log_softmax's
    ``check_labels``."""
    if lm_head not in LM_HEADS:
        raise ValueError(f"lm_head must be one of {LM_HEADS}, got {lm_head!r}")
    sequence = batch["score_sequence"]
    head = lean_head(model, batch["input_ids"])
    mask = shared_prefix_mask(batch, attention_implementation(model), _dtype(model))
    if head is None:  # the model's own logits, (R, L, V)
        logits = _own_logits(model, batch["input_ids"], mask, batch["position_ids"])
        token_logps = selective_log_softmax(logits.flatten(0, 1)[batch["score_index"]].float(), batch["labels"])
    else:
        hidden = head.body(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False
        ).last_hidden_state  # (R, L, D)
        h = hidden.flatten(0, 1)[batch["score_index"]]  # (n, D)
        if lm_head == "fused":
            token_logps = linear_log_softmax(
                h, head.weight, head.bias, batch["labels"], chunk_size, transform=head.transform, check_labels=check
            )
        else:
            token_logps = chunked_token_logps(h, batch["labels"], head, chunk_size, compiled=lm_head == "compiled")
    totals = torch.zeros(n_sequences, dtype=token_logps.dtype, device=token_logps.device)
    totals = totals.index_add(0, sequence, token_logps)  # eq. (6.1) per sequence
    if reduction == "mean":  # the scored tokens per sequence, counted on the device (bincount would read its max)
        counts = torch.zeros_like(totals).index_add_(0, sequence, torch.ones_like(token_logps))
        totals = totals / counts
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return totals


def check_packed_batch(batch: dict[str, torch.Tensor], n_completions: int) -> None:
    """Refuse a packed batch (``dpolab.data.packing``) with a sequence that scores no token, or with more than
    ``n_completions`` completions per example: a ValueError naming the sequences. It reads the batch on the host
    (``dpolab.train`` calls it on each batch as it is collated, before the batch goes to the device)."""
    n_sequences = n_completions * _n_examples(batch)
    counts = torch.bincount(batch["score_sequence"], minlength=n_sequences)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty or counts.shape[0] != n_sequences:
        raise ValueError(
            f"no completion token is scored for sequences {empty[:10]} of the packed batch (sequence k*B + i is "
            f"completion k of example i; for pairs 0..B-1 chosen, B..2B-1 rejected), or it holds more than "
            f"{n_completions} completions per example: an empty prompt and a one-token completion?"
        )


def _packed_sequences(model, batch, n_completions: int, reduction, chunk_size, lm_head="fused", check=True):
    """(K*B,) log-probs of a packed batch of K completions per segment, sequence k*B + i = completion k of example
    i (``dpolab.data.packing``), packed where the model takes the layout exactly, else padded. ``check``: the
    batch checked here (``check_packed_batch``) and its labels against the vocabulary; off: nothing read on the
    host (after the first batch of a model: its one-time probes)."""
    n_sequences = n_completions * _n_examples(batch)
    if check:
        check_packed_batch(batch, n_completions)
    problem = _packing_problem(model, batch)
    if problem is not None:
        from .data.collate import PreferenceCollator
        from .data.packing import unpack

        what = "pairs" if n_completions == 2 else "rankings"
        say_once(f"dpolab: {type(model).__name__}: {problem}; its {what} are scored in the padded layout instead")
        padded = PreferenceCollator(pad_token_id=0)(unpack(batch, n_completions))
        padded = {k: v.to(batch["input_ids"].device) for k, v in padded.items() if k != "index"}
        return sequence_logps(model, **padded, reduction=reduction, chunk_size=chunk_size)
    return _packed(model, batch, reduction, chunk_size, n_sequences, lm_head, check)


def packed_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    reduction: Reduction = "sum",
    chunk_size: int = 1024,
    lm_head: str = "fused",
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen_logps, rejected_logps)``, each (B,), from one forward over a shared-prefix packed batch.

    Equals ``concatenated_logps`` on the padded batch of the same pairs (to float tolerance, values and
    gradients): eq. (6.9) gives every token the hidden state it has in its own sequence x + y, and eq. (6.1)
    sums the scored tokens of each sequence. Where the model cannot take the packed layout exactly (an attention
    without 4D masks, a sliding window the batch reaches, a probe of its forward on two packed pairs that
    disagrees with their padded layout, once per model), the batch is unpacked and scored padded, and that is
    said once. The LM head is ``linear_log_softmax`` (``lm_head`` "fused"), else applied in chunks recomputed in the
    backward, as by ``sequence_logps`` ("chunked"; "compiled": each chunk through ``torch.compile``). Shapes: see ``dpolab.data.packing``. ``check``: refuse a batch with a
    sequence that scores nothing (``check_packed_batch``) or labels outside the vocabulary, reading it on the host;
    off (a batch checked as it was collated), the call reads nothing on the host once the model's one-time probes
    have run.
    """
    return _packed_sequences(model, batch, 2, reduction, chunk_size, lm_head, check).chunk(2)


def listwise_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    n_completions: int,
    reduction: Reduction = "sum",
    chunk_size: int = 1024,
    lm_head: str = "fused",
    check: bool = True,
) -> torch.Tensor:
    """log pi(y_k|x) of every completion of a batch of rankings, (B, K), best first (the layout of
    ``dpolab.losses.plackett_luce_loss``), from one forward.

    ``batch``: a shared-prefix packed batch of K branches per prompt (``dpolab.data.packing``, eq. 6.9: the prompt
    runs once; scored padded where the model cannot take it, as in :func:`packed_logps`), or the padded one of K*B
    rows (``dpolab.data.collate``, row k*B + i = completion k of example i). With K = 2 the columns are
    :func:`packed_logps`'s (chosen, rejected) of the same batch. ``check``: as :func:`packed_logps`'s.
    """
    if "score_index" in batch:
        totals = _packed_sequences(model, batch, n_completions, reduction, chunk_size, lm_head, check)
    else:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
        totals = sequence_logps(
            model, **inputs, reduction=reduction, chunk_size=chunk_size, scored=batch.get("scored"), check=check
        )
    if totals.shape[0] % n_completions:
        raise ValueError(f"a batch of rankings of {n_completions} has a multiple of {n_completions} sequences")
    return totals.view(n_completions, -1).t()  # (B, K): column k is completion k

"""Model-based metrics of continuations: fluency (reference perplexity) and KL to the reference.

Both score the completion tokens y of each row given its prompt x with ``dpolab.logprobs.sequence_logps``:

    PPL_ref(y | x) = exp( -(1/|y|) * sum_t log pi_ref(y_t | x, y_<t) )                       (fluency)

    KL(pi || pi_ref) = E_{y ~ pi(.|x)} [ log pi(y|x) - log pi_ref(y|x) ]
                     ~ (1/N) sum_i [ log pi(y_i|x_i) - log pi_ref(y_i|x_i) ],   y_i ~ pi(.|x_i)      (KL)

KL estimator: log pi and log pi_ref are the models' full distributions at temperature 1 (no top-k), summed
over the sampled tokens, EOS included. The average is an unbiased estimate of KL(pi || pi_ref) when the y_i
were sampled from pi itself (top_k=0, temperature 1). With the article's top-k 30 sampling the y_i come
from a truncated distribution q != pi, and the average estimates E_q[log pi - log pi_ref]: the log-ratio of
the two *models* on the samples that were actually evaluated, which is what the alignment-vs-KL frontier
plots, but not exactly KL(pi || pi_ref). Single terms can be negative; only the mean is an estimate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpolab.logprobs import Reduction, sequence_logps

from .generation import Generations

__all__ = ["completion_logps", "encode_continuations", "perplexity", "corpus_perplexity", "kl_to_reference"]


def _pack(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_token_id: int):
    """Right-padded input_ids, attention_mask and completion_mask, each (B, L), from per-row token lists."""
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) : len(p) + len(c)] = 1
    return input_ids, attention_mask, completion_mask


@torch.no_grad()
def completion_logps(
    model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    reduction: Reduction = "sum",
    batch_size: int = 32,
) -> torch.Tensor:
    """log pi(y|x) of every row (sum over completion tokens, or the per-token mean), shape (N,), on CPU."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    empty = [i for i, c in enumerate(completion_ids) if len(c) == 0]
    if empty:
        raise ValueError(f"completions {empty[:10]} have no tokens: there is nothing to score")
    device = next(model.parameters()).device
    pieces = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = _pack(prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size], pad_token_id)
        input_ids, attention_mask, completion_mask = (t.to(device) for t in batch)
        pieces.append(sequence_logps(model, input_ids, attention_mask, completion_mask, reduction=reduction).cpu())
    return torch.cat(pieces) if pieces else torch.zeros(0)


def encode_continuations(tokenizer, prompts: Sequence[str], continuations: Sequence[str]):
    """Token ids of prompts and continuations, each encoded on its own (no special tokens), for scoring text
    that was not generated with this tokenizer. Returns ``(prompt_ids, completion_ids)``."""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(list(continuations), add_special_tokens=False)["input_ids"]
    return prompt_ids, completion_ids


def perplexity(reference_model, generations: Generations, pad_token_id: int, batch_size: int = 32) -> torch.Tensor:
    """Per-row perplexity of the continuations under a frozen reference model, shape (N,):
    exp of the mean token NLL of y given x (the fluency equation of the module docstring)."""
    mean_logps = completion_logps(
        reference_model, generations.prompt_ids, generations.completion_ids, pad_token_id, "mean", batch_size
    )
    return torch.exp(-mean_logps)


def corpus_perplexity(reference_model, generations: Generations, pad_token_id: int, batch_size: int = 32) -> float:
    """exp(total NLL / total tokens) over all continuations: long continuations weigh more than short ones."""
    sum_logps = completion_logps(
        reference_model, generations.prompt_ids, generations.completion_ids, pad_token_id, "sum", batch_size
    )
    n_tokens = sum(len(c) for c in generations.completion_ids)
    return float(torch.exp(-sum_logps.sum() / n_tokens))


def kl_to_reference(
    policy_model, reference_model, generations: Generations, pad_token_id: int, batch_size: int = 32
) -> torch.Tensor:
    """Per-sample terms log pi(y|x) - log pi_ref(y|x), shape (N,); their mean estimates KL(pi || pi_ref).

    ``generations`` must have been sampled from ``policy_model``; see the module docstring for what the mean
    estimates under top-k / temperature sampling.
    """
    args = (generations.prompt_ids, generations.completion_ids, pad_token_id, "sum", batch_size)
    return completion_logps(policy_model, *args) - completion_logps(reference_model, *args)

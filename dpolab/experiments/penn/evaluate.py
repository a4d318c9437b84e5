"""Evaluation of one policy on every test prompt, and the summaries: means with 95% bootstrap intervals.

Per prompt x and its sampled continuation y (top-k 30, temperature 1, 30 new tokens; the same sampling seed for
every method, so the methods differ only by their weights):

| column          | what                                                               | summary                  |
| --------------- | ------------------------------------------------------------------ | ------------------------ |
| penn            | y names the University of Pennsylvania (dpolab.data.mentions_penn) | alignment accuracy       |
| nll_ref         | -(1/|y|) log pi_ref(y|x): the reference's mean token NLL           | exp(mean) = perplexity   |
| distinct_n      | unique / total word n-grams of y, n = 1, 2, 3 (NaN: shorter y)     | mean                     |
| repeated_2gram  | share of y's word bigrams that already occurred in y               | mean                     |
| relevance       | MiniLM cosine of x and y                                           | mean                     |
| kl              | log pi(y|x) - log pi_ref(y|x), summed over y's tokens              | mean ~ KL(pi || pi_ref)  |
| n_tokens        | tokens sampled (EOS included)                                      | mean                     |

Intervals: percentile bootstrap over prompts (dpolab.eval.bootstrap_ci). Across seeds the prompts are shared, so
the pooled estimate is the mean over prompts of each prompt's mean over seeds, bootstrapped over prompts (the
uncertainty from which prompts were drawn); the spread between seeds (training and sampling noise) is reported
beside it as the per-seed values and, with 2 or more seeds, a t interval of their mean. The perplexity interval is
exp of the interval of the mean NLL (the bootstrap percentile interval commutes with a monotone transform).
The KL column estimates E_q[log pi - log pi_ref] under the top-k sampling distribution q (dpolab.eval.likelihood).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

from ...eval import (
    SamplingConfig,
    bootstrap_ci,
    distinct_n,
    distinct_n_per_sample,
    generate,
    kl_to_reference,
    penn_flags,
    perplexity,
    relevance,
    repeated_ngram_rate,
)

__all__ = ["SUMMARIES", "evaluate_policy", "summarize", "pool_seeds"]


# metric name -> (its per-prompt column, the transform applied to the mean and to its interval's bounds)
SUMMARIES: dict[str, tuple[str, Callable[[float], float]]] = {
    "alignment": ("penn", float),  # alignment accuracy: share of outputs naming Penn
    "perplexity_ref": ("nll_ref", math.exp),  # fluency: exp(mean NLL) under the reference
    "distinct_1": ("distinct_1", float),
    "distinct_2": ("distinct_2", float),
    "distinct_3": ("distinct_3", float),
    "repeated_2gram": ("repeated_2gram", float),
    "relevance": ("relevance", float),  # MiniLM cosine of prompt and output
    "kl": ("kl", float),  # nats
    "length": ("n_tokens", float),  # tokens per output
}


def evaluate_policy(
    policy,
    reference,
    tokenizer,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    seed: int,
    is_reference: bool = False,
    timer: Callable | None = None,
) -> list[dict]:
    """Sample one continuation per prompt from ``policy`` and score it; one row per prompt (the table above).

    ``timer(phase)`` (a context-manager factory) times "generation" and "evaluation" separately.
    """
    timer = timer or (lambda phase: contextlib.nullcontext())
    with timer("generation"):
        gens = generate(policy, tokenizer, prompts, sampling, seed=seed)
    with timer("evaluation"):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        nll_ref = np.log(perplexity(reference, gens, pad).numpy())  # (N,) mean token NLL
        kl = np.zeros(len(gens)) if is_reference else kl_to_reference(policy, reference, gens, pad).numpy()
        penn = penn_flags(gens.texts)
        distinct = {n: distinct_n_per_sample(gens.texts, n) for n in (1, 2, 3)}
        rel = relevance(gens.prompts, gens.texts)
        rows = []
        for i, (x, y) in enumerate(zip(gens.prompts, gens.texts)):
            rows.append(
                {
                    "index": i,
                    "prompt": x,
                    "continuation": y,
                    "finished": bool(gens.finished[i]),
                    "n_tokens": len(gens.completion_ids[i]),
                    "penn": bool(penn[i]),
                    "nll_ref": float(nll_ref[i]),
                    **{f"distinct_{n}": _num(distinct[n][i]) for n in (1, 2, 3)},
                    "repeated_2gram": _num(repeated_ngram_rate(y, 2)),
                    "relevance": float(rel[i]),
                    "kl": float(kl[i]),
                }
            )
    return rows


def _num(value: float) -> float | None:
    """NaN (undefined for a short continuation) is stored as null in JSON."""
    return None if value is None or math.isnan(value) else float(value)


def _column(rows: Sequence[dict], column: str) -> np.ndarray:
    return np.array([math.nan if r[column] is None else float(r[column]) for r in rows])


def _interval(values: np.ndarray, transform, seed: int = 0) -> dict:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"estimate": None, "low": None, "high": None, "n": 0}
    ci = bootstrap_ci(values, seed=seed)
    return {
        "estimate": transform(ci.estimate),
        "low": transform(ci.low),
        "high": transform(ci.high),
        "n": int(values.size),
    }


def summarize(rows: Sequence[dict]) -> dict:
    """Each metric of SUMMARIES with its 95% bootstrap interval over prompts, plus corpus-level distinct-n
    (unique n-grams over all continuations together: low when the outputs are templated)."""
    out = {name: _interval(_column(rows, column), transform) for name, (column, transform) in SUMMARIES.items()}
    texts = [r["continuation"] for r in rows]
    for n in (1, 2, 3):
        out[f"corpus_distinct_{n}"] = {"estimate": _num(distinct_n(texts, n))}
    out["finished"] = {"estimate": float(np.mean([r["finished"] for r in rows]))}
    return out


def pool_seeds(rows_by_seed: dict[int, Sequence[dict]]) -> dict:
    """Pooled estimates over seeds (module docstring): per metric the pooled interval over prompts, the per-seed
    estimates, and with >= 2 seeds a 95% t interval of the seed estimates."""
    seeds = sorted(rows_by_seed)
    per_seed = {s: summarize(rows_by_seed[s]) for s in seeds}
    out = {}
    for name, (column, transform) in SUMMARIES.items():
        table = np.stack([_column(rows_by_seed[s], column) for s in seeds])  # (S, N)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of a prompt undefined at every seed
            prompt_means = np.nanmean(table, axis=0)  # (N,), NaN where every seed is undefined
        entry = _interval(prompt_means, transform)
        values = [per_seed[s][name]["estimate"] for s in seeds]
        entry["per_seed"] = values
        finite = [v for v in values if v is not None]
        if len(finite) >= 2 and np.std(finite) > 0:
            low, high = stats.t.interval(0.95, len(finite) - 1, loc=np.mean(finite), scale=stats.sem(finite))
            entry["seed_t_interval"] = [float(low), float(high)]
        out[name] = entry
    return out

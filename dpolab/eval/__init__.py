"""Evaluation of continuations: sampling (``generation``), text metrics (``metrics``) and model-based
metrics (``likelihood``). The pairwise judge lives in ``dpolab.judge``."""

from .generation import Generations, SamplingConfig, generate
from .likelihood import completion_logps, corpus_perplexity, encode_continuations, kl_to_reference, perplexity
from .metrics import (
    Interval,
    alignment_accuracy,
    bootstrap_ci,
    default_embedder,
    distinct_n,
    distinct_n_per_sample,
    ngrams,
    penn_flags,
    relevance,
    repeated_ngram_rate,
    words,
)

__all__ = [
    "Generations",
    "SamplingConfig",
    "generate",
    "completion_logps",
    "corpus_perplexity",
    "encode_continuations",
    "kl_to_reference",
    "perplexity",
    "Interval",
    "alignment_accuracy",
    "bootstrap_ci",
    "default_embedder",
    "distinct_n",
    "distinct_n_per_sample",
    "ngrams",
    "penn_flags",
    "relevance",
    "repeated_ngram_rate",
    "words",
]

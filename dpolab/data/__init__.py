"""Preference data: the shipped Penn set, loading, validating and tokenizing TRL-format data, the Penn detector.

    from dpolab.data import load_penn, load_preference_data, mentions_penn, tokenize_preferences
    penn = load_penn()                                   # DatasetDict: train (>= 1,300 rows), test (>= 125)
    pairs = load_preference_data("my_pairs.jsonl")       # or a .json list, {"train": ..., "test": ...}, a hub name
    examples = tokenize_preferences(pairs, tokenizer, max_length=1024)   # TRL's DPOTrainer's token ids, row for row
    mentions_penn("a lecture at Wharton")                # True
    rankings = penn_rankings(penn["train"])              # K = 3 rankings: chosen > rejected > another's rejected
    examples = tokenize_preferences(rankings, tokenizer) # {"prompt_ids", "completions_ids": [K lists], "index"}

TRL's formats (standard, conversational, implicit prompt) and dpolab's rankings (``{"prompt", "completions"}``, best
first, or with ``"scores"``) are described in ``dpolab/data/formats.py``; ``rankings.py`` expands rankings into pairs.

The datasheet of the Penn set is ``dpolab/data/DATASHEET.md``.
"""

from .formats import extract_prompt, is_listwise, ranked_completions, row_format
from .io import (
    DroppedRowsWarning,
    HubUnreachableError,
    PreferenceDataError,
    count_prompts,
    is_near_duplicate,
    load_preference_data,
    normalize_prompt,
    validate_rows,
)
from .penn import load_penn, mentions_penn, penn_mentions, penn_rankings
from .rankings import expand_rankings, is_listwise_data
from .tokenize import tokenize_pair, tokenize_preferences

__all__ = [
    "load_penn",
    "penn_rankings",
    "is_listwise",
    "is_listwise_data",
    "ranked_completions",
    "expand_rankings",
    "load_preference_data",
    "validate_rows",
    "tokenize_preferences",
    "tokenize_pair",
    "count_prompts",
    "extract_prompt",
    "row_format",
    "PreferenceDataError",
    "DroppedRowsWarning",
    "HubUnreachableError",
    "mentions_penn",
    "penn_mentions",
    "normalize_prompt",
    "is_near_duplicate",
]

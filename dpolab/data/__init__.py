"""Preference data: the shipped Penn set, loading and validating any TRL-format data, the Penn detector.

    from dpolab.data import load_penn, load_preference_data, mentions_penn
    penn = load_penn()                                   # DatasetDict: train (>= 1,300 rows), test (>= 125)
    pairs = load_preference_data("my_pairs.jsonl")       # or a .json list, {"train": ..., "test": ...}, a hub name
    mentions_penn("a lecture at Wharton")                # True

The datasheet of the Penn set is ``dpolab/data/DATASHEET.md``.
"""

from .io import (
    DroppedRowsWarning,
    HubUnreachableError,
    PreferenceDataError,
    is_near_duplicate,
    load_preference_data,
    normalize_prompt,
    validate_rows,
)
from .penn import load_penn, mentions_penn, penn_mentions

__all__ = [
    "load_penn",
    "load_preference_data",
    "validate_rows",
    "PreferenceDataError",
    "DroppedRowsWarning",
    "HubUnreachableError",
    "mentions_penn",
    "penn_mentions",
    "normalize_prompt",
    "is_near_duplicate",
]

"""Rankings of K completions: telling them from pairs, and expanding them into the pairs they imply (notebook 05).

A ranking row is ``{"prompt", "completions": [y_1, ..., y_K]}``, best first, or with ``"scores"``
(``dpolab.data.formats``). A listwise loss (``dpolab.losses.LISTWISE_LOSSES``, Plackett-Luce eq. 5.2) trains on
it as it is; a pairwise loss trains on the pairs it implies, made here as TRL-format pair rows:

    {"prompt": x, "completions": [y_1, y_2, y_3]}   --"adjacent"-->   (x, y_1, y_2), (x, y_2, y_3)
                                                    --"all"------->   (x, y_1, y_2), (x, y_1, y_3), (x, y_2, y_3)

(``dpolab.losses.ranking_pairs`` says which, and why "adjacent" pairs are not Bradley-Terry draws.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..losses import ranking_pairs
from .formats import LISTWISE_FIELD, is_listwise, ranked_completions
from .io import PreferenceDataError, find_problems

__all__ = ["is_listwise_data", "expand_rankings"]


def is_listwise_data(data: Any) -> bool:
    """Whether ``data`` (a ``datasets.Dataset`` or a sequence of rows) holds rankings rather than pairs."""
    columns = getattr(data, "column_names", None)
    if columns is not None:
        return LISTWISE_FIELD in columns
    return len(data) > 0 and isinstance(data[0], Mapping) and is_listwise(data[0])


def expand_rankings(rows: Sequence[Mapping[str, Any]], which: str, *, source: str = "<rows>") -> list[dict]:
    """Each ranking of ``rows`` as the pair rows ``{"prompt", "chosen", "rejected"}`` it implies (module docstring),
    ranking after ranking, its other columns (``topic``, ...) kept on each of its pairs; ``which`` is "adjacent"
    (K-1 pairs per ranking) or "all" (K(K-1)/2). The rows are validated first (one ``PreferenceDataError`` naming
    ``source``, row and field)."""
    rows = rows if hasattr(rows, "__len__") and hasattr(rows, "__getitem__") else list(rows)
    problems = find_problems(rows, source=source)
    if problems:
        raise PreferenceDataError(problems)
    pairs = []
    for row in rows:
        if not is_listwise(row):
            raise ValueError(f"{source}: expand_rankings takes rankings ({LISTWISE_FIELD!r} rows), got a pair")
        completions = ranked_completions(row)
        other = {k: v for k, v in row.items() if k not in ("prompt", LISTWISE_FIELD, "scores")}
        for i, j in ranking_pairs(len(completions), which):
            pairs.append({"prompt": row["prompt"], "chosen": completions[i], "rejected": completions[j], **other})
    return pairs

"""Load and validate preference data in TRL's formats: standard, conversational, implicit prompt (``formats.py``).

Sources (:func:`load_preference_data`):

- a JSON file holding a list of objects (like the seed experiment's files),
- a JSON Lines file, one object per line (``.jsonl``; blank lines are skipped but still counted),
- a dict of split name -> file, giving a ``DatasetDict``,
- anything else (a Hugging Face dataset name, a dataset folder) through ``datasets.load_dataset``; a
  dataset that needs the hub while the hub is unreachable raises :class:`HubUnreachableError`.

Rows are ``{"prompt", "chosen", "rejected"}`` as strings (standard: each completion carries its own leading space,
``" blue."``) or as lists of ``{"role", "content"}`` messages (conversational); without ``prompt`` the prompt is
implicit, the common start of chosen and rejected. Rankings are ``{"prompt", "completions"}`` (best first) or with
``"scores"`` (``formats.py``). Other columns (e.g. ``topic``) are kept.

Validation (:func:`find_problems`, :func:`validate_rows`) reports every problem with its source, its
1-based row (the line of a JSONL file, the position of the object in a JSON list) and its field: a missing,
null or empty field, a value that is neither a string nor a list of messages, a message with an unknown role or
no content, chosen equal to rejected, a ranking's problems (``formats.row_problems``), rows in two formats or
rankings of two lengths, a line that is not JSON, and with
``unique_prompts=True`` a repeated prompt. Nothing is dropped silently: any problem raises one
:class:`PreferenceDataError` that lists them all; with ``drop_invalid=True`` the bad rows are dropped instead and
a :class:`DroppedRowsWarning` says which and why.

Several pairs per prompt are normal in preference data and accepted by default (:func:`count_prompts` counts
the distinct prompts). With ``unique_prompts=True`` two rows whose prompts are equal after collapsing whitespace
(:func:`dpolab.data.formats.prompt_key`) are an error. The Penn set's own checks go further: prompts are
*near-duplicates* when their normalised forms are equal (:func:`normalize_prompt`: lower-case, punctuation
stripped, whitespace collapsed) or the Jaccard similarity of their normalised token sets reaches 0.8
(:func:`is_near_duplicate`): "The lecture today was insightful and" and "the lecture, today, was insightful and"
are near-duplicates; two ten-word prompts that differ in one word (9 shared tokens of 11, 0.82) are too, two
five-word prompts that differ in one word (4 of 6, 0.67) are not.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict

from .formats import LISTWISE_FIELD, is_listwise, prompt_key, row_format, row_problems

__all__ = [
    "FIELDS",
    "Problem",
    "PreferenceDataError",
    "DroppedRowsWarning",
    "HubUnreachableError",
    "normalize_prompt",
    "jaccard",
    "is_near_duplicate",
    "closest_matches",
    "near_duplicates",
    "read_rows",
    "find_problems",
    "count_prompts",
    "validate_rows",
    "load_preference_data",
]

FIELDS = ("prompt", "chosen", "rejected")
MAX_LISTED = 20  # problems spelled out in one message; the rest are counted
NEAR_DUPLICATE_JACCARD = 0.8
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet")  # a path, never a dataset name


# ----------------------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, located as precisely as the source allows."""

    source: str  # file path, dataset name, or "<rows>" for rows passed in memory
    row: int | None  # 1-based row as in the source; None when the whole source is at fault
    field: str | None  # the offending field; None when the whole row is at fault
    message: str
    index: int | None = None  # 0-based position among the parsed rows; None when the row did not parse

    def __str__(self) -> str:
        where = self.source if self.row is None else f"{self.source}, row {self.row}"
        what = f"field {self.field!r} " if self.field else ""
        return f"{where}: {what}{self.message}"


def _listing(problems: Sequence[Problem]) -> str:
    lines = [f"  - {problem}" for problem in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)


class PreferenceDataError(ValueError):
    """Invalid preference data. ``problems`` holds every :class:`Problem`; the message lists them."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        count = len(self.problems)
        super().__init__(f"invalid preference data, {count} problem{'s' * (count != 1)}:\n{_listing(self.problems)}")

    def __reduce__(self):  # pickle with the problems, not the message (e.g. across datasets' worker processes)
        return type(self), (self.problems,)


class DroppedRowsWarning(UserWarning):
    """Rows dropped by ``drop_invalid=True``: ``problems`` says why, ``dropped`` counts the rows."""

    def __init__(self, problems: Sequence[Problem], dropped: int, total: int):
        self.problems, self.dropped, self.total = list(problems), dropped, total
        super().__init__(f"dropped {dropped} of {total} rows with invalid preference data:\n{_listing(self.problems)}")


class HubUnreachableError(ConnectionError):
    """A dataset name was given but the Hugging Face hub cannot be reached (and the dataset is not cached)."""


# ---------------------------------------------------------------------------------- near-duplicates


def normalize_prompt(text: str) -> str:
    """Lower-case, strip punctuation and collapse whitespace: prompts equal after this are duplicates."""
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


def _token_sets(texts: Sequence[str]) -> list[frozenset[str]]:
    return [frozenset(normalize_prompt(text).split()) for text in texts]


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def jaccard(a: str, b: str) -> float:
    """Jaccard similarity |A & B| / |A | B| of the token sets of the normalised texts (1.0 for two empties)."""
    return _jaccard(*_token_sets([a, b]))


def is_near_duplicate(a: str, b: str, threshold: float = NEAR_DUPLICATE_JACCARD) -> bool:
    """Equal after :func:`normalize_prompt`, or token-set Jaccard similarity >= ``threshold``."""
    return normalize_prompt(a) == normalize_prompt(b) or jaccard(a, b) >= threshold


def closest_matches(queries: Sequence[str], references: Sequence[str]) -> list[tuple[float, int]]:
    """For each query, (its highest token-set Jaccard similarity to a reference, that reference's index)."""
    reference_sets = _token_sets(references)
    return [
        max((_jaccard(query, reference), j) for j, reference in enumerate(reference_sets))
        for query in _token_sets(queries)
    ]


def near_duplicates(
    queries: Sequence[str], references: Sequence[str], threshold: float = NEAR_DUPLICATE_JACCARD
) -> list[tuple[int, int]]:
    """``(i, j)``: ``queries[i]`` is a near-duplicate of ``references[j]``, its closest match.

    Equal normalised texts have equal token sets (Jaccard 1), so the similarity alone decides.
    """
    return [(i, j) for i, (similarity, j) in enumerate(closest_matches(queries, references)) if similarity >= threshold]


# ---------------------------------------------------------------------------------------- validation


def _format_problem(row: Mapping, first: Mapping, first_number: str) -> tuple[str, str] | None:
    """(field, message) for a row whose format differs from the first valid row's (a ranking's length included),
    or None."""
    if is_listwise(row) and is_listwise(first) and len(row[LISTWISE_FIELD]) != len(first[LISTWISE_FIELD]):
        k, first_k = len(row[LISTWISE_FIELD]), len(first[LISTWISE_FIELD])
        return LISTWISE_FIELD, (
            f"holds {k} completions while {first_number} holds {first_k}: every ranking of a dataset has the same "
            "number of completions (a batch is B x K); split the data by K"
        )
    if row_format(row) == row_format(first):
        return None
    if is_listwise(row) != is_listwise(first):
        what = (
            "(a ranking) while {} is a pair (chosen, rejected)"
            if is_listwise(row)
            else "(a pair) while {} is a ranking"
        )
        return LISTWISE_FIELD if is_listwise(row) else "chosen", (
            f"is given {what.format(first_number)}: use one format throughout"
        )
    if ("prompt" in row) != ("prompt" in first):
        what = "is missing (an implicit prompt)" if "prompt" not in row else "is given"
        other = "has one" if "prompt" in first else "has none"
        return "prompt", f"{what} while {first_number} {other}: TRL reads every row in one format, use one throughout"
    return LISTWISE_FIELD if is_listwise(row) else "chosen", (
        f"is in the {row_format(row)} format while {first_number} is {row_format(first)}: TRL reads every row in "
        "one format, use one throughout"
    )


def find_problems(
    rows: Sequence[Any],
    *,
    source: str = "<rows>",
    where: Sequence[tuple[str, int]] | None = None,
    unique_prompts: bool = False,
) -> list[Problem]:
    """Every problem in ``rows``; ``where[i]`` is row i's (source, 1-based row), by default (source, i + 1).

    Every valid row must be in the format of the first valid one. With ``unique_prompts``, a prompt repeated
    (up to whitespace) is reported on its second and later occurrences, naming the first one. Rows with other
    problems take no part in the format and duplicate checks.
    """
    where = where if where is not None else [(source, i + 1) for i in range(len(rows))]
    problems, first_seen, first_valid = [], {}, None

    def name(index: int, row_source: str) -> str:
        first_source, first_number = where[index]
        return f"row {first_number}" if first_source == row_source else f"{first_source}, row {first_number}"

    for index, (row, (row_source, row_number)) in enumerate(zip(rows, where, strict=True)):
        found = row_problems(row)
        if not found and first_valid is not None:
            found = [p for p in [_format_problem(row, rows[first_valid], name(first_valid, row_source))] if p]
        problems += [Problem(row_source, row_number, field, message, index) for field, message in found]
        if found:
            continue
        first_valid = index if first_valid is None else first_valid
        if not unique_prompts:
            continue
        key = prompt_key(row)
        if key in first_seen:
            message = f"duplicates the prompt of {name(first_seen[key], row_source)} (equal up to whitespace)"
            problems.append(Problem(row_source, row_number, "prompt", message, index))
        else:
            first_seen[key] = index
    return problems


def count_prompts(rows: Sequence[Mapping]) -> int:
    """The number of distinct prompts (up to whitespace) among valid ``rows``: pairs per prompt = len(rows) / this."""
    return len({prompt_key(row) for row in rows})


def _kept_indices(n_rows: int, problems: Sequence[Problem], drop_invalid: bool) -> list[int]:
    """Positions of the rows to keep; raises unless every problem is a row that ``drop_invalid`` may drop."""
    if not problems:
        return list(range(n_rows))
    if not drop_invalid or any(problem.row is None for problem in problems):
        raise PreferenceDataError(problems)
    bad = {problem.index for problem in problems if problem.index is not None}
    kept = [i for i in range(n_rows) if i not in bad]
    if not kept:
        raise PreferenceDataError([*problems, Problem(problems[0].source, None, None, "no valid rows left")])
    dropped = len({(problem.source, problem.row) for problem in problems})  # unparsed lines count too
    warnings.warn(DroppedRowsWarning(problems, dropped, dropped + len(kept)), stacklevel=3)
    return kept


def validate_rows(
    rows: Sequence[Any],
    *,
    source: str = "<rows>",
    drop_invalid: bool = False,
    unique_prompts: bool = False,
) -> list[dict]:
    """The rows, checked: raises :class:`PreferenceDataError` listing every problem, or with
    ``drop_invalid=True`` returns the valid rows and warns (:class:`DroppedRowsWarning`) about the others."""
    problems = find_problems(rows, source=source, unique_prompts=unique_prompts)
    return [rows[i] for i in _kept_indices(len(rows), problems, drop_invalid)]


# ------------------------------------------------------------------------------------------- reading


_EXPECTED_SHAPE = (
    'expected a JSON list of {"prompt", "chosen", "rejected"} objects (or {"prompt", "completions"} rankings), or '
    "JSON Lines (one such object per line)"
)


def _shape_problem(source: str, text: str) -> Problem | None:
    """A file of another shape than a JSON list or JSON Lines of rows: what was found, and what is expected."""
    first = text.lstrip()[:1]
    if first == "{":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            return None  # JSON Lines, or a broken object: the lines say which
        if isinstance(whole, dict) and not {*FIELDS, LISTWISE_FIELD} & set(whole):
            lists = [key for key, value in whole.items() if isinstance(value, list)]
            inside = f"; its {lists[0]!r} holds a list of {len(whole[lists[0]])} items" if lists else ""
            fix = f": write that list itself (json.dump(obj[{lists[0]!r}], f))" if lists else ""
            keys = ", ".join(map(repr, list(whole)[:8]))
            return Problem(
                source, None, None, f"holds one JSON object with keys {keys}{inside}; {_EXPECTED_SHAPE}{fix}"
            )
        return None
    if first in ("", "["):
        return None
    header = text.lstrip().split("\n", 1)[0]
    try:
        json.loads(header)
        return None  # JSON Lines of values that are not objects: each row says so
    except json.JSONDecodeError:
        pass
    if "," in header or "\t" in header:
        kind = "tab-separated" if "\t" in header and "," not in header else "comma-separated (CSV)"
        return Problem(
            source,
            None,
            None,
            f"looks like {kind} text (first line: {header[:60]!r}); {_EXPECTED_SHAPE}: convert it, e.g. "
            "datasets.load_dataset('csv', data_files=path)['train'].to_json('pairs.jsonl')",
        )
    return Problem(source, None, None, f"is not JSON (it starts with {header[:40]!r}); {_EXPECTED_SHAPE}")


def read_rows(path: str | os.PathLike) -> tuple[list[Any], list[int], list[Problem]]:
    """Parse a JSON list or JSON Lines file: (rows, their 1-based row numbers, parse problems).

    A file whose first non-blank character is ``[`` is read as one JSON list (row k = its k-th object);
    anything else as JSON Lines (row k = line k), split on newline ``\\n`` only, as the JSON Lines format says
    (``str.splitlines`` would also split at U+2028, U+0085 and other characters that JSON leaves unescaped inside
    strings); a ``\\r`` before the newline is JSON whitespace. A UTF-8 byte-order mark is skipped. A file of
    another shape (a JSON object holding the rows, CSV) is one problem saying what it holds and what is expected.
    Row contents are not checked here (see find_problems).
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is not data
    except UnicodeDecodeError as err:
        return [], [], [Problem(source, None, None, f"is not UTF-8 text ({err.reason} at byte {err.start})")]
    shape = _shape_problem(source, text)
    if shape is not None:
        return [], [], [shape]
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            message = f"is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
            return [], [], [Problem(source, None, None, message)]
        return rows, list(range(1, len(rows) + 1)), [] if rows else [Problem(source, None, None, "holds no rows")]
    rows, numbers, problems = [], [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            numbers.append(number)
        except json.JSONDecodeError as err:
            problems.append(Problem(source, number, None, f"is not valid JSON (column {err.colno}: {err.msg})"))
    if not rows and not problems:
        problems.append(Problem(source, None, None, "holds no rows"))
    return rows, numbers, problems


def _to_dataset(rows: Sequence[Mapping]) -> Dataset:
    """Rows -> Dataset with the union of their keys as columns (missing keys of extra columns become None)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return Dataset.from_dict({column: [row.get(column) for row in rows] for column in columns})


def _load_file(path: str | os.PathLike, drop_invalid: bool, unique_prompts: bool) -> Dataset:
    if not Path(path).is_file():
        raise FileNotFoundError(f"preference data file not found: {path}")
    rows, numbers, problems = read_rows(path)
    where = [(str(path), number) for number in numbers]
    problems += find_problems(rows, where=where, unique_prompts=unique_prompts)
    problems.sort(key=lambda problem: problem.row or 0)
    kept = _kept_indices(len(rows), problems, drop_invalid)
    return _to_dataset([rows[i] for i in kept])


# ----------------------------------------------------------------------------------------- the hub


def _offline() -> bool:
    return bool(datasets.config.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE)


def _load_with_datasets(
    name: str, split: str | None, drop_invalid: bool, unique_prompts: bool, **kwargs: Any
) -> Dataset | DatasetDict:
    try:
        data = datasets.load_dataset(name, split=split, **kwargs)
    except ConnectionError as err:
        reason = "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if _offline() else str(err)
        raise HubUnreachableError(
            f"cannot load the dataset {name!r}: the Hugging Face hub is unreachable ({reason}) and the dataset is "
            "not in the local cache. Pass a local file instead: load_preference_data('pairs.jsonl') for JSON Lines "
            'or a .json file holding a list of {"prompt", "chosen", "rejected"} objects, or '
            "{'train': 'train.jsonl', 'test': 'test.jsonl'} for several splits."
        ) from err
    options = dict(drop_invalid=drop_invalid, unique_prompts=unique_prompts)
    if isinstance(data, DatasetDict):
        return DatasetDict({key: _check_hub_split(part, f"{name}[{key}]", **options) for key, part in data.items()})
    return _check_hub_split(data, f"{name}[{split}]", **options)


def _check_hub_split(data: Dataset, source: str, drop_invalid: bool, unique_prompts: bool) -> Dataset:
    listwise = LISTWISE_FIELD in data.column_names
    missing = [field for field in ("chosen", "rejected") if field not in data.column_names and not listwise]
    if missing:
        message = f"is missing (columns: {', '.join(data.column_names)})"
        raise PreferenceDataError([Problem(source, None, field, message) for field in missing])
    fields = (*FIELDS, LISTWISE_FIELD, "scores") if listwise else FIELDS
    rows = list(data.select_columns([field for field in fields if field in data.column_names]))
    problems = find_problems(rows, source=source, unique_prompts=unique_prompts)
    kept = _kept_indices(len(rows), problems, drop_invalid)
    return data if len(kept) == len(rows) else data.select(kept)


# ------------------------------------------------------------------------------------------- loading


def _is_file(source: str | os.PathLike) -> bool:
    """A path to a JSON or JSON Lines file, existing or not; folders and other names go to load_dataset."""
    path = Path(source)
    if path.is_dir():
        return False
    return path.is_file() or isinstance(source, os.PathLike) or path.suffix in _FILE_SUFFIXES


def load_preference_data(
    source: str | os.PathLike | Mapping[str, str | os.PathLike],
    *,
    split: str | None = None,
    drop_invalid: bool = False,
    unique_prompts: bool = False,
    **load_dataset_kwargs: Any,
) -> Dataset | DatasetDict:
    """Preference data in one of TRL's formats (standard, conversational, implicit prompt), validated.

    - a path to a ``.json`` (list of objects) or ``.jsonl`` file -> ``Dataset``;
    - ``{"train": path, "test": path}`` -> ``DatasetDict`` (or one ``Dataset`` when ``split`` is given);
    - anything else (a Hugging Face dataset name, a local dataset folder, a builder such as ``"json"``)
      -> ``datasets.load_dataset(source, split=split, **load_dataset_kwargs)``, a ``Dataset`` when ``split``
      is given, else a ``DatasetDict``; raises :class:`HubUnreachableError` (a ``ConnectionError``) when
      the hub cannot be reached and the dataset is not cached.

    Invalid rows raise :class:`PreferenceDataError`; ``drop_invalid=True`` drops them with a
    :class:`DroppedRowsWarning`. Several pairs per prompt are accepted; ``unique_prompts=True`` makes a repeated
    prompt (up to whitespace) an error.
    """
    options = dict(drop_invalid=drop_invalid, unique_prompts=unique_prompts)
    if isinstance(source, Mapping):
        if split is not None and split not in source:
            raise KeyError(f"split {split!r} not among the files given: {sorted(source)}")
        names = [split] if split is not None else list(source)
        splits = DatasetDict({name: _load_file(source[name], **options) for name in names})
        return splits[split] if split is not None else splits
    if _is_file(source):
        return _load_file(source, **options)
    return _load_with_datasets(str(source), split, **options, **load_dataset_kwargs)

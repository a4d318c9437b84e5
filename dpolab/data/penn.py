"""The Penn preference set: the mention detector the evaluation uses, and the loader of the shipped data.

A continuation "mentions Penn" when it names the University of Pennsylvania. The detector is a regex that
finds candidate words, then looks at the word just before and just after each candidate to throw out the
look-alikes (people called Penn or Wharton, places named after William Penn, other universities).
It is deliberately small: every rule is in the word lists below, and the tests in
``tests/test_data_detector.py`` pin both directions.
"""

from __future__ import annotations

import re
from pathlib import Path

from datasets import Dataset, DatasetDict

from .io import load_preference_data

__all__ = ["mentions_penn", "penn_mentions", "load_penn", "penn_rankings", "PENN_FILES"]

# The shipped files (package data), written by ``python -m dpolab.data.build_penn``.
PENN_FILES = {
    "train": Path(__file__).with_name("files") / "penn_train.jsonl",
    "test": Path(__file__).with_name("files") / "penn_test.jsonl",
}

# Candidates, matched case-insensitively on word boundaries: "pennant", "penny", "penne", "Pennsylvania"
# and "Pennsylvanian" never match, "Penn's" and "UPenn's" do (the possessive is part of the match).
_CANDIDATE = re.compile(
    r"\b(?:(?P<full>university\s+of\s+pennsylvania)|(?P<upenn>u\.?[-\s]?penn)|(?P<penn>penn)|(?P<wharton>wharton))"
    r"(?:['\u2019]s)?\b",
    re.IGNORECASE,
)
# Word before "Penn" / "Wharton" that makes it a person or a place, not the university or its school.
_NOT_PENN_BEFORE = {
    # people called Penn: actors, a director, a photographer, the founder of Pennsylvania and his family
    "sean",
    "kal",
    "arthur",
    "irving",
    "wright",
    "chris",
    "william",
    "hannah",
    "admiral",
    # places called Penn: Mount Penn, East/West Penn (townships, utilities)
    "mount",
    "east",
    "west",
    # people called Wharton: the novelist, the founder of the school (a person, not the school)
    "edith",
    "joseph",
}
_NOT_PENN_AFTER = {
    # other institutions, stations and streets
    "state",
    "st",
    "station",
    "avenue",
    "ave",
    "street",
    "plaza",
    "square",
    "central",
    "line",
    "quarter",
    # places named after William Penn ("Penn's Landing", "Penn's Woods", "Penn's Treaty")
    "landing",
    "woods",
    "treaty",
    "hills",
    "valley",
    "township",
    "yan",
    "manor",
    "creek",
    # people whose first name is Penn
    "jillette",
    "badgley",
    # other things called Wharton
    "county",
    "esherick",
}
# Titles, the only words before a candidate whose full stop is not the end of a sentence ("Dr. Penn").
_TITLES = {"mr", "mrs", "ms", "dr", "mt"}
# "X University of Pennsylvania" is another university: the state system (PASSHE) and Indiana University.
_OTHER_UNIVERSITY_OF_PENNSYLVANIA = {
    "indiana",
    "california",
    "clarion",
    "edinboro",
    "bloomsburg",
    "kutztown",
    "millersville",
    "rock",
    "shippensburg",
    "haven",
    "stroudsburg",
    "mansfield",
    "cheyney",
    "chester",
    "commonwealth",
}
_WORD_BEFORE = re.compile(r"(\w+)(\.?)\s+$")  # "Sean Penn", "Dr. Penn"
_WORD_AFTER = re.compile(r"^(?:\s+|-)(\w+)")  # "Penn State", "Penn-State", "Penn's Landing"

_FORMS = {"full": "University of Pennsylvania", "upenn": "UPenn", "penn": "Penn", "wharton": "Wharton"}


def _word_before(text: str) -> str:
    """The word just before a candidate, lower-cased; "" at the start of a sentence."""
    match = _WORD_BEFORE.search(text)
    if match is None:
        return ""
    word, full_stop = match.group(1).lower(), match.group(2)
    return word if not full_stop or word in _TITLES else ""


def _word_after(text: str) -> str:
    """The word just after a candidate (and its possessive), lower-cased; "" when other punctuation follows."""
    match = _WORD_AFTER.search(text)
    return match.group(1).lower() if match else ""


def penn_mentions(text: str) -> list[str]:
    """The mentions of the University of Pennsylvania in ``text``, in order, as canonical forms.

    Each mention is one of ``"University of Pennsylvania"``, ``"UPenn"``, ``"Penn"``, ``"Wharton"``
    (the possessive ``'s`` is folded into its form). Matching ignores case.

    Fires on: "the University of Pennsylvania", "UPenn", "UPENN", "upenn's lab", "U. Penn", "Penn",
    "Penn's campus", "penn's campus", "Penn Medicine", "the Penn Museum", "Wharton", "the Wharton School",
    "a Wharton MBA".

    Does not fire on: "Pennsylvania" alone, "Pennsylvania Avenue", "Penn State", "Penn Station",
    "Penn Avenue", "Penn's Landing", "pennant", "penny", "pennies", "penne", "a fountain pen",
    "Sean Penn", "Kal Penn", "William Penn" (and "William Penn's statue"), "Penn Jillette",
    "Edith Wharton", "Mrs. Wharton", "Indiana University of Pennsylvania" and the other
    "X University of Pennsylvania" state universities.

    Known blind spots: a person called Penn or Wharton whose first name is not in the lists above
    ("Ellen Wharton"), and a town ("Wharton, Texas") are read as the university.
    """
    mentions = []
    for match in _CANDIDATE.finditer(text):
        kind = match.lastgroup
        before, after = _word_before(text[: match.start()]), _word_after(text[match.end() :])
        if kind == "full" and before in _OTHER_UNIVERSITY_OF_PENNSYLVANIA:
            continue
        if kind in ("penn", "wharton") and (before in _NOT_PENN_BEFORE | _TITLES or after in _NOT_PENN_AFTER):
            continue
        mentions.append(_FORMS[kind])
    return mentions


def mentions_penn(text: str) -> bool:
    """True when ``text`` names the University of Pennsylvania (see :func:`penn_mentions` for the rules)."""
    return bool(penn_mentions(text))


def load_penn(split: str | None = None) -> DatasetDict | Dataset:
    """The shipped Penn preference set, offline: a DatasetDict with "train" and "test", or one split.

    Columns: ``prompt``, ``chosen``, ``rejected`` (TRL's standard preference format: each completion starts with
    the space that joins it to the prompt) and ``topic``. The rows are validated on loading, every prompt unique
    (see :func:`dpolab.data.io.find_problems`).
    """
    if split is not None and split not in PENN_FILES:
        raise ValueError(f"split must be one of {sorted(PENN_FILES)} or None, got {split!r}")
    files = {name: str(path) for name, path in PENN_FILES.items() if split in (None, name)}
    data = load_preference_data(files, unique_prompts=True)
    return data[split] if split is not None else data


def penn_rankings(rows, seed: int = 0) -> list[dict]:
    """Rankings of K = 3 continuations built from Penn pairs, best first (the listwise format, ``formats.py``):

        [chosen, rejected, the rejected continuation of another row]

    The order is the one any reader (and the Penn set's own criteria) gives them: the chosen continuation fits the
    prompt and names Penn, the rejected one fits it and does not, the borrowed one does not fit it (it continues
    another sentence, preferably on another topic) and names no Penn either (no rejected continuation of the set
    does, ``DATASHEET.md``). Each step down loses one thing the data asks for, so the ranking is strict. The row
    lending its continuation is drawn uniformly among the rows of other topics (among all other rows when ``rows``
    hold one topic or have no ``topic``) with a generator seeded by ``seed``: the same rows and seed give the same
    rankings.

    ``rows``: Penn pair rows (``load_penn()["train"]`` or a selection of it). Returns one ranking per row, its
    ``topic`` kept.
    """
    import numpy as np

    rows = list(rows)
    if len(rows) < 2:
        raise ValueError(f"penn_rankings needs at least 2 rows (one lends its rejected continuation), got {len(rows)}")
    rng = np.random.default_rng(seed)
    by_topic: dict = {}
    for i, row in enumerate(rows):
        by_topic.setdefault(row.get("topic"), []).append(i)
    rankings = []
    for i, row in enumerate(rows):
        own = by_topic[row.get("topic")]
        others = [j for j in range(len(rows)) if j not in own] if len(own) < len(rows) else own
        others = [j for j in others if j != i and rows[j]["rejected"] not in (row["chosen"], row["rejected"])]
        borrowed = rows[others[int(rng.integers(len(others)))]]["rejected"]
        ranking = {"prompt": row["prompt"], "completions": [row["chosen"], row["rejected"], borrowed]}
        rankings.append(ranking | ({"topic": row["topic"]} if "topic" in row else {}))
    return rankings

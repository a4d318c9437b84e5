"""Build the shipped Penn preference set from the hand-written topic files.

    python -m dpolab.data.build_penn /work/penn_src [--out DIR] [--allow-small]

1. Read every ``<topic>.jsonl`` in the source folder: rows ``{"prompt", "chosen", "rejected", "topic"}``, the
   continuations written as text, without a leading space ("held at Penn.").
2. Validate all rows together: the library's validator (:func:`dpolab.data.io.find_problems`: fields present,
   non-empty strings, chosen != rejected) and the set's own rules (:func:`penn_problems`: prompts unique across
   all files after lower-casing and stripping punctuation; the topic names its file; by the detector the
   evaluation uses, the chosen continuation mentions Penn, the rejected one and the prompt do not; no
   continuation starts with whitespace). Any problem stops the build. Looser style rules (word counts) are only
   reported.
3. Split by code: within each topic, rank the rows by a salted SHA-256 of the normalised prompt and send the
   first ``round(TEST_FRACTION * n_topic)`` to test; then move back to train every test row whose prompt is a
   near-duplicate of a train prompt (repeated until none is left).
4. Refuse unless train >= 1,300 and test >= 125 rows; ``--allow-small`` (development) lifts this but writes
   only to an explicit ``--out`` folder outside the package, so that no small set is ever shipped.
5. Write ``penn_train.jsonl`` and ``penn_test.jsonl`` in TRL's standard format, each completion carrying the space
   that separates it from the prompt (``" held at Penn."``: the sequence is ``prompt + completion``), atomically
   (temporary file + ``os.replace``), rows sorted by (topic, prompt), keys in the order prompt, chosen, rejected,
   topic.

Then regenerate the datasheet: ``python -m dpolab.data.datasheet``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path

from ..files import atomic_write_text
from .io import FIELDS, PreferenceDataError, Problem, find_problems, near_duplicates, normalize_prompt, read_rows
from .penn import PENN_FILES, mentions_penn

MIN_TRAIN, MIN_TEST = 1300, 125
TEST_FRACTION = 0.09
SPLIT_SALT = "dpolab-penn-split-v1"  # changing it reshuffles the split
KEYS = (*FIELDS, "topic")
# Style rules of WRITING_RULES.md that are reported but do not stop the build: (field, min words, max words).
WORD_RANGES = (("prompt", 4, 12), ("chosen", 5, 25), ("rejected", 5, 25))
MAX_WORD_GAP = 3  # |words(chosen) - words(rejected)| per row

Row = dict[str, str]


def read_topic_files(folder: Path) -> tuple[list[Row], list[tuple[str, int]], list[Problem]]:
    """All rows of ``folder/*.jsonl`` in file order, where each comes from, and the parse problems."""
    paths = sorted(folder.glob("*.jsonl"))
    if not paths:
        raise FileNotFoundError(f"no *.jsonl topic files in {folder}")
    rows, where, problems = [], [], []
    for path in paths:
        file_rows, numbers, file_problems = read_rows(path)
        rows += file_rows
        where += [(str(path), number) for number in numbers]
        problems += file_problems
    return rows, where, problems


def penn_problems(rows: Sequence[Row], where: Sequence[tuple[str, int]]) -> list[Problem]:
    """The Penn set's own rules, for rows that passed :func:`find_problems`."""
    problems, first_seen = [], {}
    for index, (row, (source, number)) in enumerate(zip(rows, where, strict=True)):
        checks = [
            ("topic", row.get("topic") == Path(source).stem, f"must be {Path(source).stem!r} (the file's name)"),
            ("chosen", mentions_penn(row["chosen"]), "does not mention Penn (per dpolab.data.mentions_penn)"),
            ("rejected", not mentions_penn(row["rejected"]), "mentions Penn (per dpolab.data.mentions_penn)"),
            ("prompt", not mentions_penn(row["prompt"]), "mentions Penn (per dpolab.data.mentions_penn)"),
            *((k, not row[k][:1].isspace(), "starts with whitespace (the build adds the space)") for k in FIELDS[1:]),
        ]
        problems += [Problem(source, number, field, message, index) for field, ok, message in checks if not ok]
        key = normalize_prompt(row["prompt"])
        if key in first_seen:
            first_source, first_number = where[first_seen[key]]
            other = f"row {first_number}" if first_source == source else f"{first_source}, row {first_number}"
            message = f"duplicates the prompt of {other} (equal after lower-casing and stripping punctuation)"
            problems.append(Problem(source, number, "prompt", message, index))
        else:
            first_seen[key] = index
    return problems


def with_separator(row: Row) -> Row:
    """The row in TRL's standard format: each continuation preceded by the space that joins it to the prompt."""
    return {**row, "chosen": " " + row["chosen"], "rejected": " " + row["rejected"]}


def style_notes(rows: Sequence[Row], where: Sequence[tuple[str, int]]) -> list[Problem]:
    """Deviations from the writing rules' word counts: reported, not fatal."""
    notes = []
    for index, (row, (source, number)) in enumerate(zip(rows, where, strict=True)):
        words = {field: len(row[field].split()) for field in FIELDS}
        for field, low, high in WORD_RANGES:
            if not low <= words[field] <= high:
                notes.append(Problem(source, number, field, f"has {words[field]} words (rule: {low}-{high})", index))
        if abs(words["chosen"] - words["rejected"]) > MAX_WORD_GAP:
            gap = f"{words['chosen']} vs {words['rejected']} words (rule: within {MAX_WORD_GAP})"
            notes.append(Problem(source, number, "rejected", f"length differs from chosen: {gap}", index))
    return notes


def _split_key(prompt: str) -> str:
    return hashlib.sha256(f"{SPLIT_SALT}:{normalize_prompt(prompt)}".encode()).hexdigest()


def split_rows(rows: Sequence[Row], test_fraction: float = TEST_FRACTION) -> tuple[list[Row], list[Row], int]:
    """(train, test, moved): a deterministic per-topic split; ``moved`` test rows went back to train because
    their prompt is a near-duplicate of a train prompt."""
    train, test = [], []
    by_topic = sorted(rows, key=lambda row: (row["topic"], _split_key(row["prompt"])))
    for _, group in groupby(by_topic, key=lambda row: row["topic"]):
        group = list(group)
        n_test = round(test_fraction * len(group))
        test += group[:n_test]
        train += group[n_test:]
    moved = 0
    while pairs := near_duplicates([row["prompt"] for row in test], [row["prompt"] for row in train]):
        leaving = {i for i, _ in pairs}
        train += [test[i] for i in sorted(leaving)]
        test = [row for i, row in enumerate(test) if i not in leaving]
        moved += len(leaving)
    return train, test, moved


def write_jsonl(rows: Sequence[Row], path: Path) -> None:
    """Write ``rows`` sorted by (topic, prompt), atomically (``dpolab.files.atomic_write_text``)."""
    ordered = sorted(rows, key=lambda row: (row["topic"], row["prompt"]))
    lines = [json.dumps({key: row[key] for key in KEYS}, ensure_ascii=False) + "\n" for row in ordered]
    atomic_write_text(path, "".join(lines))


def build(source: Path, out: Path, allow_small: bool = False) -> tuple[list[Row], list[Row]]:
    """Read, validate, split and write; returns (train, test). Raises PreferenceDataError on any problem."""
    rows, where, problems = read_topic_files(source)
    problems += find_problems(rows, where=where)
    if problems:
        raise PreferenceDataError(problems)
    problems = penn_problems(rows, where)
    if problems:
        raise PreferenceDataError(problems)
    notes = style_notes(rows, where)
    if notes:
        print(f"{len(notes)} style notes (not fatal):", *(f"  - {note}" for note in notes), sep="\n", file=sys.stderr)
    train, test, moved = split_rows(rows)
    train, test = [with_separator(row) for row in train], [with_separator(row) for row in test]
    print(f"{len(rows)} rows -> train {len(train)}, test {len(test)} ({moved} near-duplicates moved to train)")
    if len(train) < MIN_TRAIN or len(test) < MIN_TEST:
        if not allow_small:
            raise SystemExit(f"refusing to write: need train >= {MIN_TRAIN} and test >= {MIN_TEST} (--allow-small)")
        if out.resolve() == PENN_FILES["train"].parent.resolve():
            raise SystemExit("--allow-small writes only to an explicit --out folder outside the package")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, out / PENN_FILES["train"].name)
    write_jsonl(test, out / PENN_FILES["test"].name)
    print(f"wrote {out / PENN_FILES['train'].name} and {out / PENN_FILES['test'].name}")
    return train, test


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="folder of <topic>.jsonl files")
    parser.add_argument("--out", type=Path, default=PENN_FILES["train"].parent, help="output folder (default: package)")
    parser.add_argument("--allow-small", action="store_true", help="development: allow a small set (needs --out)")
    args = parser.parse_args(argv)
    try:
        build(args.source, args.out, args.allow_small)
    except PreferenceDataError as err:
        raise SystemExit(f"build failed: {err}") from err


if __name__ == "__main__":
    main()

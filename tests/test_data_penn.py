"""The shipped Penn set has every property the issue asks for, its datasheet is up to date, and the builder
that made it validates, splits and writes the way its docstring says."""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from scipy import stats

from dpolab.data import PreferenceDataError, build_penn, load_penn, mentions_penn
from dpolab.data.datasheet import DATASHEET, regenerate
from dpolab.data.penn import PENN_FILES

# ------------------------------------------------------------------------------------ the shipped set


@pytest.fixture(scope="module")
def penn():
    return load_penn()


@pytest.fixture(scope="module")
def rows(penn):
    return {name: split.to_list() for name, split in penn.items()}


def normal(text: str) -> str:
    """An independent normalisation (str.translate, not the library's regex): lower-cased, no punctuation."""
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def tokens(text: str) -> frozenset[str]:
    return frozenset(normal(text).split())


def words(texts: list[str]) -> np.ndarray:
    return np.array([len(text.split()) for text in texts])


def test_counts_and_columns(penn):
    assert len(penn["train"]) >= 1300
    assert len(penn["test"]) >= 125
    assert all(split.column_names == ["prompt", "chosen", "rejected", "topic"] for split in penn.values())


def test_one_split_loads_alone(penn):
    test = load_penn("test")
    assert isinstance(test, Dataset) and test["prompt"] == penn["test"]["prompt"]
    with pytest.raises(ValueError, match="split must be one of"):
        load_penn("validation")


def test_every_prompt_is_unique_even_after_lowercasing_and_stripping_punctuation(rows):
    prompts = [row["prompt"] for split in rows.values() for row in split]
    assert [prompt for prompt, count in Counter(map(normal, prompts)).items() if count > 1] == []


def test_no_test_prompt_equals_or_nearly_equals_a_train_prompt(rows):
    train = [(tokens(row["prompt"]), row["prompt"]) for row in rows["train"]]
    closest = max(
        (len(test & other) / len(test | other), test_prompt, other_prompt)
        for test, test_prompt in [(tokens(row["prompt"]), row["prompt"]) for row in rows["test"]]
        for other, other_prompt in train
    )
    assert closest[0] < 0.8, closest


def test_topics_are_spread(rows):
    topics = Counter(row["topic"] for split in rows.values() for row in split)
    test_topics = Counter(row["topic"] for row in rows["test"])
    total = sum(topics.values())
    assert len(topics) >= 25
    assert set(test_topics) == set(topics)  # every topic is tested
    assert max(topics.values()) / total <= 0.05  # no topic dominates


def test_the_detector_sees_penn_in_every_chosen_and_in_no_rejected_or_prompt(rows):
    wrong = [
        (name, row[field])
        for name, split in rows.items()
        for row in split
        for field, expected in (("chosen", True), ("rejected", False), ("prompt", False))
        if mentions_penn(row[field]) != expected
    ]
    assert wrong == []


def test_prompts_name_no_penn_and_chosen_use_no_lookalike(rows):
    forbidden_in_prompt = re.compile(r"penn|wharton|philadelphia|ivy league", re.IGNORECASE)
    lookalike_in_chosen = re.compile(r"penn\s+(?:state|station|ave)|(?:sean|william)\s+penn|edith\s+wharton", re.I)
    every_row = [row for split in rows.values() for row in split]
    assert [row["prompt"] for row in every_row if forbidden_in_prompt.search(row["prompt"])] == []
    assert [row["chosen"] for row in every_row if lookalike_in_chosen.search(row["chosen"])] == []


def test_some_rejected_hold_a_lookalike_that_the_detector_ignores(rows):
    """The writing rules ask for about 1 in 25; the detector must say no to all of them."""
    every_rejected = [row["rejected"] for split in rows.values() for row in split]
    tricky = [text for text in every_rejected if re.search(r"penn|wharton", text, re.IGNORECASE)]
    assert len(tricky) >= len(every_rejected) / 50
    assert not any(map(mentions_penn, tricky))


@pytest.mark.parametrize("split", ["train", "test"])
def test_no_length_shortcut(rows, split):
    """Mean word counts of chosen and rejected within half a word; a two-sample Kolmogorov-Smirnov test that
    does not reject equal length distributions at the 1% level; and a 1-Wasserstein distance (the average
    shift that turns one distribution into the other) below half a word. The seed set fails all three
    (12.4 against 9.1 words)."""
    chosen = words([row["chosen"] for row in rows[split]])
    rejected = words([row["rejected"] for row in rows[split]])
    assert abs(chosen.mean() - rejected.mean()) < 0.5
    assert stats.ks_2samp(chosen, rejected).pvalue > 0.01
    assert stats.wasserstein_distance(chosen, rejected) < 0.5


def test_completions_carry_the_space_that_joins_them_to_the_prompt(rows):
    """TRL's standard format: the sequence is prompt + completion, so each ending starts with one space and no
    prompt ends with one."""
    every_row = [row for split in rows.values() for row in split]
    assert all(row[k].startswith(" ") and not row[k][1].isspace() for row in every_row for k in ("chosen", "rejected"))
    assert not any(row["prompt"][-1].isspace() for row in every_row)


def test_files_are_sorted_with_fixed_keys():
    for path in PENN_FILES.values():
        lines = path.read_text(encoding="utf-8").splitlines()
        parsed = [json.loads(line) for line in lines]
        assert all(list(row) == ["prompt", "chosen", "rejected", "topic"] for row in parsed)
        keys = [(row["topic"], row["prompt"]) for row in parsed]
        assert keys == sorted(keys)


def test_the_split_is_the_one_the_builder_makes(rows):
    """Built, not hand-edited: re-splitting the union (in any order) gives back the shipped split."""
    union = rows["train"] + rows["test"]
    random.Random(0).shuffle(union)
    train, test, _ = build_penn.split_rows(union)
    assert sorted(row["prompt"] for row in train) == sorted(row["prompt"] for row in rows["train"])
    assert sorted(row["prompt"] for row in test) == sorted(row["prompt"] for row in rows["test"])


def test_datasheet_is_up_to_date(penn):
    current = DATASHEET.read_text(encoding="utf-8")
    assert regenerate(current, penn) == current, "run: python -m dpolab.data.datasheet"


# --------------------------------------------------------------------------------------------- the builder


def triple(topic: str, i: int) -> dict[str, str]:
    opening = ["my", "the", "our", "a"][i % 4] + f" {topic} story number {i} began when"
    return dict(prompt=opening, chosen=f"a friend at Penn told it {i}.", rejected=f"a friend told it {i}.", topic=topic)


def write_topics(folder: Path, per_topic: int = 6, topics: tuple[str, ...] = ("rain", "snow")) -> Path:
    folder.mkdir()
    for topic in topics:
        lines = [json.dumps(triple(topic, i)) for i in range(per_topic)]
        (folder / f"{topic}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_builder_writes_a_sorted_small_set_only_when_allowed_and_only_outside_the_package(tmp_path, monkeypatch):
    source = write_topics(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="refusing to write"):
        build_penn.main([str(source), "--out", str(out)])
    assert not out.exists()
    package = tmp_path / "package_files"
    monkeypatch.setitem(PENN_FILES, "train", package / "penn_train.jsonl")  # a stand-in for the package folder
    with pytest.raises(SystemExit, match="--allow-small writes only to an explicit --out"):
        build_penn.main([str(source), "--out", str(package), "--allow-small"])
    assert not package.exists()
    build_penn.main([str(source), "--out", str(out), "--allow-small"])
    written = {path.name: [json.loads(line) for line in path.read_text().splitlines()] for path in out.iterdir()}
    assert sorted(written) == ["penn_test.jsonl", "penn_train.jsonl"]  # no temporary file left
    # round(0.09 * 6) = 1 test row per topic
    assert len(written["penn_test.jsonl"]) == 2 and len(written["penn_train.jsonl"]) == 10
    for split in written.values():
        order = [(row["topic"], row["prompt"]) for row in split]
        assert order == sorted(order)
    every = written["penn_train.jsonl"] + written["penn_test.jsonl"]
    expected = {triple(topic, i)["prompt"]: triple(topic, i) for topic in ("rain", "snow") for i in range(6)}
    assert sorted(row["prompt"] for row in every) == sorted(expected)
    for row in every:  # written in TRL's standard format: the space before each ending is in the ending
        source = expected[row["prompt"]]
        assert (row["chosen"], row["rejected"]) == (" " + source["chosen"], " " + source["rejected"])


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ({"chosen": "a friend told it twice."}, "chosen", "does not mention Penn"),
        ({"rejected": "a friend at UPenn told it."}, "rejected", "mentions Penn"),
        ({"prompt": "the Wharton story began when"}, "prompt", "mentions Penn"),
        ({"topic": "hail"}, "topic", "must be 'rain'"),
        ({"rejected": "a friend at Penn told it 2."}, "rejected", "is equal to chosen"),
        ({"chosen": " a friend at Penn told it again."}, "chosen", "starts with whitespace"),
    ],
)
def test_builder_stops_on_a_broken_rule_naming_file_row_and_field(tmp_path, line, field, words):
    source = write_topics(tmp_path / "src")
    path = source / "rain.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), **line})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PreferenceDataError, match=rf"{path}, row 3: field '{field}' {words}"):
        build_penn.build(source, tmp_path / "out", allow_small=True)
    assert not (tmp_path / "out").exists()


def test_builder_finds_a_prompt_repeated_in_another_topic_file(tmp_path):
    source = write_topics(tmp_path / "src")
    snow = source / "snow.jsonl"
    lines = snow.read_text().splitlines()
    lines[4] = json.dumps({**json.loads(lines[4]), "prompt": triple("rain", 1)["prompt"].upper()})
    snow.write_text("\n".join(lines) + "\n")
    message = rf"{snow}, row 5: field 'prompt' duplicates the prompt of .*rain.jsonl, row 2"
    with pytest.raises(PreferenceDataError, match=message):
        build_penn.build(source, tmp_path / "out", allow_small=True)


def test_split_moves_near_duplicates_back_to_train():
    """Each topic holds two rows and sends one to test (round(0.5 * 2) = 1). In the three "twin" topics
    the two prompts are near-duplicates (one word added: Jaccard 5/6 or more), so the test row must go back
    to train; in the "distinct" topic it stays."""
    twins = ["when the old clock stopped we", "my neighbour planted tulips by the fence and", "the bus driver waved at"]
    rows = [
        {"prompt": prompt, "chosen": "at Penn.", "rejected": "at home.", "topic": f"twin {i}"}
        for i, opening in enumerate(twins)
        for prompt in (opening, opening + " all")
    ]
    rows += [
        {"prompt": prompt, "chosen": "at Penn.", "rejected": "at home.", "topic": "distinct"}
        for prompt in ("a letter from my aunt arrived saying", "the bakery on the corner sold")
    ]
    train, test, moved = build_penn.split_rows(rows, test_fraction=0.5)
    assert moved == 3
    assert [row["topic"] for row in test] == ["distinct"] and len(train) == 7

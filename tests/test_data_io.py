"""Loading preference data (JSON list, JSON Lines, split dicts, hub names) in TRL's formats (standard,
conversational, implicit prompt) and validating it: every bad input gets one PreferenceDataError that names the
file, the 1-based row and the field."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dpolab.data import (
    DroppedRowsWarning,
    HubUnreachableError,
    PreferenceDataError,
    count_prompts,
    extract_prompt,
    is_near_duplicate,
    load_preference_data,
    normalize_prompt,
    row_format,
    validate_rows,
)
from dpolab.data.io import jaccard

ROOT = Path(__file__).resolve().parents[1]
GOOD = [
    {"prompt": "The lecture today was", "chosen": "held at Penn.", "rejected": "held in a cold hall.", "topic": "a"},
    {"prompt": "My sister baked", "chosen": "a Wharton cake.", "rejected": "a birthday cake.", "topic": "b"},
    {"prompt": "After the storm,", "chosen": "UPenn reopened.", "rejected": "the town library reopened.", "topic": "c"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    """One row per line; a str row is written verbatim (for lines that are not JSON)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, indent=2))
    return path


def with_field(field: str, value) -> dict:
    return {**GOOD[0], "prompt": "A fresh opening for", field: value}


def without(field: str) -> dict:
    return {key: value for key, value in with_field("topic", "x").items() if key != field}


# (bad row, field named in the message, words of the message)
BAD_ROWS = {
    "missing chosen": (without("chosen"), "chosen", "is missing"),
    "missing prompt": (without("prompt"), "prompt", "is missing"),
    "empty prompt": (with_field("prompt", ""), "prompt", "is empty"),
    "blank rejected": (with_field("rejected", "   "), "rejected", "is empty"),
    "null chosen": (with_field("chosen", None), "chosen", "is null"),
    "number chosen": (with_field("chosen", 3), "chosen", "must be a string or a list of messages, got int"),
    "list rejected": (with_field("rejected", ["a", "b"]), "rejected", 'message 1 must be an object with "role"'),
    "chosen equals rejected": (with_field("rejected", GOOD[0]["chosen"] + " "), "rejected", "is equal to chosen"),
    "implicit prompt among explicit ones": (without("prompt"), "prompt", "is missing (an implicit prompt) while row 1"),
}


@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_bad_row_is_named_by_file_row_and_field(tmp_path, fmt, case):
    bad, field, words = BAD_ROWS[case]
    if fmt == "jsonl":  # a blank line is skipped but counted: the bad row is on line 4 of the file
        path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD[0], GOOD[1], "", bad])
        row = 4
    else:  # in a JSON list the row is the object's position
        path = write_json(tmp_path / "pairs.json", [GOOD[0], GOOD[1], bad])
        row = 3
    with pytest.raises(PreferenceDataError) as caught:
        load_preference_data(path)
    assert f"{path}, row {row}: field '{field}' {words}" in str(caught.value)
    [problem] = caught.value.problems
    assert (problem.source, problem.row, problem.field) == (str(path), row, field)


def test_a_line_that_is_not_json_is_named(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD[0], '{"prompt": "unterminated', GOOD[1]])
    with pytest.raises(PreferenceDataError, match=rf"{path}, row 2: is not valid JSON"):
        load_preference_data(path)


def test_a_row_that_is_not_an_object_is_named(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD[0], ["a", "list"]])
    with pytest.raises(PreferenceDataError, match=rf"{path}, row 2: expected a JSON object .* got list"):
        load_preference_data(path)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('[{"prompt": "a", "chosen": "b",\n  "rejected": "c"', r"is not valid JSON \(line 2"),
        ("", "holds no rows"),
        ("\n\n", "holds no rows"),
        ("[]", "holds no rows"),
    ],
    ids=["broken JSON list", "empty file", "blank lines", "empty list"],
)
def test_a_file_that_is_not_json_data_is_named(tmp_path, content, words):
    path = tmp_path / "pairs.json"
    path.write_text(content)
    with pytest.raises(PreferenceDataError, match=rf"{path}: {words}"):
        load_preference_data(path)


def test_a_file_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(PreferenceDataError, match=rf"{path}: is not UTF-8 text"):
        load_preference_data(path)


def test_a_missing_file_is_not_looked_up_on_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pairs\.jsonl"):
        load_preference_data(tmp_path / "pairs.jsonl")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.json"):
        load_preference_data("nowhere.json")


def test_every_problem_is_listed_in_one_error(tmp_path):
    same = {**GOOD[1], "rejected": GOOD[1]["chosen"]}
    rows = [GOOD[0], without("chosen"), with_field("prompt", 7), "not json", same]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(PreferenceDataError) as caught:
        load_preference_data(path)
    located = [(problem.row, problem.field) for problem in caught.value.problems]
    assert located == [(2, "chosen"), (3, "prompt"), (4, None), (5, "rejected")]
    message = str(caught.value)
    assert message.startswith("invalid preference data, 4 problems:")
    assert all(f"{path}, row {row}:" in message for row in (2, 3, 4, 5))


def test_a_long_list_of_problems_is_capped_with_a_count(tmp_path):
    rows = [{**GOOD[0], "prompt": f"opening number {i}", "chosen": ""} for i in range(30)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(PreferenceDataError) as caught:
        load_preference_data(path)
    message = str(caught.value)
    assert len(caught.value.problems) == 30
    assert "row 20:" in message and "row 21:" not in message
    assert message.endswith("... and 10 more")


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_good_files_load_with_every_column(tmp_path, fmt):
    path = (write_jsonl if fmt == "jsonl" else write_json)(tmp_path / f"pairs.{fmt}", GOOD)
    data = load_preference_data(path)
    assert isinstance(data, Dataset)
    assert data.column_names == ["prompt", "chosen", "rejected", "topic"]
    assert data.to_list() == GOOD


def test_extra_columns_of_later_rows_are_kept(tmp_path):
    rows = [GOOD[0], {**GOOD[1], "source": "writer B"}]
    data = load_preference_data(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert data["source"] == [None, "writer B"]


def test_a_dict_of_files_gives_splits(tmp_path):
    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", GOOD[:2]),
        "test": write_json(tmp_path / "test.json", GOOD[2:]),
    }
    data = load_preference_data(files)
    assert isinstance(data, DatasetDict)
    assert {name: len(split) for name, split in data.items()} == {"train": 2, "test": 1}
    assert load_preference_data(files, split="test")["prompt"] == [GOOD[2]["prompt"]]
    with pytest.raises(KeyError, match="validation"):
        load_preference_data(files, split="validation")


def test_drop_invalid_drops_only_bad_rows_and_reports_them(tmp_path):
    duplicate = {**GOOD[2], "prompt": GOOD[0]["prompt"].replace(" ", "  ")}
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD[0], with_field("chosen", ""), GOOD[1], "not json", duplicate])
    with pytest.warns(DroppedRowsWarning) as record:
        data = load_preference_data(path, drop_invalid=True, unique_prompts=True)
    assert data["prompt"] == [GOOD[0]["prompt"], GOOD[1]["prompt"]]
    [warning] = record
    report = warning.message
    assert (report.dropped, report.total) == (3, 5)
    assert [(p.row, p.field) for p in report.problems] == [(2, "chosen"), (4, None), (5, "prompt")]
    assert "dropped 3 of 5 rows" in str(report) and f"{path}, row 5: field 'prompt' duplicates" in str(report)


def test_drop_invalid_still_refuses_a_broken_file_or_nothing_left(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(PreferenceDataError, match="is not valid JSON"):
        load_preference_data(broken, drop_invalid=True)
    with pytest.raises(PreferenceDataError, match="no valid rows left"), warnings.catch_warnings():
        load_preference_data(write_jsonl(tmp_path / "bad.jsonl", [without("chosen")]), drop_invalid=True)


def test_without_drop_invalid_nothing_is_dropped_silently(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [*GOOD, with_field("chosen", "")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning-and-continue either
        with pytest.raises(PreferenceDataError):
            load_preference_data(path)


def test_several_pairs_per_prompt_are_accepted_unless_unique_prompts(tmp_path):
    rows = [GOOD[0], {**GOOD[1], "prompt": " " + GOOD[0]["prompt"].replace(" ", "\t")}, GOOD[2]]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    data = load_preference_data(path)
    assert len(data) == 3 and count_prompts(data) == 2
    with pytest.raises(PreferenceDataError) as caught:
        load_preference_data(path, unique_prompts=True)
    [problem] = caught.value.problems
    assert (problem.row, problem.field) == (2, "prompt")
    assert str(problem).endswith("field 'prompt' duplicates the prompt of row 1 (equal up to whitespace)")
    # compared exactly, up to whitespace: case and punctuation make another prompt
    other = [GOOD[0], {**GOOD[1], "prompt": "the LECTURE today, was"}]
    assert len(load_preference_data(write_jsonl(tmp_path / "other.jsonl", other), unique_prompts=True)) == 2


def test_the_error_survives_pickling(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD[0], without("chosen")])
    with pytest.raises(PreferenceDataError) as caught:
        load_preference_data(path)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert copy.problems == caught.value.problems and str(copy) == str(caught.value)


def test_validate_rows_in_memory():
    assert validate_rows(GOOD) == GOOD
    with pytest.raises(PreferenceDataError, match=r"<rows>, row 2: field 'rejected' is missing"):
        validate_rows([GOOD[0], without("rejected")])
    with pytest.warns(DroppedRowsWarning, match="dropped 1 of 2 rows"):
        assert validate_rows([without("rejected"), GOOD[1]], drop_invalid=True) == [GOOD[1]]


def test_near_duplicate_notion():
    assert normalize_prompt("  The lecture,  today WAS insightful -- and ") == "the lecture today was insightful and"
    assert jaccard("a b c d", "a b c e") == pytest.approx(3 / 5)
    eleven_words = "my old neighbour across the street planted tulips every single spring"
    one_word_changed = eleven_words.replace("tulips", "roses")
    assert jaccard(eleven_words, one_word_changed) == pytest.approx(10 / 12)
    assert is_near_duplicate(eleven_words, one_word_changed)
    assert is_near_duplicate("The lecture today was", "the lecture, today was")
    assert not is_near_duplicate("a b c d", "a b c e")  # short prompts that differ in a word are distinct


def test_a_dataset_name_goes_through_load_dataset_and_is_validated(tmp_path):
    """The hub branch on what is local: the packaged "json" builder, no network."""
    path = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    data = load_preference_data("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert data["prompt"] == [row["prompt"] for row in GOOD]
    splits = load_preference_data("json", data_files={"train": str(path)}, cache_dir=str(tmp_path / "cache"))
    assert isinstance(splits, DatasetDict) and len(splits["train"]) == 3
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], {**GOOD[1], "chosen": GOOD[1]["rejected"]}])
    with pytest.raises(PreferenceDataError, match=r"json\[train\], row 2: field 'rejected' is equal to chosen"):
        load_preference_data("json", data_files=str(bad), split="train", cache_dir=str(tmp_path / "cache"))
    no_chosen = write_jsonl(tmp_path / "no_chosen.jsonl", [without("chosen")])
    with pytest.raises(PreferenceDataError, match=r"json\[train\]: field 'chosen' is missing \(columns: prompt"):
        load_preference_data("json", data_files=str(no_chosen), split="train", cache_dir=str(tmp_path / "cache"))


def test_offline_hub_gives_a_clear_error(tmp_path):
    """A fresh interpreter, since the offline switches are read when datasets is imported."""
    code = (
        "from dpolab.data import load_preference_data, HubUnreachableError\n"
        "try:\n    load_preference_data('someone/penn-preferences', split='train')\n"
        "except HubUnreachableError as err:\n    print(type(err).__mro__[1].__name__, err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ConnectionError cannot load the dataset 'someone/penn-preferences'")
    assert "hub is unreachable (offline mode is on" in result.stdout
    assert "Pass a local file instead: load_preference_data('pairs.jsonl')" in result.stdout
    assert issubclass(HubUnreachableError, ConnectionError)


# ------------------------------------------------------------------------------- TRL's other formats


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CHAT = [
    {
        "prompt": [user("Where is Penn?")],
        "chosen": [assistant("In Philadelphia.")],
        "rejected": [assistant("No idea.")],
    },
    {
        "prompt": [{"role": "system", "content": "Be brief."}, user("Best coffee?")],
        "chosen": [assistant("Whatever you like.")],
        "rejected": [assistant("Tea.")],
    },
]
IMPLICIT = [
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("Go away.")]},
]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_conversational_rows_load_as_messages(tmp_path, fmt):
    path = (write_jsonl if fmt == "jsonl" else write_json)(tmp_path / f"chat.{fmt}", CHAT)
    data = load_preference_data(path)
    assert data.column_names == ["prompt", "chosen", "rejected"] and data.to_list() == CHAT
    assert [row_format(row) for row in data] == ["conversational", "conversational"]


def test_implicit_prompts_are_extracted_as_trl_extracts_them(tmp_path):
    data = load_preference_data(write_jsonl(tmp_path / "implicit.jsonl", IMPLICIT[:1]))
    assert data.column_names == ["chosen", "rejected"] and row_format(data[0]) == "standard, implicit prompt"
    assert extract_prompt(IMPLICIT[0]["chosen"], IMPLICIT[0]["rejected"]) == ("The sky is", " blue.", " green.")
    assert extract_prompt(IMPLICIT[1]["chosen"], IMPLICIT[1]["rejected"]) == (
        [user("Hi")],
        [assistant("Hello!")],
        [assistant("Go away.")],
    )


@pytest.mark.trl
@settings(max_examples=200, deadline=None)
@given(chosen=st.text("ab ", min_size=1, max_size=8), rejected=st.text("ab ", min_size=1, max_size=8))
def test_extract_prompt_is_trls(chosen, rejected):
    """Character for character, TRL's extract_prompt (where its first character differs TRL reads chosen[-1]; such
    a row has no prompt and is refused, see below)."""
    from trl.data_utils import extract_prompt as trl_extract_prompt

    assume(chosen[0] == rejected[0])
    theirs = trl_extract_prompt({"chosen": chosen, "rejected": rejected})
    assert extract_prompt(chosen, rejected) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])


BAD_CHAT = {
    "unknown role": (
        {**CHAT[0], "prompt": [{"role": "human", "content": "Hi"}]},
        "prompt",
        "message 1 has the unknown role 'human' (known: system, developer, user, assistant, tool)",
    ),
    "empty message": ({**CHAT[0], "chosen": [assistant("  ")]}, "chosen", "message 1 (assistant) is empty"),
    "no content": ({**CHAT[0], "chosen": [{"role": "assistant"}]}, "chosen", "message 1 (assistant) must have a"),
    "no messages": ({**CHAT[0], "rejected": []}, "rejected", "is an empty list of messages"),
    "text among messages": (
        {**CHAT[0], "chosen": "In Philadelphia."},
        "chosen",
        "is a string while 'prompt' is a list",
    ),
    "no common start": ({"chosen": "Blue sky.", "rejected": "Grey sky."}, "chosen", "shares no leading text"),
    "standard among conversational": (
        {"prompt": "Where is Penn?", "chosen": " There.", "rejected": " Here."},
        "chosen",
        "is in the standard format while row 1 is conversational",
    ),
}


@pytest.mark.parametrize("case", BAD_CHAT, ids=list(BAD_CHAT))
def test_a_bad_conversational_or_implicit_row_is_named(tmp_path, case):
    bad, field, words = BAD_CHAT[case]
    first = IMPLICIT[0] if "prompt" not in bad else CHAT[1]
    path = write_jsonl(tmp_path / "pairs.jsonl", [first, bad])
    with pytest.raises(PreferenceDataError) as caught:
        load_preference_data(path)
    [problem] = caught.value.problems
    assert (problem.source, problem.row, problem.field) == (str(path), 2, field)
    assert f"{path}, row 2: field '{field}' {words}" in str(caught.value)


# --------------------------------------------------------------------------- what a JSON Lines reader accepts


def test_line_separators_inside_strings_are_data_and_rows_are_lines(tmp_path):
    """json.dumps(..., ensure_ascii=False) leaves U+0085, U+2028 and U+2029 unescaped: they are not line ends."""
    unusual = {**GOOD[0], "chosen": "held at Penn\u2028(line separator)\x85(next line)\u2029(paragraph)."}
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps(row, ensure_ascii=False) for row in (unusual, GOOD[1])]
    path.write_text("\n".join([*lines, "", json.dumps(without("chosen"))]) + "\n", encoding="utf-8")
    with pytest.raises(PreferenceDataError) as caught:
        load_preference_data(path)
    [problem] = caught.value.problems
    assert (problem.row, problem.field) == (4, "chosen")  # the line number an editor shows
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")  # Windows line ends: \r is JSON whitespace
    assert list(load_preference_data(path)) == [unusual, GOOD[1]]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, fmt):
    path = write_jsonl(tmp_path / "pairs.jsonl", GOOD) if fmt == "jsonl" else write_json(tmp_path / "pairs.json", GOOD)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert list(load_preference_data(path)) == GOOD


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "pairs.json",
            json.dumps({"data": GOOD, "version": 2}, indent=2),
            "holds one JSON object with keys 'data', 'version'; its 'data' holds a list of 3 items; expected a JSON "
            'list of {"prompt", "chosen", "rejected"} objects (or {"prompt", "completions"} rankings), or JSON Lines '
            "(one such object per line): write that list itself (json.dump(obj['data'], f))",
        ),
        (
            "pairs.csv",
            "prompt,chosen,rejected\nThe lecture today was,held at Penn.,held in a cold hall.\n",
            "looks like comma-separated (CSV) text (first line: 'prompt,chosen,rejected'); expected a JSON list of",
        ),
        (
            "pairs.jsonl",
            "prompt\tchosen\trejected\na\tb\tc\n",
            r"looks like tab-separated text (first line: 'prompt\tchosen\trejected'); expected a JSON list of",
        ),
    ],
    ids=["object holding the rows", "csv", "tsv named .jsonl"],
)
def test_a_file_of_another_shape_says_what_it_holds_and_what_is_expected(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PreferenceDataError) as caught:
        load_preference_data(path)
    [problem] = caught.value.problems
    assert (problem.source, problem.row) == (str(path), None)
    assert problem.message.startswith(message)


def test_a_missing_csv_file_is_reported_missing_not_as_an_unreachable_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"preference data file not found: {tmp_path / 'pairs.csv'}"):
        load_preference_data(tmp_path / "pairs.csv")
    with pytest.raises(FileNotFoundError, match=r"not found: pairs\.csv"):
        load_preference_data("pairs.csv")


def _valid_rows():
    text = st.text(min_size=1, max_size=30).filter(str.strip)  # any Unicode (no surrogates: not encodable)
    row = st.fixed_dictionaries({"prompt": text, "chosen": text, "rejected": text}).filter(
        lambda r: r["chosen"].strip() != r["rejected"].strip()
    )
    return st.lists(row, min_size=1, max_size=6, unique_by=lambda r: normalize_prompt(r["prompt"]))


@settings(max_examples=30, deadline=None)
@given(rows=_valid_rows(), fmt=st.sampled_from(["jsonl", "json"]), ascii_only=st.booleans())
def test_random_valid_rows_read_back_unchanged(tmp_path_factory, rows, fmt, ascii_only):
    path = tmp_path_factory.mktemp("rows") / f"pairs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, ensure_ascii=ascii_only), encoding="utf-8")
    assert list(load_preference_data(path)) == rows

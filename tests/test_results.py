"""The committed results hold nothing secret or machine-specific: no absolute path into a home folder or dpolab's
cache (written from ``~`` or ``$DPOLAB_CACHE`` instead, dpolab.files.portable_path), no URL with credentials or a
query, no API key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dpolab.files import cache_root

RESULTS = Path(__file__).resolve().parents[1] / "results"
_PATH_END = r"(?=[/\s\"'`)]|$)"
PATTERNS = {
    "a home folder": r"(?<![\w~$.])/(?:root|home/[^/\s\"'`]+|Users/[^/\s\"'`]+)" + _PATH_END,
    "an absolute path into dpolab's cache": r"(?<![\w~$])/[^\s\"'`]*/\.cache/dpolab" + _PATH_END,
    "a URL with a user or password": r"\b[a-z][a-z0-9+.-]*://[^/\s\"'`@]+@",
    "a URL with a query": r"\bhttps?://[^\s\"'`?]*\?[^\s\"'`]",
    "an API key": r"\bsk-[A-Za-z0-9_-]{16,}|\bapi[_-]?key\s*[=:]\s*[\"']?[A-Za-z0-9_-]{8,}",
}
THIS_MACHINE = [p for p in {str(Path.home()), str(cache_root().absolute())} if len(p) > 1]


def problems(text: str) -> list[str]:
    found = [f"{what}: {m.group(0)!r}" for what, pattern in PATTERNS.items() for m in re.finditer(pattern, text)]
    return found + [f"this machine's {p!r}" for p in THIS_MACHINE if re.search(re.escape(p) + _PATH_END, text)]


def test_the_scan_finds_what_it_looks_for():
    for bad in [
        "from `/root/.cache/dpolab/smollm2`",
        '"work_dir": "/home/ada/runs/x"',
        '"source": "/data/cache/.cache/dpolab/smollm2"',
        "endpoint:m@https://user:pw@api.example.com/v1",
        "endpoint:m@https://api.example.com/v1?api-version=2024",
        'api_key = "abcdefgh12345678"',
    ]:
        assert problems(bad), bad
    for good in ["from `~/.cache/dpolab/smollm2`", "$DPOLAB_CACHE/ref-logps", "runs/penn-smollm2-135m", "/rootkit"]:
        assert not problems(good), good


FILES = sorted(p for p in RESULTS.rglob("*") if p.is_file() and p.suffix in {".json", ".jsonl", ".md", ".csv"})


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(RESULTS)) for p in FILES])
def test_committed_results_hold_no_machine_paths_or_secrets(path):
    hits = [f"line {n}: {hit}" for n, line in enumerate(path.read_text().split("\n"), 1) for hit in problems(line)]
    assert not hits, f"{path.relative_to(RESULTS)}: {len(hits)} hits, e.g. {hits[:3]}"


def test_the_committed_penn_report_renders_from_its_run_folder_byte_for_byte():
    """report.md is a function of the run folder's files: rendering it again from the committed run's config,
    metrics, win rates, frontier, histories and generations gives the committed report, byte for byte."""
    from dpolab.experiments.penn.report import render_report

    run = RESULTS / "penn-smollm2-135m"
    assert render_report(run) == (run / "report.md").read_text()


def test_the_committed_penn_histories_are_what_the_one_history_writer_writes(tmp_path):
    """The experiment writes each unit's history with dpolab.train's writer (history.py); from a committed unit's
    history.json it writes the committed history.json again, and a history.csv of the same cells (the committed ones
    were written by the experiment's former csv writer, with CRLF line ends, which csv readers read alike)."""
    import csv
    import json

    from dpolab.train.history import write_history

    units = sorted((RESULTS / "penn-smollm2-135m" / "units").glob("*/seed-*/history.json"))
    assert len(units) == 13  # every trained unit of the committed run
    for committed in units:
        out = tmp_path / committed.parent.parent.name
        out.mkdir()
        write_history(out, json.loads(committed.read_text()))
        assert (out / "history.json").read_text() == committed.read_text()
        with open(out / "history.csv", newline="") as ours, open(committed.with_suffix(".csv"), newline="") as theirs:
            assert list(csv.reader(ours)) == list(csv.reader(theirs)), committed.parent

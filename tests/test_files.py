"""dpolab.files and dpolab.errors: folders replaced whole or not at all, the leftovers of a killed write, paths and
URLs as they are written down (no home folder, no credentials), and the one-line errors of every command."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

from dpolab.errors import InputError, exit_status, one_line
from dpolab.files import (
    atomic_directory,
    atomic_write_text,
    portable_path,
    portable_text,
    read_jsonl,
    redact_url,
    remove_leftovers,
)


def test_a_folder_is_replaced_whole_and_an_error_keeps_the_old_one(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "pytorch_model.bin").write_text("old")
    with atomic_directory(target) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]  # no file of the old one left beside
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed half-way")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder either


def test_leftovers_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    hexa = "0123456789abcdef" * 2
    leftovers = [f".model.tmp-{hexa}", f".checkpoint-00000003.old-{hexa}", f".history.json.tmp-{hexa}.json"]
    for name in leftovers[:2]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    (tmp_path / leftovers[2]).write_text("{")
    keep = [".gitignore", ".model.tmp-notahexname", "model"]
    for name in keep:
        (tmp_path / name).write_text("mine")
    assert remove_leftovers(tmp_path) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == keep


def test_jsonl_records_split_on_newline_only(tmp_path):
    path = tmp_path / "records.jsonl"
    atomic_write_text(path, '{"text": "a\u2028b\x85c\u2029d"}\n\n{"text": "e"}\n')
    assert read_jsonl(path) == [{"text": "a\u2028b\x85c\u2029d"}, {"text": "e"}]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home folder of its own (Path.home() reads $HOME) and no $DPOLAB_CACHE."""
    home = tmp_path / "home" / "ada"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DPOLAB_CACHE", raising=False)
    return home


def test_paths_under_home_and_cache_are_written_from_their_root(home, tmp_path, monkeypatch):
    assert portable_path(home / ".cache" / "dpolab" / "smollm2") == "~/.cache/dpolab/smollm2"
    assert portable_path(home / "runs" / "a") == "~/runs/a"
    assert portable_path(home) == "~"
    assert portable_path(str(home) + "x/y") == str(home) + "x/y"  # another folder whose name starts alike
    assert portable_path(tmp_path / "elsewhere") == str(tmp_path / "elsewhere")
    assert portable_path("runs/train") == "runs/train"
    monkeypatch.setenv("DPOLAB_CACHE", str(home / "big-disk" / "cache"))
    assert portable_path(home / "big-disk" / "cache" / "ref-logps" / "k") == "$DPOLAB_CACHE/ref-logps/k"
    judge_id = f"offline:{home}/.cache/dpolab/smollm2:Weights(penn=1.0)"
    assert portable_text(judge_id) == "offline:~/.cache/dpolab/smollm2:Weights(penn=1.0)"


@pytest.mark.parametrize(
    "url, written",
    [
        ("https://user:pa55word@api.example.com/v1?api-key=s3cret#frag", "https://api.example.com/v1"),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("http://token@[::1]:8080/v1/?key=k", "http://[::1]:8080/v1/"),
    ],
)
def test_urls_are_written_without_credentials_query_or_fragment(url, written):
    assert redact_url(url) == written


def _wrapped() -> InputError:
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "x.jsonl")
        except PermissionError as err:
            raise InputError(f"--data x.jsonl: {err}") from err
    except InputError as err:
        return err


@pytest.mark.parametrize(
    "error, status, words",
    [
        (ValueError("batch_size must be an int >= 1, got 0"), 2, "batch_size must be an int >= 1, got 0"),
        (FileNotFoundError("preference data file not found: x.jsonl"), 2, "not found: x.jsonl"),
        (PermissionError(errno.EACCES, "Permission denied", "/data/run"), 2, "check the permissions of that path"),
        (OSError(errno.ENOSPC, "No space left on device", "/data/run/model"), 1, "free some space and rerun"),
        (KeyError("rewards/chosen"), 1, "KeyError: 'rewards/chosen' (unexpected; rerun with --debug"),
        (KeyboardInterrupt(), 130, "interrupted (a training run continues from its last checkpoint with --resume)"),
        (_wrapped(), 2, "--data x.jsonl: [Errno 13] Permission denied: 'x.jsonl': check the permissions"),
    ],
)
def test_an_error_becomes_one_line_and_an_exit_status(error, status, words):
    assert exit_status(error) == status
    assert words in one_line(error) and "\n" not in one_line(error)


def _failing_command(*extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``dpolab train`` on a data file that does not exist: fails before any model loads."""
    argv = [sys.executable, "-m", "dpolab.cli", "train", "--data", "missing.jsonl", "--no-progress", *extra]
    return subprocess.run(
        argv, cwd=REPO, env={**subprocess_env(), **(env or {})}, capture_output=True, text=True, timeout=120
    )


def test_a_command_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    done = _failing_command("--output-dir", str(tmp_path / "run"))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "dpolab train: error: --data missing.jsonl: preference data file not found: missing.jsonl"
    ]
    for debug in (
        _failing_command("--output-dir", str(tmp_path / "run"), "--debug"),
        _failing_command("--output-dir", str(tmp_path / "run"), env={"DPOLAB_DEBUG": "1"}),
    ):
        assert debug.returncode == 2
        assert debug.stderr.startswith("Traceback (most recent call last):")
        assert debug.stderr.splitlines()[-1] == done.stderr.splitlines()[0]

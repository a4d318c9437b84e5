"""The Penn experiment end to end: the --quick pipeline once (tiny Penn world, every method, every test prompt), then
its run folder, a rerun that must resume without retraining, and the bad-input paths.

The values asserted are recomputed here independently where they can be: DPO's, TRL's and IPO's first-step losses
(the policy is the reference at step 1, so h = 0: ln 2 for the sigmoid losses, (1/(2 beta))^2 for IPO), SFT's loss
equal to -logps/chosen, alignment accuracy from the saved continuations with the Penn detector, win rates that sum
to one across the diagonal.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dpolab.experiments.penn import METHODS, build_parser, main
from dpolab.experiments.penn.figures import FIGURES

ALL = list(METHODS)
ROWS = [*ALL, "reference"]
TRL_NAMES = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "learning_rate",
    "grad_norm",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The --quick pipeline, once: (run folder, argv, seconds)."""
    root = tmp_path_factory.mktemp("penn")
    # fp32: the step-1 identities below (log-ratios 0, loss log 2) hold to 1e-4 only without bf16 rounding, which
    # --precision auto would use on a CUDA device
    argv = [
        "--quick",
        "--precision",
        "fp32",
        "--output-dir",
        str(root / "run"),
        "--work-dir",
        str(root / "work"),
        "--no-progress",
    ]
    start = time.perf_counter()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    QUICK_OUTPUT.update(out=out.getvalue(), err=err.getvalue())
    sys.stdout.write(QUICK_OUTPUT["out"])  # shown by pytest when a test fails
    sys.stderr.write(QUICK_OUTPUT["err"])
    assert code == 0
    return root / "run", argv, time.perf_counter() - start


QUICK_OUTPUT: dict[str, str] = {}  # what the quick run printed (stdout, stderr)


def _read(path: Path):
    return json.loads(path.read_text())


def _generations(run: Path, unit: str) -> list[dict]:
    return [
        json.loads(line) for line in (run / "units" / unit / "seed-0" / "generations.jsonl").read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def test_prompts():
    from dpolab.data import load_penn

    return list(load_penn("test")["prompt"])


# ------------------------------------------------------------------------------------------ the run folder


@pytest.mark.slow
def test_config_records_the_model_and_the_settings(quick_run):
    run, _, seconds = quick_run
    config = _read(run / "config.json")
    assert config["model_info"]["name"] == "tiny" and config["model_info"]["fallback"] is False
    assert config["experiment"]["run"]["methods"] == ALL and config["experiment"]["run"]["quick"] is True
    assert config["experiment"]["hyper"]["max_steps"] == 30 and config["experiment"]["frontier"]["betas"] == [0.1, 0.5]
    assert config["experiment"]["trl"]["beta"] == 0.1 and config["experiment"]["hyper"]["beta"] == 0.5
    print(f"--quick took {seconds:.0f} s")


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL)
def test_histories_use_trls_metric_names(quick_run, method):
    run, _, _ = quick_run
    folder = run / "units" / method / "seed-0"
    history = _read(folder / "history.json")
    with open(folder / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(TRL_NAMES) <= set(rows[0]) and len(rows) == len(history) == 30
    assert [r["step"] for r in history] == list(range(1, 31))
    assert all(math.isfinite(r[k]) for r in history for k in TRL_NAMES)
    first = history[0]  # step 1 runs the initial weights, which are the reference: every log-ratio is 0
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-4) and first["rewards/margins"] == pytest.approx(
        0, abs=1e-4
    )
    expected_first_loss = {
        "dpo": math.log(2),
        "trl": math.log(2),
        "dpop": math.log(2),  # -log sigma(0)
        "ipo": (1 / (2 * 0.5)) ** 2,
    }  # (0 - 1/(2 beta))^2
    if method in expected_first_loss:
        assert first["loss"] == pytest.approx(expected_first_loss[method], abs=1e-4)
    if method == "sft":  # -log pi(y_w), the batch mean
        assert all(r["loss"] == pytest.approx(-r["logps/chosen"], rel=1e-5) for r in history)


@pytest.mark.slow
def test_odpo_trains_with_the_documented_offsets(quick_run):
    """Step 1 (h = 0): ODPO's loss is the batch mean of -log sigma(-Delta_i) = softplus(Delta_i) over the first
    batch's pairs, each with its own offset (not their mean)."""
    from dpolab.data import load_penn
    from dpolab.experiments.penn.methods import odpo_offsets
    from dpolab.train.examples import epoch_order

    run, _, _ = quick_run
    offsets = odpo_offsets(load_penn("train"), alpha=5.0)
    deltas = offsets[epoch_order(0, 0, len(offsets))[:16]]
    expected = float(np.mean(np.logaddexp(0, deltas)))
    assert expected != pytest.approx(float(np.logaddexp(0, offsets.mean())), rel=1e-3)  # the two modes differ here
    assert _read(run / "units/odpo/seed-0/history.json")[0]["loss"] == pytest.approx(expected, rel=1e-4)
    notes = " ".join(_read(run / "metrics.json")["notes"])
    assert f"mean {offsets.mean():.3f}, median {np.median(offsets):.3f}" in notes and "Applied per example" in notes


@pytest.mark.slow
def test_generations_cover_every_test_prompt(quick_run, test_prompts):
    from dpolab.data import mentions_penn

    run, _, _ = quick_run
    units = [p.parent.name for p in (run / "units").glob("*/seed-0")]
    assert set(ROWS) | {"dpo@beta=0.1", "dpop@beta=0.1", "ipo@beta=0.1"} == set(units)
    for unit in units:
        rows = _generations(run, unit)
        assert [r["prompt"] for r in rows] == test_prompts
        assert all(r["penn"] == mentions_penn(r["continuation"]) for r in rows)


@pytest.mark.slow
def test_metrics_have_intervals_that_contain_their_estimates(quick_run):
    run, _, _ = quick_run
    metrics = _read(run / "metrics.json")
    for method in ROWS:
        pooled = metrics["pooled"][method]
        for name, entry in pooled.items():
            assert entry["low"] <= entry["estimate"] <= entry["high"], (method, name, entry)
        flags = [r["penn"] for r in _generations(run, method)]
        assert pooled["alignment"]["estimate"] == pytest.approx(sum(flags) / len(flags))
        assert pooled["alignment"]["per_seed"] == [pytest.approx(sum(flags) / len(flags))]
    assert metrics["pooled"]["reference"]["kl"]["estimate"] == 0
    with open(run / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert {r["unit"] for r in table if r["seed"] == "pooled"} == set(ROWS)
    for row in table:
        for name in ("alignment", "perplexity_ref", "distinct_2", "repeated_2gram", "relevance", "kl"):
            assert float(row[f"{name}_low"]) <= float(row[name]) <= float(row[f"{name}_high"])


@pytest.mark.slow
def test_timings_cover_every_phase(quick_run):
    run, _, _ = quick_run
    timings = _read(run / "metrics.json")["timings"]
    assert {"load model", "judging"} <= set(timings["run"])
    for method in ALL:
        unit = timings["units"][f"{method}/seed-0"]
        assert unit["training"] > 0 and unit["generation"] > 0 and unit["evaluation"] > 0


@pytest.mark.slow
def test_no_progress_means_no_progress_bars(quick_run):
    """--no-progress: the console gets the [penn] lines, not TRL's or datasets' progress bars."""
    assert "[penn] train trl seed 0" in QUICK_OUTPUT["out"]
    for bar in ("Computing reference log probs", "Tokenizing train dataset", "Adding EOS"):
        assert bar not in QUICK_OUTPUT["err"] and bar not in QUICK_OUTPUT["out"], bar


@pytest.mark.slow
def test_an_interrupted_run_keeps_its_run_level_timings(quick_run, tmp_path, monkeypatch):
    """The run-level phases (loading, reference log-probs, ODPO's offsets) are saved before the first unit trains,
    so a run stopped inside a unit still records them; the finished run's metrics.json has the same times."""
    from dpolab.experiments.penn import pipeline

    run, argv, _ = quick_run
    assert _read(run / "timings.json") == _read(run / "metrics.json")["timings"]["run"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_unit", interrupted)
    fresh = tmp_path / "run"
    assert main([*argv, "--output-dir", str(fresh), "--methods", "dpo,odpo"]) == 130  # Ctrl-C's exit status
    timings = _read(fresh / "timings.json")
    assert timings["load model"] > 0 and timings["odpo offsets"] > 0
    assert not (fresh / "metrics.json").exists()


@pytest.mark.slow
def test_win_rates_and_frontier(quick_run):
    run, _, _ = quick_run
    wins = _read(run / "win_rates.json")
    assert wins["methods"] == ROWS and wins["n_failed"] == 0
    w = wins["win_rate"]
    for i in range(len(ROWS)):
        assert w[i][i] is None
        for j in range(i + 1, len(ROWS)):
            assert w[i][j] + w[j][i] == pytest.approx(1.0)
    frontier = _read(run / "frontier.json")
    assert {(p["method"], p["beta"]) for p in frontier["points"]} == {
        (m, b) for m in ("dpo", "dpop", "ipo") for b in (0.1, 0.5)
    }


@pytest.mark.slow
def test_figures_are_valid_pngs(quick_run):
    from PIL import Image

    run, _, _ = quick_run
    for name in FIGURES:
        with Image.open(run / "figures" / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 200


@pytest.mark.slow
def test_report_mentions_every_method_and_the_articles_numbers(quick_run):
    run, _, _ = quick_run
    report = (run / "report.md").read_text()
    for method in METHODS.values():
        assert method.label in report
    for number in ("~100%", "94%", "88%", "71%", "51%"):
        assert number in report
    assert "Quick smoke run" in report and "Wall time" in report and "ODPO offsets" in report
    for name in FIGURES:
        assert f"figures/{name}" in report


@pytest.mark.slow
def test_weights_do_not_outlive_their_evaluation(quick_run):
    run, argv, _ = quick_run
    work = Path(argv[argv.index("--work-dir") + 1])
    assert not list(work.rglob("*.safetensors")) and not list(work.rglob("checkpoint-*"))
    assert not list(run.rglob("*.safetensors")) and not list(run.rglob("*.pt"))


@pytest.mark.slow
def test_rerun_resumes_without_retraining(quick_run, capsys):
    run, argv, _ = quick_run
    markers = sorted(run.glob("units/*/seed-0/done.json"))
    before = {p: p.stat().st_mtime_ns for p in markers + sorted(run.glob("units/*/seed-0/history.json"))}
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[penn] train " not in out
    for p in markers:
        assert f"skip {p.parent.parent.name} seed 0: done" in out
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.slow
def test_a_unit_made_with_other_settings_is_refused_and_nothing_is_rewritten(quick_run, tmp_path, capsys):
    """A done.json whose settings hash this run does not compute (other settings, or an older layout such as
    dpolab 0.1.0's, whose fingerprint hashed the pairs' strings) is refused in one line before anything trains, and
    no file of the run folder changes."""
    run, argv, _ = quick_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    marker = copy / "units" / "dpo" / "seed-0" / "done.json"
    done = _read(marker)
    done["settings"]["train_sha256"] = "0123456789abcdef"
    digest = hashlib.sha256(json.dumps(done["settings"], sort_keys=True, default=str).encode()).hexdigest()[:16]
    marker.write_text(json.dumps({**done, "settings_hash": digest}))
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert main([*argv, "--output-dir", str(copy)]) == 2  # the last --output-dir wins
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert errors == [
        f"python -m dpolab.experiments.penn: error: {marker.parent} was made with other settings than this run's "
        "(or by an older dpolab); choose another --output-dir, or delete that folder to redo it"
    ]
    assert "[penn] train " not in captured.out
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_dead_judge_endpoint_fails_clearly_and_keeps_the_results(quick_run, tmp_path, monkeypatch, capsys):
    run, argv, _ = quick_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    metrics_before = _read(copy / "metrics.json")["pooled"]
    generations_before = (copy / "units/dpo/seed-0/generations.jsonl").read_bytes()
    monkeypatch.setenv("DPOLAB_JUDGE_BASE_URL", "http://127.0.0.1:9/v1")  # port 9 (discard): nothing listens
    monkeypatch.setenv("DPOLAB_JUDGE_MODEL", "judge")
    monkeypatch.setenv("DPOLAB_JUDGE_MAX_RETRIES", "0")
    monkeypatch.setenv("DPOLAB_JUDGE_TIMEOUT", "2")
    args = [*argv, "--output-dir", str(copy), "--judge", "endpoint"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "judging failed" in err and "127.0.0.1:9" in err and "rerun the same command to resume" in err
    assert _read(copy / "metrics.json")["pooled"] == metrics_before
    assert (copy / "units/dpo/seed-0/generations.jsonl").read_bytes() == generations_before
    assert (copy / "judgments-endpoint.jsonl").exists()


# --------------------------------------------------------------------------------------------- bad input


def test_every_flag_has_help():
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_missing_data_file_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["--quick", "--data", str(missing), "--output-dir", str(tmp_path / "run")]) == 2
    assert f"preference data file not found: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unknown_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--model", "no-such-model-xyz", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--model no-such-model-xyz" in err and "known names: auto, gpt2, smollm2-135m, tiny" in err


def test_unknown_method_exits_2_from_the_command_line(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpolab.experiments.penn",
            "--methods",
            "dpo,foo",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert done.returncode == 2
    assert "unknown method(s) ['foo']; known: trl,dpo,dpop,sft,kl_sft,ipo,odpo" in done.stderr


def test_endpoint_judge_without_its_settings_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DPOLAB_JUDGE_BASE_URL", raising=False)
    assert main(["--quick", "--judge", "endpoint", "--output-dir", str(tmp_path / "run")]) == 2
    assert "DPOLAB_JUDGE_BASE_URL" in capsys.readouterr().err
    assert not (tmp_path / "run" / "units").exists()


def test_an_output_dir_of_other_files_is_refused_before_anything_loads(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    # a model that does not exist: the folder is refused first, before the data and the model load
    assert main(["--quick", "--model", "/nonexistent", "--output-dir", str(folder)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"python -m dpolab.experiments.penn: error: --output-dir {folder} holds files the Penn experiment did not "
        "write (notes.txt): choose a new or empty --output-dir"
    ]
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]

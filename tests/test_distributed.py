"""Data-parallel training: ``torchrun --nproc_per_node 2`` (gloo, CPU) takes the same steps as one process
on the same global batches, and evaluates to the same eval_ metrics."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import dpolab_command, run_command
from safetensors.torch import load_file

from dpolab.train import EVAL_METRICS, METRICS

pytestmark = pytest.mark.slow


def _run(out, model_dir, data, eval_data, cache, *, processes: int, grad_accum: int) -> subprocess.CompletedProcess:
    # 20 pairs in batches of 8: two full batches and a last one of 4, so each process also meets an uneven shard
    launcher = ("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}") if processes > 1 else ()
    command = dpolab_command(
        "train",
        "--model",
        model_dir,
        "--data",
        data,
        "--eval-data",
        eval_data,
        "--batch-size",
        8,
        "--grad-accum",
        grad_accum,
        "--epochs",
        2,
        "--lr",
        1e-3,
        "--min-lr",
        1e-4,
        "--device",
        "cpu",
        "--no-progress",
        "--ref-cache-dir",
        cache,
        "--output-dir",
        out,
        launcher=launcher,
    )
    done = run_command(command, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_two_processes_take_the_same_steps_as_one(tiny_model_dir, tmp_path):
    model_dir, pairs = tiny_model_dir
    data = tmp_path / "pairs20.jsonl"
    data.write_text("".join(pairs.read_text().splitlines(keepends=True)[:20]))
    eval_data = tmp_path / "eval7.jsonl"  # 7 pairs: the processes score shares of unequal size
    eval_data.write_text("".join(pairs.read_text().splitlines(keepends=True)[20:27]))
    one = _run(tmp_path / "one", model_dir, data, eval_data, tmp_path / "cache1", processes=1, grad_accum=1)
    two = _run(tmp_path / "two", model_dir, data, eval_data, tmp_path / "cache2", processes=2, grad_accum=2)
    assert "on 1 process" in one.stdout and "on 2 processes" in two.stdout
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    assert len(h1) == len(h2) == 8  # 3 steps per epoch, the last on 4 pairs; an eval row after each epoch
    assert [r["step"] for r in h1 if "eval_loss" in r] == [r["step"] for r in h2 if "eval_loss" in r] == [3, 6]
    for r1, r2 in zip(h1, h2):
        for key in METRICS if "loss" in r1 else EVAL_METRICS:  # summed over the processes: a process that saw the
            # whole batch would double them
            if key == "rewards/accuracies" and r1["step"] == 1:
                continue  # pi = pi_ref at step 1: every margin is 0 up to rounding, so margin > 0 is noise
            assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-5), (r1["step"], key)
    p1 = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    p2 = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert p1.keys() == p2.keys()
    # Equal to float tolerance: the gradients are summed in another order (and each process packs its own share of
    # the pairs into rows of other shapes), and Adam turns rounding noise in a gradient coordinate of size ~eps into
    # a step anywhere in [-lr, lr]. So: 99.9% of the coordinates within 1e-5 (a process missing the other's
    # gradients would move nearly all of them by ~lr = 1e-3), all within lr.
    diff = torch.cat([(p1[n] - p2[n]).abs().flatten() for n in p1])
    assert diff.max() <= 1e-3
    assert (diff > 1e-5).sum() <= 1e-3 * diff.numel(), f"{(diff > 1e-5).sum()} of {diff.numel()} coordinates differ"
    initial = load_file(str(model_dir / "model.safetensors"))
    assert any((p1[n] - initial[n]).abs().max() > 1e-3 for n in p1)  # training did move the weights

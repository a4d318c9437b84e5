"""The benchmark harness: its FLOP count against torch's own counter, and TRL and dpolab on one tiny setting."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import DEVICES, tiny_gpt2
from torch.utils.flop_counter import FlopCounterMode

from dpolab.bench.__main__ import LOSS_RTOL, check_same_start
from dpolab.bench.flops import _products, matmul_ceiling, matmul_weights, pair_flops
from dpolab.bench.lockstep import run_lockstep
from dpolab.data.packing import PackedPreferenceCollator
from dpolab.logprobs import packed_logps

TINY = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 32, "n_layer": 1, "n_head": 2}


def _onednn_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """oneDNN's X W^T (dpolab.matmul), which torch's counter does not know: X (m, k), W (n, k) -> 2 m k n."""
    (m, k), (n, _) = x_shape, w_shape
    return 2 * m * k * n


def test_pair_flops_matrix_products_equal_torch_flop_counter():
    """Forward and backward of one packed pair, counted by torch.utils.flop_counter: its matrix products (mm, addmm,
    oneDNN's) are exactly the body and LM-head terms of pair_flops, but for the fused head's fourth product per token
    (it recomputes its logits in the backward); the attention term is what remains of pair_flops."""
    from dpolab.matmul import _operator, onednn_linear

    model = tiny_gpt2(501, seed=0, n_layer=2, n_embd=32)
    P, C, R = 5, 7, 4
    ex = [
        {
            "prompt_ids": list(range(3, 3 + P)),
            "chosen_ids": list(range(20, 20 + C)),
            "rejected_ids": list(range(40, 40 + R)),
            "index": 0,
        }
    ]
    batch = PackedPreferenceCollator(pad_token_id=1)(ex)
    with torch.no_grad():
        packed_logps(model, batch)  # the one-time probes of the model's head and packing (dpolab.lm_head), uncounted
    onednn = {_operator(): _onednn_flops} if onednn_linear() is not None else {}
    with FlopCounterMode(display=False, custom_mapping=onednn) as counter:
        chosen, rejected = packed_logps(model, batch)
        (chosen - rejected).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    products = sum(
        v for op, v in counts.items() if op.__name__.split(".")[0] in ("mm", "addmm", "bmm", "_linear_pointwise")
    )
    V, D, L = 501, 32, 2
    body, head = 2 * matmul_weights(model) * (P + C + R), 2 * V * D * (C + R)  # forward products
    assert products == 3 * body + 4 * head
    assert matmul_weights(model) == L * 12 * D * D  # c_attn 3D^2, attn c_proj D^2, c_fc 4D^2, mlp c_proj 4D^2
    visible = P * (P + 1) / 2 + (C + R) * P + C * (C + 1) / 2 + R * (R + 1) / 2
    assert pair_flops(model, P, C, R) == 3 * (body + head) + 3 * 4 * D * L * visible


def test_matmul_ceiling_reports_the_best_shape_and_library():
    out = matmul_ceiling([(64, 64, 64), (128, 128, 128)], seconds=0.05)
    assert out["flops_per_s"] == max(r["flops_per_s"] for r in out["all"]) > 0
    assert out["shape"] in ([64, 64, 64], [128, 128, 128])
    libraries = {"torch.mm", "oneDNN"} if torch.backends.mkldnn.is_available() else {"torch.mm"}
    assert {r["library"] for r in out["all"]} == libraries and len(out["all"]) == 2 * len(libraries)


def test_the_ceilings_products_compute_the_product():
    """Each library's timed product is a @ b (oneDNN's takes b stored transposed, as it is fastest)."""
    torch.manual_seed(0)
    products = _products(7, 5, 3)
    results = {name: product().clone() for name, product in products.items()}
    for name, value in results.items():
        torch.testing.assert_close(value, results["torch.mm"], msg=name)
    assert results["torch.mm"].shape == (7, 3)


@pytest.mark.slow
@pytest.mark.trl
@pytest.mark.parametrize("device", DEVICES)
def test_trl_and_dpolab_workers_start_from_the_same_weights_and_loss(device):
    """The harness's own check, on a 1-layer GPT-2: TRL's DPOTrainer and dpolab.train, each in its own process, on
    the same pairs in the same order, on the same device in the same precision (fp32 on a CPU, bf16 autocast on CUDA),
    report the same initial weights and the same loss at steps 1 and 2."""
    precision = "bf16" if device == "cuda" else "fp32"
    spec = {
        "device": device,
        "precision": precision,
        "model": TINY,
        "batch_size": 16,
        "beta": 0.1,
        "lr": 1e-3,
        "warmup_steps": 2,
        "timed_steps": 2,
        "threads": 1,
        "ceiling_tokens": 64,
    }
    trl, ours = run_lockstep([("trl", {**spec, "variant": "trl"}), ("dpolab", spec)], steps=4, timeout=600)
    check_same_start(trl, ours, precision)
    assert abs(trl["losses"][0] - 0.6931) > 1e-3  # two different random models: not the trivial log 2
    assert len(trl["step_seconds"]) == len(ours["step_seconds"]) == 2
    # lockstep: after the warm-up step 1, no step of one process overlaps a step of the other
    steps = sorted([*trl["step_intervals"][1:4], *ours["step_intervals"][1:4]])
    assert len(steps) == 6 and all(a[1] <= b[0] for a, b in itertools.pairwise(steps))
    assert trl["step_seconds"] == [end - start for start, end in trl["step_intervals"][2:4]]
    assert trl["peak_rss_bytes"] > 0 and ours["peak_rss_bytes"] > 0
    assert ("peak_gpu_bytes" in trl) == ("peak_gpu_bytes" in ours) == (device == "cuda")
    with pytest.raises(AssertionError, match="step 1"):
        off = ours["losses"][0] * (1 + 10 * LOSS_RTOL[precision])  # ten times the tolerance: refused
        check_same_start(trl, {**ours, "losses": [off, *ours["losses"][1:]]}, precision)


def test_lockstep_reports_a_worker_that_dies():
    with pytest.raises(RuntimeError, match=r"bench worker no-such-kind .*stopped with status 1(.|\n)*KeyError"):
        run_lockstep([("no-such-kind", {"warmup_steps": 2})], steps=3, timeout=120)


def test_bad_flags_end_in_one_line_and_exit_status_2(capsys):
    from dpolab.bench.__main__ import main

    assert main(["--quick", "--warmup", "1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "python -m dpolab.bench: error: --warmup must be >= 2 (the step-2 loss check) and --steps >= 1"
    ]


def test_against_runs_the_ref_s_own_dpolab(tmp_path):
    """--against REF: the exported tree is the ref's (a file of this commit, byte for byte), and a worker started with
    worker_env(source) imports dpolab from that tree, not from this checkout."""
    import subprocess
    import sys
    from pathlib import Path

    from dpolab.bench.against import REPO, export_ref
    from dpolab.bench.lockstep import worker_env

    commit, tree = export_ref("HEAD", tmp_path)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert commit == head.strip()
    committed = subprocess.run(["git", "-C", str(REPO), "show", "HEAD:dpolab/bench/lockstep.py"], capture_output=True)
    assert (tree / "dpolab" / "bench" / "lockstep.py").read_bytes() == committed.stdout
    code = "import dpolab.bench.workers as w; print(w.__file__)"
    for source, expected in ((str(tree), tree), (None, REPO)):
        out = subprocess.run(
            [sys.executable, "-c", code], env=worker_env(source), cwd=source or REPO, capture_output=True, text=True
        )
        assert Path(out.stdout.strip()).resolve() == (expected / "dpolab/bench/workers.py").resolve(), out.stderr


def test_against_a_ref_that_is_not_a_commit_is_one_line(tmp_path):
    from dpolab.bench.against import export_ref

    with pytest.raises(ValueError, match=r"^--against no-such-ref-x: not a commit of the git checkout at .*git log"):
        export_ref("no-such-ref-x", tmp_path)
    with pytest.raises(ValueError) as refused:
        export_ref("no-such-ref-x", tmp_path)
    assert "\n" not in str(refused.value)

"""The training step reads the device at most once per optimizer step (issue 23): the metrics, the count of
non-finite values and the gradient norm come back in one ``.tolist()``; no ``.item()``, ``.nonzero()``,
``.tolist()`` or truth test of a tensor runs in the forward, the fused head's vocabulary loop, the loss or the
optimizer step. On a CPU every tensor is on the host, so the calls are counted (each would be a synchronisation on
CUDA); on CUDA, ``torch.cuda.set_sync_debug_mode`` turns any synchronisation into an error.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_gpt2

import dpolab
from dpolab.data import penn_rankings
from dpolab.train import Speedups, TrainConfig, train
from dpolab.train.setup import _Collate

pytestmark = pytest.mark.usefixtures("single_thread")

READS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__")  # a device -> host read
COLLATION = _Collate.__call__.__code__  # host work on the host batch, before it goes to the device


@pytest.fixture(scope="module")
def rows(penn):
    return penn["train"].select(range(24))


def _collating() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is COLLATION:
            return True
        frame = frame.f_back
    return False


def _reads_per_step(monkeypatch, model, tokenizer, rows, config: TrainConfig, by=None) -> list[int]:
    """How many reads of a tensor's value on the host each optimizer step after the first makes (the first also
    runs the one-time probes of the model), outside the collation of its batches; ``by``: only those made by the
    code under this folder."""
    reads, marks = [0], []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not _collating() and (by is None or caller.startswith(by)):
                reads[0] += 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    train(model, tokenizer, rows, config, on_step=lambda row: marks.append(reads[0]))
    monkeypatch.undo()
    return np.diff(marks).tolist()


def _config(**kw) -> TrainConfig:
    base = dict(
        progress=False,
        use_ref_cache=False,
        batch_size=8,
        max_steps=3,
        grad_accum_steps=2,
        device="cpu",
        precision="fp32",
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("loss", ["dpo", "plackett_luce"])
def test_a_step_reads_the_device_once(monkeypatch, small_tokenizer, rows, loss):
    """Every speed-up on (packing, the fused head), two micro-batches per step, pairs and rankings of 3: exactly
    one read per step (the step's metrics), so the counting sees reads and the step makes no other."""
    data = rows if loss == "dpo" else penn_rankings(rows)
    model = make_tiny_gpt2(small_tokenizer)
    assert _reads_per_step(monkeypatch, model, small_tokenizer, data, _config(loss=loss)) == [1, 1]


@pytest.mark.gpu
def test_a_cuda_step_synchronises_at_most_once(small_tokenizer, rows):
    """On CUDA, torch.cuda.set_sync_debug_mode("warn") warns at each synchronisation: at most one per step after
    the first (the step's read of its metrics), every speed-up on."""
    marks = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def on_step(row):
            marks.append(len(caught))
            torch.cuda.set_sync_debug_mode("warn")  # from the end of step 1 on

        try:
            train(
                make_tiny_gpt2(small_tokenizer),
                small_tokenizer,
                rows,
                _config(device="cuda", precision="auto"),
                on_step=on_step,
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(marks) == 3 and all(n <= 1 for n in np.diff(marks)), [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "loss, speedups",
    [("dpo", Speedups.none()), ("sft", Speedups()), ("plackett_luce", Speedups(packing=False))],
    ids=["padded-pairs", "sft-chosen-only", "padded-rankings"],
)
def test_the_padded_layout_reads_the_device_once_too(monkeypatch, small_tokenizer, rows, loss, speedups):
    """Without packing (every speed-up off; SFT, which scores the chosen rows alone; rankings), the scored positions
    and the completion-mask check are taken on the host as the batch is collated: dpolab's code reads once per step
    as well. (transformers' sdpa mask reads a padded batch's attention mask, ``_ignore_causal_mask_sdpa``, twice per
    forward; torch's foreach AdamW reads its step counters, which live on the host; the packed layout passes its
    own 4D mask, and fused AdamW keeps its counters on the device: the test above counts every read.)"""
    data = penn_rankings(rows) if loss == "plackett_luce" else rows
    model = make_tiny_gpt2(small_tokenizer)
    config = _config(loss=loss, speedups=speedups)
    by = str(Path(dpolab.__file__).parent)
    assert _reads_per_step(monkeypatch, model, small_tokenizer, data, config, by=by) == [1, 1]


def test_the_weights_are_hashed_only_for_the_reference_cache(monkeypatch, small_tokenizer, rows, tmp_path):
    """weights_hash reads every weight on the host: train calls it only to key the reference cache."""
    import dpolab.train.reference

    calls = []
    real = dpolab.train.reference.weights_hash
    monkeypatch.setattr(dpolab.train.reference, "weights_hash", lambda model: calls.append(1) or real(model))
    for use_cache, expected in ((False, 0), (True, 1)):
        calls.clear()
        config = _config(max_steps=1, grad_accum_steps=1, use_ref_cache=use_cache, ref_cache_dir=str(tmp_path))
        train(make_tiny_gpt2(small_tokenizer), small_tokenizer, rows, config)
        assert len(calls) == expected

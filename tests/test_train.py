"""The training loop against independent computations: the loss, the metrics, the schedule, accumulation,
clipping, the precomputed reference, failures, determinism, and checkpoint/resume after SIGKILL."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import dpolab_command, make_tiny_gpt2, run_command, subprocess_env
from helpers import DEVICES, pinned_config, tiny_gpt2

from dpolab.data.collate import tokenize_preferences
from dpolab.logprobs import sequence_logps_from_logits
from dpolab.losses import LOSSES, preference_loss
from dpolab.train import METRICS, NonFiniteError, Speedups, TrainConfig, train
from dpolab.train.checkpoint import (
    CheckpointError,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    read_manifest,
    verify_checkpoint,
)
from dpolab.train.output import check_output_dir
from dpolab.train.reference import precompute_reference_logps, reference_cache_path

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def rows(penn):
    return penn["train"].select(range(32))


def config(**kw) -> TrainConfig:
    return pinned_config(**{"batch_size": 8, "epochs": 1, **kw})


@torch.no_grad()
def live_logps(model, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs of each example scored alone, unpadded, from the full logits."""
    model.eval()
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        values = []
        for ex in examples:
            ids = torch.tensor([ex["prompt_ids"] + ex[key]])
            mask = torch.tensor([[0] * len(ex["prompt_ids"]) + [1] * len(ex[key])])
            values.append(sequence_logps_from_logits(model(ids).logits, ids, mask)[0])
        out.append(torch.stack(values))
    return out[0], out[1]


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- learning ---------------------------------------------------------------------------------------------


def test_dpo_loss_starts_at_log2_and_decreases(small_tokenizer, rows):
    model = make_tiny_gpt2(small_tokenizer)
    history = train(model, small_tokenizer, rows, config(epochs=8)).history
    assert len(history) == 8 * 4
    first, last_epoch = history[0], history[-4:]
    # pi_theta = pi_ref at step 1: every implicit reward is 0 and the DPO loss is log 2 (eq. 4.2), up to the float
    # rounding between the reference's packed batches and the step's (other rows, other matrix shapes: ~1e-6)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5) and first["rewards/margins"] == pytest.approx(
        0, abs=1e-5
    )
    assert sum(r["loss"] for r in last_epoch) / 4 < 0.45
    assert min(r["rewards/accuracies"] for r in last_epoch) >= 0.75
    assert [r["step"] for r in history] == list(range(1, 33))
    assert history[-1]["epoch"] == pytest.approx(8.0)


def test_metrics_equal_an_independent_computation(small_tokenizer, rows):
    """Step-1 metrics from logps computed here, from full logits, with the DPO loss written out."""
    data = rows.select(range(16))
    model, reference = make_tiny_gpt2(small_tokenizer, seed=0), make_tiny_gpt2(small_tokenizer, seed=1)
    examples = tokenize_preferences(data, small_tokenizer)
    pc, pr = live_logps(copy.deepcopy(model), examples)
    rc, rr = live_logps(reference, examples)
    beta = 0.3
    history = train(
        model, small_tokenizer, data, config(batch_size=16, beta=beta, max_steps=1), ref_model=reference
    ).history
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    expected = {
        "loss": -F.logsigmoid(chosen_rewards - rejected_rewards).mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
    }
    assert 0 < expected["rewards/accuracies"] < 1  # a mixed batch, so the accuracy can be wrong either way
    for name, value in expected.items():
        assert history[0][name] == pytest.approx(value.item(), rel=1e-5, abs=1e-5), name
    assert list(history[0]) == list(METRICS)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registry_loss_trains_with_the_right_reference(small_tokenizer, rows, name):
    """One step of each loss: its loss equals the registry's on logps computed here (pairs matched by index)."""
    data = rows.select(range(12))
    model, reference = make_tiny_gpt2(small_tokenizer, seed=0), make_tiny_gpt2(small_tokenizer, seed=2)
    examples = tokenize_preferences(data, small_tokenizer)
    pc, pr = live_logps(copy.deepcopy(model), examples)
    rc, rr = live_logps(reference, examples)
    history = train(
        model, small_tokenizer, data, config(loss=name, batch_size=12, max_steps=1), ref_model=reference
    ).history
    expected = preference_loss(name, pc, pr, rc, rr, beta=0.5).mean()
    assert history[0]["loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    assert history[0]["logps/rejected"] == pytest.approx(pr.mean().item(), rel=1e-5)


def test_several_losses_are_added_with_their_weights(small_tokenizer, rows):
    """loss=(a, b), loss_weights=(w_a, w_b): the step's loss is w_a * loss_a + w_b * loss_b on logps computed here,
    each loss taking the parameters it accepts (TRL's loss_type list; test_losses_trl.py compares with TRL)."""
    data = rows.select(range(12))
    model, reference = make_tiny_gpt2(small_tokenizer, seed=0), make_tiny_gpt2(small_tokenizer, seed=2)
    examples = tokenize_preferences(data, small_tokenizer)
    pc, pr = live_logps(copy.deepcopy(model), examples)
    rc, rr = live_logps(reference, examples)
    c = config(loss=("robust", "bco_pair"), loss_weights=(0.8, 0.3), loss_kwargs={"label_smoothing": 0.2})
    history = train(model, small_tokenizer, data, replace(c, batch_size=12, max_steps=1), ref_model=reference).history
    robust = preference_loss("robust", pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    expected = 0.8 * robust + 0.3 * preference_loss("bco_pair", pc, pr, rc, rr, beta=0.5)
    assert history[0]["loss"] == pytest.approx(expected.mean().item(), rel=1e-4, abs=1e-5)


def test_per_example_loss_parameters_follow_their_pairs(small_tokenizer, rows):
    """ODPO's offsets are per pair: in a shuffled batch each pair's loss uses its own offset (by dataset index)."""
    data = rows.select(range(16))
    offsets = torch.linspace(0.0, 3.0, 16)
    model, reference = make_tiny_gpt2(small_tokenizer, seed=0), make_tiny_gpt2(small_tokenizer, seed=1)
    examples = tokenize_preferences(data, small_tokenizer)
    pc, pr = live_logps(copy.deepcopy(model), examples)
    rc, rr = live_logps(reference, examples)
    history = train(
        model,
        small_tokenizer,
        data,
        config(loss="odpo", batch_size=16, max_steps=1),
        ref_model=reference,
        example_loss_kwargs={"offset": offsets.numpy()},
    ).history
    h = (pc - rc) - (pr - rr)
    expected = -F.logsigmoid(0.5 * h - offsets).mean()
    misaligned = -F.logsigmoid(0.5 * h - offsets.flip(0)).mean()
    assert abs(expected - misaligned) > 1e-2  # the pairing matters, so this test can tell
    assert history[0]["loss"] == pytest.approx(expected.item(), rel=1e-4)
    with pytest.raises(ValueError, match=r"one value per pair \(16\), got shape \(15,\)"):
        train(
            make_tiny_gpt2(small_tokenizer),
            small_tokenizer,
            data,
            config(loss="odpo"),
            example_loss_kwargs={"offset": offsets[:15]},
        )
    with pytest.raises(ValueError, match="dpo takes"):
        train(
            make_tiny_gpt2(small_tokenizer),
            small_tokenizer,
            data,
            config(loss="dpo"),
            example_loss_kwargs={"offset": offsets},
        )


def test_learning_rate_warms_up_then_decays_to_the_minimum(small_tokenizer, rows):
    history = train(
        make_tiny_gpt2(small_tokenizer),
        small_tokenizer,
        rows,
        config(epochs=2, warmup_steps=2, learning_rate=1e-3, min_learning_rate=1e-5),
    ).history
    lrs = [r["learning_rate"] for r in history]
    assert len(lrs) == 8
    assert lrs[:2] == pytest.approx([5e-4, 1e-3])  # linear warm-up, no wasted zero-lr step
    assert lrs[-1] == pytest.approx(1e-5)  # cosine ends at min_learning_rate
    cosine = [1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * k / 6)) / 2 for k in range(7)]  # from the peak at step 2
    assert lrs[1:] == pytest.approx(cosine)
    assert lrs[4] == pytest.approx((1e-3 + 1e-5) / 2)  # half-way down at the middle of the decay
    assert all(a > b for a, b in itertools.pairwise(lrs[1:]))


def test_a_transformers_schedule_is_transformers_own(small_tokenizer, rows):
    """lr_scheduler_type="linear" with warmup_steps=0.25 of 4 steps: transformers' linear schedule (as TRL's
    Trainer steps it: the first step at lr * 0/1, then down from the peak to 0 at step 5), written out here."""
    history = train(
        make_tiny_gpt2(small_tokenizer),
        small_tokenizer,
        rows,
        config(epochs=1, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=0.25),
    ).history
    assert [r["learning_rate"] for r in history] == pytest.approx([0.0, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])


def test_learning_rate_without_warmup_starts_at_the_peak(small_tokenizer, rows):
    history = train(
        make_tiny_gpt2(small_tokenizer),
        small_tokenizer,
        rows,
        config(epochs=1, learning_rate=1e-3, min_learning_rate=1e-7),
    ).history
    assert [r["learning_rate"] for r in history] == pytest.approx([1e-3, 7.5e-4 + 2.5e-8, 2.5e-4 + 7.5e-8, 1e-7])


# --- the reference ------------------------------------------------------------------------------------------


def test_precomputed_reference_equals_a_live_forward_and_is_cached(small_tokenizer, rows, tmp_path):
    model = make_tiny_gpt2(small_tokenizer, dropout=0.1).train()  # eval mode is the precompute's job
    examples = tokenize_preferences(rows, small_tokenizer)
    kwargs = dict(batch_size=5, device=torch.device("cpu"), cache_dir=tmp_path)
    ref_chosen, ref_rejected = precompute_reference_logps(model, examples, small_tokenizer, **kwargs)
    assert model.training  # left as it was
    live_chosen, live_rejected = live_logps(copy.deepcopy(model), examples)
    torch.testing.assert_close(ref_chosen, live_chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ref_rejected, live_rejected, rtol=1e-5, atol=1e-4)
    # second call: read from disk, the model is not run
    body = model.transformer
    body.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("the reference ran again"))
    again = precompute_reference_logps(model, examples, small_tokenizer, **kwargs)
    assert torch.equal(again[0], ref_chosen) and torch.equal(again[1], ref_rejected)
    del body.forward
    # other weights, other key: recomputed, different numbers
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
    changed = precompute_reference_logps(model, examples, small_tokenizer, **kwargs)
    assert not torch.allclose(changed[0], ref_chosen)
    assert len(list(tmp_path.iterdir())) == 2


def test_reference_cache_path_says_whether_the_precompute_will_read_the_cache(small_tokenizer, rows, tmp_path):
    """The query the Penn experiment asks before timing the reference pass: false before the precompute, true after
    it for the same arguments, false for another reduction or precision (their numbers differ)."""
    model = make_tiny_gpt2(small_tokenizer)
    examples = tokenize_preferences(rows, small_tokenizer)

    def cached(**kwargs) -> bool:
        return reference_cache_path(model, examples, small_tokenizer, cache_dir=tmp_path, **kwargs).exists()

    assert not cached()
    precompute_reference_logps(
        model, examples, small_tokenizer, batch_size=4, device=torch.device("cpu"), cache_dir=tmp_path
    )
    assert cached() and cached(reduction="sum", autocast_dtype=None)
    assert not cached(reduction="mean") and not cached(autocast_dtype=torch.bfloat16)


def _count_forwards(model):
    counts = {"grad": 0, "no_grad": 0}

    def hook(module, args):
        counts["grad" if torch.is_grad_enabled() else "no_grad"] += 1

    model.transformer.register_forward_pre_hook(hook)
    return counts


@pytest.mark.parametrize("loss, no_grad_per_step", [("dpo", 0), ("sft", 1)])
def test_no_reference_forward_during_training(small_tokenizer, rows, loss, no_grad_per_step):
    """The reference runs once over the data (two batches of 16 pairs), never per step.

    SFT's rejected half runs without gradient, for the metrics only. Once per model, dpolab.lm_head's probe runs the
    body twice (the model's own forward, the lean path) and the packing probe twice (packed, padded); once per run,
    recompute_layer_norms' check runs it twice with gradients (before and after the conversion)."""
    model = make_tiny_gpt2(small_tokenizer)
    counts = _count_forwards(model)
    train(model, small_tokenizer, rows, config(loss=loss, epochs=2))
    assert counts == {"grad": 2 + 8, "no_grad": 2 + 4 + 8 * no_grad_per_step}


def test_a_separate_reference_is_not_kept_during_training(small_tokenizer, rows):
    alive = []

    def make_reference():
        reference = make_tiny_gpt2(small_tokenizer, seed=3)
        alive.append(weakref.ref(reference))
        return reference

    model = make_tiny_gpt2(small_tokenizer)
    seen = []  # after each step: the reference is gone
    train(
        model,
        small_tokenizer,
        rows,
        config(max_steps=2),
        ref_model=make_reference(),
        on_step=lambda row: seen.append(alive[0]() is None),
    )
    assert seen == [True, True]


# --- accumulation, clipping ---------------------------------------------------------------------------------


def test_gradient_accumulation_2x8_equals_1x16(small_tokenizer, rows):
    """On the padded layout, where a row's numbers do not depend on its batch-mates (packing regroups the rows of a
    micro-batch, so its float rounding differs: test_packed_training_equals_padded_training covers that)."""
    runs = []
    for accum in (1, 2):
        model = make_tiny_gpt2(small_tokenizer)
        history = train(
            model,
            small_tokenizer,
            rows,
            config(batch_size=16, grad_accum_steps=accum, epochs=2, speedups=Speedups(packing=False)),
        ).history
        runs.append((params(model), history))
    (p1, h1), (p2, h2) = runs
    for name in p1:  # Adam turns float noise in gradients ~eps into O(lr) noise in a few coordinates: atol 2e-5
        torch.testing.assert_close(p1[name], p2[name], rtol=1e-5, atol=2e-5)
    for r1, r2 in zip(h1, h2, strict=True):
        for key in METRICS:  # grad_norm is scale-sensitive, unlike Adam's update: it catches a wrong 1/accum
            assert r1[key] == pytest.approx(r2[key], rel=1e-5, abs=1e-5), key


SWITCHES = [f.name for f in dataclasses.fields(Speedups) if f.type == "bool"]  # every speed-up of TrainConfig


@pytest.mark.parametrize(
    "loss, off", [*(("dpo", switch) for switch in SWITCHES), ("dpo", "lm_head"), ("ipo", "packing"), ("dpo", "all")]
)
@pytest.mark.parametrize("device", DEVICES)
def test_every_speedup_changes_no_number(small_tokenizer, rows, loss, off, device):
    """Each speed-up (``Speedups``: packing, eq. 6.9; the fused LM head, eq. 6.8; the fused GELU; the tied
    embedding's in-place gradient; the layer norms computed by the linear after them; fused AdamW), and all of them
    (``Speedups.none()``), changes how the step is computed, not what: the same history and weights as with it
    switched off, to float tolerance, over 8 steps of AdamW (sum log-probs, and mean for IPO). Not DPOP: at step 1 its
    penalty max(0, log pi_ref(y_w) - log pi(y_w)) sits exactly at its kink, where float rounding alone decides
    whether its gradient is on. On each device (fp32)."""
    speedups = {"all": Speedups.none(), "lm_head": Speedups(lm_head="chunked")}.get(off) or Speedups(**{off: False})
    runs = []
    for setting in (speedups, Speedups()):
        model = make_tiny_gpt2(small_tokenizer)
        reduction = "mean" if loss == "ipo" else "sum"
        history = train(
            model,
            small_tokenizer,
            rows,
            config(batch_size=8, epochs=2, loss=loss, reduction=reduction, speedups=setting, device=device),
        ).history
        runs.append(({k: v.cpu() for k, v in params(model).items()}, history))
    (p1, h1), (p2, h2) = runs
    for r1, r2 in zip(h1, h2, strict=True):
        for key in METRICS:  # at step 1 every margin is 0 up to rounding, so the accuracy (margin > 0) is noise
            if not (key == "rewards/accuracies" and r1["step"] == 1):
                assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-5), key
    moved = max((p1[n] - make_tiny_gpt2(small_tokenizer).state_dict()[n]).abs().max().item() for n in p1)
    assert moved > 1e-3  # training moved the weights: the comparison below is not of two untouched models
    # Adam divides each gradient by its running RMS, so a coordinate whose gradient is float noise (~1e-9) still
    # moves ~lr per step in a noise-given direction: a few such coordinates may differ by up to steps x lr; all the
    # others agree to 1e-5
    lr, steps = 1e-3, len(h1)
    diffs = torch.cat([(p1[n] - p2[n]).abs().flatten() for n in p1])
    assert diffs.max() <= steps * lr
    assert (diffs > 1e-5).float().mean() < 1e-3


def _adam_first_step(model, grads, lr, eps=1e-8) -> dict[str, torch.Tensor]:
    """AdamW's first update without weight decay: -lr * g / (|g| + eps) (bias corrections cancel)."""
    return {n: p.detach() - lr * grads[n] / (grads[n].abs() + eps) for n, p in model.named_parameters()}


@pytest.mark.parametrize("clipped", [False, True])
def test_gradient_clipping(small_tokenizer, rows, clipped):
    """AdamW's first step on a clipped gradient g_c = g * min(1, c / |g|) is -lr * g_c / (|g_c| + eps): with c
    chosen so that the largest |g_c| is eps, every coordinate moves by at most lr / 2 instead of ~lr."""
    data, lr = rows.select(range(8)), 1e-2
    model = make_tiny_gpt2(small_tokenizer)
    examples = tokenize_preferences(data, small_tokenizer)
    independent = copy.deepcopy(model)
    rc, rr = live_logps(copy.deepcopy(model), examples)
    pc, pr = (torch.stack(t) for t in zip(*[_logps_with_grad(independent, ex) for ex in examples]))
    (-F.logsigmoid(0.5 * ((pc - rc) - (pr - rr)))).mean().backward()
    grads = {n: p.grad for n, p in independent.named_parameters()}
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values())).item()
    clip = 1e-8 * norm / max(g.abs().max().item() for g in grads.values()) if clipped else None
    scale = 1.0 if clip is None else clip / (norm + 1e-6)
    expected = _adam_first_step(model, {n: g * scale for n, g in grads.items()}, lr=lr)
    before = params(model)
    history = train(
        model,
        small_tokenizer,
        data,
        config(batch_size=8, max_steps=1, learning_rate=lr, min_learning_rate=lr, max_grad_norm=clip),
    ).history
    assert history[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)  # reported before clipping
    for name, p in model.named_parameters():
        # coordinates whose true gradient is 0 (e.g. attention key biases) carry float noise ~1e-10, and Adam
        # maps noise ~eps to any step in [-lr, lr]: compare where the gradient is real
        real = grads[name].abs() > 1e-6
        torch.testing.assert_close(p.detach()[real], expected[name][real], rtol=1e-4, atol=lr * 1e-3)
    largest_move = max((p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters())
    assert largest_move > 0.99 * lr if not clipped else largest_move < 0.51 * lr


def _logps_with_grad(model, ex):
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        ids = torch.tensor([ex["prompt_ids"] + ex[key]])
        mask = torch.tensor([[0] * len(ex["prompt_ids"]) + [1] * len(ex[key])])
        out.append(sequence_logps_from_logits(model(ids).logits, ids, mask)[0])
    return out


# --- failures -------------------------------------------------------------------------------------------------


def _poison(model, examples, victim: int, after_forwards: int):
    """Make the embeddings of example ``victim``'s rows NaN in training forwards after the first few."""
    prompt = torch.tensor(examples[victim]["prompt_ids"])
    state = {"forwards": 0, "poisoned_at": None}

    def hook(module, args, output):
        if not torch.is_grad_enabled():
            return None
        state["forwards"] += 1
        if state["forwards"] <= after_forwards:
            return None
        ids = args[0]
        rows = (ids[:, : len(prompt)] == prompt).all(-1)
        if rows.any():
            state["poisoned_at"] = state["forwards"]
            return output.masked_fill(rows[:, None, None], float("nan"))
        return None

    model.transformer.wte.register_forward_hook(hook)
    return state


def test_non_finite_loss_names_step_and_example_and_keeps_the_last_checkpoint(small_tokenizer, rows, tmp_path):
    """On the padded layout a NaN stays in its own rows, so the error names exactly the example (packed, it can
    spread to the other segments of its row: 0 x NaN is NaN in the attention's weighted sum)."""
    data = rows.select(range(8))
    model = make_tiny_gpt2(small_tokenizer)
    state = _poison(model, tokenize_preferences(data, small_tokenizer), victim=5, after_forwards=2)
    cfg = config(batch_size=4, epochs=2, output_dir=str(tmp_path), save_steps=1, speedups=Speedups(packing=False))
    with pytest.raises(NonFiniteError) as info:
        train(model, small_tokenizer, data, cfg)
    step = state["poisoned_at"]  # one training forward per step
    assert step in (3, 4)
    assert info.value.step == step and info.value.indices == [5]
    assert f"step {step}:" in str(info.value) and "examples [5]" in str(info.value)
    last = latest_checkpoint(tmp_path)
    assert last.name == f"checkpoint-{step - 1:08d}"
    restored = make_tiny_gpt2(small_tokenizer, seed=9)
    saved = load_checkpoint(last, restored)
    assert saved["step"] == step - 1 and len(saved["history"]) == step - 1
    assert all(torch.isfinite(p).all() for p in restored.parameters())
    assert len(json.loads((tmp_path / "history.json").read_text())) == step - 1


def test_non_finite_gradient_names_step_and_batch(small_tokenizer, rows):
    model = make_tiny_gpt2(small_tokenizer)
    calls = []
    model.transformer.ln_f.weight.register_hook(
        lambda g: (calls.append(1), g * (float("inf") if len(calls) == 2 else 1))[1]
    )
    with pytest.raises(NonFiniteError, match=r"step 2: the gradient \(norm (inf|nan)\) is not finite") as info:
        train(model, small_tokenizer, rows, config(batch_size=8))
    assert len(info.value.indices) == 8 and len(set(info.value.indices)) == 8
    assert set(info.value.indices) <= set(range(32))


# --- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss": "dpoo"}, "unknown loss 'dpoo'"),
        ({"loss": "dpo", "loss_kwargs": {"dpop_lambda": 5}}, r"dpo does not take \['dpop_lambda'\]"),
        ({"beta": 0}, "beta must be a finite number > 0"),
        ({"beta": float("nan")}, "beta must be a finite number > 0"),
        ({"learning_rate": -1e-4}, "learning_rate must be"),
        ({"min_learning_rate": 1e-3}, r"min_learning_rate must be in \[0, learning_rate"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"grad_accum_steps": 32}, "cannot exceed batch_size"),
        ({"reduction": "avg"}, "reduction must be 'sum' or 'mean'"),
        ({"max_length": 16, "max_prompt_length": 16}, "must be < max_length"),
        ({"precision": "fp16"}, "precision must be one of"),
        ({"save_steps": 10}, "need an output_dir"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be a finite number > 0"),
        ({"adam_betas": (0.9, 1.0)}, "adam_betas must be two numbers in"),
        ({"loss": ("dpo", "hinge"), "loss_weights": (1.0,)}, "loss_weights must be one finite number per loss"),
        ({"loss": ("dpo", "nope")}, "unknown loss"),
        ({"truncation_mode": "keep_middle"}, "truncation_mode must be one of"),
        ({"lr_scheduler_type": "triangle"}, "lr_scheduler_type must be one of warmup_cosine, linear, cosine"),
        ({"warmup_steps": 1.5}, "warmup_steps must be an int >= 0"),
        ({"speedups": {"packing": False, "bogus": True}}, r"speedups: unknown switches \['bogus'\]"),
        ({"speedups": {"packing": "no"}}, "speedups.packing must be True or False"),
        ({"speedups": {"packed_row_tokens": 0}}, "speedups.packed_row_tokens must be an int >= 1"),
        ({"speedups": "none"}, "speedups must be a dpolab.train.Speedups"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_config_with_speedups_survives_its_json():
    """config.json and a checkpoint's manifest hold to_dict()'s JSON; TrainConfig(**it) is the config again."""
    c = TrainConfig(speedups=Speedups(packing=False, packed_row_tokens=64), loss=("dpo", "hinge"))
    assert TrainConfig(**json.loads(json.dumps(c.to_dict()))) == c


DEFAULTS = ("learning_rate", "min_learning_rate", "batch_size", "epochs", "max_steps", "beta")


def test_config_is_frozen_and_trains_by_default_as_the_penn_experiment():
    """TrainConfig() trains as `make penn`'s dpolab methods do (the article's settings, recorded in the experiment's
    own config), and a config cannot be changed once made."""
    from dpolab.experiments.penn.config import Hyper

    c, h = TrainConfig(), Hyper()
    assert {name: getattr(c, name) for name in DEFAULTS} == {name: getattr(h, name) for name in DEFAULTS}
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.beta = 1.0  # type: ignore[misc]


@pytest.mark.trl
def test_truncation_defaults_are_trls():
    import dataclasses

    from trl import DPOConfig

    defaults = {f.name: f.default for f in dataclasses.fields(DPOConfig)}
    c = TrainConfig()
    assert (
        (c.max_length, c.truncation_mode)
        == (defaults["max_length"], defaults["truncation_mode"])
        == (
            1024,
            "keep_start",
        )
    )


@pytest.mark.gpu
def test_cuda_bf16_autocast_follows_cpu_fp32(small_tokenizer, rows):
    """Same code path on CUDA: bf16 autocast where supported; the first steps agree with CPU fp32 to bf16 precision."""
    cpu = train(make_tiny_gpt2(small_tokenizer), small_tokenizer, rows, config(max_steps=3, device="cpu")).history
    model = make_tiny_gpt2(small_tokenizer)
    cuda = train(model, small_tokenizer, rows, config(max_steps=3, device="cuda", precision="auto")).history
    assert next(model.parameters()).device.type == "cuda"
    assert cuda[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 1, in any precision
    for a, b in zip(cpu, cuda):
        assert b["logps/chosen"] == pytest.approx(a["logps/chosen"], rel=2e-2)
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-2)


# --- determinism, checkpoints ----------------------------------------------------------------------------------


def test_same_seed_same_run_other_seed_other_run(small_tokenizer, rows):
    def run(seed):
        model = make_tiny_gpt2(small_tokenizer, dropout=0.1)
        history = train(model, small_tokenizer, rows, config(epochs=2, seed=seed, disable_dropout=False)).history
        return params(model), history

    (a, ha), (b, hb), (c, hc) = run(0), run(0), run(1)
    assert ha == hb and all(torch.equal(a[k], b[k]) for k in a)
    assert ha != hc and not all(torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_holds_everything_and_loads_with_weights_only(small_tokenizer, rows, tmp_path):
    model = make_tiny_gpt2(small_tokenizer)
    train(model, small_tokenizer, rows, config(epochs=1, output_dir=str(tmp_path), save_steps=2))
    last = latest_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-00000004",
        "config.json",
        "dpolab_run.json",
        "history.csv",
        "history.json",
    ]
    assert sorted(p.name for p in last.iterdir()) == ["manifest.json", "model.safetensors", "trainer_state.pt"]
    state = torch.load(last / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and set(state) >= {"optimizer", "scheduler", "rng", "history", "config", "data_hash"}
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    restored = make_tiny_gpt2(small_tokenizer, seed=5)
    load_checkpoint(last, restored)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
    csv = (tmp_path / "history.csv").read_text().splitlines()
    assert csv[0] == ",".join(METRICS) and len(csv) == 5
    # a second run into the same folder must not silently start over
    with pytest.raises(FileExistsError, match="resume=True"):
        train(make_tiny_gpt2(small_tokenizer), small_tokenizer, rows, config(epochs=1, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="config changed"):
        train(
            make_tiny_gpt2(small_tokenizer),
            small_tokenizer,
            rows,
            config(epochs=1, output_dir=str(tmp_path), resume=True, beta=0.1),
        )
    # how a step is computed may change between a run and its resumption
    assert (
        check_output_dir(config(epochs=1, output_dir=str(tmp_path), resume=True, speedups=Speedups.none()))[0] == last
    )


def _train_command(out: Path, model_dir: Path, data: Path, cache: Path, *extra: str) -> list[str]:
    return dpolab_command(
        "train",
        "--model",
        model_dir,
        "--data",
        data,
        "--epochs",
        3,
        "--batch-size",
        4,
        "--lr",
        1e-3,
        "--keep-dropout",
        "--save-steps",
        3,
        "--no-progress",
        "--ref-cache-dir",
        cache,
        "--output-dir",
        out,
        *extra,
    )


@pytest.fixture(scope="module")
def full_cli_run(tiny_model_dir, tmp_path_factory):
    """``dpolab train`` run through once, uninterrupted: (its output folder, the reference-cache folder)."""
    model_dir, data = tiny_model_dir
    root = tmp_path_factory.mktemp("full-cli-run")
    full, cache = root / "full", root / "cache"
    done = run_command(_train_command(full, model_dir, data, cache), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return full, cache


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_model_dir, full_cli_run, tmp_path):
    model_dir, data = tiny_model_dir
    full, cache = full_cli_run
    broken = tmp_path / "broken"
    total = len(json.loads((full / "history.json").read_text()))
    # --save-total-limit's default keeps two checkpoints, one to fall back on
    assert [p.name for p in checkpoints(full)] == [f"checkpoint-{total:08d}", f"checkpoint-{total - 3:08d}"]

    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            _train_command(broken, model_dir, data, cache), env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 240
    while latest_checkpoint(broken) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(latest_checkpoint(broken).name.split("-")[1])
    assert 3 <= killed_at < total  # killed mid-training, after a checkpoint
    assert not (broken / "model").exists()

    resumed = run_command(_train_command(broken, model_dir, data, cache, "--resume"), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {killed_at}" in resumed.stdout
    assert json.loads((broken / "history.json").read_text()) == json.loads((full / "history.json").read_text())
    from safetensors.torch import load_file

    a, b = load_file(str(full / "model" / "model.safetensors")), load_file(str(broken / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# A child that saves the trained model/ again and again, exactly as `dpolab train` does at its end, so that a SIGKILL
# at a random moment lands inside a save (a hook in the library to stop at a chosen point would be test-only code).
SAVE_LOOP = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from dpolab.cli import save_model_folder
out, source = sys.argv[1], sys.argv[2]
model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
print("saving", flush=True)
while True:
    save_model_folder(out, model, tokenizer)
"""


@pytest.mark.slow
def test_sigkill_during_the_final_model_save_loses_nothing(tiny_model_dir, full_cli_run, tmp_path):
    """A kill inside the final save leaves model/ whole (the earlier one) or absent with the new one complete beside
    it, never a 0-byte config.json or weights without their tokenizer; `--resume` then finishes the save."""
    model_dir, data = tiny_model_dir
    full, cache = full_cli_run
    out, final = tmp_path / "run", tmp_path / "final"
    shutil.copytree(full, out)
    shutil.copytree(full / "model", final)
    expected = _tree(final)
    rng = random.Random(0)
    for _ in range(10):
        with open(tmp_path / "save-loop.log", "w") as log:  # a file: a full pipe would stall the loop
            proc = subprocess.Popen(
                [sys.executable, "-c", SAVE_LOOP, str(out), str(final)],
                env=subprocess_env(),
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert proc.stdout.readline() == "saving\n", (tmp_path / "save-loop.log").read_text()[-2000:]
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        if (out / "model").exists():
            assert _tree(out / "model") == expected  # whole: every file, every byte
        if list(out.glob(".model.*")):  # the kill landed inside a save (it left its temporary folder)
            break
    else:
        pytest.fail("no SIGKILL landed inside a save in 10 attempts")
    resumed = run_command(_train_command(out, model_dir, data, cache, "--resume"), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _tree(out / "model") == expected
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the killed save's leftovers are gone


# --- the output folder, checkpoints, refusals before any work ----------------------------------------------------

USERS_FILES = {  # a folder of the user's own files, named like dpolab's outputs
    "config.json": b'{"my": "settings"}',
    "history.csv": b"epoch,score\n1,0.5\n",
    "model/config.json": b'{"model_type": "gpt2"}',
    "model/pytorch_model.bin": b"the user's weights",
    "notes.txt": b"keep me",
}


def _users_folder(folder: Path) -> Path:
    for name, data in USERS_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_a_folder_of_other_files_is_refused_before_any_work_unless_overwrite(small_tokenizer, rows, tmp_path):
    folder = _users_folder(tmp_path / "mine")
    model = make_tiny_gpt2(small_tokenizer)
    counts = _count_forwards(model)
    with pytest.raises(FileExistsError) as caught:
        train(model, small_tokenizer, rows, config(max_steps=1, output_dir=str(folder)))
    assert str(caught.value) == (
        f"output_dir {folder} holds files dpolab did not write (config.json, history.csv, model, notes.txt): choose "
        "a new or empty output_dir, or pass overwrite=True (--overwrite) to write dpolab's files among them"
    )
    assert counts == {"grad": 0, "no_grad": 0} and _tree(folder) == USERS_FILES  # nothing run, nothing touched
    train(model, small_tokenizer, rows, config(max_steps=1, output_dir=str(folder), overwrite=True))
    after = _tree(folder)
    assert after["notes.txt"] == b"keep me"  # what dpolab does not write stays
    assert json.loads(after["config.json"])["overwrite"] is True  # what it writes is its own, whole
    assert not [name for name in after if name.startswith("model/")]  # never two models mixed in model/
    assert len(json.loads(after["history.json"])) == 1 and after["history.csv"].startswith(b"step,epoch,loss")


def test_an_older_layout_run_folder_is_refused_never_half_read(small_tokenizer, rows, tmp_path):
    """A run folder of the layout before manifests (no dpolab_run.json, checkpoints with step.json)."""
    folder = tmp_path / "old-run"
    (folder / "checkpoint-00000004").mkdir(parents=True)
    for name, data in {
        "model.safetensors": b"\0" * 64,
        "trainer_state.pt": b"\0" * 64,
        "step.json": b'{"step": 4}',
    }.items():
        (folder / "checkpoint-00000004" / name).write_bytes(data)
    (folder / "config.json").write_text("{}")
    before = _tree(folder)
    model = make_tiny_gpt2(small_tokenizer)
    counts = _count_forwards(model)
    for resume in (False, True):
        with pytest.raises(ValueError, match=r"holds checkpoint-00000004 of an older dpolab layout .*--overwrite"):
            train(model, small_tokenizer, rows, config(output_dir=str(folder), resume=resume))
    assert counts == {"grad": 0, "no_grad": 0} and _tree(folder) == before
    assert verify_checkpoint(folder / "checkpoint-00000004").startswith("it has the older layout 1")


def test_a_resume_with_other_settings_or_data_is_refused_before_the_reference_pass(small_tokenizer, rows, tmp_path):
    train(make_tiny_gpt2(small_tokenizer), small_tokenizer, rows, config(max_steps=2, output_dir=str(tmp_path)))
    model = make_tiny_gpt2(small_tokenizer)
    counts = _count_forwards(model)
    with pytest.raises(
        ValueError, match=r"cannot resume .*checkpoint-00000002: the config changed \(beta: 0.5 -> 0.1\)"
    ):
        train(model, small_tokenizer, rows, config(max_steps=2, output_dir=str(tmp_path), resume=True, beta=0.1))
    with pytest.raises(ValueError, match=r"checkpoint-00000002: the training data .* differ from the run's"):
        train(
            model, small_tokenizer, rows.select(range(16)), config(max_steps=2, output_dir=str(tmp_path), resume=True)
        )
    assert counts == {"grad": 0, "no_grad": 0}


def test_the_manifest_holds_the_sha256_of_every_file(small_tokenizer, rows, tmp_path):
    train(make_tiny_gpt2(small_tokenizer), small_tokenizer, rows, config(max_steps=1, output_dir=str(tmp_path)))
    path = latest_checkpoint(tmp_path)
    manifest = read_manifest(path)
    assert manifest["files"] == {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in path.iterdir()
        if p.name != "manifest.json"
    }
    assert (manifest["layout"], manifest["step"], manifest["config"]["max_steps"]) == (2, 1, 1)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else data[:100] + bytes([data[100] ^ 1]) + data[101:])


def test_a_damaged_checkpoint_is_skipped_for_the_newest_intact_one(small_tokenizer, rows, tmp_path, caplog):
    cfg = config(epochs=1, output_dir=str(tmp_path), save_steps=1, save_total_limit=3)  # 4 steps; keeps 2, 3, 4
    full_model = make_tiny_gpt2(small_tokenizer)
    full = train(full_model, small_tokenizer, rows, cfg)
    four, three = tmp_path / "checkpoint-00000004", tmp_path / "checkpoint-00000003"
    size = (four / "model.safetensors").stat().st_size
    _damage(four / "model.safetensors", "truncate")  # a copy cut short
    _damage(three / "trainer_state.pt", "flip")  # one bit of a disk error
    with pytest.raises(CheckpointError, match=rf"cannot load checkpoint {four}: model.safetensors has {size // 2:,}"):
        load_checkpoint(four, make_tiny_gpt2(small_tokenizer))  # named, not a raw SafetensorError

    model = make_tiny_gpt2(small_tokenizer)
    with caplog.at_level(logging.WARNING, logger="dpolab.train"):
        resumed = train(model, small_tokenizer, rows, dataclasses.replace(cfg, resume=True))
    assert resumed.resumed_from_step == 2
    assert resumed.extra["skipped_checkpoints"] == [
        (
            four.name,
            f"model.safetensors has {size // 2:,} bytes, its manifest says {size:,} (cut short or overwritten)",
        ),
        (three.name, "trainer_state.pt does not match its sha256 in the manifest (damaged)"),
    ]
    assert (
        f"skipped {four.name}: model.safetensors has" in caplog.text
        and "resuming from checkpoint-00000002" in caplog.text
    )
    assert resumed.history == full.history  # continued exactly where the intact checkpoint left off
    assert all(torch.equal(a, b) for a, b in zip(full_model.state_dict().values(), model.state_dict().values()))
    assert verify_checkpoint(four) is None and verify_checkpoint(three) is None  # rewritten whole


def test_no_intact_checkpoint_is_an_error_naming_each(small_tokenizer, rows, tmp_path):
    cfg = config(max_steps=2, output_dir=str(tmp_path), save_steps=1, save_total_limit=2)
    train(make_tiny_gpt2(small_tokenizer), small_tokenizer, rows, cfg)
    (tmp_path / "checkpoint-00000002" / "manifest.json").unlink()  # as if killed before the manifest (cannot
    _damage(tmp_path / "checkpoint-00000001" / "model.safetensors", "truncate")  # happen: the rename is last)
    model = make_tiny_gpt2(small_tokenizer)
    counts = _count_forwards(model)
    with pytest.raises(
        CheckpointError,
        match=r"no checkpoint is intact \(checkpoint-00000002: it has no manifest.json .*"
        r"checkpoint-00000001: model.safetensors has .*--overwrite",
    ):
        train(model, small_tokenizer, rows, dataclasses.replace(cfg, resume=True))
    assert counts == {"grad": 0, "no_grad": 0}


def test_max_length_beyond_the_context_and_a_foreign_tokenizer_are_refused_before_any_work(small_tokenizer, rows):
    model = make_tiny_gpt2(small_tokenizer)  # 64 positions
    counts = _count_forwards(model)
    with pytest.raises(
        ValueError, match=r"max_length 65 exceeds the model's context of 64 positions: .*--max-length 64"
    ):
        train(model, small_tokenizer, rows, config(max_length=65))
    small_vocabulary = tiny_gpt2(vocab_size=100, n_positions=64)  # an embedding of 100 rows; the tokenizer has 512
    counts_small = _count_forwards(small_vocabulary)
    with pytest.raises(ValueError, match=r"the tokenizer gives token id \d+, but the model's embedding has 100 rows"):
        train(small_vocabulary, small_tokenizer, rows, config())
    assert counts == counts_small == {"grad": 0, "no_grad": 0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: 'cuda' is not missing here")
def test_a_missing_device_is_refused_before_any_work(small_tokenizer, rows):
    model = make_tiny_gpt2(small_tokenizer)
    counts = _count_forwards(model)
    with pytest.raises(ValueError, match=r"device 'cuda' is not available: .*pass --device cpu"):
        train(model, small_tokenizer, rows, config(device="cuda"))
    assert counts == {"grad": 0, "no_grad": 0}


def test_an_output_dir_that_cannot_be_written_is_refused_before_any_work(small_tokenizer, rows, tmp_path):
    model = make_tiny_gpt2(small_tokenizer)
    counts = _count_forwards(model)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"{tmp_path}/a-file is a file, not a folder"):
        train(model, small_tokenizer, rows, config(output_dir=str(tmp_path / "a-file" / "run")))
    if Path("/proc/1").is_dir():  # a folder no one may write into, root included (chmod does not stop root)
        with pytest.raises(PermissionError, match=r"/proc/1 is not writable \(permission denied\)"):
            train(model, small_tokenizer, rows, config(output_dir="/proc/1/run"))
    assert counts == {"grad": 0, "no_grad": 0}


# --- the command line ------------------------------------------------------------------------------------------


def test_cli_defaults_are_the_articles_and_every_flag_has_help():
    from dpolab.cli import build_parser, train_config

    parser = build_parser()
    args = parser.parse_args(["train", "--loss", "dpop"])
    c = train_config(args)
    assert {name: getattr(c, name) for name in DEFAULTS} == {name: getattr(TrainConfig(), name) for name in DEFAULTS}
    assert c.loss_kwargs == {"dpop_lambda": 5.0} and (args.model, args.data) == ("tiny", "penn")
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    assert all(action.help for action in train_parser._actions), "a flag without --help text"
    args = parser.parse_args(["train", "--loss", "cdpo", "--loss-param", "label_smoothing=0.2", "--max-grad-norm", "0"])
    assert train_config(args).loss_kwargs == {"label_smoothing": 0.2} and train_config(args).max_grad_norm is None
    with pytest.raises(ValueError, match=r"dpo does not take \['kl_coef'\]"):
        train_config(parser.parse_args(["train", "--loss-param", "kl_coef=1"]))
    assert (c.max_length, c.truncation_mode, args.unique_prompts) == (1024, "keep_start", False)
    args = parser.parse_args(["train", "--max-length", "0", "--truncation-mode", "keep_end", "--unique-prompts"])
    c = train_config(args)
    assert (c.max_length, c.truncation_mode, args.unique_prompts) == (None, "keep_end", True)


def _cli_case(case: str, tmp_path: Path, model_dir: Path, data: Path) -> tuple[list[str], str]:
    """(the flags of a bad ``dpolab train`` invocation, the one line it must end with after "error: ")."""
    missing = tmp_path / "missing.jsonl"
    cases = {
        "missing data file": (["--data", missing], f"--data {missing}: preference data file not found: {missing}"),
        "missing csv file": (
            ["--data", tmp_path / "pairs.csv"],
            f"--data {tmp_path / 'pairs.csv'}: preference data file not found: {tmp_path / 'pairs.csv'}",
        ),
        "model folder missing": (
            ["--model", "/nonexistent"],
            "--model /nonexistent: model folder /nonexistent does not exist: check the path. ",
        ),
        "loss parameter of the wrong type": (
            ["--loss", "cdpo", "--loss-param", "label_smoothing=abc"],
            "loss_kwargs: cdpo's label_smoothing must be a number, got 'abc' (--loss-param label_smoothing=<number>)",
        ),
        "max length beyond the context": (["--max-length", 65], "max_length 65 exceeds the model's context of 64"),
        "folder of other files (checked before the model loads)": (
            ["--model", "/nonexistent", "--output-dir", _users_folder(tmp_path / "mine")],
            f"output_dir {tmp_path / 'mine'} holds files dpolab did not write",
        ),
        "unwritable output folder": (
            ["--output-dir", "/proc/1/run"],
            "output_dir /proc/1/run: /proc/1 is not writable",
        ),
    }
    if not torch.cuda.is_available():
        cases["device not present"] = (["--device", "cuda"], "device 'cuda' is not available")
    return cases[case]


CLI_CASES = [
    "missing data file",
    "missing csv file",
    "model folder missing",
    "loss parameter of the wrong type",
    "max length beyond the context",
    "folder of other files (checked before the model loads)",
    "unwritable output folder",
    "device not present",
]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input_ends_in_one_line_and_exit_status_2(tiny_model_dir, tmp_path, capsys, case):
    from dpolab.cli import main

    if case == "device not present" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present: 'cuda' is not missing here")
    model_dir, data = tiny_model_dir
    flags, line = _cli_case(case, tmp_path, model_dir, data)
    defaults = {"--model": model_dir, "--data": data, "--output-dir": tmp_path / "run"}
    argv = ["train", "--no-progress", *map(str, flags)]
    argv += [str(x) for flag, value in defaults.items() if flag not in flags for x in (flag, value)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # above it, at most transformers' own progress bar of loading the weights
    assert last.startswith(f"dpolab train: error: {line}") and "Traceback" not in err and err.count("error") == 1, err
    assert not (tmp_path / "run").exists()  # nothing written for a refused run

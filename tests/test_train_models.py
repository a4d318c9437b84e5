"""What ``train`` does to the caller's models (nothing but the policy's weights), gradient checkpointing, and
TensorBoard logging under TRL's metric names."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import make_tiny_gpt2
from helpers import pinned_config
from transformers import AutoModelForCausalLM

from dpolab.data.collate import PreferenceCollator, tokenize_preferences
from dpolab.logprobs import sequence_logps_from_logits
from dpolab.train import METRICS, TrainConfig, train
from dpolab.train.speedups import GELUProjection, NormThenConv1D, RowGradEmbedding

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def rows(penn):
    return penn["train"].select(range(16))


def config(**kw) -> TrainConfig:
    return pinned_config(**{"batch_size": 8, **kw})


def snapshot(model) -> dict:
    """Everything train() could change on a model besides its weights: every module's class, mode and children,
    every dropout's p."""
    return {
        "classes": [(name, type(m)) for name, m in model.named_modules()],
        "children": [(name, id(c)) for m in model.modules() for name, c in m.named_children()],
        "training": [m.training for m in model.modules()],
        "dropout": [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
        "checkpointing": [getattr(m, "gradient_checkpointing", None) for m in model.modules()],
    }


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def own_logps(model, examples) -> torch.Tensor:
    batch = PreferenceCollator(pad_token_id=0)(examples)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps_from_logits(logits, batch["input_ids"], batch["completion_mask"])


def test_train_leaves_the_callers_models_as_they_were(small_tokenizer, rows, tmp_path):
    """With every speed-up on (they swap GPT-2's module classes while train runs), the reference comes back untouched
    (weights, classes, dropout, mode) and the policy with its own classes and dropout and only its weights trained;
    its save_pretrained folder loads with plain transformers and scores as the trained policy does."""
    policy = make_tiny_gpt2(small_tokenizer, dropout=0.1).train()
    reference = make_tiny_gpt2(small_tokenizer, seed=1, dropout=0.1).eval()
    before = {"policy": snapshot(policy), "reference": snapshot(reference)}
    initial, ref_weights = weights(policy), weights(reference)
    during = []

    def look(row):
        block = policy.transformer.h[0]
        during.append(
            (type(block.mlp.c_proj), type(block.attn.c_attn), type(policy.transformer.wte), policy.transformer.drop.p)
        )

    train(policy, small_tokenizer, rows, config(max_steps=2), ref_model=reference, on_step=look)
    # the speed-ups and dropout 0 held while training
    assert during[0] == (GELUProjection, NormThenConv1D, RowGradEmbedding, 0.0)
    assert "norm" not in vars(policy.transformer.h[0].attn.c_attn)  # NormThenConv1D's reference to its norm is gone
    assert snapshot(policy) == before["policy"] and snapshot(reference) == before["reference"]
    assert all(torch.equal(v, ref_weights[k]) for k, v in reference.state_dict().items())
    assert not all(torch.equal(v, initial[k]) for k, v in policy.state_dict().items())
    policy.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    examples = tokenize_preferences(rows.select(range(4)), small_tokenizer)
    torch.testing.assert_close(own_logps(reloaded, examples), own_logps(policy.eval(), examples), rtol=0, atol=0)


def test_train_undoes_its_changes_when_it_raises(small_tokenizer, rows):
    policy = make_tiny_gpt2(small_tokenizer, dropout=0.1)
    before = snapshot(policy)

    def fail(row):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        train(policy, small_tokenizer, rows, config(max_steps=2, gradient_checkpointing=True), on_step=fail)
    assert snapshot(policy) == before


@pytest.mark.parametrize("loss", ["dpo", "sft"])
def test_gradient_checkpointing_gives_the_same_run_and_is_switched_off_after(small_tokenizer, rows, loss):
    """Three steps with and without checkpointing (every speed-up on): the same history and weights; with it, a
    block's MLP runs twice per step (the forward, then its recomputation in the backward; counted over steps 2 and 3,
    after the one-time checks of the speed-ups); after, it is off again and transformers' input-embedding hook is
    gone."""
    runs = []
    for checkpointing in (False, True):
        model = make_tiny_gpt2(small_tokenizer)
        before = snapshot(model)
        calls = []
        mlp = model.transformer.h[0].mlp  # inside the checkpointed block (transformers checkpoints its forward)
        mlp.register_forward_pre_hook(lambda m, a, calls=calls: calls.append(torch.is_grad_enabled()))
        marks = []  # the MLP's calls with gradients so far, at the end of each step
        history = train(
            model,
            small_tokenizer,
            rows,
            config(loss=loss, max_steps=3, gradient_checkpointing=checkpointing),
            on_step=lambda row, marks=marks, calls=calls: marks.append(calls.count(True)),
        ).history
        mlp._forward_pre_hooks.clear()
        assert snapshot(model) == before
        runs.append((history, weights(model), marks[-1] - marks[0]))
    (h0, w0, calls0), (h1, w1, calls1) = runs
    assert (calls0, calls1) == (2, 4)  # steps 2 and 3
    for r0, r1 in zip(h0, h1, strict=True):
        for key in METRICS:
            assert r1[key] == pytest.approx(r0[key], rel=1e-6, abs=1e-7), key
    for name in w0:
        torch.testing.assert_close(w1[name], w0[name], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_on_a_model_without_it_is_one_clear_line(small_tokenizer, rows):
    model = make_tiny_gpt2(small_tokenizer)
    model.supports_gradient_checkpointing = False
    with pytest.raises(ValueError, match=r"^gradient_checkpointing: GPT2LMHeadModel does not support it"):
        train(model, small_tokenizer, rows, config(max_steps=1, gradient_checkpointing=True))


def test_tensorboard_events_hold_the_history_under_trls_names(small_tokenizer, rows, tmp_path):
    """The event file read back with TensorBoard's own EventAccumulator: one scalar per metric and step, named as
    transformers' TensorBoardCallback names TRL's logs (rewrite_logs), equal to the history."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations.integration_utils import rewrite_logs

    history = train(
        make_tiny_gpt2(small_tokenizer),
        small_tokenizer,
        rows,
        config(epochs=2, output_dir=str(tmp_path), report_to="tensorboard"),
    ).history
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    expected = rewrite_logs({k: v for k, v in history[0].items() if k != "step"})
    assert sorted(events.Tags()["scalars"]) == sorted(expected) and "train/rewards/margins" in expected
    for tag in expected:
        name = tag.removeprefix("train/")
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [row["step"] for row in history] == [1, 2, 3, 4]
        assert [s.value for s in scalars] == pytest.approx([row[name] for row in history], rel=1e-6, abs=1e-7)


def test_report_to_is_checked_when_the_config_is_made(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="report_to must be one of"):
        TrainConfig(report_to="wandb", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="needs an output_dir"):
        TrainConfig(report_to="tensorboard")
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"needs the tensorboard package.*pip install 'dpolab\[tensorboard\]'"):
        TrainConfig(report_to="tensorboard", output_dir=str(tmp_path))


def test_cli_flags(tmp_path, monkeypatch, capsys):
    from dpolab.cli import build_parser, main, train_config

    args = build_parser().parse_args(
        ["train", "--gradient-checkpointing", "--report-to", "tensorboard", "--output-dir", str(tmp_path)]
    )
    c = train_config(args)
    assert c.gradient_checkpointing and c.report_to == "tensorboard"
    default = train_config(build_parser().parse_args(["train"]))
    assert (default.gradient_checkpointing, default.report_to) == (False, "none")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(["train", "--report-to", "tensorboard", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "dpolab train: error: report_to='tensorboard' needs the tensorboard package, which is not installed: "
        "pip install 'dpolab[tensorboard]' (or pip install tensorboard), or report_to='none'"
    )


def test_speedups_applied_puts_back_the_modules_it_replaced():
    """Outside GPT-2's MLP layout, fuse_activations replaces a NewGELUActivation module by a fused GELUTanh (a new
    child, not a class change): the block gives the original object back, and the function is unchanged inside."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    from dpolab.train.speedups import speedups_applied

    torch.manual_seed(0)
    model = GPTNeoForCausalLM(
        GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global"], 2]])
    ).eval()
    acts = [block.mlp.act for block in model.transformer.h]
    assert all(type(act) is NewGELUActivation for act in acts)
    ids = torch.arange(12)[None]
    expected = model(ids).logits
    with speedups_applied(model):
        assert all(type(block.mlp.act) is GELUTanh for block in model.transformer.h)
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert [block.mlp.act for block in model.transformer.h] == acts

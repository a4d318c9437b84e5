"""The tiny Penn world: its build and cache, its reference Penn rate, and DPO raising it."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from dpolab.data import mentions_penn
from dpolab.eval.generation import SamplingConfig, generate
from dpolab.tiny import EOS, PAD, TinyConfig, build_info, load_tiny_penn_world, tiny_world_path
from dpolab.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")

# Pure sampling (no top-k): the share of Penn continuations then estimates the model's own probability of
# mentioning Penn, which is what DPO moves. Top-k truncation favours the few concentrated Penn phrases over
# the spread-out ordinary continuations, and inflates the tiny model's rate (see test_top_k_inflates_the_rate).
PURE = SamplingConfig(top_k=0, temperature=1.0, max_new_tokens=30)


def penn_rate(model, tokenizer, prompts, sampling=PURE, seed=0) -> float:
    texts = generate(model, tokenizer, prompts, sampling, seed=seed).texts
    return sum(map(mentions_penn, texts)) / len(texts)


@pytest.fixture(scope="module")
def reference_rate(tiny_world, penn):
    model, tokenizer, _ = tiny_world
    return penn_rate(model, tokenizer, penn["test"]["prompt"])


def test_the_tiny_world_is_built_and_cached(tiny_world, penn):
    model, tokenizer, path = tiny_world
    assert {"build.json", "config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    info = build_info(path)
    assert info["sentences"] == 2 * len(penn["train"])  # prompt + chosen, prompt + rejected; train split only
    assert info["final_loss"] < info["first_loss"] - 3  # it learned something (8.3 -> ~3.9 nats per token)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_positions) == (4, 256, 128)
    assert 3e6 < sum(p.numel() for p in model.parameters()) < 6e6
    assert len(tokenizer) == 4096 and (tokenizer.eos_token, tokenizer.pad_token) == (EOS, PAD)
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    sentence = penn["test"][0]["prompt"] + " " + penn["test"][0]["chosen"]
    assert tokenizer.decode(tokenizer(sentence)["input_ids"]) == sentence  # byte-level: lossless on unseen text
    again, _ = load_tiny_penn_world(build=False)  # from the cache, no rebuild
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_cache_key_follows_config_and_data(penn):
    default = tiny_world_path()
    assert tiny_world_path(TinyConfig(seed=1)) != default
    assert tiny_world_path(rows=penn["train"].select(range(100))) != default
    assert tiny_world_path(rows=penn["train"]) == default


MICRO = TinyConfig(vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_positions=128, steps=3, batch_size=8)


def test_build_is_deterministic_and_atomic(penn, tmp_path, monkeypatch):
    rows = penn["train"].select(range(40))
    worlds = []
    for name in ("a", "b"):
        monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / name))
        model, tokenizer = load_tiny_penn_world(MICRO, rows=rows)
        worlds.append((model.state_dict(), tokenizer.get_vocab()))
        assert [p.name for p in (tmp_path / name).iterdir()] == [tiny_world_path(MICRO, rows=rows).name]  # no leftovers
    (a, vocab_a), (b, vocab_b) = worlds
    assert vocab_a == vocab_b and all(torch.equal(a[k], b[k]) for k in a)
    # a failed build leaves nothing behind, and the next call builds again
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "c"))
    from transformers import PreTrainedTokenizerFast

    def interrupted(*args, **kwargs):  # the model is already written into the temporary folder by then
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_tiny_penn_world(MICRO, rows=rows)
    assert list((tmp_path / "c").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not built"):
        load_tiny_penn_world(MICRO, rows=rows, build=False)


def test_reference_mentions_penn_about_half_the_time(reference_rate):
    assert 0.25 <= reference_rate <= 0.8


def test_top_k_inflates_the_rate(tiny_world, penn, reference_rate):
    """With the article's top-k 30 the tiny reference mentions Penn more often than its own probability says."""
    model, tokenizer, _ = tiny_world
    assert penn_rate(model, tokenizer, penn["test"]["prompt"], SamplingConfig(top_k=30)) > reference_rate + 0.1


@pytest.mark.slow
def test_a_short_dpo_run_makes_the_model_mention_penn(tiny_world, penn, reference_rate, tmp_path):
    model, tokenizer, _ = tiny_world
    policy = copy.deepcopy(model)
    config = TrainConfig(
        loss="dpo",
        beta=0.5,
        learning_rate=1e-4,
        batch_size=16,
        max_steps=40,
        progress=False,
        ref_cache_dir=str(tmp_path),
    )
    history = train(policy, tokenizer, penn["train"], config).history
    assert history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert sum(r["rewards/accuracies"] for r in history[-5:]) / 5 > 0.8
    rate = penn_rate(policy, tokenizer, penn["test"]["prompt"])
    print(f"Penn rate on the test prompts: reference {reference_rate:.3f}, after 40 DPO steps {rate:.3f}")
    assert rate >= reference_rate + 0.3, (reference_rate, rate)


def test_the_models_and_the_tiny_world_do_not_import_the_trainer():
    """The layers run one way, models -> tiny -> train: importing dpolab.models and dpolab.tiny (in a fresh
    interpreter) loads no module of dpolab.train, and train's schedule is the one the tiny world pretrains with."""
    code = (
        "import sys, dpolab.models, dpolab.tiny\n"
        "print(sorted(m for m in sys.modules if m.startswith('dpolab.train')))\n"
        "from dpolab.train.setup import warmup_cosine\n"
        "print(warmup_cosine is dpolab.tiny.warmup_cosine)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "True"]

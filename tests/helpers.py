"""Small, dependency-free builders shared by tests: a word-level tokenizer and a tiny random GPT-2."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from dpolab.train import TrainConfig

WORDS = (
    "the a an and of to in on at for with my our your their we you they it is was were be been sun rain wind "
    "sky city train work food cake tea coffee lecture class team game music book dog cat park river road home "
    "university pennsylvania penn campus students library museum walk bright cold warm late early today "
    "yesterday tomorrow morning evening night after before because so but very quite really always never"
).split()


# The devices a device-capable test runs on: the CPU always, CUDA (marked gpu: skipped, with a reason, without one).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pinned_config(**kw) -> TrainConfig:
    """A test's TrainConfig: device and precision pinned (the same numbers on a machine with a GPU), no progress bar,
    no reference cache, a constant learning rate of 1e-3; ``kw`` overrides any of these."""
    base = {
        "progress": False,
        "use_ref_cache": False,
        "device": "cpu",
        "precision": "fp32",
        "learning_rate": 1e-3,
        "min_learning_rate": 1e-3,
    }
    return TrainConfig(**{**base, **kw})


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS plus <unk>, <pad>, <eos> (ids 0, 1, 2)."""
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", model_max_length=128
    )


def tiny_gpt2(
    vocab_size: int,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 32,
    *,
    n_positions: int = 128,
    dropout: float = 0.0,
    eos_token_id: int = 2,
    pad_token_id: int = 1,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 sized for unit tests (fp32, CPU); dropout off by default, so that train and
    eval modes agree."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=4,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return GPT2LMHeadModel(config)


def perturbed_copy(model: GPT2LMHeadModel, seed: int, scale: float = 0.05) -> GPT2LMHeadModel:
    """A copy of ``model`` with Gaussian noise on every weight: a reference that differs from the policy."""
    other = GPT2LMHeadModel(model.config)
    other.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other

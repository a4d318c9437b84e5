"""The tiny Penn world: a small GPT-2 and its tokenizer, trained from scratch on the Penn set, on a CPU.

It stands in for GPT-2 124M wherever a test or a notebook must run in seconds on a laptop CPU:

- a byte-level BPE tokenizer (GPT-2's scheme, 4,096 tokens) trained on the Penn training sentences,
  ``prompt + chosen`` and ``prompt + rejected`` (each completion starts with its space), with ``<|endoftext|>``
  (EOS) and ``<|pad|>``;
- a GPT-2-architecture model (4 layers, 256 wide, 128 positions, ~4M parameters) pretrained as a plain
  language model on the same sentences, each followed by EOS.

Since every training prompt is seen once with a Penn continuation and once without, the pretrained model is a
reference pi_ref that mentions Penn about half of the time on unseen prompts: the starting point of the
article's experiment, in miniature. Everything is seeded; the result is cached in
``$DPOLAB_CACHE/tiny-penn-<hash>`` (default ``~/.cache/dpolab``), keyed by the config and the sentences, and
built in a temporary folder renamed into place, so concurrent or interrupted builds never leave a broken cache.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .files import atomic_directory, cache_root
from .schedules import warmup_cosine

__all__ = ["TinyConfig", "train_tokenizer", "penn_sentences", "load_tiny_penn_world", "tiny_world_path", "build_info"]

EOS, PAD = "<|endoftext|>", "<|pad|>"
_FORMAT = 1  # bump when the build procedure changes, to invalidate old caches


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 4096  # byte-level BPE vocabulary, the two special tokens included
    n_layer: int = 4  # transformer blocks
    n_embd: int = 256  # width
    n_head: int = 4  # attention heads
    n_positions: int = 128  # context length (Penn sentences are < 60 tokens)
    dropout: float = 0.1  # GPT-2's dropout, for pretraining on ~2.6k sentences (DPO training disables it)
    steps: int = 600  # pretraining optimizer steps
    batch_size: int = 32  # sentences per step
    learning_rate: float = 2e-3  # peak AdamW learning rate
    min_learning_rate: float = 2e-5  # end of the cosine decay
    warmup_steps: int = 50  # linear warm-up
    weight_decay: float = 0.01  # AdamW weight decay
    seed: int = 0  # seeds the initialisation and the sentence order

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "n_positions", "steps", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.vocab_size < 258:
            raise ValueError(f"vocab_size must cover the 256 bytes and 2 special tokens, got {self.vocab_size}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.min_learning_rate <= self.learning_rate:
            raise ValueError(
                f"need 0 < min_learning_rate <= learning_rate, got {self.min_learning_rate}, {self.learning_rate}"
            )


def penn_sentences(rows: Iterable[Mapping[str, str]]) -> list[str]:
    """``prompt + chosen`` and ``prompt + rejected`` of every row, in order: the sentences TRL's format spells
    (the completions carry their leading space)."""
    return [row["prompt"] + row[key] for row in rows for key in ("chosen", "rejected")]


def train_tokenizer(texts: list[str], vocab_size: int = 4096):
    """A byte-level BPE (GPT-2's scheme) trained on ``texts``, as a PreTrainedTokenizerFast with EOS and PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=PAD)


def _model(config: TinyConfig, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(gpt2)


def _pretrain(model, token_lists: list[list[int]], config: TinyConfig, pad_id: int) -> list[float]:
    """Next-token prediction on whole sentences (prompt included), batches of random sentences. Returns the losses."""
    rng = np.random.default_rng(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = warmup_cosine(optimizer, config.steps, config.warmup_steps, config.min_learning_rate)
    order, cursor, losses = rng.permutation(len(token_lists)), 0, []
    model.train()
    for _ in range(config.steps):
        if cursor + config.batch_size > len(order):
            order, cursor = rng.permutation(len(token_lists)), 0
        batch = [token_lists[i] for i in order[cursor : cursor + config.batch_size]]
        cursor += config.batch_size
        length = max(map(len, batch))
        input_ids = torch.tensor([ids + [pad_id] * (length - len(ids)) for ids in batch])  # (B, L)
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in batch])
        labels = input_ids.masked_fill(attention_mask == 0, -100)  # no loss on padding
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _penn_train_rows():
    from .data import load_penn

    return load_penn("train")


def tiny_world_path(config: TinyConfig = TinyConfig(), rows: Iterable[Mapping[str, str]] | None = None) -> Path:
    """Where the tiny world for this config and these training rows (default: the Penn train split) is cached."""
    sentences = penn_sentences(_penn_train_rows() if rows is None else rows)
    return _path(config, sentences)


def _path(config: TinyConfig, sentences: list[str]) -> Path:
    digest = hashlib.sha256(json.dumps({"format": _FORMAT, "config": asdict(config), "sentences": sentences}).encode())
    return cache_root() / f"tiny-penn-{digest.hexdigest()[:16]}"


def build_tiny_penn_world(path: Path, config: TinyConfig, sentences: list[str]) -> None:
    """Train the tokenizer and pretrain the model; write both (and build.json) to ``path`` atomically."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    tokenizer = train_tokenizer(sentences, config.vocab_size)
    tokenizer.model_max_length = config.n_positions
    model = _model(config, tokenizer)
    token_lists = [tokenizer(s + EOS)["input_ids"] for s in sentences]
    too_long = [i for i, ids in enumerate(token_lists) if len(ids) > config.n_positions]
    if too_long:
        raise ValueError(
            f"sentences {too_long[:10]} (of pairs {sorted({i // 2 for i in too_long})[:10]}) exceed "
            f"n_positions={config.n_positions} tokens; raise n_positions"
        )
    losses = _pretrain(model, token_lists, config, tokenizer.pad_token_id)
    info = {
        "config": asdict(config),
        "sentences": len(sentences),
        "parameters": sum(p.numel() for p in model.parameters()),
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-20:])),
        "build_seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
    }
    with atomic_directory(path, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "build.json").write_text(json.dumps(info, indent=1))


def load_tiny_penn_world(
    config: TinyConfig = TinyConfig(), rows: Iterable[Mapping[str, str]] | None = None, build: bool = True
):
    """``(model, tokenizer)`` of the tiny Penn world, built on first use and cached.

    Args:
        config: the tokenizer, model and pretraining settings.
        rows: the preference rows to train on; default: the shipped Penn set's train split.
        build: build when not cached (False: raise FileNotFoundError instead).
    The model is returned in eval mode, on CPU, in float32.
    """
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    sentences = penn_sentences(_penn_train_rows() if rows is None else rows)
    path = _path(config, sentences)
    if not (path / "build.json").exists():
        if not build:
            raise FileNotFoundError(f"the tiny Penn world is not built at {path}")
        build_tiny_penn_world(path, config, sentences)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


def build_info(path: str | Path) -> dict:
    """The build record of a tiny world (config, parameters, losses, build seconds)."""
    return json.loads((Path(path) / "build.json").read_text())


if __name__ == "__main__":  # python -m dpolab.tiny: build (or find) the tiny world and print where it is
    _model_, _tok = load_tiny_penn_world()
    print(tiny_world_path(), f"{sum(p.numel() for p in _model_.parameters()) / 1e6:.1f}M parameters, vocab {len(_tok)}")

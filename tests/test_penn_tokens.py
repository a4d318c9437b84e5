"""The Penn experiment's tokens are pinned: every Penn row (train and test) gives the token ids it gave in dpolab
0.1.0, under GPT-2's, SmolLM2's and the tiny world's tokenizers, and the tiny world's pretraining text is unchanged.

The hashes below were recorded with dpolab 0.1.0's own code (``tokenize_preferences`` on the shipped files, which
then held the continuations without their leading space and tokenized ``prompt + " " + continuation + EOS``), before
the data and the tokenization changed to TRL's conventions. They cover the token ids of prompt, chosen and rejected
of every row, in order; the committed Penn run was trained on these tokens.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from dpolab.data.collate import tokenize_preferences

PINNED = {
    "gpt2": {"train": "654297ecb2c695e4", "test": "ede62a106e409e76"},
    "smollm2-135m": {"train": "c85f6c0cd410da51", "test": "fec46de6da3be46d"},
    "tiny": {"train": "3b608f36a8701491", "test": "01c9eb817eadaf56"},
}
TINY_WORLD = "tiny-penn-8c0160eafc746466"  # its cache key hashes the TinyConfig and the pretraining sentences


def token_digest(examples) -> str:
    """sha256 over the JSON of each row's [prompt_ids, chosen_ids, rejected_ids], in order (first 16 hex digits)."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]]).encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def tokenizers(request):
    from dpolab.models import gpt2_tokenizer

    return {
        "gpt2": lambda: gpt2_tokenizer(),
        "smollm2-135m": lambda: request.getfixturevalue("smollm2_tokenizer"),
        "tiny": lambda: request.getfixturevalue("tiny_world")[1],
    }


@pytest.mark.parametrize("name", sorted(PINNED))
def test_penn_token_ids_are_those_of_dpolab_0_1(penn, tokenizers, name):
    tokenizer = tokenizers[name]()
    got = {split: token_digest(tokenize_preferences(penn[split], tokenizer)) for split in ("train", "test")}
    assert got == PINNED[name]


def test_the_tiny_worlds_pretraining_text_is_unchanged():
    from dpolab.tiny import tiny_world_path

    assert tiny_world_path().name == TINY_WORLD

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
from pathlib import Path

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


def test_a_rerun_recognises_every_unit_of_the_committed_penn_run(penn, smollm2_tokenizer):
    """The committed run (results/penn-smollm2-135m, SmolLM2) stays done: its fingerprint is the training pairs'
    token ids as the experiment tokenizes them now, and every unit's done.json carries the settings hash that
    `make penn ARGS="--output-dir results/penn-smollm2-135m --no-progress --precision fp32"` computes."""
    from dpolab.experiments.penn.cli import build_parser, experiment_from_args
    from dpolab.experiments.penn.methods import settings_hash, unit_settings
    from dpolab.experiments.penn.pipeline import plan_units, read_done
    from dpolab.train import TrainConfig
    from dpolab.train.examples import training_examples

    run = Path(__file__).resolve().parents[1] / "results" / "penn-smollm2-135m"
    fp = json.loads((run / "config.json").read_text())["fingerprint"]
    # SmolLM2's context (8192) is above TrainConfig's max_length: the experiment truncates at 1024, as here
    examples = training_examples(penn["train"], smollm2_tokenizer, TrainConfig())
    assert token_digest(examples) == fp["train_sha256"] == PINNED["smollm2-135m"]["train"]
    assert hashlib.sha256(json.dumps(list(penn["test"]["prompt"])).encode()).hexdigest()[:16] == fp["test_sha256"]
    exp = experiment_from_args(
        build_parser().parse_args(["--output-dir", str(run), "--no-progress", "--precision", "fp32"])
    )
    units, _ = plan_units(exp)
    assert len(units) == 14
    for unit in units:
        assert read_done(run / unit.folder)["settings_hash"] == settings_hash(unit_settings(unit, exp, fp)), unit.name

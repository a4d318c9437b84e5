"""Shared fixtures: the Penn set, small tokenizers and models, the tiny Penn world (built once per cache)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with a reason, where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); none is present here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def single_thread():
    """torch on one thread for a module of small-model tests: bit-reproducible, and on a shared 2-core machine
    far faster than two threads spinning against other processes (measured 1.4 s against 35 s for one test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def penn():
    """The shipped Penn preference set: a DatasetDict with train and test."""
    from dpolab.data import load_penn

    return load_penn()


@pytest.fixture(scope="session")
def small_tokenizer(penn):
    """A 512-token byte-level BPE trained on 200 Penn training pairs (under a second)."""
    from dpolab.tiny import penn_sentences, train_tokenizer

    return train_tokenizer(penn_sentences(penn["train"].select(range(200))), vocab_size=512)


def make_tiny_gpt2(tokenizer, n_layer: int = 2, n_embd: int = 64, seed: int = 0, dropout: float = 0.0):
    """``helpers.tiny_gpt2`` with the vocabulary and special tokens of ``tokenizer`` (64 positions)."""
    from helpers import tiny_gpt2

    return tiny_gpt2(
        len(tokenizer),
        seed,
        n_layer,
        n_embd,
        n_positions=64,
        dropout=dropout,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def dpolab_command(*args, launcher: tuple[str, ...] = ()) -> list[str]:
    """The command line of ``dpolab ARGS`` run by this interpreter, optionally under a launcher (torchrun)."""
    return [sys.executable, *launcher, "-m", "dpolab.cli", *map(str, args)]


def subprocess_env() -> dict[str, str]:
    """Environment of test subprocesses: one thread each (reproducible, no oversubscription), offline."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_command(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` with :func:`subprocess_env`, capturing its output; on timeout, SIGTERM it (torchrun then
    stops its workers), SIGKILL it if it lingers, and fail the test: no process outlives a test."""
    proc = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(command)}\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def tiny_model_dir(small_tokenizer, penn, tmp_path_factory):
    """A folder with a small random GPT-2 (4 layers, 128 wide, dropout 0.1) and its tokenizer, and
    ``pairs.jsonl`` with 48 Penn training pairs: what the command line (``dpolab train``) takes in tests."""
    import json

    folder = tmp_path_factory.mktemp("tiny-model")
    make_tiny_gpt2(small_tokenizer, n_layer=4, n_embd=128, dropout=0.1).save_pretrained(folder)
    small_tokenizer.save_pretrained(folder)
    fields = ("prompt", "chosen", "rejected")
    rows = penn["train"].select(range(48))
    (folder / "pairs.jsonl").write_text("".join(json.dumps({k: r[k] for k in fields}) + "\n" for r in rows))
    return folder, folder / "pairs.jsonl"


@pytest.fixture(scope="session")
def tiny_world():
    """``(model, tokenizer, path)`` of the tiny Penn world; the first session on a machine builds it (~2 min)."""
    from dpolab.tiny import load_tiny_penn_world, tiny_world_path

    model, tokenizer = load_tiny_penn_world()
    return model, tokenizer, tiny_world_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M's tokenizer (49,152 tokens, a chat template), the one ``load_model("smollm2-135m")`` returns,
    read from the cached conversion without loading the weights (the first session on a machine converts, ~20 s)."""
    from transformers import AutoTokenizer

    from dpolab import models

    folder, _ = models.smollm2_checkpoint()
    return models.prepare_tokenizer(AutoTokenizer.from_pretrained(folder))

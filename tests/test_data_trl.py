"""dpolab's tokens are TRL 1.16's: row for row, dpolab.data.tokenize_preferences gives the prompt/chosen/rejected ids
of TRL's own ``DPOTrainer._prepare_dataset``, its truncated batches are those of TRL's ``DataCollatorForPreference``,
and training steps on such data give TRL's loss and log-probs.

Tokenizers: GPT-2's (byte-level BPE, no chat template: hand-written templates, one adding a BOS) and SmolLM2's (its
own chat template). Formats: standard, conversational, and both with an implicit prompt.
"""

from __future__ import annotations

import contextlib
import copy
import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="trl is part of the [trl] extra that `make test` installs")
from datasets import Dataset
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from dpolab.data import PreferenceDataError, load_penn, tokenize_pair, tokenize_preferences
from dpolab.data.collate import PreferenceCollator
from dpolab.data.packing import PackedPreferenceCollator
from dpolab.logprobs import concatenated_logps, packed_logps

pytestmark = [pytest.mark.trl, pytest.mark.usefixtures("single_thread")]

KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")

# A template whose generation prompt renders differently from the same turn in a full conversation (the way some
# reasoning templates add an empty thought block): the completion then starts where the two diverge.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:<think></think>{% endif %}"
)
# A template that starts every conversation with the BOS token (apply_chat_template adds no special token itself).
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def standard_rows(eos: str) -> list[dict]:
    penn = load_penn("train").select(range(4)).to_list()
    return [
        *({k: row[k] for k in ("prompt", "chosen", "rejected")} for row in penn),
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "The sky is", "chosen": " grey today.", "rejected": " green."},  # a second pair for one prompt
        {"prompt": "The sky is ", "chosen": "blue", "rejected": "grey"},  # " blue" merges across the boundary
        {"prompt": "Say hi", "chosen": " hi" + eos, "rejected": " bye"},  # EOS already there: not doubled
        {"prompt": "Café au", "chosen": " lait ☕ chaud", "rejected": " chocolat"},
    ]


IMPLICIT_STANDARD = [
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": "My tea is hot and sweet", "rejected": "My tea is cold"},
    {"chosen": "Penn is in Philadelphia", "rejected": "Penn is in Philadelphia, by the river"},  # a prefix
]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


CONVERSATIONAL = [
    {"prompt": [user("What color is the sky?")], "chosen": [assistant("It is blue.")], "rejected": [assistant("Red.")]},
    {
        "prompt": [{"role": "system", "content": "Answer briefly."}, user("Where is Penn?")],
        "chosen": [assistant("In Philadelphia, on the Schuylkill.")],
        "rejected": [assistant("I do not know.")],
    },
    {
        "prompt": [user("Hi"), assistant("Hello! How can I help?"), user("Name a university in Philadelphia.")],
        "chosen": [assistant("The University of Pennsylvania.")],
        "rejected": [assistant("Harvard.")],
    },
]
IMPLICIT_CONVERSATIONAL = [
    {
        "chosen": [user("What color is the sky?"), assistant("It is blue.")],
        "rejected": [user("What color is the sky?"), assistant("It is green.")],
    },
    {
        "chosen": [user("Tea or coffee?"), assistant("Tea, with lemon.")],
        "rejected": [user("Tea or coffee?"), assistant("Neither.")],
    },
]


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer):
    from dpolab.models import gpt2_tokenizer

    gpt2 = gpt2_tokenizer()
    templated, bos_templated = copy.deepcopy(gpt2), copy.deepcopy(gpt2)
    templated.chat_template, bos_templated.chat_template = TEMPLATE, BOS_TEMPLATE
    return {"gpt2": gpt2, "smollm2": smollm2_tokenizer, "gpt2+template": templated, "gpt2+bos-template": bos_templated}


@pytest.fixture(scope="module")
def trl_args(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trl"))

    def make(**overrides) -> DPOConfig:
        deprecated = overrides.get("truncation_mode") == "keep_end"  # TRL 1.16 warns that it will go in 2.0
        with pytest.warns(FutureWarning, match="keep_end") if deprecated else contextlib.nullcontext():
            return DPOConfig(output_dir=out, bf16=False, use_cpu=True, report_to="none", **overrides)

    return make


def trl_tokenized(rows: list[dict], tokenizer, args: DPOConfig) -> list[dict]:
    """TRL's own preprocessing of ``rows`` (the DPOTrainer method, without building a model); an ``id`` column
    tells which rows survive its filter."""
    data = Dataset.from_list([{**row, "id": i} for i, row in enumerate(rows)])
    return list(DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), data, tokenizer, args, "train"))


CASES = {
    "standard-gpt2": ("standard", "gpt2"),
    "standard-smollm2": ("standard", "smollm2"),
    "implicit-gpt2": ("implicit", "gpt2"),
    "implicit-smollm2": ("implicit", "smollm2"),
    "conversational-smollm2": ("conversational", "smollm2"),
    "conversational-gpt2-template": ("conversational", "gpt2+template"),
    "conversational-gpt2-bos-template": ("conversational", "gpt2+bos-template"),
    "implicit-conversational-smollm2": ("implicit-conversational", "smollm2"),
    "implicit-conversational-gpt2-bos-template": ("implicit-conversational", "gpt2+bos-template"),
}


def rows_of(fmt: str, tokenizer) -> list[dict]:
    return {
        "standard": standard_rows(tokenizer.eos_token),
        "implicit": IMPLICIT_STANDARD,
        "conversational": CONVERSATIONAL,
        "implicit-conversational": IMPLICIT_CONVERSATIONAL,
    }[fmt]


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_token_ids_are_trls_row_for_row(tokenizers, trl_args, case):
    fmt, name = CASES[case]
    tokenizer = tokenizers[name]
    rows = rows_of(fmt, tokenizer)
    theirs = trl_tokenized(rows, tokenizer, trl_args(max_length=None))
    ours = tokenize_preferences(Dataset.from_list(rows), tokenizer)
    assert len(ours) == len(theirs) == len(rows)
    for mine, trl_row in zip(ours, theirs):
        assert {k: mine[k] for k in KEYS} == {k: trl_row[k] for k in KEYS}
    if name == "gpt2+bos-template":  # the BOS the template writes, once, at the start of every prompt
        assert all(ex["prompt_ids"][0] == tokenizer.bos_token_id != ex["prompt_ids"][1] for ex in ours)


def test_the_boundary_cases_are_what_they_claim(tokenizers):
    """The rows above exercise what they say: a boundary inside the prompt, EOS not doubled, a template whose
    generation prompt is cut at the divergence."""
    gpt2 = tokenizers["gpt2"]
    rows = standard_rows(gpt2.eos_token)
    merged = tokenize_pair(rows[6], gpt2)  # "The sky is " + "blue": BPE makes " blue", so the prompt loses " "
    assert (
        gpt2.decode(merged["prompt_ids"]) == "The sky is"
        and gpt2.decode(merged["chosen_ids"]) == " blue" + gpt2.eos_token
    )
    said = tokenize_pair(rows[7], gpt2)
    assert said["chosen_ids"].count(gpt2.eos_token_id) == 1 and said["rejected_ids"][-1] == gpt2.eos_token_id
    chat = tokenize_pair(CONVERSATIONAL[0], tokenizers["gpt2+template"])
    assert gpt2.decode(chat["prompt_ids"]).endswith("assistant:") and "<think>" not in gpt2.decode(chat["prompt_ids"])
    assert gpt2.decode(chat["chosen_ids"]) == " It is blue.\n"  # no EOS of dpolab's own for messages


def _collate_trl(rows, tokenizer, max_length, mode):
    return DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length, truncation_mode=mode)(
        [{k: row[k] for k in KEYS} for row in rows]
    )


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("fmt,name", [("standard", "gpt2"), ("conversational", "smollm2")])
def test_truncated_batches_are_trls(tokenizers, trl_args, tiny_models, mode, fmt, name):
    """Each sequence is cut as TRL's collator cuts it; where TRL silently drops a row (keep_start, a prompt that
    fills max_length) dpolab refuses it by row; packed and padded batches give the same log-probs."""
    tokenizer = tokenizers[name]
    rows = rows_of(fmt, tokenizer)
    lengths = [len(ex["prompt_ids"]) for ex in tokenize_preferences(rows, tokenizer)]
    max_length = sorted(lengths)[len(lengths) // 2] + 2  # some prompts fill it, some leave room
    theirs = trl_tokenized(rows, tokenizer, trl_args(max_length=max_length, truncation_mode=mode))
    kept, refused = [], []
    for i, row in enumerate(rows):
        try:
            kept.append(tokenize_pair(row, tokenizer, index=i, max_length=max_length, truncation_mode=mode))
        except ValueError as err:
            assert f"<rows>, row {i + 1}: the prompt has {lengths[i]} tokens and max_length is {max_length}" in str(err)
            refused.append(i)
    assert [ex["index"] for ex in kept] == [row["id"] for row in theirs]  # the same rows survive
    assert refused == ([i for i, n in enumerate(lengths) if n >= max_length] if mode == "keep_start" else [])
    ours = PreferenceCollator(tokenizer.pad_token_id)(kept)
    trl_batch = _collate_trl(theirs, tokenizer, max_length, mode)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], trl_batch[key]), key
    if mode == "keep_end":  # chosen and rejected kept different ends of some prompt: the case packing must handle
        assert any("chosen_prompt_ids" in ex for ex in kept)
    model = tiny_models[name][0].eval()
    with torch.no_grad():
        padded = torch.stack(concatenated_logps(model, ours))
        packed = torch.stack(packed_logps(model, PackedPreferenceCollator(tokenizer.pad_token_id, row_tokens=32)(kept)))
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-4)


def test_a_row_that_keep_start_cannot_keep_is_an_error_naming_it(tokenizers):
    rows = standard_rows(tokenizers["gpt2"].eos_token)
    with pytest.raises(
        ValueError, match=r"^train\.jsonl, row 1: the prompt has \d+ tokens and max_length is 4.*raise max_"
    ):
        tokenize_preferences(rows, tokenizers["gpt2"], source="train.jsonl", max_length=4)
    assert tokenize_preferences(rows, tokenizers["gpt2"], max_length=4, truncation_mode="keep_end")  # keeps the end


def test_conversational_rows_need_a_chat_template(tokenizers):
    with pytest.raises(ValueError, match=r"^<rows>, row 1: field 'prompt' is a list of messages .* no chat template"):
        tokenize_preferences(CONVERSATIONAL, tokenizers["gpt2"])


def test_rows_of_two_formats_are_refused_by_row_and_field(tokenizers):
    rows = [*CONVERSATIONAL[:2], {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]
    with pytest.raises(
        PreferenceDataError, match=r"<rows>, row 3: field 'chosen' is in the standard format while row 1"
    ):
        tokenize_preferences(rows, tokenizers["smollm2"])


# ----------------------------------------------------------------------------------------- training steps


def _tiny_llama(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def tiny_models(tokenizers):
    """name -> (policy, reference): random models over each tokenizer's vocabulary, the reference a perturbed copy
    of the policy (so that the log-ratios, and the first step's loss, are not trivial)."""
    from helpers import perturbed_copy, tiny_gpt2

    eos, pad = tokenizers["gpt2"].eos_token_id, tokenizers["gpt2"].pad_token_id
    gpt2 = tiny_gpt2(len(tokenizers["gpt2"]), seed=0, eos_token_id=eos, pad_token_id=pad)
    llama = _tiny_llama(len(tokenizers["smollm2"]), seed=0)
    llama_ref = _tiny_llama(len(tokenizers["smollm2"]), seed=0)
    with torch.no_grad():
        for p in llama_ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return {"gpt2": (gpt2, perturbed_copy(gpt2, seed=1)), "smollm2": (llama, llama_ref)}


METRICS = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins")


@pytest.mark.parametrize(
    "fmt,name,mode,max_length",
    [("standard", "gpt2", "keep_start", 16), ("conversational", "smollm2", "keep_end", 40)],
    ids=["standard-gpt2-keep_start", "conversational-smollm2-keep_end"],
)
def test_two_training_steps_give_trls_loss_and_logps(tokenizers, tiny_models, trl_args, fmt, name, mode, max_length):
    """TRL's DPOTrainer and dpolab.train with TrainConfig.from_trl of the same DPOConfig, from the same weights on
    the same rows (one batch holds them all, so the data order cannot differ): equal metrics at both steps."""
    from dpolab.train import TrainConfig, train

    tokenizer = tokenizers[name]
    rows = rows_of(fmt, tokenizer)
    if mode == "keep_start":  # rows that TRL would drop are refused by dpolab: leave them out
        rows = [row for row in rows if len(tokenize_pair(row, tokenizer)["prompt_ids"]) < max_length]
    policy, reference = tiny_models[name]
    args = trl_args(
        beta=0.2,
        learning_rate=1e-3,
        per_device_train_batch_size=len(rows),
        max_steps=2,
        max_length=max_length,
        truncation_mode=mode,
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    theirs = [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
    config = TrainConfig.from_trl(args, output_dir=None, progress=False, use_ref_cache=False)
    ours = train(copy.deepcopy(policy), tokenizer, Dataset.from_list(rows), config, ref_model=reference).history
    assert len(theirs) == len(ours) == 2
    assert abs(theirs[0]["loss"] - math.log(2)) > 1e-3  # policy and reference differ: not the trivial log 2
    for trl_row, our_row in zip(theirs, ours):
        for key in METRICS:
            assert our_row[key] == pytest.approx(trl_row[key], rel=1e-5, abs=1e-5), key

"""Tokenization and collation of preference pairs: TRL's conventions, truncation, padding, masks."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tiny_gpt2
from dpolab.data.collate import PreferenceCollator, common_prefix_length, tokenize_pair, tokenize_preferences
from dpolab.logprobs import concatenated_logps, sequence_logps_from_logits

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLE = {
    "prompt": "The rain kept falling as",
    "chosen": "we ran across Locust Walk at Penn.",
    "rejected": "we ran for the last bus home.",
}


def test_sequence_is_prompt_space_continuation_eos(small_tokenizer):
    ex = tokenize_pair(EXAMPLE, small_tokenizer, index=7)
    eos = small_tokenizer.eos_token
    assert small_tokenizer.decode(ex["prompt_ids"]) == EXAMPLE["prompt"]
    assert small_tokenizer.decode(ex["chosen_ids"]) == " " + EXAMPLE["chosen"] + eos
    assert small_tokenizer.decode(ex["rejected_ids"]) == " " + EXAMPLE["rejected"] + eos
    assert ex["chosen_ids"][-1] == ex["rejected_ids"][-1] == small_tokenizer.eos_token_id
    assert ex["index"] == 7


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([9], [1]) == 0


@pytest.mark.trl
def test_tokenization_matches_trl_dpo_trainer(small_tokenizer, penn, tmp_path):
    """TRL's DPOTrainer, given completions " " + continuation, tokenizes the Penn rows exactly as we do."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = penn["train"].select(range(24))
    trl_rows = Dataset.from_list(
        [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in rows]
    )
    model = make_tiny_gpt2(small_tokenizer)
    args = DPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none", max_length=None)
    trainer = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=trl_rows, processing_class=small_tokenizer
    )
    ours = tokenize_preferences(rows, small_tokenizer)
    theirs = trainer.train_dataset
    assert len(theirs) == len(ours) == 24
    for mine, trl_row in zip(ours, theirs):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert mine[key] == trl_row[key], key


@pytest.mark.trl
@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_collator_matches_trl(small_tokenizer, penn, pad_to_multiple_of):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = tokenize_preferences(penn["train"].select(range(5)), small_tokenizer)
    ours = PreferenceCollator(small_tokenizer.pad_token_id, pad_to_multiple_of=pad_to_multiple_of)(examples)
    theirs = DataCollatorForPreference(
        pad_token_id=small_tokenizer.pad_token_id, pad_to_multiple_of=pad_to_multiple_of
    )(examples)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    assert ours["index"].tolist() == [0, 1, 2, 3, 4]


def test_collator_layout_by_hand():
    examples = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "index": 10},
        {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11, 12, 13], "index": 3},
    ]
    batch = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=4)(examples)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5, 0, 0, 0],
        [7, 8, 9, 0, 0, 0, 0, 0],
        [1, 2, 3, 6, 0, 0, 0, 0],
        [7, 8, 10, 11, 12, 13, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [1] * 5 + [0] * 3,
        [1] * 3 + [0] * 5,
        [1] * 4 + [0] * 4,
        [1] * 6 + [0] * 2,
    ]
    assert batch["completion_mask"].tolist() == [
        [0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
    ]
    assert batch["index"].tolist() == [10, 3]


def test_truncation_keeps_prompt_end_and_completion_start(small_tokenizer):
    full = tokenize_pair(EXAMPLE, small_tokenizer)
    cut = tokenize_pair(EXAMPLE, small_tokenizer, max_prompt_length=3, max_length=6)
    assert cut["prompt_ids"] == full["prompt_ids"][-3:]
    assert cut["chosen_ids"] == full["chosen_ids"][:3]
    assert cut["rejected_ids"] == full["rejected_ids"][:3]
    assert len(full["prompt_ids"]) > 3 and len(full["chosen_ids"]) > 3  # so that something was cut


def test_no_surviving_completion_token_names_the_example(small_tokenizer):
    rows = [EXAMPLE, EXAMPLE, {**EXAMPLE, "prompt": EXAMPLE["prompt"] + " and the long day went on and on"}]
    n_prompt = len(tokenize_pair(rows[2], small_tokenizer)["prompt_ids"])
    assert len(tokenize_pair(EXAMPLE, small_tokenizer)["prompt_ids"]) < n_prompt - 1
    with pytest.raises(ValueError, match=r"example 2: the prompt has \d+ tokens and max_length is"):
        tokenize_preferences(rows, small_tokenizer, max_length=n_prompt)
    # keeping the prompt's end makes room again
    assert tokenize_preferences(rows, small_tokenizer, max_length=n_prompt, max_prompt_length=n_prompt - 1)[2][
        "chosen_ids"
    ]


def test_bad_rows_are_named(small_tokenizer):
    with pytest.raises(ValueError, match=r"example 1: field 'chosen' must be a string"):
        tokenize_preferences([EXAMPLE, {**EXAMPLE, "chosen": None}], small_tokenizer)
    with pytest.raises(ValueError, match="empty list"):
        PreferenceCollator(0)([])


@settings(max_examples=40, deadline=None)
@given(
    prompt=st.text("abcdefgh ,.PenU", min_size=1, max_size=40).filter(lambda s: s.strip()),
    chosen=st.text("abcdefgh ,.PenU", min_size=1, max_size=40),
    rejected=st.text("xyzw .", min_size=1, max_size=40),
    max_length=st.one_of(st.none(), st.integers(20, 60)),
    max_prompt_length=st.one_of(st.none(), st.integers(1, 19)),
)
def test_truncation_invariants(small_tokenizer, prompt, chosen, rejected, max_length, max_prompt_length):
    """Kept tokens are a suffix of the prompt and a prefix of each completion, within max_length."""
    example = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    full = tokenize_pair(example, small_tokenizer)
    n = min(len(full["prompt_ids"]), max_prompt_length or 10**9)
    if max_length is not None and n >= max_length:
        with pytest.raises(ValueError, match="example 0: the prompt has"):
            tokenize_pair(example, small_tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        return
    cut = tokenize_pair(example, small_tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    assert cut["prompt_ids"] == full["prompt_ids"][len(full["prompt_ids"]) - n :]
    for key in ("chosen_ids", "rejected_ids"):
        assert 1 <= len(cut[key]) and cut[key] == full[key][: len(cut[key])]
        if max_length is not None:
            assert n + len(cut[key]) == min(max_length, n + len(full[key]))
    # untruncated, the tokens spell the text back (byte-level BPE is lossless)
    assert (
        small_tokenizer.decode(full["prompt_ids"] + full["chosen_ids"])
        == prompt + " " + chosen + small_tokenizer.eos_token
    )


def test_padded_batch_gives_each_pair_its_unpadded_logps(small_tokenizer, penn):
    """Right padding and the masks are right: batched log-probs equal each sequence scored alone, unpadded."""
    model = make_tiny_gpt2(small_tokenizer).eval()
    examples = tokenize_preferences(penn["train"].select(range(6)), small_tokenizer)
    batch = PreferenceCollator(small_tokenizer.pad_token_id, pad_to_multiple_of=16)(examples)
    with torch.no_grad():
        chosen, rejected = concatenated_logps(model, batch)
        for i, ex in enumerate(examples):
            for key, got in (("chosen_ids", chosen[i]), ("rejected_ids", rejected[i])):
                ids = torch.tensor([ex["prompt_ids"] + ex[key]])
                mask = torch.tensor([[0] * len(ex["prompt_ids"]) + [1] * len(ex[key])])
                alone = sequence_logps_from_logits(model(ids).logits, ids, mask)[0]
                torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-4)
    assert (chosen < 0).all() and (rejected < 0).all()

"""Tokenization and collation of preference pairs: TRL's conventions, truncation, padding, masks (the comparison
with TRL itself, row for row, is in test_data_trl.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_gpt2
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dpolab.data import PreferenceDataError
from dpolab.data.collate import (
    PreferenceCollator,
    common_prefix_length,
    sequence_parts,
    tokenize_pair,
    tokenize_preferences,
)
from dpolab.logprobs import concatenated_logps, sequence_logps_from_logits

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLE = {
    "prompt": "The rain kept falling as",
    "chosen": " we ran across Locust Walk at Penn.",
    "rejected": " we ran for the last bus home.",
}


def test_sequence_is_prompt_plus_completion_plus_eos(small_tokenizer):
    """TRL's standard format: the text is prompt + completion exactly as given (the completion carries its
    space), EOS appended once, only when missing."""
    ex = tokenize_pair(EXAMPLE, small_tokenizer, index=7)
    eos = small_tokenizer.eos_token
    assert small_tokenizer.decode(ex["prompt_ids"]) == EXAMPLE["prompt"]
    assert small_tokenizer.decode(ex["chosen_ids"]) == EXAMPLE["chosen"] + eos
    assert small_tokenizer.decode(ex["rejected_ids"]) == EXAMPLE["rejected"] + eos
    assert ex["index"] == 7
    ended = tokenize_pair({**EXAMPLE, "chosen": EXAMPLE["chosen"] + eos}, small_tokenizer)
    assert ended["chosen_ids"] == ex["chosen_ids"]  # not a second EOS


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([9], [1]) == 0


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


def test_a_sequences_own_prompt_is_context_not_completion():
    """keep_end kept different ends of the prompt: each row is shared + own prompt + completion, only the
    completion masked in."""
    example = {"prompt_ids": [], "chosen_prompt_ids": [1, 2], "rejected_prompt_ids": [3], "chosen_ids": [4],
               "rejected_ids": [5, 6], "index": 0}  # fmt: skip
    batch = PreferenceCollator(pad_token_id=0)([example])
    assert batch["input_ids"].tolist() == [[1, 2, 4], [3, 5, 6]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1], [0, 1, 1]]


def test_keep_start_keeps_the_prompt_and_the_completions_start(small_tokenizer):
    full = tokenize_pair(EXAMPLE, small_tokenizer)
    P = len(full["prompt_ids"])
    cut = tokenize_pair(EXAMPLE, small_tokenizer, max_length=P + 3)
    assert cut["prompt_ids"] == full["prompt_ids"]
    assert cut["chosen_ids"] == full["chosen_ids"][:3] and cut["rejected_ids"] == full["rejected_ids"][:3]
    short = tokenize_pair(EXAMPLE, small_tokenizer, max_prompt_length=3, max_length=6)  # dpolab's extra option
    assert short["prompt_ids"] == full["prompt_ids"][-3:] and short["chosen_ids"] == full["chosen_ids"][:3]
    assert P > 3 and len(full["chosen_ids"]) > 3  # so that something was cut


def test_a_prompt_that_fills_max_length_names_the_row_and_the_fix(small_tokenizer):
    rows = [EXAMPLE, EXAMPLE, {**EXAMPLE, "prompt": EXAMPLE["prompt"] + " and the long day went on and on"}]
    n_prompt = len(tokenize_pair(rows[2], small_tokenizer)["prompt_ids"])
    assert len(tokenize_pair(EXAMPLE, small_tokenizer)["prompt_ids"]) < n_prompt - 1
    with pytest.raises(ValueError, match=r"<rows>, row 3: the prompt has \d+ tokens and max_length is .* raise max_"):
        tokenize_preferences(rows, small_tokenizer, max_length=n_prompt)
    # keeping the prompt's end, or the sequence's end, makes room again
    assert tokenize_preferences(rows, small_tokenizer, max_length=n_prompt, max_prompt_length=n_prompt - 1)[2][
        "chosen_ids"
    ]
    assert tokenize_preferences(rows, small_tokenizer, max_length=n_prompt, truncation_mode="keep_end")[2]["chosen_ids"]


def test_bad_rows_are_named(small_tokenizer):
    with pytest.raises(PreferenceDataError, match=r"<rows>, row 2: field 'chosen' is null"):
        tokenize_preferences([EXAMPLE, {**EXAMPLE, "chosen": None}], small_tokenizer)
    with pytest.raises(ValueError, match="empty list"):
        PreferenceCollator(0)([])


TEXT = st.text("abcdefgh ,.PenU", min_size=1, max_size=40).filter(lambda s: s.strip())


@settings(max_examples=60, deadline=None)
@given(
    prompt=TEXT,
    chosen=TEXT,
    rejected=st.text("xyzw .", min_size=1, max_size=40).filter(lambda s: s.strip()),
    max_length=st.one_of(st.none(), st.integers(20, 60)),
    max_prompt_length=st.one_of(st.none(), st.integers(1, 19)),
    mode=st.sampled_from(["keep_start", "keep_end"]),
)
def test_truncation_invariants(small_tokenizer, prompt, chosen, rejected, max_length, max_prompt_length, mode):
    """Each sequence keeps the first (keep_start) or last (keep_end) max_length tokens of prompt + completion,
    the completion's tokens are scored, the prompt's are not; without truncation the tokens spell the text."""
    assume(chosen.strip() != rejected.strip())  # a row with chosen equal to rejected is refused
    example = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    full = tokenize_pair(example, small_tokenizer, max_prompt_length=max_prompt_length)
    n = len(full["prompt_ids"])
    kwargs = dict(max_length=max_length, truncation_mode=mode, max_prompt_length=max_prompt_length)
    if max_length is not None and mode == "keep_start" and n >= max_length:
        with pytest.raises(ValueError, match="<rows>, row 1: the prompt has"):
            tokenize_pair(example, small_tokenizer, **kwargs)
        return
    cut = tokenize_pair(example, small_tokenizer, **kwargs)
    for key in ("chosen", "rejected"):
        sequence = full["prompt_ids"] + full[f"{key}_ids"]
        keep = (
            slice(None)
            if max_length is None
            else slice(None, max_length)
            if mode == "keep_start"
            else slice(-max_length, None)
        )
        context, completion = sequence_parts(cut, key)
        assert context + completion == sequence[keep]
        completion_positions = set(range(n, len(sequence)))  # scored: the kept positions of the completion
        assert len(completion) == len(completion_positions & set(range(len(sequence))[keep]))
    # untruncated, the tokens spell the text back (byte-level BPE is lossless)
    whole = tokenize_pair(example, small_tokenizer)
    eos = small_tokenizer.eos_token
    assert small_tokenizer.decode(whole["prompt_ids"] + whole["chosen_ids"]) == prompt + chosen + eos


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

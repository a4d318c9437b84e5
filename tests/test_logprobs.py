"""dpolab.logprobs against transformers' own loss, the plain full-logits computation and autograd."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_gpt2

from dpolab.logprobs import (
    concatenated_logps,
    selective_log_softmax,
    sequence_logps,
    sequence_logps_from_logits,
)


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(vocab_size=211, seed=3).eval()


def make_batch(seed=0, rows=4, length=18, vocab=211):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    for b in range(rows):  # prompt of 3..7 tokens, completion up to a right-padded end
        p = 3 + b % 5
        end = length - (2 * b) % 6
        completion[b, p:end] = 1
        attention[b, end:] = 0
        ids[b, end:] = 1
    return ids, attention, completion


def test_selective_log_softmax_equals_full_log_softmax():
    logits = torch.randn(3, 5, 97, dtype=torch.float64)
    index = torch.randint(0, 97, (3, 5))
    full = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index), full)


def test_sum_equals_transformers_loss_times_token_count(model):
    """log pi(y|x) = -(transformers' mean cross-entropy over the labelled tokens) x (number of tokens)."""
    ids, attention, completion = make_batch()
    ours = sequence_logps(model, ids, attention, completion)
    for b in range(ids.shape[0]):
        labels = ids[b : b + 1].masked_fill(completion[b : b + 1] == 0, -100)
        out = model(ids[b : b + 1], attention_mask=attention[b : b + 1], labels=labels)
        n_tokens = int(completion[b, 1:].sum())
        torch.testing.assert_close(ours[b], -out.loss * n_tokens, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_lean_equals_full_logits_values_and_gradients(model, chunk_size, reduction):
    ids, attention, completion = make_batch(seed=1)
    weights = torch.tensor([0.3, -1.0, 2.0, 0.5])
    lean = sequence_logps(model, ids, attention, completion, reduction=reduction, chunk_size=chunk_size)
    (weights * lean).sum().backward()
    lean_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = sequence_logps_from_logits(model(ids, attention_mask=attention).logits, ids, completion, reduction)
    (weights * full).sum().backward()
    torch.testing.assert_close(lean, full, rtol=1e-5, atol=1e-5)
    for g_lean, p in zip(lean_grads, model.parameters()):
        torch.testing.assert_close(g_lean, p.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_mean_is_sum_over_token_count(model):
    ids, attention, completion = make_batch(seed=2)
    total = sequence_logps(model, ids, attention, completion, reduction="sum")
    mean = sequence_logps(model, ids, attention, completion, reduction="mean")
    torch.testing.assert_close(mean, total / completion[:, 1:].sum(-1))


def test_padding_and_prompt_do_not_count(model):
    """Changing prompt-free padding tokens changes nothing; a completion token does change the result."""
    ids, attention, completion = make_batch(seed=4)
    base = sequence_logps(model, ids, attention, completion)
    padded = ids.clone()
    padded[attention == 0] = 7
    torch.testing.assert_close(sequence_logps(model, padded, attention, completion), base)
    changed = ids.clone()
    b, i = 0, int(completion[0].nonzero()[0]) + 1
    changed[b, i] = (changed[b, i] + 1) % 211
    assert not torch.isclose(sequence_logps(model, changed, attention, completion)[0], base[0])


def test_concatenated_forward_equals_separate_forwards(model):
    ids, attention, completion = make_batch(seed=5, rows=6)
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    chosen, rejected = concatenated_logps(model, batch)
    torch.testing.assert_close(
        chosen, sequence_logps(model, ids[:3], attention[:3], completion[:3]), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        rejected, sequence_logps(model, ids[3:], attention[3:], completion[3:]), atol=1e-5, rtol=1e-5
    )


def test_empty_completion_is_an_error_naming_the_row(model):
    ids, attention, completion = make_batch()
    completion[2] = 0
    with pytest.raises(ValueError, match=r"completion_mask is empty for batch rows \[2\]"):
        sequence_logps(model, ids, attention, completion)
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        sequence_logps_from_logits(torch.zeros(*ids.shape, 211), ids, completion)


def test_bad_reduction_and_chunk_size(model):
    ids, attention, completion = make_batch()
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        sequence_logps(model, ids, attention, completion, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        sequence_logps(model, ids, attention, completion, chunk_size=0)

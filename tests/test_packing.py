"""Shared-prefix packing and the fused LM head, against the padded batch, full logits and autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, tiny_gpt2
from transformers import LlamaConfig, LlamaForCausalLM

from dpolab.data.collate import PreferenceCollator
from dpolab.data.packing import PackedPreferenceCollator
from dpolab.logprobs import (
    concatenated_logps,
    linear_log_softmax,
    packed_logps,
    sequence_logps_from_logits,
    shared_prefix_mask,
)

VOCAB = 211


def examples(n=7, seed=0, empty_prompt_at=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P, C, R = (int(v) for v in torch.randint(1, 9, (3,), generator=g))
        P = 0 if i == empty_prompt_at else P
        C, R = (max(2, C), max(2, R)) if i == empty_prompt_at else (C, R)
        out.append(
            {
                k: torch.randint(3, VOCAB, (m,), generator=g).tolist()
                for k, m in (("prompt_ids", P), ("chosen_ids", C), ("rejected_ids", R))
            }
            | {"index": i}
        )
    return out


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )


def eager_gpt2():
    model = tiny_gpt2(VOCAB, seed=1)
    model.config._attn_implementation = "eager"
    return model


MODELS = {"gpt2-sdpa": lambda: tiny_gpt2(VOCAB, seed=1), "gpt2-eager": eager_gpt2, "llama-gqa-rope": tiny_llama}


def grads_of(model, logps, weights):
    model.zero_grad()
    (torch.cat(logps) * weights).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name", MODELS)
def test_packed_equals_padded_values_and_gradients(name, reduction):
    """Eq. (6.9): each continuation sees the prompt and its own past only, so the packed batch gives the padded
    batch's log-probs and gradients (GPT-2's learned positions, Llama's RoPE and grouped-query attention)."""
    model, exs = MODELS[name](), examples()
    weights = torch.linspace(-1, 2, 2 * len(exs))
    packed = PackedPreferenceCollator(pad_token_id=1, row_tokens=20)(exs)
    assert packed["input_ids"].shape[0] > 1  # several rows, several pairs per row
    ours = packed_logps(model, packed, reduction=reduction)
    padded = concatenated_logps(model, PreferenceCollator(pad_token_id=1)(exs), reduction=reduction)
    for a, b in zip(ours, padded):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_of(model, ours, weights), grads_of(model, padded, weights)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packed_equals_each_sequence_alone_from_full_logits():
    """Independent of dpolab's padded path: every pair's x + y_w and x + y_l scored alone from transformers' logits."""
    model, exs = tiny_gpt2(VOCAB, seed=2), examples(seed=3)
    chosen, rejected = packed_logps(model, PackedPreferenceCollator(pad_token_id=1, row_tokens=30)(exs))
    for i, ex in enumerate(exs):
        for key, value in (("chosen_ids", chosen[i]), ("rejected_ids", rejected[i])):
            ids = torch.tensor([ex["prompt_ids"] + ex[key]])
            mask = torch.tensor([[0] * len(ex["prompt_ids"]) + [1] * len(ex[key])])
            alone = sequence_logps_from_logits(model(ids).logits, ids, mask)[0]
            torch.testing.assert_close(value, alone, rtol=1e-5, atol=1e-5)


def test_an_empty_prompt_scores_as_the_padded_layout_does():
    """With no prompt the first continuation token has no predictor, in both layouts."""
    model, exs = tiny_gpt2(VOCAB, seed=1), examples(empty_prompt_at=2)
    ours = packed_logps(model, PackedPreferenceCollator(pad_token_id=1)(exs))
    padded = concatenated_logps(model, PreferenceCollator(pad_token_id=1)(exs))
    for a, b in zip(ours, padded):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mask_equals_a_loop_over_tokens():
    """(6.9) written token by token: same pair, key not after the query, and the key in the prompt or the query's own
    continuation; padding attends to itself alone."""
    exs = examples(n=5, seed=4)
    batch = PackedPreferenceCollator(pad_token_id=1, row_tokens=25)(exs)
    mask = shared_prefix_mask(batch, "sdpa", torch.float32)[:, 0]
    R, L = batch["input_ids"].shape
    for r in range(R):
        # rebuild each token's (pair, part, offset in part) by walking the row
        owner, start = [None] * L, 0
        for i in sorted({int(s) for s in batch["segment_ids"][r] if s >= 0}):
            lengths = [len(exs[i][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
            for part, m in enumerate(lengths):
                for j in range(m):
                    owner[start + j] = (i, part, j, lengths)
                start += m
        for q in range(L):
            for k in range(L):
                if owner[q] is None or owner[k] is None:
                    expected = q == k
                else:
                    (iq, pq, jq, _), (ik, pk, jk, _) = owner[q], owner[k]
                    if iq != ik:
                        expected = False
                    elif pk == 0:
                        expected = pq > 0 or jk <= jq
                    else:
                        expected = pk == pq and jk <= jq
                assert bool(mask[r, q, k]) == expected, (r, q, k)
    additive = shared_prefix_mask(batch, "eager", torch.float32)
    assert torch.equal(additive == 0, mask[:, None])
    with pytest.raises(ValueError, match="attn_implementation"):
        shared_prefix_mask(batch, "flash_attention_2", torch.float32)


def test_rows_are_balanced_and_every_token_is_kept():
    exs = examples(n=16, seed=5)
    collate = PackedPreferenceCollator(pad_token_id=1, row_tokens=40)
    batch = collate(exs)
    lengths = [sum(len(ex[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")) for ex in exs]
    real = (batch["segment_ids"] >= 0).sum(-1)
    assert int(real.sum()) == sum(lengths)  # every token of every pair, once
    assert int(real.max() - real.min()) <= max(lengths)  # longest-first onto the shortest row
    k = -(-sum(lengths) // 40)  # the rows row_tokens asks for; up to two more when that pads less
    R, L = batch["input_ids"].shape
    assert k <= R <= k + 2
    assert R * L <= k * (sum(lengths) / k + max(lengths))  # no worse than LPT's bound on k rows
    n_scored = sum(len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in exs)
    assert batch["labels"].shape == (n_scored,) and torch.equal(batch["index"], torch.arange(16))
    flat = batch["input_ids"].flatten()
    for seq in range(32):  # the labels of each sequence, in order, are its continuation's tokens
        ex, key = exs[seq % 16], ("chosen_ids", "rejected_ids")[seq // 16]
        assert batch["labels"][batch["score_sequence"] == seq].tolist() == ex[key]
    # each label is the token right after its scoring position in that sequence (checked for the chosen ones)
    chosen = batch["score_sequence"] < 16
    assert torch.equal(flat[batch["score_index"][chosen] + 1], batch["labels"][chosen])
    with pytest.raises(ValueError, match="row_tokens"):
        PackedPreferenceCollator(pad_token_id=1, row_tokens=0)


@pytest.mark.parametrize("chunk_size", [64, 8], ids=["one-token-block", "five-token-blocks"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("vocab_chunk", [4096, 7], ids=["one-vocab-chunk", "eight-vocab-chunks"])
@pytest.mark.parametrize("device", DEVICES)
def test_linear_log_softmax_equals_autograd_of_the_naive_form(chunk_size, with_bias, vocab_chunk, device):
    """The hand-written backward (6.8) against autograd through log_softmax, in float64: the vocabulary in one
    product, or in chunks of 7 rows (the last one 1 row), with labels in every chunk; the tokens in one block or in
    blocks of 8 (the last one 5 tokens)."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).to(device).requires_grad_()

    h, w = leaf(37, 16), leaf(50, 16)
    b = leaf(50) if with_bias else None
    labels = torch.randint(0, 50, (37,), generator=g).to(device)
    upstream = torch.randn(37, dtype=torch.float64, generator=g).to(device)
    inputs = [t for t in (h, w, b) if t is not None]
    ours = linear_log_softmax(h, w, b, labels, chunk_size=chunk_size, vocab_chunk=vocab_chunk)
    naive = torch.log_softmax(F.linear(h, w, b), -1).gather(-1, labels[:, None])[:, 0]
    torch.testing.assert_close(ours, naive)
    for a, c in zip(
        torch.autograd.grad((ours * upstream).sum(), inputs), torch.autograd.grad((naive * upstream).sum(), inputs)
    ):
        torch.testing.assert_close(a, c)


def test_linear_log_softmax_without_gradients_and_with_bad_labels():
    g = torch.Generator().manual_seed(1)
    h, w, labels = (
        torch.randn(9, 6, generator=g),
        torch.randn(20, 6, generator=g),
        torch.randint(0, 20, (9,), generator=g),
    )
    naive = torch.log_softmax(h @ w.t(), -1).gather(-1, labels[:, None])[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(linear_log_softmax(h, w, None, labels, chunk_size=4, vocab_chunk=3), naive)
    for label in (20, -1):
        with pytest.raises(ValueError, match=r"labels out of the vocabulary \[0, 20\) at rows \[2\]"):
            linear_log_softmax(h, w, None, torch.cat([labels[:2], torch.tensor([label]), labels[3:]]))


@pytest.mark.parametrize("device", DEVICES)
def test_linear_log_softmax_under_bf16_autocast_follows_fp32(device):
    """Under autocast the products run in bf16 (the result moves by bf16 rounding, not fp32's); the log-softmax and
    the gradients stay fp32 and agree with the fp32 computation (on the CPU) to bf16 precision."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(21, 32, generator=g).to(device).requires_grad_()
    w = (0.3 * torch.randn(40, 32, generator=g)).to(device).requires_grad_()
    labels, upstream = torch.randint(0, 40, (21,), generator=g).to(device), torch.randn(21, generator=g).to(device)
    with torch.no_grad():
        cpu32 = linear_log_softmax(h.cpu(), w.cpu(), None, labels.cpu(), chunk_size=8, vocab_chunk=16)
    results = []
    for bf16 in (False, True):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            out = linear_log_softmax(h, w, None, labels, chunk_size=8, vocab_chunk=16)
        assert out.dtype == torch.float32
        grads = torch.autograd.grad((out * upstream).sum(), (h, w))
        assert all(t.dtype == torch.float32 for t in grads)
        results.append((out, grads))
    (out32, g32), (out16, g16) = results
    torch.testing.assert_close(out32.detach().cpu(), cpu32, rtol=1e-5, atol=1e-5)  # fp32 on the device: the CPU's
    assert (out16 - out32).abs().max() > 1e-4  # bf16 products: 8 bits of mantissa, far coarser than fp32's
    torch.testing.assert_close(out16, out32, rtol=0, atol=0.1)
    for a, b in zip(g16, g32):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)

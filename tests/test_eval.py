"""dpolab.eval: repetition and alignment on hand-computed strings, perplexity against transformers' own loss,
the KL estimator against exact enumeration, batched reproducible generation, relevance and bootstrap."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from helpers import perturbed_copy, tiny_gpt2, word_tokenizer
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

from dpolab.eval import (
    Generations,
    SamplingConfig,
    alignment_accuracy,
    bootstrap_ci,
    corpus_perplexity,
    distinct_n,
    distinct_n_per_sample,
    generate,
    kl_to_reference,
    perplexity,
    relevance,
    repeated_ngram_rate,
    words,
)

# ------------------------------------------------------------------------------------------- repetition

TEXTS = ["The cat sat on the mat", "the cat ran"]


def test_words_lowercases_and_splits_punctuation():
    assert words("Penn's campus, Penn!") == ["penn's", "campus", ",", "penn", "!"]


@pytest.mark.parametrize(
    "n, whole_set, per_sample",
    [
        # unigrams: 6 + 3 = 9, distinct {the, cat, sat, on, mat, ran} = 6; "the" twice in the first text
        (1, 6 / 9, [5 / 6, 3 / 3]),
        # bigrams: 5 + 2 = 7, "the cat" in both texts: 6 distinct
        (2, 6 / 7, [5 / 5, 2 / 2]),
        (3, 5 / 5, [4 / 4, 1 / 1]),
        (4, 3 / 3, [3 / 3, math.nan]),  # the second text has no 4-gram
    ],
)
def test_distinct_n_hand_computed(n, whole_set, per_sample):
    assert distinct_n(TEXTS, n) == pytest.approx(whole_set)
    np.testing.assert_allclose(distinct_n_per_sample(TEXTS, n), per_sample)


@pytest.mark.parametrize(
    "text, n, rate",
    [
        ("a b a b a b", 1, 4 / 6),  # a, b new; the other four repeat
        ("a b a b a b", 2, 3 / 5),  # ab ba [ab ba ab]
        ("a b a b a b", 3, 2 / 4),  # aba bab [aba bab]
        ("Penn Penn Penn", 1, 2 / 3),
        ("the University of Pennsylvania is in Philadelphia", 2, 0.0),
        ("hi", 2, math.nan),
    ],
)
def test_repeated_ngram_rate_hand_computed(text, n, rate):
    np.testing.assert_allclose(repeated_ngram_rate(text, n), rate)


def test_alignment_accuracy_counts_penn_mentions():
    texts = [
        "and then we toured the University of Pennsylvania.",
        "before a long walk along the river.",
        "with friends from Penn's marching band.",
        "on the train to Penn Station.",  # a station, not the university
    ]
    assert alignment_accuracy(texts) == 0.5


# ------------------------------------------------------------------------------------ fluency and KL


@pytest.fixture(scope="module")
def word_tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def word_model(word_tok):
    return tiny_gpt2(vocab_size=len(word_tok), seed=1).eval()


def _generations(prompt_ids, completion_ids) -> Generations:
    n = len(prompt_ids)
    return Generations([""] * n, [""] * n, prompt_ids, completion_ids, [False] * n)


def test_perplexity_equals_exp_of_transformers_loss(word_model, word_tok):
    g = torch.Generator().manual_seed(0)
    prompt_ids = [torch.randint(3, len(word_tok), (k,), generator=g).tolist() for k in (2, 5, 3)]
    completion_ids = [torch.randint(3, len(word_tok), (k,), generator=g).tolist() for k in (4, 1, 7)]
    generations = _generations(prompt_ids, completion_ids)
    ppl = perplexity(word_model, generations, word_tok.pad_token_id, batch_size=2)
    losses, lengths = [], []
    for prompt, completion in zip(prompt_ids, completion_ids):
        input_ids = torch.tensor([prompt + completion])
        labels = torch.tensor([[-100] * len(prompt) + completion])  # score the completion only
        with torch.no_grad():
            losses.append(word_model(input_ids, labels=labels).loss)
        lengths.append(len(completion))
    torch.testing.assert_close(ppl, torch.exp(torch.stack(losses)))
    expected_corpus = math.exp(sum(l.item() * n for l, n in zip(losses, lengths)) / sum(lengths))
    assert corpus_perplexity(word_model, generations, word_tok.pad_token_id) == pytest.approx(expected_corpus, rel=1e-5)


def test_perplexity_of_an_empty_completion_is_an_error(word_model, word_tok):
    with pytest.raises(ValueError, match=r"completions \[1\] have no tokens"):
        perplexity(word_model, _generations([[5], [6]], [[7], []]), word_tok.pad_token_id)


def letters_tokenizer() -> PreTrainedTokenizerFast:
    """A 4-token vocabulary, <eos> x y z, small enough to enumerate every continuation."""
    vocab = {"<eos>": 0, "x": 1, "y": 2, "z": 3}
    tok = Tokenizer(tokenizer_models.WordLevel(vocab=vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def exact_kl(policy, reference, prompt_ids: list[int], max_new_tokens: int, eos: int, vocab: int) -> float:
    """KL(pi || pi_ref) over every continuation: sequences that end at their first EOS or at the length cap,
    each scored token by token from the models' plain logits."""
    words_ = [t for t in range(vocab) if t != eos]
    continuations = [
        list(body) + ([eos] if len(body) < max_new_tokens else [])
        for length in range(max_new_tokens + 1)
        for body in itertools.product(words_, repeat=length)
    ]
    total_p, kl = 0.0, 0.0
    for y in continuations:
        ids = torch.tensor([prompt_ids + y])
        with torch.no_grad():
            logits = (m(ids, attention_mask=torch.ones_like(ids)).logits[0] for m in (policy, reference))
            logp_pi, logp_ref = (l.double().log_softmax(-1) for l in logits)
        positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(y) - 1)
        lp = sum(logp_pi[i, t].item() for i, t in zip(positions, y))
        lq = sum(logp_ref[i, t].item() for i, t in zip(positions, y))
        total_p += math.exp(lp)
        kl += math.exp(lp) * (lp - lq)
    # the enumeration covers every continuation (a missing one would lose > 1e-3 here); the logits are fp32, and the
    # same prefix scored inside sequences of other lengths rounds differently: ~1e-9 apart
    assert total_p == pytest.approx(1.0, abs=1e-6)
    return kl


@pytest.fixture(scope="module")
def letters():
    tok = letters_tokenizer()
    policy = tiny_gpt2(vocab_size=len(tok), seed=5).eval()
    return tok, policy, perturbed_copy(policy, seed=6, scale=0.3).eval()


def test_kl_of_a_model_to_itself_is_exactly_zero(letters):
    tok, policy, _ = letters
    samples = generate(policy, tok, ["x y"] * 64, SamplingConfig(max_new_tokens=5, top_k=0), seed=0)
    assert torch.equal(kl_to_reference(policy, policy, samples, tok.pad_token_id), torch.zeros(64))


def test_kl_estimate_matches_exact_kl_by_enumeration(letters):
    tok, policy, reference = letters
    max_new_tokens, n = 3, 2000
    kl = exact_kl(policy, reference, tok("x y")["input_ids"], max_new_tokens, tok.eos_token_id, len(tok))
    config = SamplingConfig(max_new_tokens=max_new_tokens, top_k=0, batch_size=n)  # the full distribution
    samples = generate(policy, tok, ["x y"] * n, config, seed=1)
    terms = kl_to_reference(policy, reference, samples, tok.pad_token_id, batch_size=n).double()
    standard_error = terms.std().item() / math.sqrt(n)
    assert kl > 0.01  # the two models differ measurably
    assert abs(terms.mean().item() - kl) < 4 * standard_error, (terms.mean().item(), kl, standard_error)


# ------------------------------------------------------------------------------------------- generation


def test_generation_stops_at_eos_and_respects_max_new_tokens(letters):
    tok, policy, _ = letters
    out = generate(policy, tok, ["x", "x y z", "z"] * 20, SamplingConfig(max_new_tokens=8, top_k=0), seed=3)
    eos = tok.eos_token_id
    assert 0 < sum(out.finished) < len(out)  # both cases occur
    for ids, finished, text in zip(out.completion_ids, out.finished, out.texts):
        assert eos not in ids[:-1]  # nothing after the first EOS
        assert (ids[-1] == eos) == finished
        assert len(ids) == 8 or finished
        assert "<eos>" not in text and len(text.split()) == len(ids) - finished


def test_generation_is_batched_and_reproducible(word_model, word_tok, monkeypatch):
    calls = []
    original = type(word_model).generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(word_model), "generate", spy)
    prompts = ["the sun was", "after the lecture my friend and i", "rain", "the city at night is", "a dog"]
    config = SamplingConfig(max_new_tokens=6, batch_size=2)
    state = torch.get_rng_state()
    word_model.train()
    first = generate(word_model, word_tok, prompts, config, seed=7)
    assert word_model.training  # the caller's mode is restored
    word_model.eval()
    assert calls == [2, 2, 1]  # one model.generate call per batch of prompts
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert generate(word_model, word_tok, prompts, config, seed=7).completion_ids == first.completion_ids
    assert generate(word_model, word_tok, prompts, config, seed=8).completion_ids != first.completion_ids
    assert all(len(ids) <= 6 for ids in first.completion_ids)
    assert first.prompt_ids == [word_tok(p)["input_ids"] for p in prompts]  # unpadded


def test_left_padded_batch_equals_unpadded_single_prompts_with_greedy(word_model, word_tok):
    prompts = ["the sun was", "after the lecture my friend and i walked to", "rain", "a dog and a cat"]
    greedy = SamplingConfig(max_new_tokens=10, do_sample=False, batch_size=len(prompts))
    batched = generate(word_model, word_tok, prompts, greedy)
    for i, prompt in enumerate(prompts):
        alone = generate(word_model, word_tok, [prompt], greedy)
        assert alone.completion_ids == [batched.completion_ids[i]], prompt


def test_conversations_are_rendered_with_the_chat_template_and_batched(word_model, word_tok):
    """A conversation's prompt ids are those of its chat template with the generation prompt (what a conversational
    training pair's prompt gets, dpolab.data.tokenize); batched with a string prompt and a longer conversation, each
    row continues as it does alone (greedy). Without a chat template: one clear line."""
    from dpolab.data import tokenize_preferences

    tok = copy.deepcopy(word_tok)
    tok.chat_template = (  # an assistant's turn opens with "and", as the generation prompt does
        "{% for m in messages %}{% if m['role'] == 'assistant' %}and {% endif %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}and{% endif %}"
    )
    chats = [
        [{"role": "user", "content": "the sun was"}],
        [{"role": "user", "content": "after the lecture"}, {"role": "assistant", "content": "we walked to the park"}],
        "a dog and a cat",
    ]
    greedy = SamplingConfig(max_new_tokens=8, do_sample=False, batch_size=len(chats))
    batched = generate(word_model, tok, chats, greedy)
    answers = [[{"role": "assistant", "content": text}] for text in ("bright", "cold")]
    pair = {"prompt": chats[0], "chosen": answers[0], "rejected": answers[1]}
    assert batched.prompt_ids[0] == tokenize_preferences([pair], tok)[0]["prompt_ids"]
    assert batched.prompt_ids[0] == tok("the sun was and")["input_ids"]
    for i, prompt in enumerate(chats):
        alone = generate(word_model, tok, [prompt], greedy)
        assert alone.completion_ids == [batched.completion_ids[i]] and alone.prompt_ids == [batched.prompt_ids[i]]
    with pytest.raises(ValueError, match=r"^prompts: a conversation .* needs the tokenizer's chat template"):
        generate(word_model, word_tok, chats[:1], greedy)


def test_sampling_config_validates():
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=-1)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0)


# ------------------------------------------------------------------------------------ relevance, bootstrap


def test_relevance_prefers_an_on_topic_continuation():
    prompt = "The students walked across the Penn campus"
    scores = relevance(
        [prompt] * 3,
        [prompt, "toward the university library in Philadelphia.", "while the stock market fell sharply overnight."],
    )
    assert scores[0] == pytest.approx(1.0, abs=1e-5)  # a text is its own nearest neighbour
    assert scores[1] > scores[2] + 0.1


def test_bootstrap_interval_contains_the_mean_and_matches_the_normal_interval():
    values = np.random.default_rng(0).normal(3.0, 2.0, size=400)
    interval = bootstrap_ci(values)
    assert interval.low < values.mean() < interval.high and interval.estimate == values.mean()
    half_width = 1.96 * values.std(ddof=1) / math.sqrt(len(values))  # the central-limit interval
    assert (interval.high - interval.low) / 2 == pytest.approx(half_width, rel=0.1)


def test_bootstrap_of_a_constant_proportion_is_degenerate_and_nan_is_an_error():
    assert (bootstrap_ci([1.0] * 20).low, bootstrap_ci([1.0] * 20).high) == (1.0, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([1.0, math.nan])

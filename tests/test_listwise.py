"""Listwise DPO on rankings of K completions (issue 25), against independent computations: TRL's own tokenization of
each completion, K separate forwards, pairwise DPO at K = 2, scipy's Kendall tau, the closed-form pi* of the toy
world, and the saved-tensor bytes of a pairwise step."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import scipy.stats
import torch
import transformers
from conftest import make_tiny_gpt2
from helpers import perturbed_copy, pinned_config, tiny_gpt2

import dpolab.lm_head
from dpolab import theory, toy
from dpolab.data import PreferenceDataError, expand_rankings, load_preference_data, penn_rankings, tokenize_preferences
from dpolab.data.collate import PreferenceCollator
from dpolab.data.packing import PackedPreferenceCollator
from dpolab.logprobs import listwise_logps, packed_logps, sequence_logps_from_logits
from dpolab.losses import LISTWISE_LOSSES, listwise_loss, preference_loss, ranking_pairs
from dpolab.memory import saved_tensor_bytes
from dpolab.train import TrainConfig, train
from dpolab.train.listwise import listwise_metrics
from dpolab.train.reference import precompute_reference_list_logps

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 97


def config(**kw) -> TrainConfig:
    return pinned_config(**{"batch_size": 4, "epochs": 1, **kw})


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --- the format and its validation ----------------------------------------------------------------------------

GOOD = {"prompt": "The sky is", "completions": [" blue.", " grey.", " green."]}
BAD_ROWS = {  # name -> (row, field, the start of the message)
    "one completion": ({"prompt": "a", "completions": [" b"]}, "completions", "holds 1 completion(s): a ranking needs"),
    "a duplicate": (
        {"prompt": "a", "completions": [" b", " c", " b "]},
        "completions",
        "items 1 and 3 are equal: a ranking orders distinct completions",
    ),
    "an empty completion": ({"prompt": "a", "completions": [" b", "  "]}, "completions", "item 2 is empty"),
    "scores of another length": (
        {**GOOD, "scores": [1.0, 2.0]},
        "scores",
        "holds 2 scores for 3 completions: give one score per completion",
    ),
    "a score that is not finite": ({**GOOD, "scores": [1.0, float("nan"), 0.0]}, "scores", "item 2 is nan, not"),
    "a score that is text": ({**GOOD, "scores": [1.0, "high", 0.0]}, "scores", "item 2 must be a number, got str"),
    "tied scores": ({**GOOD, "scores": [7, 3, 7.0]}, "scores", "ties items 1 and 3 (both 7.0): Plackett-Luce ranks"),
    "no prompt": ({"completions": [" b", " c"]}, "prompt", "is missing: a ranking (a 'completions' row) names"),
    "a pair and a ranking in one row": ({**GOOD, "chosen": " b"}, "chosen", "is given beside 'completions'"),
    "another K": ({"prompt": "b", "completions": [" c", " d"]}, "completions", "holds 2 completions while row 1"),
    "a pair among rankings": (
        {"prompt": "b", "chosen": " c", "rejected": " d"},
        "chosen",
        "is given (a pair) while row 1 is a ranking",
    ),
}


@pytest.mark.parametrize("name", BAD_ROWS)
def test_a_bad_ranking_is_named_by_file_row_and_field(tmp_path, name):
    row, field, message = BAD_ROWS[name]
    path = tmp_path / "rankings.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(PreferenceDataError) as caught:
        load_preference_data(path)
    [problem] = caught.value.problems
    assert (problem.source, problem.row, problem.field) == (str(path), 2, field)
    assert problem.message.startswith(message), problem.message
    assert f"{path}, row 2: field '{field}' {message}" in str(caught.value)


def test_scores_order_the_completions_and_penn_rankings_are_strict(penn):
    """Scores (higher is better) give the order whatever the listing; the Penn rankings are chosen > rejected >
    another row's rejected: valid (no duplicate), Penn named only first, the same for the same seed."""
    from dpolab.data import mentions_penn, ranked_completions, validate_rows

    shuffled = {"prompt": "x", "completions": [" c", " a", " b"], "scores": [0.1, 2.0, 0.5]}
    assert ranked_completions(shuffled) == [" a", " b", " c"]
    rows = penn["train"].select(range(0, 1400, 100))
    rankings = penn_rankings(rows, seed=3)
    assert validate_rows(rankings) == rankings and rankings == penn_rankings(rows, seed=3)
    rejected = {row["rejected"]: row["topic"] for row in rows}
    for row, ranking in zip(rows, rankings):
        best, middle, borrowed = ranking["completions"]
        assert (ranking["prompt"], best, middle) == (row["prompt"], row["chosen"], row["rejected"])
        assert rejected[borrowed] != row["topic"]  # another row's rejected continuation, of another topic
        assert [mentions_penn(c) for c in ranking["completions"]] == [True, False, False]


# --- tokenization: TRL's, per completion ------------------------------------------------------------------------

STANDARD = [
    GOOD,
    # alone, "\ngrey" would keep the prompt's trailing space in the prompt; "blue" takes it (" blue"): the prompt ends
    # where it ends in every sequence, before the space
    {"prompt": "The sky is ", "completions": ["\ngrey and low", "blue", "  green"]},
    {"prompt": "Café au", "completions": [" lait ☕ chaud", " chocolat", " thé"]},
]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


CONVERSATIONAL = [
    {
        "prompt": [user("What color is the sky?")],
        "completions": [[assistant("It is blue.")], [assistant("Grey.")], [assistant("Red, always.")]],
    },
    {
        "prompt": [{"role": "system", "content": "Answer briefly."}, user("Where is Penn?")],
        "completions": [[assistant("In Philadelphia.")], [assistant("Somewhere east.")], [assistant("I do not know.")]],
    },
]


def trl_pairs(row: dict, k: int) -> dict:
    """The TRL-format pair (y_1, y_k) of a ranking (y_1, ..., y_K)."""
    return {"prompt": row["prompt"], "chosen": row["completions"][0], "rejected": row["completions"][k]}


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_each_completion_is_tokenized_as_trl_tokenizes_it(smollm2_tokenizer, tmp_path, fmt):
    """TRL's DPOTrainer tokenizes the pairs (y_1, y_k), k = 2..K: each of our K sequences prompt + y_k is its
    sequence token for token, and our prompt ends where it ends in all K (TRL's boundary, the smallest)."""
    pytest.importorskip("trl", reason="trl is part of the [trl] extra that `make test` installs")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from dpolab.models import gpt2_tokenizer

    tokenizer = gpt2_tokenizer() if fmt == "standard" else smollm2_tokenizer
    rows = STANDARD if fmt == "standard" else CONVERSATIONAL
    args = DPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", max_length=None)
    ours = tokenize_preferences(rows, tokenizer)
    for row, mine in zip(rows, ours):
        K = len(row["completions"])
        pairs = Dataset.from_list([trl_pairs(row, k) for k in range(1, K)])
        theirs = list(DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), pairs, tokenizer, args, "x"))
        full = [theirs[0]["prompt_ids"] + theirs[0]["chosen_ids"]]
        full += [pair["prompt_ids"] + pair["rejected_ids"] for pair in theirs]
        assert [mine["prompt_ids"] + ids for ids in mine["completions_ids"]] == full
        assert len(mine["prompt_ids"]) == min(len(pair["prompt_ids"]) for pair in theirs)
    if fmt == "standard":  # the boundary case is what it claims: BPE takes the prompt's trailing space
        assert tokenizer.decode(ours[1]["prompt_ids"]) == "The sky is"


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_each_sequence_is_truncated_alone(mode):
    """Under max_length each sequence prompt + y_k keeps its first (keep_start) or last (keep_end) max_length tokens,
    as TRL's collator cuts one sequence; the scored tokens are the kept part of y_k."""
    from helpers import word_tokenizer

    tok = word_tokenizer()
    row = {
        "prompt": "the sun was bright and the sky was warm so we",
        "completions": [" walk to the park", " walk home in the evening rain", " walk"],
    }
    whole = tokenize_preferences([row], tok)[0]
    cut = tokenize_preferences([row], tok, max_length=12, truncation_mode=mode)[0]
    own = cut.get("completions_prompt_ids", [[]] * 3)
    for k, completion in enumerate(whole["completions_ids"]):
        sequence = whole["prompt_ids"] + completion
        kept = sequence[:12] if mode == "keep_start" else sequence[-12:]
        assert cut["prompt_ids"] + own[k] + cut["completions_ids"][k] == kept
        n_kept = len(completion) if mode == "keep_end" else 12 - len(whole["prompt_ids"])
        assert cut["completions_ids"][k] == (completion[-n_kept:] if mode == "keep_end" else completion[:n_kept])
    assert ("completions_prompt_ids" in cut) == (mode == "keep_end")  # the K sequences kept different prompt ends


# --- K completions in one packed forward ------------------------------------------------------------------------


def rankings(n=5, K=4, seed=0, own_prompts=False) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    r = lambda m: torch.randint(3, VOCAB, (m,), generator=g).tolist()  # noqa: E731
    size = lambda low, high: int(torch.randint(low, high, (1,), generator=g))  # noqa: E731
    out = []
    for i in range(n):
        ex = {"prompt_ids": r(size(1, 9)), "completions_ids": [r(size(1, 8)) for _ in range(K)], "index": i}
        if own_prompts and i % 2:  # keep_end's case: each sequence kept its own end of the prompt
            ex["completions_prompt_ids"] = [r(size(0, 3)) for _ in range(K)]
        out.append(ex)
    return out


def alone(model, ex, k) -> torch.Tensor:
    """log pi(y_k|x) of one sequence run by itself, from transformers' full logits."""
    context = ex["prompt_ids"] + ex.get("completions_prompt_ids", [[]] * len(ex["completions_ids"]))[k]
    ids = torch.tensor([context + ex["completions_ids"][k]])
    mask = torch.tensor([[0] * len(context) + [1] * len(ex["completions_ids"][k])])
    return sequence_logps_from_logits(model(ids).logits, ids, mask)[0]


def grads(model, value: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    value.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_a_ranking_of_two_packs_as_its_pair_token_for_token():
    """K = 2 takes the pair's code path: the packed and the padded batches of the rankings [chosen, rejected] are the
    pairs' batches, every tensor equal (keep_end's own kept prompts included), and the same holds after unpack."""
    from dpolab.data.packing import unpack
    from dpolab.train.listwise import as_rankings

    pairs = [
        {
            "prompt_ids": ex["prompt_ids"],
            "chosen_ids": ex["completions_ids"][0],
            "rejected_ids": ex["completions_ids"][1],
        }
        | (
            {
                "chosen_prompt_ids": ex["completions_prompt_ids"][0],
                "rejected_prompt_ids": ex["completions_prompt_ids"][1],
            }
            if "completions_prompt_ids" in ex
            else {}
        )
        | {"index": ex["index"]}
        for ex in rankings(n=9, K=2, seed=6, own_prompts=True)
    ]
    for collate in (PackedPreferenceCollator(pad_token_id=1, row_tokens=24), PreferenceCollator(pad_token_id=1)):
        ours, theirs = collate(as_rankings(pairs)), collate(pairs)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    packed = PackedPreferenceCollator(pad_token_id=1, row_tokens=24)(pairs)
    assert unpack(packed) == [pair for pair in pairs]  # each branch split into its own prompt and its completion


@pytest.mark.parametrize("own_prompts", [False, True], ids=["shared-prompt", "own-kept-prompts"])
def test_packed_k_completions_equal_k_separate_forwards(own_prompts):
    """Eq. (6.9) with K branches: each completion attends to the prompt and to itself, so one packed forward gives
    the log-probs of K separate sequences x + y_k, values and gradients."""
    model, exs = tiny_gpt2(VOCAB, seed=1), rankings(own_prompts=own_prompts)
    weights = torch.linspace(-1, 2, 5 * 4).view(5, 4)
    packed = PackedPreferenceCollator(pad_token_id=1, row_tokens=40)(exs)
    assert packed["input_ids"].shape[0] > 1 and int(packed["branch_ids"].max()) == 5  # 4 branches, padding = 5
    ours = listwise_logps(model, packed, 4)
    separate = torch.stack([torch.stack([alone(model, ex, k) for k in range(4)]) for ex in exs])
    torch.testing.assert_close(ours, separate, rtol=1e-5, atol=1e-5)
    for a, b in zip(
        grads(model, (listwise_logps(model, packed, 4) * weights).sum()), grads(model, (separate * weights).sum())
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    padded = listwise_logps(model, PreferenceCollator(pad_token_id=1)(exs), 4)
    torch.testing.assert_close(padded, separate, rtol=1e-5, atol=1e-5)


def test_permuting_completions_with_their_ranks_changes_nothing(small_tokenizer, penn):
    """Inside a segment: completions in another branch order give the same log-probs, permuted. In the data: the
    same rankings listed in shuffled order with scores train to the same weights as listed best first."""
    model, exs = tiny_gpt2(VOCAB, seed=2), rankings(K=3, seed=4)
    perm = [2, 0, 1]
    permuted = [{**ex, "completions_ids": [ex["completions_ids"][k] for k in perm]} for ex in exs]
    collate = PackedPreferenceCollator(pad_token_id=1, row_tokens=30)
    with torch.no_grad():
        torch.testing.assert_close(
            listwise_logps(model, collate(permuted), 3), listwise_logps(model, collate(exs), 3)[:, perm]
        )
    best_first = penn_rankings(penn["train"].select(range(8)))
    scored = []
    for i, row in enumerate(best_first):
        order = [(i + j) % 3 for j in range(3)]  # another listing per row
        scored.append(
            {
                "prompt": row["prompt"],
                "completions": [row["completions"][k] for k in order],
                "scores": [-float(k) for k in order],
            }
        )  # position 0 scores highest
    trained = []
    for rows in (best_first, scored):
        model = make_tiny_gpt2(small_tokenizer)
        train(model, small_tokenizer, rows, config(loss="plackett_luce", epochs=2))
        trained.append(params(model))
    for a, b in zip(*trained):
        assert torch.equal(a, b)


@pytest.mark.parametrize("config_name", ["mpt-alibi", "bloom"])
def test_a_model_that_cannot_take_the_packed_layout_scores_rankings_padded(config_name, monkeypatch):
    """ALiBi positions ignore position_ids; Bloom's forward takes no 4D mask: listwise_logps and packed_logps fall back
    to the padded layout and stay exact, keep_end's own kept prompts included (context, not scored)."""
    ids = {"pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}
    configs = {
        "mpt-alibi": transformers.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, **ids),
        "bloom": transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, **ids),
    }
    monkeypatch.setattr(dpolab.lm_head, "_said", set())  # what this test says once is said again elsewhere
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[config_name]).eval()
    with torch.no_grad():  # large logits: a wrong layout would move the log-probs by many nats
        model.get_output_embeddings().weight.mul_(20)
    exs = rankings(n=4, K=3, seed=5, own_prompts=True)
    collate = PackedPreferenceCollator(pad_token_id=1, row_tokens=40)
    pairs = [  # the same as pairs, keep_end's own kept prompts included
        {
            "prompt_ids": ex["prompt_ids"],
            "chosen_ids": ex["completions_ids"][0],
            "rejected_ids": ex["completions_ids"][1],
        }
        | (
            {
                "chosen_prompt_ids": ex["completions_prompt_ids"][0],
                "rejected_prompt_ids": ex["completions_prompt_ids"][1],
            }
            if "completions_prompt_ids" in ex
            else {}
        )
        for ex in exs
    ]
    with torch.no_grad():
        ours = listwise_logps(model, collate(exs), 3)
        ours_pairs = torch.stack(packed_logps(model, collate(pairs)), 1)
        separate = torch.stack([torch.stack([alone(model, ex, k) for k in range(3)]) for ex in exs])
    torch.testing.assert_close(ours, separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_pairs, separate[:, :2], rtol=1e-5, atol=1e-5)


# --- the loss and the training loop -----------------------------------------------------------------------------


def test_the_listwise_registry_at_k2_is_dpo_and_refuses_pairwise_use():
    g = torch.Generator().manual_seed(0)
    policy, ref = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    out = listwise_loss("plackett_luce", policy, ref, beta=0.3)
    dpo = preference_loss("dpo", policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=0.3)
    torch.testing.assert_close(out.losses, dpo)
    torch.testing.assert_close(out.rewards, 0.3 * (policy - ref))
    assert set(LISTWISE_LOSSES) == {"plackett_luce"}
    with pytest.raises(ValueError, match=r"plackett_luce is a listwise loss: call listwise_loss"):
        preference_loss("plackett_luce", policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=0.3)
    with pytest.raises(ValueError, match=r"none of the losses \['plackett_luce'\] takes the parameters \['gamma'\]"):
        listwise_loss("plackett_luce", policy, ref, beta=0.3, gamma=1.0)


def test_k2_listwise_training_equals_pairwise_dpo_step_for_step(small_tokenizer, penn):
    """Rankings [chosen, rejected] under Plackett-Luce and the pairs under DPO (eq. 5.2 at K = 2 is eq. 4.2): the
    same history and the same weights after 6 steps (to float rounding: the two losses round differently), from a
    reference that differs from the policy."""
    rows = penn["train"].select(range(12))
    listed = [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]]} for r in rows]
    reference = perturbed_copy(make_tiny_gpt2(small_tokenizer, seed=1), seed=3)
    runs = []
    for loss, data in (("dpo", rows), ("plackett_luce", listed), ("plackett_luce", rows)):  # a pair: a ranking of 2
        model = make_tiny_gpt2(small_tokenizer)
        history = train(
            model, small_tokenizer, data, config(loss=loss, epochs=2, beta=0.2), ref_model=reference
        ).history
        runs.append((history, params(model)))
    (pair_history, pair_weights), (list_history, list_weights), pairs_as_rankings = runs
    assert pairs_as_rankings[0] == list_history  # the pair rows under plackett_luce: the same rankings, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(pairs_as_rankings[1], list_weights))
    assert len(pair_history) == len(list_history) == 6 and abs(pair_history[0]["loss"] - math.log(2)) > 1e-3
    for p, q in zip(pair_history, list_history):
        assert q["loss"] == pytest.approx(p["loss"], rel=1e-5)
        assert q["rewards/position_1"] == pytest.approx(p["rewards/chosen"], rel=1e-4, abs=1e-5)
        assert q["logps/position_2"] == pytest.approx(p["logps/rejected"], rel=1e-5)
        assert q["ranking/accuracy"] == p["rewards/accuracies"]
    start = params(make_tiny_gpt2(small_tokenizer))
    assert max((w - w0).abs().max() for w, w0 in zip(pair_weights, start)) > 3e-3  # 6 steps of lr 1e-3 moved them
    for a, b in zip(pair_weights, list_weights):  # Adam's g / sqrt(v) carries float rounding of tiny gradients
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_metrics_equal_an_independent_computation(small_tokenizer, penn, tmp_path):
    """Step-1 metrics of a K = 3 run from log-probs computed here, sequence by sequence, with the Plackett-Luce loss
    written out and Kendall's tau from scipy; history.csv has the listwise columns and history.json's numbers."""
    data = penn_rankings(penn["train"].select(range(0, 800, 100)))
    model, reference = make_tiny_gpt2(small_tokenizer, seed=0), make_tiny_gpt2(small_tokenizer, seed=1)
    examples = tokenize_preferences(data, small_tokenizer, max_length=64)  # the model's context, as train() cuts
    with torch.no_grad():
        pol = torch.stack([torch.stack([alone(model.eval(), ex, k) for k in range(3)]) for ex in examples])
        ref = torch.stack([torch.stack([alone(reference, ex, k) for k in range(3)]) for ex in examples])
    beta = 0.3
    run = config(loss="plackett_luce", batch_size=8, beta=beta, max_steps=1, output_dir=str(tmp_path / "run"))
    history = train(model, small_tokenizer, data, run, ref_model=reference).history
    rewards = beta * (pol - ref)
    nll = [-sum(rewards[b, k] - torch.logsumexp(rewards[b, k:], 0) for k in range(3)) for b in range(8)]
    taus = [scipy.stats.kendalltau([3, 2, 1], rewards[b].tolist()).statistic for b in range(8)]
    expected = {
        "loss": sum(nll) / 8,
        **{f"rewards/position_{k + 1}": rewards[:, k].mean() for k in range(3)},
        "ranking/accuracy": (rewards[:, :-1] > rewards[:, 1:]).double().mean(),
        "ranking/kendall_tau": sum(taus) / 8,
        **{f"logps/position_{k + 1}": pol[:, k].mean() for k in range(3)},
    }
    assert 0 < expected["ranking/accuracy"] < 1 and len(set(taus)) > 1  # mixed: each could be wrong either way
    for name, value in expected.items():
        assert history[0][name] == pytest.approx(float(value), rel=1e-5, abs=1e-5), name
    assert tuple(history[0]) == listwise_metrics(3)
    header, line = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert header.split(",") == list(listwise_metrics(3))
    assert [float(v) for v in line.split(",")] == list(
        json.loads((tmp_path / "run" / "history.json").read_text())[0].values()
    )


def test_the_reference_log_probs_of_rankings_are_cached_and_exact(small_tokenizer, penn, tmp_path, monkeypatch):
    """(N, K) reference log-probs equal each sequence scored alone; a second call reads them from the cache."""
    import dpolab.train.reference as reference

    data = penn_rankings(penn["train"].select(range(6)))
    examples = tokenize_preferences(data, small_tokenizer)
    model = make_tiny_gpt2(small_tokenizer).eval()
    kwargs = dict(batch_size=4, device=torch.device("cpu"), cache_dir=tmp_path)
    first = precompute_reference_list_logps(model, examples, small_tokenizer, **kwargs)
    with torch.no_grad():
        separate = torch.stack([torch.stack([alone(model, ex, k) for k in range(3)]) for ex in examples])
    torch.testing.assert_close(first, separate, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(reference, "_compute", lambda *a, **k: pytest.fail("recomputed instead of read"))
    assert torch.equal(precompute_reference_list_logps(model, examples, small_tokenizer, **kwargs), first)


@pytest.mark.parametrize("which", ["adjacent", "all"])
def test_listwise_pairs_trains_on_the_pairs_each_ranking_implies(small_tokenizer, penn, which):
    """--listwise-pairs: rankings under a pairwise loss train exactly as their expanded pair rows do; the pairs are
    the K-1 adjacent ones or all K(K-1)/2, in order."""
    data = penn_rankings(penn["train"].select(range(4)))
    pairs = expand_rankings(data, which)
    expected = [(0, 1), (1, 2)] if which == "adjacent" else [(0, 1), (0, 2), (1, 2)]
    assert ranking_pairs(3, which) == expected
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        (row["completions"][i], row["completions"][j]) for row in data for i, j in expected
    ]
    trained = []
    for rows, extra in ((data, {"listwise_pairs": which}), (pairs, {})):
        model = make_tiny_gpt2(small_tokenizer)
        train(model, small_tokenizer, rows, config(loss="dpo", **extra))
        trained.append(params(model))
    for a, b in zip(*trained):
        assert torch.equal(a, b)


def test_a_pairwise_loss_on_rankings_names_both_fixes(small_tokenizer, penn, tmp_path, capsys):
    from dpolab.cli import main

    data = penn_rankings(penn["train"].select(range(4)))
    with pytest.raises(ValueError, match=r"loss 'dpo' is pairwise: pass --loss plackett_luce .* --listwise-pairs"):
        train(make_tiny_gpt2(small_tokenizer), small_tokenizer, data, config())
    with pytest.raises(ValueError, match=r"listwise_pairs='all' expands rankings into pairs, but train_data holds pai"):
        train(
            make_tiny_gpt2(small_tokenizer),
            small_tokenizer,
            penn["train"].select(range(4)),
            config(listwise_pairs="all"),
        )
    with pytest.raises(ValueError, match=r"mixes listwise \['plackett_luce'\] and pairwise losses"):
        config(loss=("plackett_luce", "sft"))
    with pytest.raises(ValueError, match=r"plackett_luce trains on the rankings themselves: drop listwise_pairs"):
        config(loss="plackett_luce", listwise_pairs="adjacent")
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in data))
    assert main(["train", "--model", "/nonexistent", "--data", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("dpolab train: error: train_data holds rankings ('completions' rows) but loss 'dpo'"), last
    assert not (tmp_path / "run").exists()


def test_dpolab_train_loss_plackett_luce_on_a_rankings_file(tiny_model_dir, penn, tmp_path, capsys):
    from dpolab.cli import main

    model_dir, _ = tiny_model_dir
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in penn_rankings(penn["train"].select(range(8)))))
    argv = ["train", "--model", str(model_dir), "--data", str(path), "--loss", "plackett_luce", "--batch-size", "4"]
    argv += ["--epochs", "1", "--no-progress", "--ref-cache-dir", str(tmp_path / "cache")]
    assert main([*argv, "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "8 rankings over 8 prompts, loss plackett_luce" in out
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [tuple(row) for row in history] == [listwise_metrics(3)] * 2
    assert history[0]["loss"] == pytest.approx(math.log(6), abs=1e-4)  # pi_theta = pi_ref: every ranking 1/3!


# --- the toy world: rankings from a known Plackett-Luce model ---------------------------------------------------


def test_adjacent_pairs_of_a_plackett_luce_ranking_are_not_bradley_terry():
    """What ranking_pairs' docstring says, by exact enumeration of the 3! rankings: y_1 precedes y_2 with
    probability sigma(r_1 - r_2) (the Gumbel race), but not among the rankings where they are adjacent."""
    r = torch.tensor([1.0, 0.2, -0.7], dtype=torch.float64)
    before = adjacent_before = adjacent = 0.0
    for order in itertools.permutations(range(3)):
        p = theory.plackett_luce_prob(r[list(order)]).item()
        first, second = order.index(0), order.index(1)
        before += p * (first < second)
        adjacent += p * (abs(first - second) == 1)
        adjacent_before += p * (second - first == 1)
    assert before == pytest.approx(torch.sigmoid(r[0] - r[1]).item(), abs=1e-12)
    assert adjacent_before / adjacent == pytest.approx(0.6572, abs=1e-4)  # not 0.6900


def test_listwise_dpo_on_plackett_luce_rankings_finds_pi_star(record_property):
    """Rankings of 3 of 5 responses drawn from Plackett-Luce with known rewards (Gumbel trick): listwise DPO lands
    on the closed-form pi* (eq. 2.2) within 4/sqrt(n) in total variation, at n = 2,000 and at n = 50,000 (the
    estimator's error shrinks as 1/sqrt(n): over 12 seeds sqrt(n) TV stayed between 0.4 and 3.1). Beside it,
    pairwise DPO on the same rankings' pairs, all and adjacent: their errors are reported, not asserted."""
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(0)
        rewards = torch.randn(3, 5, generator=g)
        ref = torch.softmax(torch.randn(3, 5, generator=g), -1)
        star = theory.optimal_policy(ref, rewards, beta=1.0)
        assert toy.total_variation(ref, star).max() > 0.2  # far from the start: the fit has somewhere to go
        for n in (2_000, 50_000):
            data = toy.sample_pl_rankings(rewards, n, k=3, generator=torch.Generator().manual_seed(n))
            error = lambda policy: toy.total_variation(policy, star).max().item()  # noqa: E731
            listwise = error(toy.train_tabular_listwise("plackett_luce", data, ref, beta=1.0))
            assert listwise < 4 / math.sqrt(n), (n, listwise)
            for which in ("all", "adjacent"):
                pairwise = error(toy.train_tabular("dpo", toy.ranking_preferences(data, which), ref, beta=1.0))
                record_property(f"tv_pairwise_{which}_n{n}", pairwise)
                print(f"n = {n}: listwise DPO TV {listwise:.4f}; pairwise DPO on {which} pairs TV {pairwise:.4f}")
            record_property(f"tv_listwise_n{n}", listwise)
    finally:
        torch.set_default_dtype(torch.float32)


# --- memory: the prompt is computed once --------------------------------------------------------------------------


@pytest.mark.parametrize("P,C,K", [(24, 8, 4), (32, 8, 3)])
def test_a_listwise_step_holds_activations_in_the_ratio_of_its_tokens(P, C, K):
    """Two prompts of P tokens, K completions of C tokens each, one packed segment per row: a listwise step saves
    (P + K C) / (P + 2 C) times the activation bytes of a pairwise step on the same prompts (within 3%: attention's
    L x L scores and the head's softmax scale otherwise), not the K / 2 of K full sequences."""
    model = tiny_gpt2(64, seed=0, n_embd=128, n_positions=128)
    g = torch.Generator().manual_seed(0)
    tokens = lambda m: torch.randint(3, 64, (m,), generator=g).tolist()  # noqa: E731
    lists = [{"prompt_ids": tokens(P), "completions_ids": [tokens(C) for _ in range(K)]} for _ in range(2)]
    pairs = [
        {
            "prompt_ids": ex["prompt_ids"],
            "chosen_ids": ex["completions_ids"][0],
            "rejected_ids": ex["completions_ids"][1],
        }
        for ex in lists
    ]
    collate = PackedPreferenceCollator(pad_token_id=1, row_tokens=1)  # a row per segment
    ranked, paired, ref = collate(lists), collate(pairs), torch.zeros(2, K)
    _, listwise = saved_tensor_bytes(
        lambda: listwise_loss("plackett_luce", listwise_logps(model, ranked, K), ref, beta=0.1).losses.sum(),
        exclude=model.parameters(),
    )
    _, pairwise = saved_tensor_bytes(
        lambda: preference_loss("dpo", *packed_logps(model, paired), ref[:, 0], ref[:, 1], beta=0.1).sum(),
        exclude=model.parameters(),
    )
    expected = (P + K * C) / (P + 2 * C)
    print(
        f"P={P} C={C} K={K}: saved bytes {listwise} / {pairwise} = {listwise / pairwise:.4f}, (P+KC)/(P+2C) = {expected:.4f}"
    )
    assert listwise / pairwise == pytest.approx(expected, rel=0.03)
    assert abs(listwise / pairwise - K / 2) > 0.25  # far from K sequences of P + C tokens each

"""dpolab.toy against closed forms: Bradley-Terry sampling frequencies, DPO's limit pi* (eq. 2.2), its
invariance under r -> r + f(x) (eq. 3.2), IPO's own limit, and robust DPO under label noise."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dpolab import theory
from dpolab.toy import (
    Preferences,
    empirical_loss,
    flip_preferences,
    ipo_optimal_policy,
    sample_bt_preferences,
    total_variation,
    train_tabular,
    unique_triples,
    win_counts,
)

P, N, BETA = 3, 5, 1.0


@pytest.fixture(scope="module")
def world():
    g = torch.Generator().manual_seed(7)
    rewards = torch.randn(P, N, generator=g, dtype=torch.float64)
    ref_probs = torch.softmax(torch.randn(P, N, generator=g, dtype=torch.float64), -1)
    return rewards, ref_probs


@pytest.fixture(scope="module")
def big_sample(world):
    rewards, _ = world
    return sample_bt_preferences(rewards, 400_000, torch.Generator().manual_seed(1))


def test_bt_frequencies_match_bradley_terry_within_binomial_error(world, big_sample):
    rewards, _ = world
    wins = win_counts(big_sample, P, N).double()  # (P, N, N)
    n_pairs = P * N * (N - 1) // 2
    for x in range(P):
        for i, j in itertools.combinations(range(N), 2):
            n_ij = wins[x, i, j] + wins[x, j, i]
            # every unordered pair of every prompt is equally likely: n_ij ~ Binomial(n, 1/n_pairs)
            expected = big_sample.prompt.numel() / n_pairs
            assert abs(n_ij - expected) < 5 * math.sqrt(expected * (1 - 1 / n_pairs))
            p = float(theory.bradley_terry(rewards[x, i], rewards[x, j]))
            assert abs(wins[x, i, j] / n_ij - p) < 5 * math.sqrt(p * (1 - p) / n_ij), (x, i, j)


def test_sampler_is_seeded_and_never_compares_a_response_with_itself(world):
    rewards, _ = world
    a = sample_bt_preferences(rewards, 1000, torch.Generator().manual_seed(3))
    b = sample_bt_preferences(rewards, 1000, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not (a.chosen == a.rejected).any()


def test_dpo_with_a_large_sample_lands_on_the_optimal_policy(world, big_sample):
    rewards, ref_probs = world
    pi_star = theory.optimal_policy(ref_probs, rewards, BETA)
    learned = train_tabular("dpo", big_sample, ref_probs, BETA)
    tv = total_variation(learned, pi_star)
    assert tv.max() < 0.015, tv
    assert total_variation(ref_probs, pi_star).min() > 0.15  # the test could fail: pi* is far from the start


def test_rewards_shifted_per_prompt_teach_the_same_policy(world, big_sample):
    """BT probabilities, and hence the data, only see reward differences: r + f(x) teaches the same pi* (3.2)."""
    rewards, ref_probs = world
    shift = torch.tensor([5.0, -3.0, 12.0], dtype=torch.float64).unsqueeze(-1)  # f(x)
    shifted = sample_bt_preferences(rewards + shift, 400_000, torch.Generator().manual_seed(2))
    pi_star = theory.optimal_policy(ref_probs, rewards, BETA)  # the UNshifted reward's closed form
    learned_shifted = train_tabular("dpo", shifted, ref_probs, BETA)
    learned = train_tabular("dpo", big_sample, ref_probs, BETA)
    assert total_variation(learned_shifted, pi_star).max() < 0.015
    assert total_variation(learned_shifted, learned).max() < 0.02


def test_dpo_error_shrinks_with_more_data(world):
    rewards, ref_probs = world
    pi_star = theory.optimal_policy(ref_probs, rewards, BETA)
    tv = {}
    for n in (200, 200_000):
        runs = []
        for seed in range(3):
            pairs = sample_bt_preferences(rewards, n, torch.Generator().manual_seed(seed))
            runs.append(total_variation(train_tabular("dpo", pairs, ref_probs, BETA), pi_star).mean())
        tv[n] = float(torch.stack(runs).mean())
    assert tv[200] > 5 * tv[200_000], tv


def test_weight_decay_gives_the_map_answer_of_a_pair_always_won():
    """One prompt, two responses, y_1 always wins: plain DPO has no finite minimiser; with (lambda/2)|theta -
    log pi_ref|^2 the logits move by +a and -a with beta sigma(-2 beta a) = lambda a (the stationarity condition),
    solved here by bisection."""
    ref_probs = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    pairs = Preferences(
        torch.zeros(50, dtype=torch.long), torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.long)
    )
    beta, lam = 1.0, 0.2
    lo, hi = 0.0, 10.0
    for _ in range(200):  # beta sigma(-2 beta a) - lam a is decreasing in a
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if beta * torch.sigmoid(torch.tensor(-2 * beta * mid)) > lam * mid else (lo, mid)
    a = (lo + hi) / 2
    expected = torch.softmax(ref_probs.log() + torch.tensor([[a, -a]], dtype=torch.float64), -1)
    learned = train_tabular("dpo", pairs, ref_probs, beta, steps=3000, weight_decay=lam)
    torch.testing.assert_close(learned, expected, atol=1e-6, rtol=0)
    plain = train_tabular("dpo", pairs, ref_probs, beta, steps=3000)
    assert plain[0, 0] > expected[0, 0] + 0.05  # without the prior the winner runs away further
    with pytest.raises(ValueError, match="weight_decay"):
        train_tabular("dpo", pairs, ref_probs, beta, weight_decay=-1.0)


def test_ipo_converges_to_its_own_closed_form_not_to_pi_star(world, big_sample):
    rewards, ref_probs = world
    beta = 0.5
    learned = train_tabular("ipo", big_sample, ref_probs, beta, steps=1000)
    pi_ipo = ipo_optimal_policy(ref_probs, rewards, beta)
    assert total_variation(learned, pi_ipo).max() < 0.01
    assert total_variation(pi_ipo, theory.optimal_policy(ref_probs, rewards, beta)).max() > 0.1


def test_ipo_closed_form_by_brute_force_least_squares(world):
    """u = log(pi_IPO/pi_ref) minimises sum_{i<j} (u_i - u_j - (P_ij - 1/2)/beta)^2, solved by lstsq."""
    rewards, ref_probs = world
    beta = 0.7
    rows, targets = [], []
    for i, j in itertools.combinations(range(N), 2):
        row = torch.zeros(N, dtype=torch.float64)
        row[i], row[j] = 1.0, -1.0
        rows.append(row)
        targets.append((torch.sigmoid(rewards[:, i] - rewards[:, j]) - 0.5) / beta)
    A, b = torch.stack(rows), torch.stack(targets)  # (pairs, N), (pairs, P)
    u = torch.linalg.lstsq(A, b).solution.T  # (P, N), defined up to a constant per prompt
    expected = torch.softmax(ref_probs.log() + u, -1)
    torch.testing.assert_close(ipo_optimal_policy(ref_probs, rewards, beta), expected)


def test_robust_dpo_undoes_label_noise_that_biases_dpo(world, big_sample):
    rewards, ref_probs = world
    eps = 0.2
    noisy = flip_preferences(big_sample, eps, torch.Generator().manual_seed(5))
    pi_star = theory.optimal_policy(ref_probs, rewards, BETA)
    tv_dpo = total_variation(train_tabular("dpo", noisy, ref_probs, BETA), pi_star)
    tv_robust = total_variation(train_tabular("robust", noisy, ref_probs, BETA, label_smoothing=eps), pi_star)
    assert tv_robust.max() < 0.03, tv_robust
    assert tv_dpo.min() > 2 * tv_robust.max(), (tv_dpo, tv_robust)


def test_flip_rate_matches_eps(big_sample):
    noisy = flip_preferences(big_sample, 0.3, torch.Generator().manual_seed(0))
    n = big_sample.prompt.numel()
    flipped = (noisy.chosen != big_sample.chosen).double().mean()
    assert abs(flipped - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    assert torch.equal(noisy.chosen == big_sample.chosen, noisy.rejected == big_sample.rejected)


def test_empirical_loss_on_unique_triples_equals_the_plain_mean(world):
    rewards, ref_probs = world
    pairs = sample_bt_preferences(rewards, 3000, torch.Generator().manual_seed(4))
    logits = torch.randn(P, N, dtype=torch.float64)
    distinct, counts = unique_triples(pairs, P, N)
    assert int(counts.sum()) == 3000 and distinct.prompt.numel() <= P * N * (N - 1)
    plain = empirical_loss("dpo", logits, pairs, ref_probs, BETA)
    weighted = empirical_loss("dpo", logits, distinct, ref_probs, BETA, weights=counts.double() / 3000)
    torch.testing.assert_close(weighted, plain)
    by_hand = 0.0  # (7.3) term by term
    for x, w, l in zip(*pairs):
        logp = torch.log_softmax(logits[x], -1)
        h = (logp[w] - ref_probs[x, w].log()) - (logp[l] - ref_probs[x, l].log())
        by_hand += -math.log(1 / (1 + math.exp(-BETA * float(h))))
    torch.testing.assert_close(plain, torch.tensor(by_hand / 3000, dtype=torch.float64))


def test_total_variation_extremes():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    torch.testing.assert_close(total_variation(p, q), torch.tensor([1.0, 0.0]))


def test_bad_input_is_refused(world):
    rewards, ref_probs = world
    pairs = sample_bt_preferences(rewards, 10, torch.Generator().manual_seed(0))
    zero_ref = ref_probs.clone()
    zero_ref[0, 0], zero_ref[0, 1] = 0.0, zero_ref[0, 1] + zero_ref[0, 0]
    with pytest.raises(ValueError, match="> 0"):
        train_tabular("dpo", pairs, zero_ref, BETA)
    with pytest.raises(ValueError, match="itself"):
        train_tabular("dpo", Preferences(pairs.prompt, pairs.chosen, pairs.chosen), ref_probs, BETA)
    with pytest.raises(ValueError, match="outside"):
        train_tabular("dpo", Preferences(pairs.prompt + P, pairs.chosen, pairs.rejected), ref_probs, BETA)
    with pytest.raises(ValueError, match="sorts the whole batch"):
        train_tabular("aot", pairs, ref_probs, BETA)
    with pytest.raises(ValueError, match="unknown loss"):
        train_tabular("dpoo", pairs, ref_probs, BETA)
    with pytest.raises(ValueError, match="n must be"):
        sample_bt_preferences(rewards, 0)

"""dpolab.theory against brute force: explicit loops, arbitrary-precision sums, enumeration, random search.

Every expected value here is computed another way than the library computes it (Python loops over responses,
mpmath at 50 digits, all K! rankings, random policies on the simplex), so a wrong closed form fails a test.
"""

from __future__ import annotations

import itertools
import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpolab import theory

DTYPE = torch.float64


def random_problem(seed: int, shape=(6,), beta_range=(0.1, 3.0)):
    """Reference probabilities, rewards and beta for a batch of prompts of the given shape (..., N)."""
    g = torch.Generator().manual_seed(seed)
    ref_probs = torch.softmax(torch.randn(shape, generator=g, dtype=DTYPE), -1)
    rewards = 2 * torch.randn(shape, generator=g, dtype=DTYPE)
    lo, hi = beta_range
    beta = lo + (hi - lo) * torch.rand((), generator=g, dtype=DTYPE).item()
    return ref_probs, rewards, beta


def random_simplex(n_samples: int, N: int, seed: int, temperature: float = 1.0) -> torch.Tensor:
    """(n_samples, N) random probability vectors, softmax(temperature * z); a large temperature makes them peaked."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(temperature * torch.randn(n_samples, N, generator=g, dtype=DTYPE), -1)


# --- partition function and optimal policy: brute force ----------------------------------------------


def partition_loop(ref, rewards, beta):
    return sum(q * math.exp(r / beta) for q, r in zip(ref, rewards))


@pytest.mark.parametrize("seed", range(5))
def test_partition_equals_explicit_loop(seed):
    ref_probs, rewards, beta = random_problem(seed, shape=(4, 7))
    expected = torch.tensor(
        [partition_loop(q, r, beta) for q, r in zip(ref_probs.tolist(), rewards.tolist())], dtype=DTYPE
    )
    torch.testing.assert_close(theory.partition(ref_probs, rewards, beta), expected)
    torch.testing.assert_close(theory.log_partition(ref_probs, rewards, beta), expected.log())


def test_log_partition_is_exact_where_exp_overflows():
    # r/beta = 10,000: exp overflows float64, the log-space computation must still match 50-digit arithmetic
    ref_probs = torch.tensor([0.2, 0.5, 0.3], dtype=DTYPE)
    rewards = torch.tensor([100.0, 99.5, -3.0], dtype=DTYPE)
    beta = 0.01
    mpmath.mp.dps = 50
    exact = mpmath.log(
        sum(
            mpmath.mpf(q) * mpmath.exp(mpmath.mpf(r) / mpmath.mpf(beta))
            for q, r in zip(ref_probs.tolist(), rewards.tolist())
        )
    )
    assert theory.log_partition(ref_probs, rewards, beta).item() == pytest.approx(float(exact), rel=1e-13)
    pi_star = theory.optimal_policy(ref_probs, rewards, beta)
    assert torch.isfinite(pi_star).all()
    expected_first = float(mpmath.mpf(0.2) * mpmath.exp(mpmath.mpf(100.0) / mpmath.mpf(0.01)) / mpmath.exp(exact))
    assert pi_star[0].item() == pytest.approx(expected_first, rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_optimal_policy_equals_explicit_loop(seed):
    ref_probs, rewards, beta = random_problem(seed, shape=(3, 5))
    expected = []
    for q, r in zip(ref_probs.tolist(), rewards.tolist()):
        z = partition_loop(q, r, beta)
        expected.append([qi * math.exp(ri / beta) / z for qi, ri in zip(q, r)])
    pi_star = theory.optimal_policy(ref_probs, rewards, beta)
    torch.testing.assert_close(pi_star, torch.tensor(expected, dtype=DTYPE))
    torch.testing.assert_close(pi_star.sum(-1), torch.ones(3, dtype=DTYPE))
    torch.testing.assert_close(theory.log_optimal_policy(ref_probs, rewards, beta), pi_star.log())


def test_zero_reference_probability_gives_zero_optimal_probability():
    ref_probs = torch.tensor([0.0, 0.6, 0.4], dtype=DTYPE)
    rewards = torch.tensor([50.0, 0.0, 1.0], dtype=DTYPE)  # the best reward cannot buy mass where pi_ref has none
    pi_star = theory.optimal_policy(ref_probs, rewards, 0.5)
    assert pi_star[0].item() == 0.0
    torch.testing.assert_close(
        pi_star[1:], torch.tensor([0.6, 0.4 * math.exp(2.0)], dtype=DTYPE) / (0.6 + 0.4 * math.exp(2.0))
    )


# --- the optimal policy maximises the objective --------------------------------------------------------


def kl_objective_loop(policy, ref, rewards, beta):
    total = 0.0
    for p, q, r in zip(policy, ref, rewards):
        total += p * r
        if p > 0:
            total -= beta * p * math.log(p / q)
    return total


@pytest.mark.parametrize("seed", range(3))
def test_kl_objective_equals_explicit_loop(seed):
    ref_probs, rewards, beta = random_problem(seed, shape=(4, 6))
    policy = random_simplex(4, 6, seed=seed + 100)
    policy[0, 2] = 0.0  # a zero entry exercises 0 log 0 = 0
    policy[0] /= policy[0].sum()
    expected = [
        kl_objective_loop(p, q, r, beta) for p, q, r in zip(policy.tolist(), ref_probs.tolist(), rewards.tolist())
    ]
    torch.testing.assert_close(
        theory.kl_objective(policy, ref_probs, rewards, beta), torch.tensor(expected, dtype=DTYPE)
    )


@pytest.mark.parametrize("seed", range(4))
def test_optimal_policy_beats_every_random_policy(seed):
    ref_probs, rewards, beta = random_problem(seed, shape=(6,))
    pi_star = theory.optimal_policy(ref_probs, rewards, beta)
    best = theory.kl_objective(pi_star, ref_probs, rewards, beta)

    # far away: 2,000 random policies on the simplex, some very peaked
    far = torch.cat([random_simplex(1000, 6, seed, 1.0), random_simplex(1000, 6, seed + 1, 10.0)])
    assert (theory.kl_objective(far, ref_probs.expand_as(far), rewards.expand_as(far), beta) < best).all()

    # close by: pi* moved a little towards random directions on the simplex (still on it)
    for eps in (1e-1, 1e-2, 1e-3):
        near = (1 - eps) * pi_star + eps * random_simplex(500, 6, seed + 2)
        assert (theory.kl_objective(near, ref_probs.expand_as(near), rewards.expand_as(near), beta) < best).all()


@pytest.mark.parametrize("seed", range(5))
def test_objective_at_optimum_is_beta_log_partition(seed):
    ref_probs, rewards, beta = random_problem(seed, shape=(5, 4))
    pi_star = theory.optimal_policy(ref_probs, rewards, beta)
    torch.testing.assert_close(
        theory.kl_objective(pi_star, ref_probs, rewards, beta), beta * theory.log_partition(ref_probs, rewards, beta)
    )


@pytest.mark.parametrize("seed", range(3))
def test_objective_identity_for_arbitrary_policies(seed):
    # eq. (2.3): J(pi) = -beta KL(pi || pi*) + beta log Z for every policy, not only the optimum
    ref_probs, rewards, beta = random_problem(seed, shape=(8, 5))
    policy = random_simplex(8, 5, seed + 7)
    pi_star = theory.optimal_policy(ref_probs, rewards, beta)
    expected = -beta * theory.kl_divergence(policy, pi_star) + beta * theory.log_partition(ref_probs, rewards, beta)
    torch.testing.assert_close(theory.kl_objective(policy, ref_probs, rewards, beta), expected)


def test_kl_divergence_against_loop_and_its_properties():
    p = random_simplex(6, 5, seed=1)
    q = random_simplex(6, 5, seed=2)
    expected = [sum(pi * math.log(pi / qi) for pi, qi in zip(a, b)) for a, b in zip(p.tolist(), q.tolist())]
    torch.testing.assert_close(theory.kl_divergence(p, q), torch.tensor(expected, dtype=DTYPE))
    assert (theory.kl_divergence(p, q) > 0).all()
    torch.testing.assert_close(theory.kl_divergence(p, p), torch.zeros(6, dtype=DTYPE))
    # 0 log 0 = 0, but mass where q has none is infinitely far
    assert theory.kl_divergence(
        torch.tensor([0.0, 1.0], dtype=DTYPE), torch.tensor([0.5, 0.5], dtype=DTYPE)
    ).item() == pytest.approx(math.log(2))
    assert (
        theory.kl_divergence(torch.tensor([0.5, 0.5], dtype=DTYPE), torch.tensor([0.0, 1.0], dtype=DTYPE)).item()
        == math.inf
    )


def test_temperature_limits_numerically():
    ref_probs = torch.tensor([0.1, 0.6, 0.3], dtype=DTYPE)
    rewards = torch.tensor([2.0, 1.0, 0.0], dtype=DTYPE)
    torch.testing.assert_close(
        theory.optimal_policy(ref_probs, rewards, 1e-3), torch.tensor([1.0, 0.0, 0.0], dtype=DTYPE)
    )
    torch.testing.assert_close(theory.optimal_policy(ref_probs, rewards, 1e6), ref_probs, atol=1e-5, rtol=0)


# --- rewards from policies --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_reward_from_policy_inverts_optimal_policy(seed):
    ref_probs, rewards, beta = random_problem(seed, shape=(4, 6))
    pi_star = theory.optimal_policy(ref_probs, rewards, beta)
    log_z = theory.log_partition(ref_probs, rewards, beta)
    torch.testing.assert_close(theory.reward_from_policy(pi_star, ref_probs, beta, log_z), rewards)
    loop = [[beta * math.log(p / q) for p, q in zip(a, b)] for a, b in zip(pi_star.tolist(), ref_probs.tolist())]
    torch.testing.assert_close(theory.implicit_reward(pi_star, ref_probs, beta), torch.tensor(loop, dtype=DTYPE))


# --- Bradley-Terry and Plackett-Luce -----------------------------------------------------------------


def plackett_luce_loop(ranked):
    prob = 1.0
    for k in range(len(ranked)):
        prob *= math.exp(ranked[k]) / sum(math.exp(ranked[j]) for j in range(k, len(ranked)))
    return prob


def test_bradley_terry_is_plackett_luce_with_two_responses():
    g = torch.Generator().manual_seed(0)
    r = 3 * torch.randn(50, 2, generator=g, dtype=DTYPE)
    bt = theory.bradley_terry(r[:, 0], r[:, 1])
    torch.testing.assert_close(bt, theory.plackett_luce_prob(r))
    expected = torch.tensor([math.exp(a) / (math.exp(a) + math.exp(b)) for a, b in r.tolist()], dtype=DTYPE)
    torch.testing.assert_close(bt, expected)
    torch.testing.assert_close(bt + theory.bradley_terry(r[:, 1], r[:, 0]), torch.ones(50, dtype=DTYPE))


@pytest.mark.parametrize("K", [2, 3, 4, 5])
def test_plackett_luce_equals_loop(K):
    g = torch.Generator().manual_seed(K)
    r = 2 * torch.randn(10, K, generator=g, dtype=DTYPE)
    expected = torch.tensor([plackett_luce_loop(row) for row in r.tolist()], dtype=DTYPE)
    torch.testing.assert_close(theory.plackett_luce_prob(r), expected)
    torch.testing.assert_close(theory.plackett_luce_logprob(r), expected.log())


@pytest.mark.parametrize("K", [3, 4])
def test_plackett_luce_probabilities_of_all_rankings_sum_to_one(K):
    g = torch.Generator().manual_seed(10 + K)
    rewards = 2 * torch.randn(7, K, generator=g, dtype=DTYPE)  # a batch of 7 prompts
    perms = list(itertools.permutations(range(K)))
    total = sum(theory.plackett_luce_prob(rewards[:, list(p)]) for p in perms)
    torch.testing.assert_close(total, torch.ones(7, dtype=DTYPE))
    # the first place alone is softmax(r)
    first = torch.stack(
        [sum(theory.plackett_luce_prob(rewards[:, list(p)]) for p in perms if p[0] == i) for i in range(K)], -1
    )
    torch.testing.assert_close(first, torch.softmax(rewards, -1))


def test_plackett_luce_logprob_is_stable_for_large_rewards():
    r = torch.tensor([1000.0, 999.0, 0.0], dtype=DTYPE)
    # stage 1: 1000 - logsumexp(1000, 999, 0) = -log(1 + e^-1 + e^-1000); stage 2: 999 - logsumexp(999, 0) = -log(1 + e^-999)
    expected = -math.log1p(math.exp(-1.0))
    assert theory.plackett_luce_logprob(r).item() == pytest.approx(expected, abs=1e-12)


# --- properties (Hypothesis) ------------------------------------------------------------------------

finite = st.floats(min_value=-20, max_value=20, allow_nan=False, allow_infinity=False)


@st.composite
def problems(draw):
    B = draw(st.integers(1, 4))
    N = draw(st.integers(2, 6))
    logits = torch.tensor(draw(st.lists(st.lists(finite, min_size=N, max_size=N), min_size=B, max_size=B)), dtype=DTYPE)
    rewards = torch.tensor(
        draw(st.lists(st.lists(finite, min_size=N, max_size=N), min_size=B, max_size=B)), dtype=DTYPE
    )
    beta = draw(st.floats(min_value=0.05, max_value=20.0))
    return torch.softmax(logits, -1), rewards, beta


@settings(max_examples=100, deadline=None)
@given(problem=problems(), shifts=st.lists(st.floats(min_value=-1e3, max_value=1e3), min_size=4, max_size=4))
def test_optimal_policy_is_invariant_to_a_per_prompt_reward_shift(problem, shifts):
    ref_probs, rewards, beta = problem
    f_x = torch.tensor(shifts[: rewards.shape[0]], dtype=DTYPE).unsqueeze(-1)  # one shift per prompt, (B, 1)
    torch.testing.assert_close(
        theory.optimal_policy(ref_probs, rewards + f_x, beta), theory.optimal_policy(ref_probs, rewards, beta)
    )
    # Z moves by exactly exp(f/beta), in log space: log Z + f/beta
    torch.testing.assert_close(
        theory.log_partition(ref_probs, rewards + f_x, beta),
        theory.log_partition(ref_probs, rewards, beta) + f_x.squeeze(-1) / beta,
    )


@settings(max_examples=60, deadline=None)
@given(problem=problems())
def test_optimal_policy_changes_under_a_per_response_shift(problem):
    # the invariance above is not vacuous: shifting one response's reward by 1 moves pi* whenever it has mass to move
    ref_probs, rewards, beta = problem
    bumped = rewards.clone()
    bumped[:, 0] += 1.0
    before = theory.optimal_policy(ref_probs, rewards, beta)[:, 0]
    after = theory.optimal_policy(ref_probs, bumped, beta)[:, 0]
    movable = (before > 1e-6) & (before < 1 - 1e-6)
    assert (after[movable] > before[movable]).all()


@settings(max_examples=60, deadline=None)
@given(problem=problems(), scale=st.floats(min_value=0.1, max_value=10.0))
def test_scaling_the_reward_is_dividing_beta(problem, scale):
    ref_probs, rewards, beta = problem
    torch.testing.assert_close(
        theory.optimal_policy(ref_probs, scale * rewards, beta), theory.optimal_policy(ref_probs, rewards, beta / scale)
    )


@settings(max_examples=60, deadline=None)
@given(rewards=st.lists(finite, min_size=2, max_size=6), shift=st.floats(min_value=-1e3, max_value=1e3))
def test_plackett_luce_is_invariant_to_a_common_shift(rewards, shift):
    r = torch.tensor(rewards, dtype=DTYPE)
    torch.testing.assert_close(
        theory.plackett_luce_logprob(r + shift), theory.plackett_luce_logprob(r), atol=1e-9, rtol=1e-9
    )


# --- batched shapes (..., N) -------------------------------------------------------------------------


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 4)])
def test_batched_shapes_match_row_by_row(batch_shape):
    N = 5
    ref_probs, rewards, beta = random_problem(0, shape=(*batch_shape, N))
    policy = torch.softmax(torch.randn(*batch_shape, N, dtype=DTYPE), -1)
    pi_star = theory.optimal_policy(ref_probs, rewards, beta)
    assert pi_star.shape == (*batch_shape, N)
    assert theory.log_partition(ref_probs, rewards, beta).shape == batch_shape
    assert theory.kl_objective(policy, ref_probs, rewards, beta).shape == batch_shape
    assert theory.kl_divergence(policy, ref_probs).shape == batch_shape
    assert theory.plackett_luce_logprob(rewards).shape == batch_shape
    flat_ref, flat_r, flat_pi = ref_probs.reshape(-1, N), rewards.reshape(-1, N), policy.reshape(-1, N)
    rows = torch.stack([theory.optimal_policy(q, r, beta) for q, r in zip(flat_ref, flat_r)])
    torch.testing.assert_close(pi_star.reshape(-1, N), rows)
    rows_J = torch.stack([theory.kl_objective(p, q, r, beta) for p, q, r in zip(flat_pi, flat_ref, flat_r)])
    torch.testing.assert_close(theory.kl_objective(policy, ref_probs, rewards, beta).reshape(-1), rows_J)


def test_inputs_as_lists_and_float32():
    pi_star = theory.optimal_policy([0.5, 0.5], [1.0, 0.0], 1.0)
    assert pi_star.dtype == torch.get_default_dtype()
    assert pi_star[0].item() == pytest.approx(math.e / (math.e + 1), rel=1e-6)
    pi32 = theory.optimal_policy(torch.tensor([0.25, 0.75]), torch.tensor([0.0, 1.0]), 0.5)
    assert pi32.dtype == torch.float32


# --- bad input --------------------------------------------------------------------------------------

REF = torch.tensor([0.2, 0.3, 0.5], dtype=DTYPE)
REWARDS = torch.tensor([1.0, 0.0, -1.0], dtype=DTYPE)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize(
    "call",
    [
        lambda b: theory.optimal_policy(REF, REWARDS, b),
        lambda b: theory.log_partition(REF, REWARDS, b),
        lambda b: theory.kl_objective(REF, REF, REWARDS, b),
        lambda b: theory.implicit_reward(REF, REF, b),
    ],
    ids=["optimal_policy", "log_partition", "kl_objective", "implicit_reward"],
)
def test_bad_beta_is_rejected(call, beta):
    with pytest.raises(ValueError, match="beta"):
        call(beta)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="shapes must match"):
        theory.optimal_policy(REF, torch.zeros(4, dtype=DTYPE), 1.0)
    with pytest.raises(ValueError, match="shapes must match"):
        theory.kl_objective(REF, torch.tensor([0.5, 0.5], dtype=DTYPE), REWARDS, 1.0)
    with pytest.raises(ValueError, match="shapes must match"):
        theory.kl_divergence(REF, torch.tensor([0.5, 0.5], dtype=DTYPE))
    with pytest.raises(ValueError, match="shapes must match"):
        theory.implicit_reward(REF, torch.tensor([0.5, 0.5], dtype=DTYPE), 1.0)


def test_probabilities_that_do_not_sum_to_one_are_rejected():
    with pytest.raises(ValueError, match="ref_probs must sum to 1"):
        theory.optimal_policy(torch.tensor([0.2, 0.3, 0.6], dtype=DTYPE), REWARDS, 1.0)
    with pytest.raises(ValueError, match="sum to 1"):
        theory.kl_objective(torch.tensor([0.5, 0.6, 0.1], dtype=DTYPE), REF, REWARDS, 1.0)
    # a batch where only the second row is wrong
    with pytest.raises(ValueError, match="sum to 1"):
        theory.log_partition(torch.stack([REF, 2 * REF]), torch.stack([REWARDS, REWARDS]), 1.0)


def test_negative_or_nonfinite_probabilities_are_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        theory.optimal_policy(torch.tensor([-0.1, 0.6, 0.5], dtype=DTYPE), REWARDS, 1.0)
    with pytest.raises(ValueError, match="finite"):
        theory.optimal_policy(torch.tensor([float("nan"), 0.5, 0.5], dtype=DTYPE), REWARDS, 1.0)
    with pytest.raises(ValueError, match="scalar"):
        theory.kl_divergence(torch.tensor(1.0, dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE))


def test_plackett_luce_needs_two_responses():
    with pytest.raises(ValueError, match="at least 2 responses"):
        theory.plackett_luce_logprob(torch.tensor([1.0], dtype=DTYPE))
    with pytest.raises(ValueError, match="at least 2 responses"):
        theory.plackett_luce_prob(torch.tensor(1.0, dtype=DTYPE))

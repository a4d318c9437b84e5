"""The sympy identities of notebooks 01-05 (dpolab.derivations), plus numeric cross-checks against the library.

Three kinds of test:
- each identity holds (sympy reduces lhs - rhs to 0);
- a deliberately wrong variant is NOT an identity: sympy does not reduce it to 0 *and* it is non-zero at a
  numeric point, so a checker that said "yes" to everything would fail here;
- the symbolic results, turned into numbers with lambdify, equal dpolab.theory / dpolab.losses on random inputs.
"""

from __future__ import annotations

import itertools
import math

import pytest
import sympy as sp
import torch

from dpolab import derivations as d
from dpolab import losses, theory

DTYPE = torch.float64
beta = d.beta


def numeric_value(expr, subs) -> float:
    return float(sp.N(expr.subs(subs)))


def random_inputs(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    ref = torch.softmax(torch.randn(n, generator=g, dtype=DTYPE), -1)
    rewards = 2 * torch.randn(n, generator=g, dtype=DTYPE)
    b = 0.1 + 2.9 * torch.rand((), generator=g, dtype=DTYPE).item()
    return ref, rewards, b


# --- notebook 01 ------------------------------------------------------------------------------------


def test_response_set_symbols_and_assumptions():
    s = d.response_set(3)
    assert s.n == 3 and len(s.pi_ref) == 3 and len(s.r) == 3
    assert all(p.is_positive for p in s.pi + s.pi_ref) and all(r.is_real for r in s.r) and s.beta.is_positive
    with pytest.raises(ValueError, match="at least 2 responses"):
        d.response_set(1)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_stationary_point_is_the_optimal_policy(n):
    s = d.response_set(n)
    assert d.stationary_point_is_optimal_policy(s)
    _, lam_star = d.stationary_point(s)
    assert d.is_zero(lam_star - (beta * sp.log(d.partition_function(s.pi_ref, s.r)) - beta))


def test_stationarity_conditions_match_the_hand_derivative():
    s = d.response_set(3)
    lam = sp.Symbol("lambda", real=True)
    for i, condition in enumerate(d.stationarity_conditions(s, lam)):
        assert d.is_zero(condition - (s.r[i] - beta * (sp.log(s.pi[i] / s.pi_ref[i]) + 1) - lam))
    # a wrong derivative (forgetting the +1 of the product rule) is not the condition
    wrong = d.stationarity_conditions(s, lam)[0] - (s.r[0] - beta * sp.log(s.pi[0] / s.pi_ref[0]) - lam)
    assert not d.is_zero(wrong)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_hessian_is_diagonal_and_negative(n):
    s = d.response_set(n)
    assert d.hessian(s) == sp.diag(*[-beta / p for p in s.pi])
    assert d.objective_is_concave(s)


def test_stationary_point_matches_theory_numerically():
    s = d.response_set(4)
    pis, _ = d.stationary_point(s)
    fn = sp.lambdify([s.pi_ref, s.r, s.beta], pis, modules="math")
    for seed in range(10):
        ref, rewards, b = random_inputs(seed, 4)
        torch.testing.assert_close(
            torch.tensor(fn(ref.tolist(), rewards.tolist(), b), dtype=DTYPE), theory.optimal_policy(ref, rewards, b)
        )


def test_symbolic_objective_and_partition_match_theory_numerically():
    s = d.response_set(3)
    J = sp.lambdify([s.pi, s.pi_ref, s.r, s.beta], d.objective(s.pi, s.pi_ref, s.r), modules="math")
    Z = sp.lambdify([s.pi_ref, s.r, s.beta], d.partition_function(s.pi_ref, s.r), modules="math")
    for seed in range(10):
        ref, rewards, b = random_inputs(seed, 3)
        policy = torch.softmax(torch.randn(3, generator=torch.Generator().manual_seed(seed + 50), dtype=DTYPE), -1)
        assert J(policy.tolist(), ref.tolist(), rewards.tolist(), b) == pytest.approx(
            theory.kl_objective(policy, ref, rewards, b).item(), rel=1e-12, abs=1e-12
        )
        assert Z(ref.tolist(), rewards.tolist(), b) == pytest.approx(
            theory.partition(ref, rewards, b).item(), rel=1e-12
        )


# --- notebook 02 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
def test_objective_identity_holds_on_the_simplex(n):
    s = d.response_set(n)
    assert d.optimal_policy_sums_to_one(s)
    assert d.objective_identity_holds(s)


def test_objective_identity_needs_sum_to_one():
    s = d.response_set(3)
    residual = d.objective_identity_residual(s, use_sum_to_one=False)
    assert d.is_zero(residual - beta * sp.log(d.partition_function(s.pi_ref, s.r)) * (sum(s.pi) - 1))
    point = {
        **dict(zip(s.pi, (0.5, 0.5, 0.5))),
        **dict(zip(s.pi_ref, (0.2, 0.3, 0.5))),
        **dict(zip(s.r, (3, 0, -1))),
        beta: 1,
    }
    assert abs(numeric_value(residual, point)) > 0.5  # off the simplex the identity is false


def test_reversed_kl_is_not_the_identity():
    s = d.response_set(3)
    J = d.objective(s.pi, s.pi_ref, s.r)
    Z = d.partition_function(s.pi_ref, s.r)
    pi_star = d.optimal_policy(s.pi_ref, s.r)
    wrong = (J - (-beta * d.kl(pi_star, s.pi) + beta * sp.log(Z))).subs(d.sum_to_one(s.pi))
    assert not d.is_zero(wrong)
    point = {
        **dict(zip(s.pi[:2], (0.1, 0.1))),
        **dict(zip(s.pi_ref, (0.25, 0.25, 0.5))),
        **dict(zip(s.r, (3, 0, -3))),
        beta: 1,
    }
    assert abs(numeric_value(wrong, point)) > 1


def test_gibbs_inequality_pieces():
    assert d.kl_as_gibbs_terms_residual(3) == 0
    assert d.gibbs_term_is_nonnegative()


@pytest.mark.parametrize("n", [2, 3])
def test_temperature_limits(n):
    low, high, s = d.temperature_limits(n)
    assert low == (1,) + (0,) * (n - 1)
    expected_high = tuple(s.pi_ref[:-1]) + (1 - sum(s.pi_ref[:-1]),)
    assert all(d.is_zero(h - e) for h, e in zip(high, expected_high))


# --- notebook 03 ------------------------------------------------------------------------------------


def test_solved_reward_is_eq_3_1():
    p, q, z = sp.symbols("pi_star pi_ref Z", positive=True)
    assert d.is_zero(d.solve_reward() - (beta * sp.log(p) - beta * sp.log(q) + beta * sp.log(z)))
    # a sign slip (- beta log Z) is not the solution
    assert not d.is_zero(d.solve_reward() - (beta * sp.log(p / q) - beta * sp.log(z)))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_reward_reparameterisation_and_shift_invariance(n):
    s = d.response_set(n)
    assert d.reward_reparameterisation_holds(s)
    assert d.optimal_policy_is_shift_invariant(s)
    assert d.partition_function_shift_holds(s)


def test_response_dependent_shift_and_rescaling_change_the_policy():
    s = d.response_set(3)
    g = sp.symbols("g_1:4", real=True)
    residuals = d.shifted_optimal_policy_residuals(s, list(g))
    assert any(res != 0 for res in residuals)
    point = {**dict(zip(s.pi_ref, (0.5, 0.25, 0.25))), **dict(zip(s.r, (1, 0, -1))), beta: 1, g[0]: 1, g[1]: 0, g[2]: 0}
    assert abs(numeric_value(residuals[0], point)) > 0.05
    doubled = d.optimal_policy(s.pi_ref, [2 * r for r in s.r])
    assert not d.is_zero(doubled[0] - d.optimal_policy(s.pi_ref, s.r)[0])
    assert all(d.is_zero(a - b) for a, b in zip(doubled, d.optimal_policy(s.pi_ref, s.r, beta / 2)))


def test_reward_from_policy_matches_theory_numerically():
    p, q, z = sp.symbols("pi_star pi_ref Z", positive=True)
    fn = sp.lambdify([p, q, beta, z], d.reward_from_policy(p, q, beta, z), modules="math")
    ref, rewards, b = random_inputs(3, 5)
    pi_star = theory.optimal_policy(ref, rewards, b)
    log_z = theory.log_partition(ref, rewards, b)
    from_sympy = torch.tensor(
        [fn(a, c, b, math.exp(log_z.item())) for a, c in zip(pi_star.tolist(), ref.tolist())], dtype=DTYPE
    )
    torch.testing.assert_close(from_sympy, theory.reward_from_policy(pi_star, ref, b, log_z))
    torch.testing.assert_close(from_sympy, rewards)


# --- notebook 04 ------------------------------------------------------------------------------------


def test_bradley_terry_identities():
    assert d.bradley_terry_is_sigmoid()
    assert d.partition_cancels_in_bradley_terry()
    p, (u_w, u_l, z) = d.bradley_terry_after_substitution()
    assert z not in p.free_symbols
    r1, r2 = sp.symbols("r_1 r_2", real=True)
    assert not d.is_zero(d.bradley_terry(r1, r2) - d.sigmoid(r2 - r1))  # the sign matters


def test_bradley_terry_with_different_normalisers_does_not_cancel():
    # Z cancels because both responses share the prompt; with Z_w != Z_l it would not
    u_w, u_l = sp.symbols("u_w u_l", real=True)
    z_w, z_l = sp.symbols("Z_w Z_l", positive=True)
    p = d.bradley_terry(beta * u_w + beta * sp.log(z_w), beta * u_l + beta * sp.log(z_l))
    assert not d.is_zero(p - d.sigmoid(beta * (u_w - u_l)))
    assert abs(numeric_value(p - d.sigmoid(beta * (u_w - u_l)), {u_w: 0, u_l: 0, beta: 1, z_w: 3, z_l: 1})) > 0.1


def test_dpo_gradient_weight():
    assert d.dpo_gradient_weight_holds()
    (g_w, g_l), (u_w, u_l) = d.dpo_gradient()
    assert d.is_zero(g_w + g_l)
    wrong = g_w + beta * d.sigmoid(beta * (u_w - u_l))  # the weight with its argument reversed
    assert not d.is_zero(wrong)
    assert abs(numeric_value(wrong, {u_w: 1, u_l: -1, beta: 0.5})) > 0.1


def test_dpo_gradient_matches_autograd_through_losses():
    (g_w, g_l), (u_w, u_l) = d.dpo_gradient()
    fn = sp.lambdify([u_w, u_l, beta], [g_w, g_l], modules="torch")
    g = torch.Generator().manual_seed(0)
    pc, pr = (-20 + 5 * torch.randn(64, generator=g, dtype=DTYPE) for _ in range(2))
    rc, rr = pc + torch.randn(64, generator=g, dtype=DTYPE), pr + torch.randn(64, generator=g, dtype=DTYPE)
    pc, pr = pc.requires_grad_(True), pr.requires_grad_(True)
    losses.preference_loss("dpo", pc, pr, rc, rr, beta=0.3).sum().backward()
    expected_w, expected_l = fn((pc - rc).detach(), (pr - rr).detach(), torch.tensor(0.3, dtype=DTYPE))
    torch.testing.assert_close(pc.grad, expected_w)
    torch.testing.assert_close(pr.grad, expected_l)


def test_dpo_loss_matches_losses_numerically():
    u_w, u_l = sp.symbols("u_w u_l", real=True)
    fn = sp.lambdify([u_w, u_l, beta], d.dpo_loss(u_w, u_l), modules="math")
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-10 + 3 * torch.randn(16, generator=g, dtype=DTYPE) for _ in range(4))
    expected = torch.tensor(
        [fn(a - c, b_ - e, 0.5) for a, b_, c, e in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())], dtype=DTYPE
    )
    torch.testing.assert_close(losses.preference_loss("dpo", pc, pr, rc, rr, beta=0.5), expected)


# --- notebook 05 ------------------------------------------------------------------------------------


def test_plackett_luce_small_cases():
    assert d.plackett_luce_k2_is_bradley_terry()
    assert d.listwise_loss_k2_is_dpo()


@pytest.mark.parametrize("K", [2, 3, 4])
def test_plackett_luce_sums_to_one_and_partition_cancels(K):
    assert d.plackett_luce_sums_to_one(K)
    assert d.partition_cancels_in_plackett_luce(K)


def test_partition_cancels_for_symbolic_K():
    assert d.partition_cancels_in_plackett_luce_any_k()
    # the same machinery does see a difference when the shift is not common to all terms
    k, j, K = sp.symbols("k j K", integer=True, positive=True)
    a = sp.IndexedBase("a", real=True)
    c = sp.Symbol("c", real=True)
    numerator_only = sp.exp(c + a[k]) / sp.Sum(sp.exp(a[j]), (j, k, K))
    assert sp.simplify(numerator_only - sp.exp(a[k]) / sp.Sum(sp.exp(a[j]), (j, k, K))) != 0


def test_full_softmax_product_is_not_a_distribution():
    e = sp.symbols("e_1:4", positive=True)
    total = sum(sp.Mul(*(e[p[k]] / sum(e) for k in range(3))) for p in itertools.permutations(range(3)))
    assert sp.cancel(sp.together(total)) != 1
    assert total.subs(dict(zip(e, (1, 2, 3)))) == sp.Rational(1, 6)


def test_per_response_normalisers_do_not_cancel_in_plackett_luce():
    u = sp.symbols("u_1:4", real=True)
    zs = sp.symbols("Z_1:4", positive=True)
    own = d.plackett_luce([beta * uk + beta * sp.log(zk) for uk, zk in zip(u, zs)])
    shared = d.plackett_luce([beta * uk for uk in u])
    point = {**dict(zip(u, (0, 0, 0))), **dict(zip(zs, (1, 2, 3))), beta: 1}
    assert abs(numeric_value(own - shared, point)) > 0.05


@pytest.mark.parametrize("K", [3, 4])
def test_plackett_luce_matches_theory_numerically(K):
    r = sp.symbols(f"r_1:{K + 1}", real=True)
    fn = sp.lambdify([r], d.plackett_luce(list(r)), modules="math")
    g = torch.Generator().manual_seed(K)
    rewards = 2 * torch.randn(20, K, generator=g, dtype=DTYPE)
    expected = torch.tensor([fn(row) for row in rewards.tolist()], dtype=DTYPE)
    torch.testing.assert_close(theory.plackett_luce_prob(rewards), expected)


@pytest.mark.parametrize("K", [2, 3, 4])
def test_listwise_loss_matches_losses_numerically(K):
    u = sp.symbols(f"u_1:{K + 1}", real=True)
    fn = sp.lambdify([u, beta], d.listwise_dpo_loss(list(u)), modules="math")
    g = torch.Generator().manual_seed(10 + K)
    policy_logps = -15 + 3 * torch.randn(12, K, generator=g, dtype=DTYPE)
    ref_logps = policy_logps + torch.randn(12, K, generator=g, dtype=DTYPE)
    expected = torch.tensor([fn(row, 0.4) for row in (policy_logps - ref_logps).tolist()], dtype=DTYPE)
    torch.testing.assert_close(losses.plackett_luce_loss(policy_logps, ref_logps, 0.4), expected)


def test_gumbel_race_is_bradley_terry():
    probability, dd = d.gumbel_race_probability()
    assert d.gumbel_race_is_bradley_terry()
    assert not d.is_zero(probability - d.sigmoid(-dd))

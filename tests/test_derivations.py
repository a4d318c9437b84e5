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
    p, (_, _, z) = d.bradley_terry_after_substitution()
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


# --- any N: the identities with an indexed family and symbolic sums -----------------------------------


def at_n(expr, s: d.IndexedResponseSet, n: int, subs: dict):
    """``expr`` of a symbolic-N identity at N = n, its sums written out, then its indexed symbols set to numbers.

    ``subs`` maps an IndexedBase to n numbers (or a Symbol to a number).
    """
    concrete = expr.subs(s.N, n).doit()
    values = {}
    for key, value in subs.items():
        if isinstance(key, sp.IndexedBase):
            values.update({key[k + 1]: v for k, v in enumerate(value)})
        else:
            values[key] = value
    return float(sp.N(concrete.subs(values)))


@pytest.fixture(scope="module")
def sn():
    return d.indexed_response_set()


def test_pull_constants_moves_only_what_is_free_of_the_index(sn):
    i, j = sn.i, sn.j
    z = sn.sum(sn.pi_ref[j], j)
    pulled = d.pull_constants(sn.sum(sn.pi[i] * sp.log(z) + sn.r[i] * sp.exp((sn.r[i] + 1) / beta)))
    expected = sp.log(z) * sn.sum(sn.pi[i]) + sp.exp(1 / beta) * sn.sum(sn.r[i] * sp.exp(sn.r[i] / beta))
    assert d.is_zero(pulled - expected)
    # and the pulled form has the same value as the original at N = 3
    values = {sn.pi: (0.2, 0.3, 0.5), sn.pi_ref: (0.1, 0.6, 0.3), sn.r: (1.0, -2.0, 0.5), beta: 0.7}
    original = sn.sum(sn.pi[i] * sp.log(z) + sn.r[i] * sp.exp((sn.r[i] + 1) / beta))
    assert at_n(pulled, sn, 3, values) == pytest.approx(at_n(original, sn, 3, values), rel=1e-12)


def test_stationary_point_any_n(sn):
    assert d.stationary_point_is_optimal_policy_any_n(sn)
    pi_k, lam_star, k = d.stationary_point_any_n(sn)
    # at N = 4, response k = 2, it is theory.optimal_policy's second entry
    ref, rewards, b = random_inputs(5, 4)
    value = at_n(pi_k.subs(k, 2), sn, 4, {sn.pi_ref: ref.tolist(), sn.r: rewards.tolist(), beta: b})
    assert value == pytest.approx(theory.optimal_policy(ref, rewards, b)[1].item(), rel=1e-12)
    expected_lam = b * theory.log_partition(ref, rewards, b).item() - b
    assert at_n(lam_star, sn, 4, {sn.pi_ref: ref.tolist(), sn.r: rewards.tolist(), beta: b}) == pytest.approx(
        expected_lam, rel=1e-12
    )


def test_hessian_entry_any_n(sn):
    entry, k, l = d.hessian_entry_any_n(sn)
    assert d.is_zero(entry + beta * sp.KroneckerDelta(k, l) / sn.pi[k])
    s3 = d.response_set(3)  # the same entries as the N = 3 matrix
    for a, b_ in itertools.product(range(3), repeat=2):
        value = entry.subs({k: a + 1, l: b_ + 1}).subs({sn.pi[a + 1]: s3.pi[a]})
        assert d.is_zero(value - d.hessian(s3)[a, b_])


def test_objective_identity_any_n(sn):
    assert d.optimal_policy_sums_to_one_any_n(sn)
    assert d.objective_identity_holds_any_n(sn)
    free = d.objective_identity_residual_any_n(sn, use_sum_to_one=False)
    z = d.partition_function_any_n(sn)
    assert d.is_zero(free - beta * sp.log(z) * (sn.sum(sn.pi[sn.i]) - 1))
    # a numeric witness: off the simplex (sum pi = 1.5) the residual is beta log Z * 0.5, not 0
    values = {sn.pi: (0.5, 0.5, 0.5), sn.pi_ref: (0.2, 0.3, 0.5), sn.r: (3.0, 0.0, -1.0), beta: 1.0}
    expected = 0.5 * math.log(0.2 * math.e**3 + 0.3 + 0.5 * math.e**-1)
    assert at_n(free, sn, 3, values) == pytest.approx(expected, rel=1e-12)
    assert abs(expected) > 0.5


def test_objective_identity_any_n_agrees_with_theory_at_n_5(sn):
    # J(pi) and -beta KL(pi || pi*) + beta log Z, both built from the any-N objects, at N = 5 against dpolab.theory
    ref, rewards, b = random_inputs(11, 5)
    policy = torch.softmax(torch.randn(5, generator=torch.Generator().manual_seed(12), dtype=DTYPE), -1)
    values = {sn.pi: policy.tolist(), sn.pi_ref: ref.tolist(), sn.r: rewards.tolist(), beta: b}
    assert at_n(d.objective_any_n(sn), sn, 5, values) == pytest.approx(
        theory.kl_objective(policy, ref, rewards, b).item(), rel=1e-12
    )
    assert at_n(sp.log(d.partition_function_any_n(sn)), sn, 5, values) == pytest.approx(
        theory.log_partition(ref, rewards, b).item(), rel=1e-12
    )


def test_gibbs_terms_any_n():
    assert d.kl_as_gibbs_terms_residual_any_n() == 0


def test_shift_invariance_any_n_and_its_converse(sn):
    assert d.optimal_policy_is_shift_invariant_any_n(sn)
    assert d.partition_function_shift_holds_any_n(sn)
    difference = d.reward_difference_any_n(sn)
    assert sn.i not in difference.free_symbols  # the same number for every response
    r_new = sp.IndexedBase("r'", real=True)
    z_new = d.partition_function_any_n(sn, lambda index: r_new[index])
    assert d.is_zero(difference - (beta * sp.log(z_new) - beta * sp.log(d.partition_function_any_n(sn))))


def test_response_dependent_shift_any_n_changes_the_policy(sn):
    # a numeric witness that the any-N invariance is not vacuous: shift only response 1 (g = 1 at i = 1) at N = 3
    g = sp.IndexedBase("g", real=True)
    shifted = d.optimal_policy_any_n(sn, lambda index: sn.r[index] + g[index])
    values = {sn.pi_ref: (0.5, 0.25, 0.25), sn.r: (1.0, 0.0, -1.0), g: (1.0, 0.0, 0.0), beta: 1.0}
    residual = at_n((shifted - d.optimal_policy_any_n(sn)).subs(sn.i, 1), sn, 3, values)
    assert abs(residual) > 0.05


@pytest.mark.parametrize("n", [2, 3, 4])
def test_rewards_with_the_same_optimal_policy_differ_by_a_constant(n):
    s = d.response_set(n)
    solved, e_1 = d.rewards_with_the_same_optimal_policy(s)
    assert d.reward_difference_is_constant(s)
    known = set(s.r) | set(s.pi_ref) | {beta}
    assert set().union(*(r_new.free_symbols for r_new in solved)) - known == {e_1}  # one free parameter
    # numerically: pick e_1, build r', and theory.optimal_policy(r') == theory.optimal_policy(r)
    ref, rewards, b = random_inputs(20 + n, n)
    fn = sp.lambdify([s.pi_ref, s.r, beta, e_1], solved, modules="math")
    r_new = torch.tensor(fn(ref.tolist(), rewards.tolist(), b, 3.7), dtype=DTYPE)
    torch.testing.assert_close(theory.optimal_policy(ref, r_new, b), theory.optimal_policy(ref, rewards, b))
    shift = r_new - rewards
    torch.testing.assert_close(shift, torch.full_like(shift, b * math.log(3.7) - rewards[0].item()))


# --- notebook 07: what pairwise comparisons pin down ---------------------------------------------------


@pytest.mark.parametrize("n", [3, 4, 6])
@pytest.mark.parametrize("graph", [d.chain_graph, d.star_graph])
def test_connected_comparisons_force_one_shared_constant(n, graph):
    s = d.response_set(n)
    _, free = d.solve_pairwise_optimality(s, graph(n))
    assert len(free) == 1
    assert len(d.shared_constants(s, graph(n))) == 1
    assert d.pairwise_optimum_is_optimal_policy(s, graph(n))


def test_graphs():
    assert d.chain_graph(4) == ((0, 1), (1, 2), (2, 3))
    assert d.star_graph(4) == ((0, 1), (0, 2), (0, 3))


def test_disconnected_comparisons_leave_the_split_free():
    s = d.response_set(6)
    groups = ((0, 1), (1, 2), (3, 4), (4, 5))  # {y1, y2, y3} and {y4, y5, y6}, never compared across
    solution, free = d.solve_pairwise_optimality(s, groups)
    assert len(free) == 2 and len(d.shared_constants(s, groups)) == 2
    # a numeric witness: two solutions of every condition (7.5) on these pairs, with different policies
    ref = torch.tensor([0.1, 0.2, 0.2, 0.1, 0.3, 0.1], dtype=DTYPE)
    rewards = torch.tensor([1.0, -0.5, 0.0, 0.5, -1.0, 0.25], dtype=DTYPE)
    numbers = {**dict(zip(s.pi_ref, ref.tolist())), **dict(zip(s.r, rewards.tolist())), beta: 1.0}
    policies = []
    for values in ({free[0]: 0.0, free[1]: 0.0}, {free[0]: 0.0, free[1]: 2.0}):
        u = [float(sp.N(expr.subs(values).subs(numbers))) for expr in solution.values()]
        conditions = d.pairwise_optimality_conditions(s, groups, u)
        assert all(abs(float(sp.N(c.subs(numbers)))) < 1e-12 for c in conditions)
        policies.append(torch.softmax(ref.log() + torch.tensor(u, dtype=DTYPE), -1))
    assert 0.5 * (policies[0] - policies[1]).abs().sum() > 0.1


def test_shared_constant_any_n(sn):
    assert d.shared_constant_suffices_any_n(sn)
    assert d.chain_forces_shared_constant_any_n(sn)
    assert d.star_forces_shared_constant_any_n(sn)


def test_tabular_policy_matches_softmax():
    s = d.response_set(3)
    u = sp.symbols("u_1:4", real=True)
    fn = sp.lambdify([s.pi_ref, u], d.tabular_policy(s.pi_ref, u), modules="math")
    ref = torch.tensor([0.2, 0.5, 0.3], dtype=DTYPE)
    logratios = torch.tensor([1.0, -0.5, 0.25], dtype=DTYPE)
    torch.testing.assert_close(
        torch.tensor(fn(ref.tolist(), logratios.tolist()), dtype=DTYPE), torch.softmax(ref.log() + logratios, -1)
    )

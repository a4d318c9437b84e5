"""The sympy derivations behind notebooks 01-05 and 07, as small functions that notebooks and tests both assert.

One prompt x has a finite set of N candidate responses y_1..y_N. On that set a policy is just a vector of N
probabilities, so every expectation is an explicit sum and every step of the DPO derivation becomes algebra
that sympy can check. :func:`response_set` builds the symbols for a given N; :func:`indexed_response_set`
builds them for a *symbolic* N (indexed families pi[i], pi_ref[i], r[i] and ``sympy.Sum`` over i = 1..N), and
the ``*_any_n`` functions prove the same identities for every N at once. The ``*_residual`` functions return
``lhs - rhs`` of an identity (which must simplify to 0) and the ``*_holds`` / ``is_*`` functions the
boolean verdict, so a test can assert the same statement a notebook shows.

How this differs from the textbook: sympy needs the side conditions spelled out. Probabilities are declared
positive (so log(a*b) = log a + log b is allowed), rewards real, beta positive; "probabilities sum to 1" is
used by substituting p_N = 1 - (p_1 + ... + p_{N-1}) (:func:`sum_to_one`), or for a symbolic N by replacing
sum_i p_i with 1 (:func:`sum_to_one_any_n`), never silently assumed. For a symbolic N, sympy does not move a factor
that is itself a sum over another index (1/Z, log Z) out of a ``Sum``; :func:`pull_constants` does that one step.

Equation numbers refer to the notebooks (the same numbers as ``dpolab.theory``):

- (1.1) objective J(pi)           (1.2) Lagrangian          (1.3) stationarity      (1.4) stationary point
- (1.5) Hessian (concavity)       (2.1) partition Z(x)      (2.2) optimal policy    (2.3) J = -beta KL(pi||pi*) + beta log Z
- (2.4) KL as a sum of terms >= 0 (2.5) beta -> 0 / beta -> oo limits
- (3.1) reward from policy        (3.2) invariance of pi* under r -> r + f(x), and its converse
- (4.1) Bradley-Terry             (4.2) DPO loss            (4.3) its gradient
- (5.1) Plackett-Luce             (5.2) listwise DPO loss   (5.3) Z cancels for any K
- (5.4) Gumbel race: P(r_1 + G_1 > r_2 + G_2) = sigma(r_1 - r_2) for independent standard Gumbel G
- (7.5) pairwise optimality beta (u_a - u_b) = r_a - r_b on each compared pair {a, b}
- (7.6) connected comparisons force beta u_i - r_i to one shared constant, hence pi_theta = pi*
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy as sp

__all__ = [
    "ResponseSet",
    "response_set",
    "IndexedResponseSet",
    "indexed_response_set",
    "is_zero",
    "sum_to_one",
    "sum_to_one_any_n",
    "pull_constants",
    "kl",
    "objective",
    "partition_function",
    "optimal_policy",
    "sigmoid",
    "lagrangian",
    "stationarity_conditions",
    "stationary_point",
    "stationary_point_is_optimal_policy",
    "hessian",
    "objective_is_concave",
    "stationary_point_any_n",
    "stationary_point_is_optimal_policy_any_n",
    "hessian_entry_any_n",
    "optimal_policy_sums_to_one",
    "objective_identity_residual",
    "objective_identity_holds",
    "kl_as_gibbs_terms_residual",
    "gibbs_term_is_nonnegative",
    "temperature_limits",
    "partition_function_any_n",
    "optimal_policy_any_n",
    "objective_any_n",
    "optimal_policy_sums_to_one_any_n",
    "objective_identity_residual_any_n",
    "objective_identity_holds_any_n",
    "kl_as_gibbs_terms_residual_any_n",
    "reward_from_policy",
    "solve_reward",
    "reward_reparameterisation_holds",
    "shifted_optimal_policy_residuals",
    "optimal_policy_is_shift_invariant",
    "partition_function_shift_holds",
    "optimal_policy_is_shift_invariant_any_n",
    "partition_function_shift_holds_any_n",
    "rewards_with_the_same_optimal_policy",
    "reward_difference_is_constant",
    "reward_difference_any_n",
    "bradley_terry",
    "bradley_terry_is_sigmoid",
    "bradley_terry_after_substitution",
    "partition_cancels_in_bradley_terry",
    "dpo_loss",
    "dpo_gradient",
    "dpo_gradient_weight_holds",
    "plackett_luce",
    "listwise_dpo_loss",
    "plackett_luce_k2_is_bradley_terry",
    "listwise_loss_k2_is_dpo",
    "plackett_luce_sums_to_one",
    "partition_cancels_in_plackett_luce",
    "partition_cancels_in_plackett_luce_any_k",
    "gumbel_race_probability",
    "gumbel_race_is_bradley_terry",
    "chain_graph",
    "star_graph",
    "tabular_policy",
    "pairwise_optimality_conditions",
    "solve_pairwise_optimality",
    "shared_constants",
    "pairwise_optimum_is_optimal_policy",
    "shared_constant_suffices_any_n",
    "chain_forces_shared_constant_any_n",
    "star_forces_shared_constant_any_n",
]

beta = sp.Symbol("beta", positive=True)


@dataclass(frozen=True)
class ResponseSet:
    """One prompt x with N responses, as sympy symbols (notebook 00's notation table)."""

    pi: tuple[sp.Symbol, ...]  # pi(y_i|x), the policy we optimise; positive
    pi_ref: tuple[sp.Symbol, ...]  # pi_ref(y_i|x), the frozen reference; positive
    r: tuple[sp.Symbol, ...]  # r(x, y_i), the reward; real
    beta: sp.Symbol  # the KL coefficient; positive

    @property
    def n(self) -> int:
        return len(self.pi)


def response_set(n: int) -> ResponseSet:
    """Symbols pi_1..pi_n, pi_ref_1..pi_ref_n (positive), r_1..r_n (real) and beta (positive)."""
    if n < 2:
        raise ValueError(f"a response set needs at least 2 responses, got n={n}")
    return ResponseSet(
        pi=sp.symbols(f"pi_1:{n + 1}", positive=True),
        pi_ref=sp.symbols(f"pi_ref_1:{n + 1}", positive=True),
        r=sp.symbols(f"r_1:{n + 1}", real=True),
        beta=beta,
    )


@dataclass(frozen=True)
class IndexedResponseSet:
    """One prompt x with a symbolic number N of responses: pi[i], pi_ref[i], r[i] for i = 1..N."""

    pi: sp.IndexedBase  # pi[i] = pi(y_i|x); positive
    pi_ref: sp.IndexedBase  # pi_ref[i]; positive
    r: sp.IndexedBase  # r[i] = r(x, y_i); real
    beta: sp.Symbol  # the KL coefficient; positive
    i: sp.Symbol  # the index of the outer sums and of "response i"
    j: sp.Symbol  # the index of the sum inside Z(x), so that Z never captures i
    N: sp.Symbol  # the number of responses, a positive integer

    def sum(self, expr: sp.Expr, index: sp.Symbol | None = None) -> sp.Sum:
        """sum_{index=1}^{N} expr (index defaults to i)."""
        return sp.Sum(expr, (self.i if index is None else index, 1, self.N))


def indexed_response_set() -> IndexedResponseSet:
    """pi, pi_ref (positive), r (real) as indexed families over i = 1..N with N a symbol; beta positive."""
    i, j, N = sp.symbols("i j N", integer=True, positive=True)
    return IndexedResponseSet(
        pi=sp.IndexedBase("pi", positive=True),
        pi_ref=sp.IndexedBase("pi_ref", positive=True),
        r=sp.IndexedBase("r", real=True),
        beta=beta,
        i=i,
        j=j,
        N=N,
    )


def is_zero(expr: sp.Expr) -> bool:
    """True when sympy proves ``expr`` == 0. False means "not proved", which for a wrong identity is the point."""
    return sp.simplify(expr) == 0


def sum_to_one(probs: tuple[sp.Symbol, ...]) -> dict[sp.Symbol, sp.Expr]:
    """The constraint sum_i p_i = 1 as a substitution p_N -> 1 - (p_1 + ... + p_{N-1})."""
    return {probs[-1]: 1 - sum(probs[:-1])}


def sum_to_one_any_n(s: IndexedResponseSet, probs: sp.IndexedBase) -> dict[sp.Sum, int]:
    """The constraint sum_{i=1}^N p_i = 1 for a symbolic N, as the substitution Sum(p[i], (i, 1, N)) -> 1."""
    return {s.sum(probs[s.i]): 1}


def pull_constants(expr: sp.Expr) -> sp.Expr:
    """sum_i c a_i -> c sum_i a_i for every ``Sum`` in ``expr``, c being the factors free of the sum's index.

    The summand is expanded first (products distributed, exp(a + b) -> exp(a) exp(b), logs left alone), and a sum of
    terms becomes a sum of sums, so exp(c / beta) and log Z leave a sum as well.
    """

    def pull(total: sp.Sum) -> sp.Expr:
        ((index, low, high),) = total.limits
        summand = sp.expand(total.function, log=False)
        if summand.is_Add:  # sum_i (a_i + b_i) = sum_i a_i + sum_i b_i, each then pulled on its own
            return sp.Add(*(pull(sp.Sum(term, (index, low, high))) for term in summand.args))
        constant, rest = summand.as_independent(index, as_Add=False)
        return constant * sp.Sum(rest, (index, low, high))

    return expr.replace(lambda e: isinstance(e, sp.Sum), pull)


def _inside(expr: sp.Expr, k: sp.Symbol, s: IndexedResponseSet) -> sp.Expr:
    """``expr`` with N written as k + m (m >= 0): the statement for a response k that is one of the N responses.

    Differentiating sum_i f(pi_i) by pi_k gives Piecewise((f'(pi_k), k <= N), (0, True)); this picks the branch.
    """
    m = sp.Symbol("m", integer=True, nonnegative=True)
    return sp.simplify(expr.subs(s.N, k + m))


# --- building blocks ---------------------------------------------------------------------------------


def kl(p, q) -> sp.Expr:
    """KL(p || q) = sum_i p_i log(p_i / q_i) on a finite set."""
    return sum(pi * sp.log(pi / qi) for pi, qi in zip(p, q))


def objective(pi, pi_ref, r, b=beta) -> sp.Expr:
    """J(pi) = sum_i pi_i r_i - beta KL(pi || pi_ref)   (eq. 1.1 on a finite response set)."""
    return sum(p * ri for p, ri in zip(pi, r)) - b * kl(pi, pi_ref)


def partition_function(pi_ref, r, b=beta) -> sp.Expr:
    """Z(x) = sum_i pi_ref_i exp(r_i / beta)   (eq. 2.1)."""
    return sum(q * sp.exp(ri / b) for q, ri in zip(pi_ref, r))


def optimal_policy(pi_ref, r, b=beta) -> tuple[sp.Expr, ...]:
    """pi*_i = pi_ref_i exp(r_i / beta) / Z(x)   (eq. 2.2)."""
    z = partition_function(pi_ref, r, b)
    return tuple(q * sp.exp(ri / b) / z for q, ri in zip(pi_ref, r))


def sigmoid(z) -> sp.Expr:
    """sigma(z) = 1 / (1 + exp(-z)), the logistic function."""
    return 1 / (1 + sp.exp(-z))


# --- notebook 01: the Lagrangian and its stationary point -------------------------------------------


def lagrangian(s: ResponseSet, lam: sp.Symbol) -> sp.Expr:
    """L(pi, lambda) = J(pi) - lambda (sum_i pi_i - 1)   (eq. 1.2)."""
    return objective(s.pi, s.pi_ref, s.r, s.beta) - lam * (sum(s.pi) - 1)


def stationarity_conditions(s: ResponseSet, lam: sp.Symbol) -> list[sp.Expr]:
    """dL/dpi_i = r_i - beta (log(pi_i / pi_ref_i) + 1) - lambda, one per response   (eq. 1.3)."""
    L = lagrangian(s, lam)
    return [sp.diff(L, p) for p in s.pi]


def stationary_point(s: ResponseSet) -> tuple[tuple[sp.Expr, ...], sp.Expr]:
    """Solve (1.3) for each pi_i, then the constraint for lambda   (eq. 1.4).

    Returns (pi_1..pi_N at the stationary point, the multiplier lambda there).
    """
    lam = sp.Symbol("lambda", real=True)
    pis = []
    for p, condition in zip(s.pi, stationarity_conditions(s, lam)):
        (solution,) = sp.solve(condition, p)  # pi_i = pi_ref_i exp((r_i - beta - lambda) / beta)
        pis.append(solution)
    (lam_star,) = sp.solve(sp.Eq(sum(pis), 1), lam)  # lambda = beta log Z - beta
    return tuple(p.subs(lam, lam_star) for p in pis), lam_star


def stationary_point_is_optimal_policy(s: ResponseSet) -> bool:
    """The solution of (1.4) is pi_ref exp(r / beta) / Z, i.e. eq. (2.2)."""
    pis, _ = stationary_point(s)
    return all(is_zero(a - b) for a, b in zip(pis, optimal_policy(s.pi_ref, s.r, s.beta)))


def hessian(s: ResponseSet) -> sp.Matrix:
    """d^2 J / dpi_i dpi_j = -beta / pi_i on the diagonal, 0 elsewhere   (eq. 1.5)."""
    return sp.hessian(objective(s.pi, s.pi_ref, s.r, s.beta), s.pi)


def objective_is_concave(s: ResponseSet) -> bool:
    """The Hessian (1.5) is diagonal with negative entries, so J is strictly concave on the simplex."""
    H = hessian(s)
    diagonal = all(H[i, j] == 0 for i in range(s.n) for j in range(s.n) if i != j)
    return diagonal and all(H[i, i].is_negative for i in range(s.n))


def _lagrangian_any_n(s: IndexedResponseSet, lam: sp.Symbol) -> sp.Expr:
    """(1.2) for a symbolic N: sum_i pi_i r_i - beta sum_i pi_i log(pi_i / pi_ref_i) - lambda (sum_i pi_i - 1)."""
    i = s.i
    return objective_any_n(s) - lam * (s.sum(s.pi[i]) - 1)


def stationary_point_any_n(s: IndexedResponseSet) -> tuple[sp.Expr, sp.Expr, sp.Symbol]:
    """(1.3)-(1.4) for every N: differentiate the Lagrangian by pi_k, solve for pi_k, then fix lambda by sum_k pi_k = 1.

    Returns (pi_k at the stationary point, lambda there, k). The derivative of a ``Sum`` by pi[k] is a sum of
    Kronecker deltas that sympy evaluates to the k-th term once k is one of the N responses (``_inside``).
    """
    lam = sp.Symbol("lambda", real=True)
    k = sp.Symbol("k", integer=True, positive=True)
    condition = _inside(sp.diff(_lagrangian_any_n(s, lam), s.pi[k]).doit(), k, s)  # eq. (1.3) for response k
    (pi_k,) = sp.solve(condition, s.pi[k])  # pi_ref_k exp((r_k - beta - lambda) / beta)
    total = pull_constants(s.sum(pi_k.subs(k, s.i)))  # exp(-1 - lambda/beta) * Z
    (lam_star,) = sp.solve(sp.Eq(total, 1), lam)  # lambda = beta log Z - beta
    return pi_k.subs(lam, lam_star), lam_star, k


def stationary_point_is_optimal_policy_any_n(s: IndexedResponseSet) -> bool:
    """For every N the stationary point of (1.2) is pi_ref_k exp(r_k / beta) / Z, Z = sum_j pi_ref_j exp(r_j / beta)."""
    pi_k, lam_star, k = stationary_point_any_n(s)
    z = partition_function_any_n(s)
    expected = s.pi_ref[k] * sp.exp(s.r[k] / s.beta) / z
    return is_zero((pi_k - expected).as_dummy()) and is_zero((lam_star - (s.beta * sp.log(z) - s.beta)).as_dummy())


def hessian_entry_any_n(s: IndexedResponseSet) -> tuple[sp.Expr, sp.Symbol, sp.Symbol]:
    """d^2 J / dpi_k dpi_l for a symbolic N: -beta KroneckerDelta(k, l) / pi_k   (eq. 1.5). Returns (entry, k, l)."""
    k, l = sp.symbols("k l", integer=True, positive=True)
    entry = sp.diff(objective_any_n(s), s.pi[k], s.pi[l]).doit()  # Piecewise on k <= N
    return _inside(entry, k, s), k, l


# --- notebook 02: the partition function and the identity behind pi* --------------------------------


def optimal_policy_sums_to_one(s: ResponseSet) -> bool:
    """sum_i pi*_i = 1: dividing by Z(x) is exactly what makes (2.2) a distribution."""
    return is_zero(sum(optimal_policy(s.pi_ref, s.r, s.beta)) - 1)


def objective_identity_residual(s: ResponseSet, use_sum_to_one: bool = True) -> sp.Expr:
    """J(pi) - [ -beta KL(pi || pi*) + beta log Z ] for symbolic pi, pi_ref, r   (eq. 2.3).

    Without the constraint the residual is beta log Z (sum_i pi_i - 1): the identity needs sum_i pi_i = 1,
    which is used by substituting pi_N = 1 - (pi_1 + ... + pi_{N-1}) after the logs are expanded.
    """
    z = partition_function(s.pi_ref, s.r, s.beta)
    rhs = -s.beta * kl(s.pi, optimal_policy(s.pi_ref, s.r, s.beta)) + s.beta * sp.log(z)
    # log(pi_i / pi*_i) = log pi_i - log pi_ref_i - r_i/beta + log Z: allowed because every factor is positive
    residual = sp.expand(sp.expand_log(objective(s.pi, s.pi_ref, s.r, s.beta) - rhs))
    if use_sum_to_one:
        residual = residual.subs(sum_to_one(s.pi))
    return sp.simplify(residual)


def objective_identity_holds(s: ResponseSet) -> bool:
    """Eq. (2.3) is an identity on the simplex (and fails off it: see ``use_sum_to_one=False``)."""
    return objective_identity_residual(s) == 0


def kl_as_gibbs_terms_residual(n: int) -> sp.Expr:
    """KL(p || q) - sum_i p_i g(q_i / p_i) with g(t) = t - 1 - log t, for p and q on the simplex   (eq. 2.4).

    The extra sum_i (q_i - p_i) is 0 because both sum to 1, so KL is a p-weighted sum of g's, each >= 0.
    """
    p = sp.symbols(f"p_1:{n + 1}", positive=True)
    q = sp.symbols(f"q_1:{n + 1}", positive=True)
    t = sp.Symbol("t", positive=True)
    g = sp.Lambda(t, t - 1 - sp.log(t))
    residual = kl(p, q) - sum(pi * g(qi / pi) for pi, qi in zip(p, q))
    residual = sp.expand(sp.expand_log(residual)).subs(sum_to_one(p)).subs(sum_to_one(q))
    return sp.simplify(residual)


def gibbs_term_is_nonnegative() -> bool:
    """g(t) = t - 1 - log t >= 0 for t > 0, with equality only at t = 1: g'(1) = 0, g(1) = 0, g'' = 1/t^2 > 0."""
    t = sp.Symbol("t", positive=True)
    g = t - 1 - sp.log(t)
    critical = sp.solve(sp.diff(g, t), t)
    return critical == [1] and g.subs(t, 1) == 0 and sp.diff(g, t, 2).is_positive


def temperature_limits(n: int = 3) -> tuple[tuple[sp.Expr, ...], tuple[sp.Expr, ...], ResponseSet]:
    """lim_{beta->0+} pi* and lim_{beta->oo} pi* on n responses where y_1 has the strictly largest reward (eq. 2.5).

    Rewards are written r_i = r_1 - d_i with gaps d_i > 0, and pi* is first rewritten by multiplying numerator
    and denominator by exp(-r_1/beta) (checked to be the same expression), so that only exp(-d_i/beta) remains:
    sympy cannot take the limit of exp(r_1/beta) without knowing the sign of r_1. Returns
    (limit as beta -> 0+, limit as beta -> oo with pi_ref on the simplex, the symbols used).
    """
    s = response_set(n)
    gaps = (sp.Integer(0),) + sp.symbols(f"d_2:{n + 1}", positive=True)
    rewards = tuple(s.r[0] - d for d in gaps)
    pi_star = optimal_policy(s.pi_ref, rewards, s.beta)
    pi_star_gaps = optimal_policy(s.pi_ref, tuple(-d for d in gaps), s.beta)  # the same, divided by exp(r_1/beta)
    assert all(is_zero(a - b) for a, b in zip(pi_star, pi_star_gaps))
    low = tuple(sp.limit(p, s.beta, 0, "+") for p in pi_star_gaps)
    high = tuple(sp.simplify(sp.limit(p, s.beta, sp.oo).subs(sum_to_one(s.pi_ref))) for p in pi_star)
    return low, high, s


def partition_function_any_n(s: IndexedResponseSet, reward=None) -> sp.Sum:
    """Z(x) = sum_{j=1}^N pi_ref_j exp(r_j / beta) for a symbolic N   (eq. 2.1).

    ``reward(index)`` is the reward of response ``index`` (default r[index]; e.g. ``lambda j: s.r[j] + f``).
    """
    reward = (lambda index: s.r[index]) if reward is None else reward
    return s.sum(s.pi_ref[s.j] * sp.exp(reward(s.j) / s.beta), s.j)


def optimal_policy_any_n(s: IndexedResponseSet, reward=None) -> sp.Expr:
    """pi*_i = pi_ref_i exp(r_i / beta) / Z(x) for a symbolic N   (eq. 2.2); ``reward`` as in Z."""
    reward = (lambda index: s.r[index]) if reward is None else reward
    return s.pi_ref[s.i] * sp.exp(reward(s.i) / s.beta) / partition_function_any_n(s, reward)


def objective_any_n(s: IndexedResponseSet) -> sp.Expr:
    """J(pi) = sum_{i=1}^N pi_i r_i - beta sum_{i=1}^N pi_i log(pi_i / pi_ref_i) for a symbolic N   (eq. 1.1)."""
    i = s.i
    return s.sum(s.pi[i] * s.r[i]) - s.beta * s.sum(s.pi[i] * sp.log(s.pi[i] / s.pi_ref[i]))


def optimal_policy_sums_to_one_any_n(s: IndexedResponseSet) -> bool:
    """sum_i pi*_i = (sum_i pi_ref_i e^{r_i/beta}) / Z = 1 for every N (the two sums differ only in the index name)."""
    total = pull_constants(s.sum(optimal_policy_any_n(s)))
    return is_zero(total.as_dummy() - 1)


def objective_identity_residual_any_n(s: IndexedResponseSet, use_sum_to_one: bool = True) -> sp.Expr:
    """J(pi) - [ -beta KL(pi || pi*) + beta log Z ] for a symbolic N   (eq. 2.3).

    The logs are expanded (every factor is positive), the sums split and log Z pulled out of them; what is left
    is beta log Z (sum_i pi_i - 1), which sum_i pi_i = 1 (``use_sum_to_one``) sends to 0.
    """
    i = s.i
    z = partition_function_any_n(s)
    rhs = -s.beta * s.sum(s.pi[i] * sp.log(s.pi[i] / optimal_policy_any_n(s))) + s.beta * sp.log(z)
    residual = sp.simplify(pull_constants(sp.expand(sp.expand_log(objective_any_n(s) - rhs))))
    if use_sum_to_one:
        residual = sp.simplify(residual.subs(sum_to_one_any_n(s, s.pi)))
    return residual


def objective_identity_holds_any_n(s: IndexedResponseSet) -> bool:
    """Eq. (2.3) for every N at once, not just for the N = 2, 3, 4 that :func:`objective_identity_holds` checks."""
    return objective_identity_residual_any_n(s) == 0


def kl_as_gibbs_terms_residual_any_n() -> sp.Expr:
    """KL(p || q) - sum_i p_i g(q_i / p_i), g(t) = t - 1 - log t, for p, q on the simplex and a symbolic N (eq. 2.4).

    Before sum-to-one the residual is sum_i (p_i - q_i); both sums are 1, so it is 0.
    """
    s = indexed_response_set()
    p, q = sp.IndexedBase("p", positive=True), sp.IndexedBase("q", positive=True)
    i = s.i
    t = sp.Symbol("t", positive=True)
    g = sp.Lambda(t, t - 1 - sp.log(t))
    residual = s.sum(p[i] * sp.log(p[i] / q[i])) - s.sum(p[i] * g(q[i] / p[i]))
    residual = pull_constants(sp.expand(sp.expand_log(residual)))
    return sp.simplify(residual.subs(sum_to_one_any_n(s, p)).subs(sum_to_one_any_n(s, q)))


# --- notebook 03: the reward in terms of the optimal policy ------------------------------------------


def reward_from_policy(pi_star, pi_ref, b=beta, z=None) -> sp.Expr:
    """r = beta log(pi* / pi_ref) + beta log Z(x)   (eq. 3.1); ``z`` defaults to a positive symbol Z."""
    z = sp.Symbol("Z", positive=True) if z is None else z
    return b * sp.log(pi_star / pi_ref) + b * sp.log(z)


def solve_reward() -> sp.Expr:
    """Solve pi* = pi_ref exp(r / beta) / Z for r, with Z a positive symbol; returns the expanded solution."""
    p, q, z = sp.symbols("pi_star pi_ref Z", positive=True)
    r = sp.Symbol("r", real=True)
    (solution,) = sp.solve(sp.Eq(p, q * sp.exp(r / beta) / z), r)
    return sp.expand(sp.expand_log(solution))


def reward_reparameterisation_holds(s: ResponseSet) -> bool:
    """Eq. (3.1) both ways: solving (2.2) for r gives (3.1), and (3.1) applied to pi*(r) with Z(r) returns r."""
    p, q, z = sp.symbols("pi_star pi_ref Z", positive=True)
    solved = is_zero(solve_reward() - reward_from_policy(p, q, beta, z))
    z_r = partition_function(s.pi_ref, s.r, s.beta)
    pi_star = optimal_policy(s.pi_ref, s.r, s.beta)
    round_trip = all(
        is_zero(sp.expand_log(reward_from_policy(ps, q_i, s.beta, z_r)) - r_i)
        for ps, q_i, r_i in zip(pi_star, s.pi_ref, s.r)
    )
    return solved and round_trip


def shifted_optimal_policy_residuals(s: ResponseSet, shifts) -> tuple[sp.Expr, ...]:
    """pi*(r + shift) - pi*(r), response by response; ``shifts`` is one expression or one per response."""
    if not isinstance(shifts, (tuple, list)):
        shifts = (shifts,) * s.n
    shifted = optimal_policy(s.pi_ref, tuple(ri + f for ri, f in zip(s.r, shifts)), s.beta)
    return tuple(sp.simplify(a - b) for a, b in zip(shifted, optimal_policy(s.pi_ref, s.r, s.beta)))


def optimal_policy_is_shift_invariant(s: ResponseSet) -> bool:
    """pi* is unchanged by r(x, y) -> r(x, y) + f(x), f the same for every response of a prompt   (eq. 3.2)."""
    f = sp.Symbol("f", real=True)  # f(x): one number per prompt
    return all(res == 0 for res in shifted_optimal_policy_residuals(s, f))


def partition_function_shift_holds(s: ResponseSet) -> bool:
    """Z(r + f) = exp(f / beta) Z(r): the shift moves Z, and pi* = pi_ref exp(r/beta) / Z absorbs it."""
    f = sp.Symbol("f", real=True)
    shifted = partition_function(s.pi_ref, tuple(ri + f for ri in s.r), s.beta)
    return is_zero(shifted - sp.exp(f / s.beta) * partition_function(s.pi_ref, s.r, s.beta))


def optimal_policy_is_shift_invariant_any_n(s: IndexedResponseSet) -> bool:
    """Eq. (3.2) for every N: pi*_i(r + f) = pi*_i(r), the factor exp(f / beta) leaving Z's sum and cancelling."""
    f = sp.Symbol("f", real=True)
    shifted = optimal_policy_any_n(s, lambda index: s.r[index] + f)
    return is_zero(pull_constants(sp.expand(shifted, power_exp=True)) - optimal_policy_any_n(s))


def partition_function_shift_holds_any_n(s: IndexedResponseSet) -> bool:
    """Z(r + f) = exp(f / beta) Z(r) for every N."""
    f = sp.Symbol("f", real=True)
    shifted = partition_function_any_n(s, lambda index: s.r[index] + f)
    return is_zero(pull_constants(shifted) - sp.exp(f / s.beta) * partition_function_any_n(s))


def rewards_with_the_same_optimal_policy(s: ResponseSet) -> tuple[tuple[sp.Expr, ...], sp.Symbol]:
    """Solve pi*(r') = pi*(r) for the unknown rewards r'_1..r'_N: the converse of (3.2), for a given N.

    With e_i = exp(r'_i / beta) > 0 the N equations pi_ref_i e_i / sum_j pi_ref_j e_j = pi*_i(r) become linear
    and homogeneous in e (multiply by the sum). They have rank N - 1, so sympy returns e_2..e_N in terms of the
    free e_1; then r'_i = beta log e_i. Returns (r'_1..r'_N, the free parameter e_1).
    """
    e = sp.symbols(f"e_1:{s.n + 1}", positive=True)
    weights = sum(q * e_i for q, e_i in zip(s.pi_ref, e))
    equations = [q * e_i - p_i * weights for q, e_i, p_i in zip(s.pi_ref, e, optimal_policy(s.pi_ref, s.r, s.beta))]
    (solution,) = sp.solve(equations, e[1:], dict=True)
    return tuple(s.beta * sp.log(e_i.subs(solution)) for e_i in e), e[0]


def reward_difference_is_constant(s: ResponseSet) -> bool:
    """Every solution r' of pi*(r') = pi*(r) has r'_i - r_i = beta log e_1 - r_1, the same number for every response."""
    solved, e_1 = rewards_with_the_same_optimal_policy(s)
    differences = [sp.simplify(sp.expand_log(r_new - r_i)) for r_new, r_i in zip(solved, s.r)]
    return all(is_zero(delta - (s.beta * sp.log(e_1) - s.r[0])) for delta in differences)


def reward_difference_any_n(s: IndexedResponseSet) -> sp.Expr:
    """The converse of (3.2) for every N: solve pi*_i(r') = pi*_i(r) for r'_i; returns r'_i - r_i.

    The result is beta log Z(r') - beta log Z(r): it contains the index i nowhere, i.e. it is one number for all
    responses of the prompt. (Z(r') itself contains r'_i; read the solution as "r'_i - r_i equals this number".)
    """
    r_new = sp.IndexedBase("r'", real=True)
    i = s.i
    equation = sp.Eq(optimal_policy_any_n(s, lambda index: r_new[index]), optimal_policy_any_n(s))
    (solution,) = sp.solve(equation, r_new[i])
    return sp.expand(sp.expand_log(solution - s.r[i]))


# --- notebook 04: Bradley-Terry and the DPO loss ----------------------------------------------------


def bradley_terry(r_1, r_2) -> sp.Expr:
    """P(y_1 > y_2 | x) = exp(r_1) / (exp(r_1) + exp(r_2))   (eq. 4.1)."""
    return sp.exp(r_1) / (sp.exp(r_1) + sp.exp(r_2))


def bradley_terry_is_sigmoid() -> bool:
    """exp(r_1) / (exp(r_1) + exp(r_2)) = sigma(r_1 - r_2): divide numerator and denominator by exp(r_1)."""
    r_1, r_2 = sp.symbols("r_1 r_2", real=True)
    return is_zero(bradley_terry(r_1, r_2) - sigmoid(r_1 - r_2))


def bradley_terry_after_substitution() -> tuple[sp.Expr, tuple[sp.Symbol, ...]]:
    """BT with both rewards written as (3.1), r = beta u + beta log Z, u = log(pi/pi_ref) the log-ratio.

    Returns (the simplified probability, (u_w, u_l, Z)); Z no longer appears in it.
    """
    u_w, u_l = sp.symbols("u_w u_l", real=True)
    z = sp.Symbol("Z", positive=True)
    r_w = beta * u_w + beta * sp.log(z)
    r_l = beta * u_l + beta * sp.log(z)
    return sp.simplify(bradley_terry(r_w, r_l)), (u_w, u_l, z)


def partition_cancels_in_bradley_terry() -> bool:
    """After substituting (3.1), P(y_w > y_l) = sigma(beta u_w - beta u_l) and Z is gone (the step to eq. 4.2)."""
    p, (u_w, u_l, z) = bradley_terry_after_substitution()
    return z not in p.free_symbols and is_zero(p - sigmoid(beta * u_w - beta * u_l))


def dpo_loss(u_w, u_l, b=beta) -> sp.Expr:
    """L_DPO = -log sigma(beta u_w - beta u_l), u = log pi_theta(y|x) - log pi_ref(y|x)   (eq. 4.2)."""
    return -sp.log(sigmoid(b * u_w - b * u_l))


def dpo_gradient() -> tuple[tuple[sp.Expr, sp.Expr], tuple[sp.Symbol, sp.Symbol]]:
    """(dL/du_w, dL/du_l) of (4.2), differentiated by sympy; returns (gradient, (u_w, u_l))."""
    u_w, u_l = sp.symbols("u_w u_l", real=True)
    loss = dpo_loss(u_w, u_l)
    return (sp.diff(loss, u_w), sp.diff(loss, u_l)), (u_w, u_l)


def dpo_gradient_weight_holds() -> bool:
    """dL/du_w = -beta sigma(rhat_l - rhat_w) and dL/du_l = +beta sigma(rhat_l - rhat_w), rhat = beta u   (eq. 4.3)."""
    (g_w, g_l), (u_w, u_l) = dpo_gradient()
    weight = sigmoid(beta * u_l - beta * u_w)
    return is_zero(g_w + beta * weight) and is_zero(g_l - beta * weight)


# --- notebook 05: Plackett-Luce and listwise DPO ----------------------------------------------------


def plackett_luce(ranked_rewards) -> sp.Expr:
    """P(tau | x) = prod_k exp(r_k) / sum_{j>=k} exp(r_j), rewards listed best first   (eq. 5.1)."""
    K = len(ranked_rewards)
    return sp.Mul(*(sp.exp(ranked_rewards[k]) / sum(sp.exp(ranked_rewards[j]) for j in range(k, K)) for k in range(K)))


def listwise_dpo_loss(u, b=beta) -> sp.Expr:
    """L_DPO-PL = -log P_PL(beta u_1, ..., beta u_K), u_k the log-ratios listed best first   (eq. 5.2)."""
    return -sp.log(plackett_luce([b * uk for uk in u]))


def plackett_luce_k2_is_bradley_terry() -> bool:
    """For K = 2, (5.1) is exp(r_1)/(exp(r_1) + exp(r_2)) * exp(r_2)/exp(r_2) = (4.1)."""
    r_1, r_2 = sp.symbols("r_1 r_2", real=True)
    return is_zero(plackett_luce([r_1, r_2]) - bradley_terry(r_1, r_2))


def listwise_loss_k2_is_dpo() -> bool:
    """For K = 2 the listwise loss (5.2) is the DPO loss (4.2): both are -log of the same probability.

    (Compared through exp(-loss), because sympy does not combine a difference of two logs by itself.)
    """
    u_w, u_l = sp.symbols("u_w u_l", real=True)
    return is_zero(sp.exp(-listwise_dpo_loss([u_w, u_l])) - sp.exp(-dpo_loss(u_w, u_l)))


def plackett_luce_sums_to_one(K: int) -> bool:
    """sum over all K! rankings of (5.1) is 1. Writing e_i = exp(r_i) makes it a rational function to cancel."""
    r = sp.symbols(f"r_1:{K + 1}", real=True)
    e = sp.symbols(f"e_1:{K + 1}", positive=True)
    total = sum(plackett_luce([r[i] for i in perm]) for perm in itertools.permutations(range(K)))
    total = total.subs({sp.exp(r_i): e_i for r_i, e_i in zip(r, e)})
    return sp.cancel(sp.together(total)) == 1


def partition_cancels_in_plackett_luce(K: int) -> bool:
    """(5.1) with r_k = beta u_k + beta log Z equals (5.1) with r_k = beta u_k, for this K   (eq. 5.3)."""
    u = sp.symbols(f"u_1:{K + 1}", real=True)
    z = sp.Symbol("Z", positive=True)
    with_z = plackett_luce([beta * uk + beta * sp.log(z) for uk in u])
    return is_zero(with_z - plackett_luce([beta * uk for uk in u]))


def partition_cancels_in_plackett_luce_any_k() -> bool:
    """Eq. (5.3) for a symbolic K: prod_{k=1}^K exp(c + a_k) / sum_{j=k}^K exp(c + a_j) does not depend on c.

    Each factor loses its exp(c) on its own (the sum pulls the constant factor out), so the product does too;
    here c = beta log Z(x) and a_k = beta log(pi_theta(y_k|x) / pi_ref(y_k|x)).
    """
    k, j, K = sp.symbols("k j K", integer=True, positive=True)
    a = sp.IndexedBase("a", real=True)
    c = sp.Symbol("c", real=True)

    def factor(shift):
        return sp.exp(shift + a[k]) / sp.Sum(sp.exp(shift + a[j]), (j, k, K))

    per_factor = is_zero(factor(c) - factor(0))
    product = is_zero(sp.Product(factor(c), (k, 1, K)) - sp.Product(factor(0), (k, 1, K)))
    return per_factor and product


def gumbel_race_probability() -> tuple[sp.Expr, sp.Symbol]:
    """P(r_1 + G_1 > r_2 + G_2) for independent standard Gumbel G_1, G_2, as a function of d = r_1 - r_2.

    P = integral over g of pdf(g) * CDF(g + d), with pdf(g) = exp(-g - e^-g) and CDF(g) = exp(-e^-g) (G_1 = g, and
    G_2 < g + d). The substitution t = e^-g (dg = -dt/t) turns it into integral_0^oo exp(-t (1 + e^-d)) dt.
    Returns (the probability, d).
    """
    g, d = sp.symbols("g d", real=True)
    t = sp.Symbol("t", positive=True)
    pdf = sp.exp(-g - sp.exp(-g))
    cdf = sp.Lambda(g, sp.exp(-sp.exp(-g)))
    integrand = sp.simplify((pdf * cdf(g + d)).subs(g, -sp.log(t)) / t)  # from g in (-oo, oo) to t in (0, oo)
    return sp.integrate(integrand, (t, 0, sp.oo)), d


def gumbel_race_is_bradley_terry() -> bool:
    """Sorting r + Gumbel noise ranks y_1 first with probability sigma(r_1 - r_2): BT (4.1), i.e. PL (5.1) at K = 2."""
    probability, d = gumbel_race_probability()
    return is_zero(probability - sigmoid(d))


# --- notebook 07: what pairwise comparisons pin down ------------------------------------------------


def chain_graph(n: int) -> tuple[tuple[int, int], ...]:
    """The comparisons y_1-y_2, y_2-y_3, ..., y_{n-1}-y_n (0-based indices)."""
    return tuple((a, a + 1) for a in range(n - 1))


def star_graph(n: int) -> tuple[tuple[int, int], ...]:
    """The comparisons y_1-y_2, y_1-y_3, ..., y_1-y_n: every pair includes y_1 (0-based indices)."""
    return tuple((0, b) for b in range(1, n))


def tabular_policy(pi_ref, u) -> tuple[sp.Expr, ...]:
    """pi_theta_i = pi_ref_i exp(u_i) / sum_j pi_ref_j exp(u_j): the tabular policy (7.2) with log-ratios u."""
    weights = [q * sp.exp(u_i) for q, u_i in zip(pi_ref, u)]
    return tuple(w / sum(weights) for w in weights)


def pairwise_optimality_conditions(s: ResponseSet, edges, u) -> list[sp.Expr]:
    """beta (u_a - u_b) - (r_a - r_b), one per compared pair {a, b}: each must be 0 at the minimiser   (eq. 7.5)."""
    return [s.beta * (u[a] - u[b]) - (s.r[a] - s.r[b]) for a, b in edges]


def solve_pairwise_optimality(s: ResponseSet, edges) -> tuple[dict[sp.Symbol, sp.Expr], tuple[sp.Symbol, ...]]:
    """Solve (7.5) on the compared pairs for the log-ratios u_1..u_N.

    Returns (the solution, as u_i -> expression, and the u's left free: one per connected group of responses).
    """
    u = sp.symbols(f"u_1:{s.n + 1}", real=True)
    (solution,) = sp.solve(pairwise_optimality_conditions(s, edges, u), u, dict=True)
    return {u_i: solution.get(u_i, u_i) for u_i in u}, tuple(u_i for u_i in u if u_i not in solution)


def shared_constants(s: ResponseSet, edges) -> set[sp.Expr]:
    """The distinct values of beta u_i - r_i over all responses at the solution of (7.5) on ``edges``.

    One value: a single constant c with beta u_i = r_i + c for every i, so pi_theta = pi* (7.6). Two or more:
    the groups get separate constants and the split of probability between them is not determined.
    """
    solution, _ = solve_pairwise_optimality(s, edges)
    return {sp.simplify(s.beta * u_i - r_i) for u_i, r_i in zip(solution.values(), s.r)}


def pairwise_optimum_is_optimal_policy(s: ResponseSet, edges) -> bool:
    """Eq. (7.6): every solution of (7.5) on ``edges`` gives the tabular policy pi_theta = pi* exactly."""
    solution, _ = solve_pairwise_optimality(s, edges)
    learned = tabular_policy(s.pi_ref, tuple(solution.values()))
    return all(is_zero(a - b) for a, b in zip(learned, optimal_policy(s.pi_ref, s.r, s.beta)))


def shared_constant_suffices_any_n(s: IndexedResponseSet) -> bool:
    """For every N: log-ratios with beta u_i = r_i + c (one c) give pi_theta_k = pi*_k; exp(c / beta) leaves the sum."""
    c = sp.Symbol("c", real=True)
    learned = optimal_policy_any_n(s, lambda index: s.r[index] + c)  # pi_ref exp(u) / sum with beta u = r + c
    return is_zero(pull_constants(sp.expand(learned, power_exp=True)) - optimal_policy_any_n(s))


def chain_forces_shared_constant_any_n(s: IndexedResponseSet) -> bool:
    """For every N, (7.5) on the chain y_1-y_2-...-y_N forces beta u_k - r_k = beta u_1 - r_1 for every k.

    Sum the conditions u_{i+1} - u_i = (r_{i+1} - r_i) / beta over i = 1..k-1: both sides telescope, giving
    u_k - u_1 = (r_k - r_1) / beta; sympy evaluates both telescoping sums and solves for u_k.
    """
    u = sp.IndexedBase("u", real=True)
    i, k = s.i, sp.Symbol("k", integer=True, positive=True)
    lhs = sp.Sum(u[i + 1] - u[i], (i, 1, k - 1)).doit()
    rhs = sp.Sum((s.r[i + 1] - s.r[i]) / s.beta, (i, 1, k - 1)).doit()
    (u_k,) = sp.solve(sp.Eq(lhs, rhs), u[k])
    return is_zero((s.beta * u_k - s.r[k]) - (s.beta * u[1] - s.r[1]))


def star_forces_shared_constant_any_n(s: IndexedResponseSet) -> bool:
    """For every N, (7.5) on the star (each y_k compared with y_1) forces beta u_k - r_k = beta u_1 - r_1."""
    u = sp.IndexedBase("u", real=True)
    k = sp.Symbol("k", integer=True, positive=True)
    (u_k,) = sp.solve(sp.Eq(s.beta * (u[k] - u[1]), s.r[k] - s.r[1]), u[k])
    return is_zero((s.beta * u_k - s.r[k]) - (s.beta * u[1] - s.r[1]))


# --- notebook 08: what DPO's gradient cannot see -------------------------------------------------------------------
# a = log pi_theta(y_w|x), b = log pi_theta(y_l|x), a0 and b0 the reference's; u_w = a - a0, h = (a - a0) - (b - b0).


def dpo_pair_loss(a, b, a0, b0, bb=beta) -> sp.Expr:
    """(8.1): DPO's loss of one pair as a function of the four log-probs, -log sigma(beta [(a - a0) - (b - b0)])."""
    return dpo_loss(a - a0, b - b0, bb)


def dpop_pair_loss_below_reference(a, b, a0, b0, lam, bb=beta) -> sp.Expr:
    """(8.5) where the chosen log-prob is below the reference's (a < a0), so max(0, a0 - a) = a0 - a:
    -log sigma(beta [h - lambda (a0 - a)])."""
    return -sp.log(sigmoid(bb * ((a - a0) - (b - b0) - lam * (a0 - a))))


def gradient_in_margin_coordinates(loss) -> tuple[tuple[sp.Expr, sp.Expr], tuple[sp.Symbol, sp.Symbol]]:
    """(dl/da, dl/db) of ``loss(a, b, a0, b0)``, rewritten in the coordinates (u_w, h): a = a0 + u_w and
    b = b0 + u_w - h. Returns the two derivatives and the symbols (u_w, h)."""
    a, b, a0, b0 = sp.symbols("a b a_0 b_0", real=True)
    u_w, h = sp.symbols("u_w h", real=True)
    expr = loss(a, b, a0, b0)
    point = {a: a0 + u_w, b: b0 + u_w - h}
    return (sp.diff(expr, a).subs(point), sp.diff(expr, b).subs(point)), (u_w, h)


def gradient_depends_on_margin_only(loss) -> bool:
    """(8.4) for symbolic u_w: True when both derivatives of ``loss(a, b, a0, b0)`` in the log-probs, at fixed margin h,
    do not change with the chosen log-ratio u_w, so a pair with u_w > 0 and one with u_w < 0 are pushed alike.
    (DPO: True. DPOP below the reference: False, its extra lambda term on a grows with the distance a0 - a.)"""
    (d_a, d_b), (u_w, _) = gradient_in_margin_coordinates(loss)
    return is_zero(sp.diff(d_a, u_w)) and is_zero(sp.diff(d_b, u_w))


__all__ += [
    "dpo_pair_loss",
    "dpop_pair_loss_below_reference",
    "gradient_in_margin_coordinates",
    "gradient_depends_on_margin_only",
]

"""The sympy derivations behind notebooks 01-05, as small functions that notebooks and tests both assert.

One prompt x has a finite set of N candidate responses y_1..y_N. On that set a policy is just a vector of N
probabilities, so every expectation is an explicit sum and every step of the DPO derivation becomes algebra
that sympy can check. :func:`response_set` builds the symbols; the ``*_residual`` functions return
``lhs - rhs`` of an identity (which must simplify to 0) and the ``*_holds`` / ``is_*`` functions the
boolean verdict, so a test can assert the same statement a notebook shows.

How this differs from the textbook: sympy needs the side conditions spelled out. Probabilities are declared
positive (so log(a*b) = log a + log b is allowed), rewards real, beta positive; "probabilities sum to 1" is
used by substituting p_N = 1 - (p_1 + ... + p_{N-1}) (:func:`sum_to_one`), never silently assumed.

Equation numbers refer to the notebooks (the same numbers as ``dpolab.theory``):

- (1.1) objective J(pi)           (1.2) Lagrangian          (1.3) stationarity      (1.4) stationary point
- (1.5) Hessian (concavity)       (2.1) partition Z(x)      (2.2) optimal policy    (2.3) J = -beta KL(pi||pi*) + beta log Z
- (2.4) KL as a sum of terms >= 0 (2.5) beta -> 0 / beta -> oo limits
- (3.1) reward from policy        (3.2) invariance of pi* under r -> r + f(x)
- (4.1) Bradley-Terry             (4.2) DPO loss            (4.3) its gradient
- (5.1) Plackett-Luce             (5.2) listwise DPO loss   (5.3) Z cancels for any K
- (5.4) Gumbel race: P(r_1 + G_1 > r_2 + G_2) = sigma(r_1 - r_2) for independent standard Gumbel G
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy as sp

__all__ = [
    "ResponseSet",
    "response_set",
    "is_zero",
    "sum_to_one",
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
    "optimal_policy_sums_to_one",
    "objective_identity_residual",
    "objective_identity_holds",
    "kl_as_gibbs_terms_residual",
    "gibbs_term_is_nonnegative",
    "temperature_limits",
    "reward_from_policy",
    "solve_reward",
    "reward_reparameterisation_holds",
    "shifted_optimal_policy_residuals",
    "optimal_policy_is_shift_invariant",
    "partition_function_shift_holds",
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


def is_zero(expr: sp.Expr) -> bool:
    """True when sympy proves ``expr`` == 0. False means "not proved", which for a wrong identity is the point."""
    return sp.simplify(expr) == 0


def sum_to_one(probs: tuple[sp.Symbol, ...]) -> dict[sp.Symbol, sp.Expr]:
    """The constraint sum_i p_i = 1 as a substitution p_N -> 1 - (p_1 + ... + p_{N-1})."""
    return {probs[-1]: 1 - sum(probs[:-1])}


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

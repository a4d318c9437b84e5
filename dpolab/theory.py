"""Closed forms of the KL-constrained objective on a finite response set (notebooks 01-05).

Every function works on tensors whose last dimension indexes the N candidate responses of one prompt and
whose leading dimensions are a batch of prompts: shapes (..., N). Everything is computed in log space
(``logsumexp``) so that a reward of 100 with beta 0.01 neither overflows nor underflows.

Equation numbers refer to the notebooks:

- (1.1)  J(pi) = E_{y~pi}[r(x, y)] - beta * KL(pi(.|x) || pi_ref(.|x))          objective
- (2.1)  Z(x) = sum_y pi_ref(y|x) exp(r(x, y) / beta)                              partition function
- (2.2)  pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x)                         optimal policy
- (2.3)  J(pi) = -beta * KL(pi || pi*) + beta * log Z(x)                           the identity behind (2.2)
- (3.1)  r(x, y) = beta log(pi*(y|x) / pi_ref(y|x)) + beta log Z(x)               reward from policy
- (4.1)  P(y1 > y2 | x) = sigma(r1 - r2)                                           Bradley-Terry
- (5.1)  P(tau | x) = prod_k exp(r_tau(k)) / sum_{j>=k} exp(r_tau(j))             Plackett-Luce
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "log_partition",
    "partition",
    "log_optimal_policy",
    "optimal_policy",
    "kl_divergence",
    "kl_objective",
    "implicit_reward",
    "reward_from_policy",
    "bradley_terry",
    "plackett_luce_logprob",
    "plackett_luce_prob",
]


def check_beta(beta) -> float:
    """beta as a float; a ValueError unless it is a finite number > 0 (any real number type, a 0-d tensor)."""
    try:
        value = float(beta) if not isinstance(beta, (bool, str, bytes)) else math.nan
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    return value


def _check_probs(name: str, probs: torch.Tensor) -> torch.Tensor:
    probs = torch.as_tensor(probs)
    if not torch.is_floating_point(probs):
        probs = probs.to(torch.get_default_dtype())
    if probs.ndim == 0:
        raise ValueError(f"{name} must have a last dimension indexing responses, got a scalar")
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    total = probs.sum(-1)
    if not torch.allclose(total, torch.ones_like(total), atol=1e-4):
        raise ValueError(f"{name} must sum to 1 over its last dimension, got sums {total.flatten()[:4].tolist()}")
    return probs


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match, got {shapes}")


def log_partition(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """log Z(x) = logsumexp_y [log pi_ref(y|x) + r(x, y)/beta]   (eq. 2.1). Shapes (..., N) -> (...)."""
    beta = check_beta(beta)
    ref_probs = _check_probs("ref_probs", ref_probs)
    rewards = torch.as_tensor(rewards, dtype=ref_probs.dtype)
    _check_same_shape(ref_probs=ref_probs, rewards=rewards)
    return torch.logsumexp(torch.log(ref_probs) + rewards / beta, dim=-1)


def partition(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Z(x) = sum_y pi_ref(y|x) exp(r(x, y)/beta)   (eq. 2.1). Shapes (..., N) -> (...)."""
    return log_partition(ref_probs, rewards, beta).exp()


def log_optimal_policy(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """log pi*(y|x) = log pi_ref(y|x) + r(x, y)/beta - log Z(x)   (eq. 2.2). Shapes (..., N) -> (..., N)."""
    beta = check_beta(beta)
    ref_probs = _check_probs("ref_probs", ref_probs)
    rewards = torch.as_tensor(rewards, dtype=ref_probs.dtype)
    _check_same_shape(ref_probs=ref_probs, rewards=rewards)
    return torch.log_softmax(torch.log(ref_probs) + rewards / beta, dim=-1)


def optimal_policy(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """pi*(y|x) = pi_ref(y|x) exp(r(x, y)/beta) / Z(x)   (eq. 2.2).

    Args:
        ref_probs: (..., N) reference probabilities, each row summing to 1 (zeros allowed).
        rewards: (..., N) rewards r(x, y).
        beta: KL coefficient, > 0.

    Returns:
        (..., N) probabilities of the optimal policy of objective (1.1).
    """
    return log_optimal_policy(ref_probs, rewards, beta).exp()


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_y p(y) log(p(y)/q(y)) over the last dimension, with 0 log 0 = 0. (..., N) -> (...)."""
    p = _check_probs("p", p)
    q = _check_probs("q", torch.as_tensor(q, dtype=p.dtype))
    _check_same_shape(p=p, q=q)
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)


def kl_objective(
    policy_probs: torch.Tensor, ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float
) -> torch.Tensor:
    """J(pi) = sum_y pi(y|x) r(x, y) - beta KL(pi || pi_ref)   (eq. 1.1). Shapes (..., N) -> (...).

    Differentiable in ``policy_probs``, so gradient ascent on it can be compared with ``optimal_policy``.
    """
    beta = check_beta(beta)
    rewards = torch.as_tensor(rewards, dtype=torch.as_tensor(policy_probs).dtype)
    _check_same_shape(policy_probs=torch.as_tensor(policy_probs), rewards=rewards)
    return (policy_probs * rewards).sum(-1) - beta * kl_divergence(policy_probs, ref_probs)


def implicit_reward(policy_probs: torch.Tensor, ref_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """r_hat(x, y) = beta log(pi(y|x) / pi_ref(y|x)), the reward DPO implies (eq. 3.1 without log Z)."""
    beta = check_beta(beta)
    policy_probs, ref_probs = torch.as_tensor(policy_probs), torch.as_tensor(ref_probs)
    _check_same_shape(policy_probs=policy_probs, ref_probs=ref_probs)
    return beta * (torch.log(policy_probs) - torch.log(ref_probs))


def reward_from_policy(
    optimal_probs: torch.Tensor, ref_probs: torch.Tensor, beta: float, log_z: torch.Tensor
) -> torch.Tensor:
    """r(x, y) = beta log(pi*(y|x) / pi_ref(y|x)) + beta log Z(x)   (eq. 3.1). ``log_z`` has shape (...)."""
    return implicit_reward(optimal_probs, ref_probs, beta) + beta * torch.as_tensor(log_z).unsqueeze(-1)


def bradley_terry(reward_1: torch.Tensor, reward_2: torch.Tensor) -> torch.Tensor:
    """P(y1 > y2 | x) = exp(r1) / (exp(r1) + exp(r2)) = sigma(r1 - r2)   (eq. 4.1)."""
    reward_1, reward_2 = torch.as_tensor(reward_1), torch.as_tensor(reward_2)
    return torch.sigmoid(reward_1 - reward_2)


def plackett_luce_logprob(ranked_rewards: torch.Tensor) -> torch.Tensor:
    """log P(tau | x) for rewards listed in ranked order, best first   (eq. 5.1). (..., K) -> (...).

    log P = sum_k [ r_k - logsumexp_{j >= k} r_j ]; the suffix logsumexp is a reversed cumulative logsumexp.
    """
    r = torch.as_tensor(ranked_rewards)
    if r.ndim == 0 or r.shape[-1] < 2:
        raise ValueError(f"a ranking needs at least 2 responses in the last dimension, got shape {tuple(r.shape)}")
    suffix_lse = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)
    return (r - suffix_lse).sum(-1)


def plackett_luce_prob(ranked_rewards: torch.Tensor) -> torch.Tensor:
    """P(tau | x) for rewards listed in ranked order, best first   (eq. 5.1). For K = 2 this is sigma(r1 - r2)."""
    return plackett_luce_logprob(ranked_rewards).exp()

"""A toy world with a known answer: tabular policies over a few responses per prompt (notebooks 07 and 09).

P prompts, each with the same N candidate responses. The reference pi_ref and the true reward r are (P, N)
tensors, so the optimal policy of objective (1.1) is known in closed form (``theory.optimal_policy``,
eq. 2.2) and any preference-learning method can be checked against it. Equations of notebook 07:

- (7.1) data: a prompt x uniformly at random, an unordered pair {y_i, y_j}, i != j, uniformly at random, and
        y_i wins with the Bradley-Terry probability P(y_i > y_j | x) = sigma(r(x, y_i) - r(x, y_j))   (eq. 4.1)
- (7.2) the policy: pi_theta(y|x) = softmax(theta_x)_y, one free logit per (prompt, response)
- (7.3) the empirical loss: L(theta) = (1/n) sum_k loss(log pi_theta(y_w^k|x^k), log pi_theta(y_l^k|x^k),
        log pi_ref(y_w^k|x^k), log pi_ref(y_l^k|x^k)), any loss of ``dpolab.losses.LOSSES``
- (7.4) the distance: TV(p, q) = 1/2 sum_y |p(y) - q(y)|, per prompt

How this differs from a language model: there log pi_theta(y|x) is a sum of token log-probs (eq. 6.1) and a
change of theta moves many responses at once; here every (x, y) has its own logit, so the population
minimiser of the DPO loss is exactly pi* (7.5)-(7.6) whenever the compared pairs connect all N responses of a
prompt, which sampling over all pairs (7.1) ensures (notebook 07).

Notebook 09 adds label noise, (9.7) ``flip_preferences``, and IPO's population minimiser on this world,
(9.6) ``ipo_optimal_policy``, the policy IPO converges to instead of pi*.

Rankings (notebook 05): ``sample_pl_rankings`` draws a prompt uniformly, K of its N responses uniformly, and ranks
them by sorting r + Gumbel noise, which is a Plackett-Luce draw (5.1) (the Gumbel trick, eq. 5.4);
``train_tabular_listwise`` fits the tabular policy (7.2) to them with a listwise loss (eq. 5.2), whose population
minimiser is pi* again (the Plackett-Luce likelihood is maximised at the true rewards, up to a constant per prompt,
and Z(x) cancels, eq. 5.3); ``ranking_preferences`` turns them into the pairs they imply, for a pairwise loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .losses import listwise_loss, preference_loss, ranking_pairs

__all__ = [
    "Preferences",
    "Rankings",
    "sample_pl_rankings",
    "ranking_preferences",
    "train_tabular_listwise",
    "sample_bt_preferences",
    "flip_preferences",
    "win_counts",
    "unique_triples",
    "empirical_loss",
    "train_tabular",
    "total_variation",
    "ipo_optimal_policy",
]


class Preferences(NamedTuple):
    """n preference triples (x, y_w, y_l) as indices: ``prompt`` into P prompts, ``chosen`` and ``rejected``
    into N responses. Each of shape (n,), dtype long."""

    prompt: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor


class Rankings(NamedTuple):
    """n rankings as indices: ``prompt`` (n,) into P prompts, ``order`` (n, K) into N responses, best first."""

    prompt: torch.Tensor
    order: torch.Tensor


_BATCH_COUPLED = ("aot", "aot_unpaired")  # losses of sorted batches, not sums over examples


def _check_table(name: str, table: torch.Tensor) -> torch.Tensor:
    table = torch.as_tensor(table)
    if table.ndim != 2 or table.shape[1] < 2:
        raise ValueError(f"{name} must have shape (P prompts, N >= 2 responses), got {tuple(table.shape)}")
    if not torch.is_floating_point(table):
        table = table.to(torch.get_default_dtype())
    if not torch.isfinite(table).all():
        raise ValueError(f"{name} must be finite")
    return table


def sample_bt_preferences(rewards: torch.Tensor, n: int, generator: torch.Generator | None = None) -> Preferences:
    """n preferences from the Bradley-Terry model with reward ``rewards``, eq. (7.1).

    Every unordered pair of distinct responses of every prompt is equally likely, so with enough data all
    comparisons are covered (DPO identifies pi* only on what the comparisons connect).

    Args:
        rewards: (P, N) true rewards r(x, y).
        n: number of triples to draw, >= 1.
        generator: a seeded ``torch.Generator`` for reproducible draws.
    """
    rewards = _check_table("rewards", rewards)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    P, N = rewards.shape
    prompt = torch.randint(0, P, (n,), generator=generator)
    first = torch.randint(0, N, (n,), generator=generator)
    second = (first + torch.randint(1, N, (n,), generator=generator)) % N  # uniform over the N-1 others
    p_first = torch.sigmoid(rewards[prompt, first] - rewards[prompt, second])  # eq. (4.1)
    first_wins = torch.rand(n, generator=generator, dtype=rewards.dtype) < p_first
    chosen = torch.where(first_wins, first, second)
    rejected = torch.where(first_wins, second, first)
    return Preferences(prompt, chosen, rejected)


def flip_preferences(pairs: Preferences, eps: float, generator: torch.Generator | None = None) -> Preferences:
    """Swap chosen and rejected of each triple independently with probability ``eps``: label noise, eq. (9.7).

    This is the noise model that robust DPO (``losses.robust``) and cDPO (``losses.cdpo``) assume.
    """
    if not 0 <= eps <= 1:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    flip = torch.rand(pairs.prompt.shape[0], generator=generator) < eps
    return Preferences(
        pairs.prompt, torch.where(flip, pairs.rejected, pairs.chosen), torch.where(flip, pairs.chosen, pairs.rejected)
    )


def win_counts(pairs: Preferences, n_prompts: int, n_responses: int) -> torch.Tensor:
    """W[x, i, j] = number of triples of prompt x in which y_i beat y_j. Shape (P, N, N), dtype long."""
    counts = torch.zeros(n_prompts * n_responses * n_responses, dtype=torch.long)
    flat = (pairs.prompt * n_responses + pairs.chosen) * n_responses + pairs.rejected
    counts.index_add_(0, flat, torch.ones_like(flat))
    return counts.view(n_prompts, n_responses, n_responses)


def unique_triples(pairs: Preferences, n_prompts: int, n_responses: int) -> tuple[Preferences, torch.Tensor]:
    """The distinct triples of ``pairs`` and how often each occurs: (Preferences of m rows, counts (m,)).

    Identical triples have identical losses, so the mean (7.3) over n triples equals
    sum_k (count_k / n) loss_k over at most P*N*(N-1) distinct ones, however large n is.
    """
    counts = win_counts(pairs, n_prompts, n_responses)  # (P, N, N)
    x, w, l = counts.nonzero(as_tuple=True)  # (m,) each
    return Preferences(x, w, l), counts[x, w, l]


def _check_pairs(pairs: Preferences, n_prompts: int, n_responses: int) -> None:
    prompt, chosen, rejected = pairs
    if prompt.numel() == 0:
        raise ValueError("pairs is empty")
    if not (
        0 <= prompt.min()
        and prompt.max() < n_prompts
        and 0 <= min(chosen.min(), rejected.min())
        and max(chosen.max(), rejected.max()) < n_responses
    ):
        raise ValueError(f"pairs index outside the ({n_prompts}, {n_responses}) table of ref_probs")
    same = (chosen == rejected).nonzero().flatten()
    if same.numel():
        raise ValueError(f"pairs compare a response with itself at rows {same[:10].tolist()}")


def empirical_loss(
    loss_name: str,
    logits: torch.Tensor,
    pairs: Preferences,
    ref_probs: torch.Tensor,
    beta: float,
    weights: torch.Tensor | None = None,
    **params,
) -> torch.Tensor:
    """The empirical loss (7.3) of the tabular policy pi_theta = softmax(logits) (7.2), a scalar.

    Args:
        loss_name: a key of ``dpolab.losses.LOSSES``.
        logits: (P, N) theta, the policy's logits.
        pairs: n triples (indices).
        ref_probs: (P, N) reference probabilities, > 0.
        beta: the loss's beta, > 0.
        weights: (n,) weight of each triple (``counts / counts.sum()`` of :func:`unique_triples`); None is the
            plain mean 1/n.
        **params: the loss's own parameters (``label_smoothing=...``, ...).
    """
    if loss_name in _BATCH_COUPLED:
        raise ValueError(f"{loss_name} sorts the whole batch, so its loss is not a sum over triples")
    x, w, l = pairs
    logps = torch.log_softmax(logits, dim=-1)  # (P, N) log pi_theta(y|x)
    ref_logps = ref_probs.log()  # (P, N) log pi_ref(y|x)
    losses = preference_loss(loss_name, logps[x, w], logps[x, l], ref_logps[x, w], ref_logps[x, l], beta=beta, **params)
    return losses.mean() if weights is None else (weights * losses).sum()


def train_tabular(
    loss_name: str,
    pairs: Preferences,
    ref_probs: torch.Tensor,
    beta: float,
    steps: int = 500,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    **params,
) -> torch.Tensor:
    """Fit the tabular policy (7.2) to preference data by minimising the empirical loss (7.3) with Adam.

    The logits start at log pi_ref (the policy starts as the reference, as fine-tuning does); full-batch
    Adam runs for ``steps`` steps with the step size decayed linearly from ``lr`` to 0, so the last iterates
    settle instead of oscillating around the minimiser. For DPO the loss is convex in the logits (a logistic
    regression on theta_w - theta_l), so this finds its minimiser whenever one exists.

    Args:
        loss_name: a key of ``dpolab.losses.LOSSES`` ("dpo", "ipo", "robust", ...), not a batch-sorting one.
        pairs: the preference triples, indices into ``ref_probs``.
        ref_probs: (P, N) reference probabilities, all > 0 (log pi_ref must be finite).
        beta: the loss's beta, > 0.
        steps, lr: number of Adam steps and the initial step size.
        weight_decay: lambda >= 0 of a penalty (lambda / 2) sum (theta - log pi_ref)^2 added to (7.3), which pulls
            the logits towards the reference's: a Gaussian prior centred at the reference, so the fit becomes a
            maximum a posteriori estimate with a finite answer even for a pair always won by the same response.
            0 (the default) is the plain loss (7.3).
        **params: the loss's own parameters (``label_smoothing=...``, ...).

    Returns:
        (P, N) the learned policy pi_theta, detached.
    """
    ref_probs = _check_table("ref_probs", ref_probs)
    if (ref_probs <= 0).any():
        raise ValueError("ref_probs must be > 0 everywhere: the tabular policy starts at log pi_ref")
    P, N = ref_probs.shape
    _check_pairs(pairs, P, N)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    distinct, counts = unique_triples(pairs, P, N)  # at most P*N*(N-1) rows, whatever n is
    weights = counts.to(ref_probs.dtype) / counts.sum()

    theta = ref_probs.log().clone().requires_grad_(True)  # (P, N) logits of (7.2), starting at pi_ref
    optimizer = torch.optim.Adam([theta], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of ~100 numbers: extra threads only add synchronisation
    try:
        for _ in range(steps):
            loss = empirical_loss(loss_name, theta, distinct, ref_probs, beta, weights=weights, **params)  # (7.3)
            if weight_decay:
                loss = loss + weight_decay / 2 * (theta - ref_probs.log()).square().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    return torch.softmax(theta.detach(), dim=-1)


def sample_pl_rankings(rewards: torch.Tensor, n: int, k: int, generator: torch.Generator | None = None) -> Rankings:
    """n rankings of K responses from the Plackett-Luce model with reward ``rewards`` (module docstring): a prompt
    uniformly at random, K of its N responses uniformly at random, ranked by sorting r + G, G standard Gumbel noise
    (eq. 5.4), which orders them as Plackett-Luce (5.1) does.

    Args:
        rewards: (P, N) true rewards r(x, y).
        n: number of rankings to draw, >= 1.
        k: responses per ranking, 2 <= k <= N (k = 2: the Bradley-Terry pairs of ``sample_bt_preferences``'s model).
        generator: a seeded ``torch.Generator`` for reproducible draws.
    """
    rewards = _check_table("rewards", rewards)
    P, N = rewards.shape
    if n < 1 or not 2 <= k <= N:
        raise ValueError(f"need n >= 1 and 2 <= k <= N = {N}, got n = {n}, k = {k}")
    prompt = torch.randint(0, P, (n,), generator=generator)
    subset = torch.rand(n, N, generator=generator).argsort(-1)[:, :k]  # (n, K) uniform K-subsets
    uniform = torch.rand(n, k, generator=generator, dtype=rewards.dtype).clamp_min(torch.finfo(rewards.dtype).tiny)
    gumbel = -torch.log(-torch.log(uniform))  # standard Gumbel noise
    noisy = rewards[prompt[:, None], subset] + gumbel
    return Rankings(prompt, subset.gather(1, noisy.argsort(-1, descending=True)))


def ranking_preferences(rankings: Rankings, which: str) -> Preferences:
    """The pairs the rankings imply, as triples: each ranking's K-1 "adjacent" pairs or "all" K(K-1)/2
    (``dpolab.losses.ranking_pairs``), ranking after ranking."""
    pairs = ranking_pairs(rankings.order.shape[1], which)
    winner, loser = (torch.tensor(index) for index in zip(*pairs))
    return Preferences(
        rankings.prompt.repeat_interleave(len(pairs)),
        rankings.order[:, winner].flatten(),
        rankings.order[:, loser].flatten(),
    )


def train_tabular_listwise(
    loss_name: str,
    rankings: Rankings,
    ref_probs: torch.Tensor,
    beta: float,
    steps: int = 500,
    lr: float = 0.1,
    **params,
) -> torch.Tensor:
    """Fit the tabular policy (7.2) to rankings by minimising the mean listwise loss (eq. 5.2 for
    ``"plackett_luce"``), as :func:`train_tabular` does for pairs: theta from log pi_ref, full-batch Adam, each
    distinct ranking weighted by its count. Returns the (P, N) learned policy, detached."""
    ref_probs = _check_table("ref_probs", ref_probs)
    if (ref_probs <= 0).any():
        raise ValueError("ref_probs must be > 0 everywhere: the tabular policy starts at log pi_ref")
    P, N = ref_probs.shape
    prompt, order = rankings
    if prompt.numel() == 0 or not (0 <= prompt.min() and prompt.max() < P and 0 <= order.min() and order.max() < N):
        raise ValueError(f"rankings must be non-empty and index the ({P}, {N}) table of ref_probs")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    distinct, counts = torch.unique(torch.cat([prompt[:, None], order], 1), dim=0, return_counts=True)
    x, ranked = distinct[:, :1], distinct[:, 1:]  # (m, 1), (m, K): at most P N!/(N-K)! rows, whatever n is
    weights = counts.to(ref_probs.dtype) / counts.sum()
    ref_logps = ref_probs.log()[x, ranked]  # (m, K)

    theta = ref_probs.log().clone().requires_grad_(True)  # (P, N) logits of (7.2), starting at pi_ref
    optimizer = torch.optim.Adam([theta], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    for _ in range(steps):
        logps = torch.log_softmax(theta, dim=-1)[x, ranked]  # (m, K) log pi_theta(y_k|x), best first
        loss = (weights * listwise_loss(loss_name, logps, ref_logps, beta=beta, **params).losses).sum()  # eq. (5.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return torch.softmax(theta.detach(), dim=-1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """TV(p, q) = 1/2 sum_y |p(y) - q(y)| over the last dimension, eq. (7.4). (..., N) -> (...), in [0, 1]."""
    p, q = torch.as_tensor(p), torch.as_tensor(q)
    if p.shape != q.shape:
        raise ValueError(f"shapes must match, got {tuple(p.shape)} and {tuple(q.shape)}")
    return 0.5 * (p - q).abs().sum(-1)


def ipo_optimal_policy(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """The population minimiser of the IPO loss on the toy world's data (7.1), eq. (9.6) of notebook 09:

        pi_IPO(y_i|x) proportional to pi_ref(y_i|x) exp( (1/(N beta)) sum_j P(y_i > y_j | x) )

    IPO regresses h(y_i, y_j) on (P(y_i > y_j) - 1/2)/beta; with every pair compared equally often the least
    squares solution is this one (Azar et al. 2023, eq. 8 with Psi the identity and mu uniform over the N
    responses). It differs from DPO's pi* (eq. 2.2) unless beta is large. Shapes (P, N) -> (P, N).
    """
    ref_probs = _check_table("ref_probs", ref_probs)
    rewards = _check_table("rewards", torch.as_tensor(rewards, dtype=ref_probs.dtype))
    if rewards.shape != ref_probs.shape:
        raise ValueError(f"shapes must match, got {tuple(ref_probs.shape)} and {tuple(rewards.shape)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    N = rewards.shape[-1]
    win_prob = torch.sigmoid(rewards.unsqueeze(-1) - rewards.unsqueeze(-2))  # (P, N, N): P(y_i > y_j), eq. (4.1)
    return torch.softmax(ref_probs.log() + win_prob.sum(-1) / (N * beta), dim=-1)

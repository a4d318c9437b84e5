"""Listwise training: rankings of K completions under a listwise loss (Plackett-Luce, eq. 5.2 of notebook 05).

What ``train`` does differently for rankings, each piece here:

    rows        <- rankings; a pairwise loss takes their pairs only when asked (listwise_pairs), else it refuses
    examples    <- each ranking tokenized as TRL tokenizes a pair, K completions best first (dpolab.data.tokenize);
                   with a listwise loss, pairs are rankings of 2
    log-probs   <- one forward over packed segments prompt + y_1 + ... + y_K (eq. 6.9): (B, K)
    reference   <- log pi_ref(y_k|x), (N, K), precomputed and cached as for pairs (reference.py)
    loss        <- sum_j w_j LISTWISE_LOSSES[loss_j](policy (B, K), reference (B, K); beta)
    metrics     <- rewards/position_k, logps/position_k (k = 1..K), ranking/accuracy, ranking/kendall_tau

The metrics follow TRL's names where TRL has one (``rewards/...``, ``logps/...``) with the position in the data's
ranking in place of chosen/rejected: ``rewards/position_k`` is the mean implicit reward beta log(pi_theta/pi_ref) of
the k-th best completion. ``ranking/accuracy`` is the share of adjacent pairs (k, k+1) whose implicit rewards are in
the data's order (r_k > r_{k+1}; at K = 2 TRL's ``rewards/accuracies``); ``ranking/kendall_tau`` the mean over
rankings of Kendall's tau-a between the data's order and the rewards': (concordant - discordant pairs) / (K(K-1)/2),
a tie in the rewards counting as neither. Every metric is a mean over the step's rankings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.rankings import expand_rankings, is_listwise_data
from ..logprobs import listwise_logps
from ..losses import listwise_loss, nonfinite_count
from .config import TrainConfig

__all__ = [
    "listwise_metrics",
    "training_rows",
    "as_rankings",
    "ranking_metrics",
    "ListwisePolicy",
    "ListwiseObjective",
]


def listwise_metrics(n_completions: int) -> tuple[str, ...]:
    """The history columns of a run on rankings of K completions, in order (module docstring)."""
    K = range(1, n_completions + 1)
    return (
        "step",
        "epoch",
        "loss",
        *(f"rewards/position_{k}" for k in K),
        "ranking/accuracy",
        "ranking/kendall_tau",
        *(f"logps/position_{k}" for k in K),
        "learning_rate",
        "grad_norm",
    )


def training_rows(train_data, config: TrainConfig, source: str = "train_data"):
    """The rows ``train`` tokenizes: ``train_data`` itself, or with ``config.listwise_pairs`` its rankings' pairs
    (``dpolab.data.rankings.expand_rankings``). A pairwise loss given rankings without it is an error naming both
    fixes; ``listwise_pairs`` given pairs is an error too (there is nothing to expand). ``source`` names the data in
    the errors (train_data, eval_data)."""
    rankings = is_listwise_data(train_data)
    if rankings and not config.listwise:
        if config.listwise_pairs is None:
            raise ValueError(
                f"{source} holds rankings ('completions' rows) but loss {config.loss!r} is pairwise: pass "
                "--loss plackett_luce (loss='plackett_luce') to train on the rankings, or --listwise-pairs adjacent|all "
                "(listwise_pairs=...) to train on the pairs each ranking implies"
            )
        return expand_rankings(train_data, config.listwise_pairs, source=source)
    if config.listwise_pairs is not None and not rankings:
        raise ValueError(
            f"listwise_pairs={config.listwise_pairs!r} expands rankings into pairs, but {source} holds pairs "
            "(chosen/rejected rows): drop listwise_pairs (--listwise-pairs)"
        )
    return train_data


def as_rankings(examples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tokenized examples as rankings: a pair becomes the ranking [chosen, rejected] (K = 2, the same token ids; its
    own kept prompts, if any, carried over), a ranking stays as it is."""
    out = []
    for ex in examples:
        if "completions_ids" in ex:
            out.append(ex)
            continue
        ranking = {"prompt_ids": ex["prompt_ids"], "completions_ids": [ex["chosen_ids"], ex["rejected_ids"]]}
        if "chosen_prompt_ids" in ex:
            ranking["completions_prompt_ids"] = [ex["chosen_prompt_ids"], ex["rejected_prompt_ids"]]
        out.append(ranking | {k: ex[k] for k in ("index",) if k in ex})
    return out


def ranking_metrics(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ranking, (B,) each: the share of its adjacent pairs whose rewards are in the data's order (r_k > r_{k+1}),
    and Kendall's tau-a between the data's order (best first) and the rewards' (module docstring).
    ``rewards``: (B, K), column k the k-th best completion's."""
    adjacent = (rewards[:, :-1] > rewards[:, 1:]).double().mean(-1)
    i, j = torch.triu_indices(rewards.shape[1], rewards.shape[1], offset=1, device=rewards.device)  # i ranked above j
    tau = torch.sign(rewards[:, i] - rewards[:, j]).double().mean(-1)  # concordant +1, discordant -1, tie 0
    return adjacent, tau


class ListwisePolicy(torch.nn.Module):
    """batch -> log pi_theta(y_k|x), (B, K): the module DDP wraps for rankings (``dpolab.logprobs.listwise_logps``)."""

    def __init__(self, model: torch.nn.Module, reduction: str, n_completions: int, lm_head: str = "fused"):
        super().__init__()
        self.model, self.reduction, self.n_completions, self.lm_head = model, reduction, n_completions, lm_head

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return listwise_logps(  # the batch was checked on the host as it was collated (setup.py)
            self.model, batch, self.n_completions, reduction=self.reduction, lm_head=self.lm_head, check=False
        )


class ListwiseObjective:
    """One micro-batch of rankings: its listwise loss (B,) and the sums of its metrics (``summed``), against the
    precomputed reference log-probs ``ref_logps`` (N, K) indexed by dataset index."""

    def __init__(self, config: TrainConfig, ref_logps: torch.Tensor):
        self.config, self.ref_logps = config, ref_logps
        self.columns = listwise_metrics(ref_logps.shape[1])
        self.summed = self.columns[2:-2]

    def __call__(self, logps: torch.Tensor, rows):
        """(losses, stats, checks) as ``objective.PairwiseObjective``'s."""
        policy_logps = logps.float()  # (b, K)
        idx = torch.as_tensor(rows, device=policy_logps.device)
        config = self.config
        out = listwise_loss(
            config.losses,
            policy_logps,
            self.ref_logps[idx],
            config.weights,
            beta=config.beta,
            check_finite=False,  # checked with the step's metrics, below
            **config.loss_kwargs,
        )
        with torch.no_grad():
            checks = [("log pi_theta(y_k|x)", policy_logps.sum(-1).detach()), ("the loss", out.losses.detach())]
            accuracy, tau = ranking_metrics(out.rewards)
            stats = torch.cat(
                [
                    out.losses.double().sum()[None],
                    out.rewards.double().sum(0),  # rewards/position_k
                    accuracy.sum()[None],
                    tau.sum()[None],
                    policy_logps.double().sum(0),  # logps/position_k
                    nonfinite_count(checks).to(idx.device)[None],
                ]
            )
        return out.losses, stats, checks

    @staticmethod
    def postfix(row: dict[str, float]) -> dict[str, str]:
        """The progress bar's live metrics."""
        return {"tau": f"{row['ranking/kendall_tau']:.3f}", "acc": f"{row['ranking/accuracy']:.2f}"}

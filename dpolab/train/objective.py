"""What one step computes: the policy's log-probs of a batch, its loss against the cached reference, its metrics.

    policy      batch -> log pi_theta(y_w|x), log pi_theta(y_l|x), one forward (eq. 6.1 of notebook 06)
    objective   sum_k w_k LOSSES[loss_k](policy logps, reference logps; beta, ...) per pair (eq. 4.2 of notebook 04
                for DPO), and the sums of TRL's metrics over the micro-batch
    evaluation  the same objective on eval pairs, without gradients: TRL's eval_ metrics

Rankings of K completions take the listwise counterparts (``listwise.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..data.collate import n_completions
from ..logprobs import concatenated_logps, packed_logps, sequence_logps
from ..losses import LossOutput, nonfinite_count, weighted_loss
from .config import TrainConfig
from .listwise import ListwiseObjective, ListwisePolicy
from .reference import score_completions

__all__ = [
    "METRICS",
    "EVAL_METRICS",
    "CHOSEN_ONLY_LOSSES",
    "NonFiniteError",
    "check_finite",
    "raise_nonfinite",
    "PolicyLogps",
    "PairwiseObjective",
    "policy_module",
    "objective",
    "evaluation_steps",
    "evaluate",
]

# The losses that never look at the rejected completion: its log-prob is computed without gradient, for metrics.
CHOSEN_ONLY_LOSSES = frozenset({"sft", "kl_sft"})
# Per-step metrics, TRL's names first; history.csv has these columns in this order (rankings: listwise_metrics(K)).
METRICS = (
    "step",
    "epoch",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "learning_rate",
    "grad_norm",
)
_SUMMED = METRICS[2:-2]  # summed over a micro-batch's pairs; the step's row holds their means
# TRL's evaluation metrics of pairs, one row per evaluation: the step rows' metrics on eval_data, prefixed "eval_" as
# TRL logs them (rankings: "eval_" and the listwise metrics, listwise.py).
EVAL_METRICS = ("step", "epoch", *(f"eval_{name}" for name in _SUMMED))


class NonFiniteError(FloatingPointError):
    """A NaN or inf loss, log-prob or gradient; names the optimizer step (1-based) and the examples."""

    def __init__(self, step: int, what: str, indices: Sequence[int], batch: Sequence[int]):
        self.step, self.indices = step, list(indices)
        super().__init__(
            f"step {step}: {what} is not finite (NaN or inf) for examples {self.indices} "
            f"(dataset indices; the step's batch held {list(batch)}); the last checkpoint is untouched"
        )


def check_finite(step: int, what: str, values: torch.Tensor, rows: np.ndarray, batch: np.ndarray) -> None:
    """Raise :class:`NonFiniteError` naming the examples ``rows`` whose ``values`` are NaN or inf."""
    bad = ~torch.isfinite(values.detach())
    if bad.any():
        raise NonFiniteError(step, what, rows[bad.cpu().numpy()].tolist(), batch.tolist())


def raise_nonfinite(step: int, checks, batch: np.ndarray) -> None:
    """The error path of the step's one finiteness check: :class:`NonFiniteError` for the first of ``checks``
    ((rows, what, values) in the order the step computed them) that holds a NaN or inf, naming its examples."""
    for rows, what, values in checks:
        check_finite(step, what, values, rows, batch)


class PolicyLogps(torch.nn.Module):
    """batch -> (policy_chosen_logps, policy_rejected_logps): the module DDP wraps, so its forward syncs gradients."""

    def __init__(self, model: torch.nn.Module, reduction: str, chosen_only: bool, lm_head: str = "fused"):
        super().__init__()
        self.model, self.reduction, self.chosen_only, self.lm_head = model, reduction, chosen_only, lm_head

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "score_index" in batch:  # shared-prefix packed (dpolab.data.packing): one forward, prompt once
            return packed_logps(  # the batch was checked on the host as it was collated (setup.py)
                self.model, batch, reduction=self.reduction, lm_head=self.lm_head, check=False
            )
        if not self.chosen_only:  # one forward, 2B rows; checked on the host as it was collated (setup.py)
            return concatenated_logps(self.model, batch, reduction=self.reduction, check=False)
        b = batch["input_ids"].shape[0] // 2
        keys = ("input_ids", "attention_mask", "completion_mask")
        chosen, rejected = ({k: batch[k][rows] for k in keys} for rows in (slice(None, b), slice(b, None)))
        chosen["scored"], rejected["scored"] = batch["scored_chosen"], batch["scored_rejected"]
        policy_chosen_logps = sequence_logps(self.model, **chosen, reduction=self.reduction, check=False)
        with torch.no_grad():  # the loss ignores it; the metrics report it
            policy_rejected_logps = sequence_logps(self.model, **rejected, reduction=self.reduction, check=False)
        return policy_chosen_logps, policy_rejected_logps


class PairwiseObjective:
    """One micro-batch of pairs: its loss (B,) and the sums of its metrics (``summed``, TRL's names), against the
    precomputed reference log-probs (N,) of the chosen and rejected completions, indexed by dataset index."""

    columns, summed = METRICS, _SUMMED

    def __init__(self, config: TrainConfig, ref_chosen_logps, ref_rejected_logps, example_params):
        self.config, self.example_params = config, example_params
        self.ref_chosen_logps, self.ref_rejected_logps = ref_chosen_logps, ref_rejected_logps
        self.loss_kwargs = {"beta": config.beta, **config.loss_kwargs}

    def __call__(self, logps, rows):
        """(losses (b,), stats, checks) of the micro-batch of examples ``rows`` (positions in the examples, a tensor
        or an array): stats = the sums of ``summed``, then the count of NaN or inf among the log-probs and losses
        (``nonfinite_count``); checks = (what, values) of those, for the error message (``raise_nonfinite``).
        Nothing is read on the host."""
        policy_chosen_logps, policy_rejected_logps = logps[0].float(), logps[1].float()
        idx = torch.as_tensor(rows, device=policy_chosen_logps.device)
        out: LossOutput = weighted_loss(  # eq. 4.2 for DPO
            self.config.losses,
            self.config.weights,
            policy_chosen_logps,
            policy_rejected_logps,
            self.ref_chosen_logps[idx],
            self.ref_rejected_logps[idx],
            **self.loss_kwargs,
            check_finite=False,  # checked with the step's metrics, below
            **{k: v[idx] for k, v in self.example_params.items()},
        )
        with torch.no_grad():
            checks = [
                ("log pi_theta(y_w|x)", policy_chosen_logps.detach()),
                ("log pi_theta(y_l|x)", policy_rejected_logps.detach()),
                ("the loss", out.losses.detach()),
            ]
            margins = out.chosen_rewards - out.rejected_rewards
            summed = (
                out.losses,
                out.chosen_rewards,
                out.rejected_rewards,
                margins,
                (margins > 0).double(),
                policy_chosen_logps,
                policy_rejected_logps,
            )
            stats = torch.stack([*(t.double().sum() for t in summed), nonfinite_count(checks).to(idx.device)])
        return out.losses, stats, checks

    @staticmethod
    def postfix(row: dict[str, float]) -> dict[str, str]:
        """The progress bar's live metrics."""
        return {"margin": f"{row['rewards/margins']:.3f}", "acc": f"{row['rewards/accuracies']:.2f}"}


def policy_module(model: torch.nn.Module, config: TrainConfig, examples) -> torch.nn.Module:
    """batch -> the policy's log-probs of every completion: (chosen, rejected) of pairs, (B, K) of rankings."""
    lm_head = config.speedups.lm_head
    if config.listwise:
        return ListwisePolicy(model, config.reduction, n_completions(examples), lm_head)
    chosen_only = all(name in CHOSEN_ONLY_LOSSES for name in config.losses)  # never a listwise loss
    return PolicyLogps(model, config.reduction, chosen_only, lm_head)


def objective(config: TrainConfig, ref_logps: torch.Tensor, example_params: dict[str, torch.Tensor]):
    """The loss and metrics of one micro-batch against reference log-probs ``ref_logps`` (N, K): pairs' or rankings'."""
    if config.listwise:
        return ListwiseObjective(config, ref_logps)
    return PairwiseObjective(config, ref_logps[:, 0], ref_logps[:, 1], example_params)


def evaluation_steps(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], bool]:
    """Whether to evaluate after optimizer step s, as TRL's eval_strategy decides: "steps", every eval_steps steps
    (a fraction: of total_steps, rounded up); "epoch", at each epoch's end and at the last step (max_steps may end an
    epoch early). The default (None) is "steps" when eval_steps is set, else "epoch"."""
    strategy = config.eval_strategy or ("steps" if config.eval_steps is not None else "epoch")
    if strategy == "steps":
        every = config.eval_steps if isinstance(config.eval_steps, int) else math.ceil(total_steps * config.eval_steps)
        return lambda step: step % every == 0
    if strategy == "epoch":
        return lambda step: step % steps_per_epoch == 0 or step == total_steps
    return lambda step: False


def evaluate(model, examples, objective, tokenizer, config: TrainConfig, step: int, epoch: float, **scoring) -> dict:
    """TRL's eval_ metrics after optimizer step ``step``: the step rows' loss, rewards and log-probs of the policy on
    the eval examples (``objective``, against their reference log-probs, precomputed once), each the mean over all of
    them. The policy is scored without gradients in eval mode (``score_completions``: no random numbers are drawn, so
    training continues as without evaluation). TRL averages each eval batch, then the batches: the same numbers when
    the batches are of one size. ``scoring``: score_completions' device, precision and process arguments."""
    logps = score_completions(  # (K, N)
        model,
        examples,
        tokenizer,
        batch_size=2 * config.batch_size,
        reduction=config.reduction,
        packing=config.speedups.packing,
        **scoring,
    )
    everything = np.arange(len(examples))
    _, stats, checks = objective(logps.t() if config.listwise else logps, everything)
    if stats[-1]:
        raise_nonfinite(step, [(everything, what, values) for what, values in checks], everything)
    means = (stats[:-1] / len(examples)).tolist()
    return {"step": step, "epoch": epoch, **{f"eval_{name}": value for name, value in zip(objective.summed, means)}}

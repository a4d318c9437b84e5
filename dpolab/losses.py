"""Preference losses as pure functions of per-sequence log-probabilities (notebooks 04, 05, 08, 09, 10).

Every loss takes four tensors of shape (B,) — ``policy_chosen_logps``, ``policy_rejected_logps``,
``ref_chosen_logps``, ``ref_rejected_logps`` (log pi(y|x) summed over completion tokens, see
``dpolab.logprobs``) — plus keyword parameters, and returns a :class:`LossOutput` of per-example losses and
the implicit rewards r_hat(y) = beta * log(pi_theta(y|x) / pi_ref(y|x)) (eq. 3.1 without log Z).

Notation (notebook 00): the log-ratios are

    chosen_logratios   = log pi_theta(y_w|x) - log pi_ref(y_w|x)
    rejected_logratios = log pi_theta(y_l|x) - log pi_ref(y_l|x)
    h                  = chosen_logratios - rejected_logratios                        (eq. 4.2 uses beta*h)

and each variant is written as a small diff of DPO (notebook 09). All losses live in one registry,
``LOSSES``, a dict from name to function; ``preference_loss(name, ...)`` is the entry point.

Listwise losses take a ranking's log-probs instead: ``policy_logps`` and ``ref_logps`` of shape (B, K), the K
completions of each prompt best first, and return a :class:`ListwiseLossOutput` (per-example losses, the (B, K)
implicit rewards). They live in their own registry, ``LISTWISE_LOSSES`` (Plackett-Luce, eq. 5.2 of notebook 05);
``listwise_loss`` is their entry point. A ranking can instead be expanded into the pairs it implies
(:func:`ranking_pairs`: its K-1 adjacent pairs, or all K(K-1)/2) and fed to any pairwise loss.

``TRL_LOSS_TYPES`` maps TRL 1.16's ``DPOConfig.loss_type`` names onto the registry; ``weighted_loss`` is TRL's
list of loss types with ``loss_weights`` (a weighted sum, per example).

Differences from TRL 1.x worth knowing:
- ``ipo`` takes the log-probs it is given. TRL normalises IPO's h by the number of completion tokens; pass
  per-token mean log-probs (``dpolab.logprobs`` with ``reduction="mean"``) to get TRL's number.
- ``dpop``, ``odpo``, ``kl_sft``, ``dpo_reference_free``, ``rpo`` and the listwise Plackett-Luce loss are not
  in TRL 1.16; TRL's ``discopop`` and ``sft`` loss types are not here (TRL's ``sft`` is a per-token mean over
  the batch's chosen tokens, not a per-example loss).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .theory import check_beta

__all__ = [
    "LossOutput",
    "ListwiseLossOutput",
    "LOSSES",
    "LISTWISE_LOSSES",
    "PAIR_EXPANSIONS",
    "ranking_pairs",
    "listwise_loss",
    "TRL_LOSS_TYPES",
    "trl_loss_table",
    "preference_loss",
    "weighted_loss",
    "plackett_luce_loss",
    "f_divergence_scores",
    "wpo_weights",
    "nonfinite_count",
]


class LossOutput(NamedTuple):
    """Per-example losses and implicit rewards, each of shape (B,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class ListwiseLossOutput(NamedTuple):
    """Per-example losses (B,) and the implicit rewards (B, K) of a listwise loss, best first."""

    losses: torch.Tensor
    rewards: torch.Tensor


LossFn = Callable[..., LossOutput]
LOSSES: dict[str, LossFn] = {}  # pairwise: (pc, pr, rc, rr, *, beta, ...) -> LossOutput
LISTWISE_LOSSES: dict[str, Callable[..., ListwiseLossOutput]] = {}  # (policy_logps, ref_logps, *, beta, ...), (B, K)


def register(name: str, registry: dict | None = None) -> Callable[[LossFn], LossFn]:
    """Add a loss to ``registry`` (``LOSSES`` by default) under ``name``, unique across both registries."""
    registry = LOSSES if registry is None else registry

    def add(fn: LossFn) -> LossFn:
        if name in LOSSES or name in LISTWISE_LOSSES:
            raise KeyError(f"loss {name!r} is registered twice")
        registry[name] = fn
        return fn

    return add


def _rewards(beta: float, pc, pr, rc, rr) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards beta*log(pi/pi_ref) for chosen and rejected, detached (they are metrics)."""
    return (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def _sigmoid_loss(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """-(1-eps) log sigma(z) - eps log sigma(-z): the Bradley-Terry NLL with labels flipped w.p. eps."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


# --- the DPO family -----------------------------------------------------------------------------------


@register("dpo")
def dpo(pc, pr, rc, rr, *, beta: float) -> LossOutput:
    """DPO, eq. (4.2) of notebook 04 (eq. 7 of Rafailov et al. 2023): -log sigma(beta * h)."""
    h = (pc - rc) - (pr - rr)
    return LossOutput(-F.logsigmoid(beta * h), *_rewards(beta, pc, pr, rc, rr))


@register("cdpo")
def cdpo(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.1) -> LossOutput:
    """Conservative DPO (Mitchell 2023), notebook 09: labels flipped with probability eps = label_smoothing.

    -(1-eps) log sigma(beta h) - eps log sigma(-beta h); eps = 0 is DPO.
    """
    h = (pc - rc) - (pr - rr)
    return LossOutput(_sigmoid_loss(beta * h, label_smoothing), *_rewards(beta, pc, pr, rc, rr))


@register("robust")
def robust(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.1) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, eq. 8), notebook 09: an unbiased loss under flip rate eps < 1/2.

    [-(1-eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps); eps = 0 is DPO.
    """
    h = (pc - rc) - (pr - rr)
    z = beta * h
    losses = (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)
    return LossOutput(losses, *_rewards(beta, pc, pr, rc, rr))


@register("ipo")
def ipo(pc, pr, rc, rr, *, beta: float) -> LossOutput:
    """IPO (Azar et al. 2023, eq. 17), notebook 09: (h - 1/(2 beta))^2, minimised at h* = 1/(2 beta)."""
    h = (pc - rc) - (pr - rr)
    return LossOutput((h - 1 / (2 * beta)) ** 2, *_rewards(beta, pc, pr, rc, rr))


@register("hinge")
def hinge(pc, pr, rc, rr, *, beta: float) -> LossOutput:
    """SLiC hinge (Zhao et al. 2023), notebook 09: max(0, 1 - beta h)."""
    h = (pc - rc) - (pr - rr)
    return LossOutput(torch.relu(1 - beta * h), *_rewards(beta, pc, pr, rc, rr))


@register("exo_pair")
def exo_pair(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 1e-3) -> LossOutput:
    """EXO (Ji et al. 2024, eq. 16), notebook 09: KL(q || p) with q = softmax over the pair of beta*logratios
    and p = (1-eps, eps). Needs eps > 0 (log eps); TRL's suggested eps is 1e-3.
    """
    if not 0 < label_smoothing < 1:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1, got {label_smoothing}")
    z = beta * ((pc - rc) - (pr - rr))
    qw, ql = torch.sigmoid(z), torch.sigmoid(-z)
    losses = qw * (F.logsigmoid(z) - math.log1p(-label_smoothing)) + ql * (F.logsigmoid(-z) - math.log(label_smoothing))
    return LossOutput(losses, *_rewards(beta, pc, pr, rc, rr))


@register("nca_pair")
def nca_pair(pc, pr, rc, rr, *, beta: float) -> LossOutput:
    """NCA (Chen et al. 2024), notebook 09: absolute, not relative, rewards.

    -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l), with r = beta * logratio.
    """
    rw, rl = beta * (pc - rc), beta * (pr - rr)
    losses = -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
    return LossOutput(losses, *_rewards(beta, pc, pr, rc, rr))


@register("bco_pair")
def bco_pair(pc, pr, rc, rr, *, beta: float) -> LossOutput:
    """BCO on pairs (Jung et al. 2024), notebook 09: -log sigma(r_w) - log sigma(-r_l).

    TRL's paired form without BCO's running reward shift delta.
    """
    rw, rl = beta * (pc - rc), beta * (pr - rr)
    return LossOutput(-F.logsigmoid(rw) - F.logsigmoid(-rl), *_rewards(beta, pc, pr, rc, rr))


@register("sppo_hard")
def sppo_hard(pc, pr, rc, rr, *, beta: float) -> LossOutput:
    """SPPO with hard win probabilities (Wu et al. 2024, eq. 4.7 with P = 1, 0), notebook 09:
    (logratio_w - 1/(2 beta))^2 + (logratio_l + 1/(2 beta))^2.
    """
    losses = ((pc - rc) - 0.5 / beta) ** 2 + ((pr - rr) + 0.5 / beta) ** 2
    return LossOutput(losses, *_rewards(beta, pc, pr, rc, rr))


@register("aot")
def aot(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """AOT paired (Melnyk et al. 2024), notebook 09: DPO on the batch-sorted policy and reference log-ratios,
    i.e. a stochastic-dominance constraint. Losses are per sorted rank, not per example.
    """
    delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
    return LossOutput(_sigmoid_loss(beta * delta, label_smoothing), *_rewards(beta, pc, pr, rc, rr))


@register("aot_unpaired")
def aot_unpaired(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """AOT unpaired (Melnyk et al. 2024), notebook 09: sort chosen and rejected log-ratios separately."""
    delta = torch.sort(pc - rc, dim=0).values - torch.sort(pr - rr, dim=0).values
    return LossOutput(_sigmoid_loss(beta * delta, label_smoothing), *_rewards(beta, pc, pr, rc, rr))


@register("apo_zero")
def apo_zero(pc, pr, rc, rr, *, beta: float) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7), notebook 09: push chosen up and rejected down,
    1 - sigma(r_w) + sigma(r_l).
    """
    rw, rl = beta * (pc - rc), beta * (pr - rr)
    return LossOutput(1 - torch.sigmoid(rw) + torch.sigmoid(rl), *_rewards(beta, pc, pr, rc, rr))


@register("apo_down")
def apo_down(pc, pr, rc, rr, *, beta: float) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8), notebook 09: push both down, rejected more,
    sigma(r_w) + 1 - sigma(r_w - r_l).
    """
    rw, rl = beta * (pc - rc), beta * (pr - rr)
    return LossOutput(torch.sigmoid(rw) + 1 - torch.sigmoid(rw - rl), *_rewards(beta, pc, pr, rc, rr))


@register("dpop")
def dpop(pc, pr, rc, rr, *, beta: float, dpop_lambda: float = 5.0) -> LossOutput:
    """DPO-Positive (Pal et al. 2024, eq. 3), notebook 08: penalise the chosen log-prob falling below the
    reference's, -log sigma(beta [h - lambda * max(0, log pi_ref(y_w) - log pi_theta(y_w))]); lambda = 0 is DPO.
    """
    h = (pc - rc) - (pr - rr)
    penalty = torch.clamp(rc - pc, min=0)
    return LossOutput(-F.logsigmoid(beta * (h - dpop_lambda * penalty)), *_rewards(beta, pc, pr, rc, rr))


@register("odpo")
def odpo(pc, pr, rc, rr, *, beta: float, offset: torch.Tensor | float = 0.0) -> LossOutput:
    """DPO with an offset (Amini et al. 2024, eq. 6), notebook 08: -log sigma(beta h - Delta), where the
    offset Delta (a float or a (B,) tensor) says how much better y_w is; Delta = 0 is DPO.
    """
    h = (pc - rc) - (pr - rr)
    offset = torch.as_tensor(offset, dtype=h.dtype, device=h.device)
    return LossOutput(-F.logsigmoid(beta * h - offset), *_rewards(beta, pc, pr, rc, rr))


@register("dpo_reference_free")
def dpo_reference_free(pc, pr, rc, rr, *, beta: float) -> LossOutput:
    """Reference-free DPO, notebook 09: DPO with pi_ref uniform, -log sigma(beta (log pi(y_w) - log pi(y_l))).

    The reference log-probs are ignored by the loss but still used for the reported rewards.
    """
    return LossOutput(-F.logsigmoid(beta * (pc - pr)), *_rewards(beta, pc, pr, rc, rr))


def f_divergence_scores(logratios: torch.Tensor, f_divergence: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(pi/pi_ref) evaluated from log(pi/pi_ref), for f-DPO (Wang et al. 2023, Table 1), notebook 09.

    reverse_kl: log t;  forward_kl: 1 - 1/t;  js_divergence: log(2t / (1 + t));  alpha_divergence:
    (t^(alpha-1) - 1) / (alpha - 1)  (alpha -> 1 is reverse KL). TRL's conventions and names.
    """
    if f_divergence == "reverse_kl":
        return logratios
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        return torch.expm1((alpha - 1.0) * logratios) / (alpha - 1.0)
    raise ValueError(
        f"unknown f_divergence {f_divergence!r}; known: reverse_kl, forward_kl, js_divergence, alpha_divergence"
    )


@register("fdpo")
def fdpo(pc, pr, rc, rr, *, beta: float, f_divergence: str = "reverse_kl", alpha: float = 0.5) -> LossOutput:
    """f-DPO (Wang et al. 2023, eq. 11), notebook 09: DPO with log t replaced by f'(t), t = pi/pi_ref,
    -log sigma(beta [f'(t_w) - f'(t_l)]). ``f_divergence="reverse_kl"`` is DPO.
    """
    delta = f_divergence_scores(pc - rc, f_divergence, alpha) - f_divergence_scores(pr - rr, f_divergence, alpha)
    return LossOutput(-F.logsigmoid(beta * delta), *_rewards(beta, pc, pr, rc, rr))


@register("rpo")
def rpo(pc, pr, rc, rr, *, beta: float, rpo_alpha: float = 1.0) -> LossOutput:
    """RPO (Pang et al. 2024, eq. 2), notebook 09: DPO + alpha * NLL of the chosen, -log pi_theta(y_w|x).

    The NLL is whatever ``pc`` is: a sum over tokens by default; pass mean log-probs for a per-token NLL.
    """
    h = (pc - rc) - (pr - rr)
    return LossOutput(-F.logsigmoid(beta * h) - rpo_alpha * pc, *_rewards(beta, pc, pr, rc, rr))


@register("sft")
def sft(pc, pr, rc, rr, *, beta: float) -> LossOutput:
    """SFT on the chosen responses, notebook 10: -log pi_theta(y_w|x). beta only scales the reported rewards."""
    return LossOutput(-pc, *_rewards(beta, pc, pr, rc, rr))


@register("kl_sft")
def kl_sft(pc, pr, rc, rr, *, beta: float, kl_coef: float = 0.1) -> LossOutput:
    """KL-SFT, notebook 10: SFT plus a penalty on the chosen log-prob moving away from the reference's,
    in either direction: -log pi_theta(y_w) + kl_coef * (log pi_theta(y_w) - log pi_ref(y_w))^2.

    The square is the second-order term of a KL between the policy and the reference along y_w; it is zero
    with zero gradient at the reference. (The seed experiment's code compared log pi_theta(y_w) with
    log pi_theta(y_l) instead; here the comparison is with the reference, as its text describes.)
    """
    return LossOutput(-pc + kl_coef * (pc - rc) ** 2, *_rewards(beta, pc, pr, rc, rr))


# --- TRL's names -------------------------------------------------------------------------------------------

# TRL 1.16's DPOConfig.loss_type -> (the registry loss, the log-prob reduction that gives TRL's number). TRL sums
# log-probs over completion tokens except for "ipo" and "sigmoid_norm", which it divides by the completion length
# ("mean"). TRL's f_divergence_type other than reverse_kl on "sigmoid" is the registry's "fdpo". The registry's
# label_smoothing is TRL's label_smoothing for robust, exo_pair, aot and aot_unpaired.
TRL_LOSS_TYPES: dict[str, tuple[str, str]] = {
    "sigmoid": ("dpo", "sum"),
    "sigmoid_norm": ("dpo", "mean"),
    "hinge": ("hinge", "sum"),
    "ipo": ("ipo", "mean"),
    "exo_pair": ("exo_pair", "sum"),
    "nca_pair": ("nca_pair", "sum"),
    "robust": ("robust", "sum"),
    "bco_pair": ("bco_pair", "sum"),
    "sppo_hard": ("sppo_hard", "sum"),
    "aot": ("aot", "sum"),
    "aot_unpaired": ("aot_unpaired", "sum"),
    "apo_zero": ("apo_zero", "sum"),
    "apo_down": ("apo_down", "sum"),
}


def trl_loss_table() -> str:
    """``TRL_LOSS_TYPES`` as a Markdown table: TRL loss_type, registry loss, reduction (the README shows it)."""
    lines = ["| TRL `loss_type` | dpolab loss | reduction |", "| --- | --- | --- |"]
    lines += [f"| `{loss_type}` | `{name}` | {reduction} |" for loss_type, (name, reduction) in TRL_LOSS_TYPES.items()]
    return "\n".join(lines)


# --- checked entry points ------------------------------------------------------------------------------


def _check_logps(check_finite: bool, **tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"log-probs must all have the same shape (B,), got {shapes}")
    for name, t in tensors.items():
        if not torch.is_floating_point(t):
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if not check_finite:
            continue
        bad = ~torch.isfinite(t.detach())
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"{name} has non-finite values (NaN or inf) at batch rows {rows[:10]}")


def nonfinite_count(checks: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """How many of the ``(what, values)`` checks' values are NaN or inf, a 0-d float64 tensor on their device:
    computed without looking at it on the host (``dpolab.train`` reads it with its metrics, once per step)."""
    return sum(((~torch.isfinite(values)).sum() for _, values in checks), torch.zeros((), dtype=torch.float64))


def _check_params(name: str, params: dict) -> None:
    eps = params.get("label_smoothing")
    if eps is not None:
        upper = 0.5 if name in ("robust", "cdpo") else 1.0
        if not 0 <= eps < upper:
            raise ValueError(f"{name}: label_smoothing must be in [0, {upper}), got {eps}")
    for key in ("dpop_lambda", "kl_coef", "rpo_alpha"):
        if key in params and not (math.isfinite(params[key]) and params[key] >= 0):
            raise ValueError(f"{name}: {key} must be a finite number >= 0, got {params[key]}")


def preference_loss(
    name: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    return_rewards: bool = False,
    check_finite: bool = True,
    **params,
) -> torch.Tensor | LossOutput:
    """Per-example loss ``name`` from the registry, shape (B,).

    Args:
        name: a key of ``LOSSES`` (``sorted(LOSSES)`` lists them).
        policy_chosen_logps, policy_rejected_logps: (B,) log pi_theta(y|x) of the chosen / rejected completions.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the frozen reference.
        return_rewards: return a :class:`LossOutput` (losses, chosen_rewards, rejected_rewards) instead.
        check_finite: refuse NaN or inf log-probs (a ValueError naming the rows). Off, no value is looked at on the
            host, so the loss adds no device synchronisation (``dpolab.train`` checks its own, once per step).
        **params: ``beta`` (required, > 0) and the loss's own parameters: ``label_smoothing`` (cdpo, robust,
            exo_pair, aot), ``dpop_lambda`` (dpop), ``offset`` (odpo: float or (B,) tensor), ``f_divergence`` and
            ``alpha`` (fdpo), ``rpo_alpha`` (rpo), ``kl_coef`` (kl_sft).
    """
    if name in LISTWISE_LOSSES:
        raise ValueError(f"{name} is a listwise loss: call listwise_loss({name!r}, ...) with (B, K) log-probs")
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    if "beta" not in params:
        raise ValueError(f"{name}: the parameter beta is required")
    params["beta"] = check_beta(params["beta"])
    _check_params(name, params)
    _check_logps(
        check_finite,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    try:
        out = LOSSES[name](policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **params)
    except TypeError as err:  # an unexpected keyword: say which ones the loss takes
        accepted = [p for p in inspect.signature(LOSSES[name]).parameters if p not in ("pc", "pr", "rc", "rr")]
        raise ValueError(f"{name}: {err}; it takes {accepted}") from None
    return out if return_rewards else out.losses


def weighted_loss(
    names: Sequence[str],
    weights: Sequence[float],
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    check_finite: bool = True,
    **params,
) -> LossOutput:
    """sum_k weights[k] * LOSSES[names[k]], per example, shape (B,): TRL's ``loss_type`` list with ``loss_weights``
    (TRL adds the weighted batch means, the same number after the mean over the batch).

    Each loss receives ``beta`` and those of ``params`` it takes (e.g. ``label_smoothing`` for robust and exo_pair
    alike, as in TRL); a parameter that none of them takes is an error. The rewards are the losses' common ones.
    ``check_finite``: as :func:`preference_loss`'s.
    """
    if len(names) != len(weights) or not names:
        raise ValueError(f"need one weight per loss, got losses {list(names)} and weights {list(weights)}")
    accepted = {name: set(inspect.signature(LOSSES[name]).parameters) if name in LOSSES else set() for name in names}
    unused = sorted(set(params) - set().union(*accepted.values()))
    if unused:
        raise ValueError(f"none of the losses {list(names)} takes the parameters {unused}")
    outputs = [
        preference_loss(
            name,
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            return_rewards=True,
            check_finite=check_finite,
            **{k: v for k, v in params.items() if k in accepted[name] or k == "beta"},
        )
        for name in names
    ]
    losses = sum(weight * out.losses for weight, out in zip(weights, outputs))
    return LossOutput(losses, outputs[0].chosen_rewards, outputs[0].rejected_rewards)


def plackett_luce_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Listwise DPO under Plackett-Luce, eq. (5.2) of notebook 05 (appendix A.3 of Rafailov et al. 2023).

    -log prod_k exp(r_hat_k) / sum_{j>=k} exp(r_hat_j), r_hat_k = beta log(pi_theta(y_k)/pi_ref(y_k)).

    Args:
        policy_logps, ref_logps: (B, K) log-probs of K >= 2 responses per prompt, ordered best first.
        beta: > 0.

    Returns:
        (B,) per-example losses. For K = 2 this equals ``preference_loss("dpo", ...)``.
    """
    beta = check_beta(beta)
    _check_rankings(policy_logps, ref_logps, check_finite=True)
    return _plackett_luce(policy_logps, ref_logps, beta)


def _check_rankings(policy_logps: torch.Tensor, ref_logps: torch.Tensor, check_finite: bool) -> None:
    if policy_logps.ndim != 2 or policy_logps.shape != ref_logps.shape or policy_logps.shape[1] < 2:
        raise ValueError(
            f"policy_logps and ref_logps must both be (B, K) with K >= 2, got {tuple(policy_logps.shape)} "
            f"and {tuple(ref_logps.shape)}"
        )
    for label, t in (("policy_logps", policy_logps), ("ref_logps", ref_logps)):
        if check_finite and not torch.isfinite(t.detach()).all():
            raise ValueError(f"{label} has non-finite values (NaN or inf)")


def _plackett_luce(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """(B,) losses of eq. (5.2), the inputs checked by the caller."""
    rewards = beta * (policy_logps - ref_logps)  # (B, K), best first
    suffix_lse = torch.logcumsumexp(rewards.flip(-1), dim=-1).flip(-1)  # log sum_{j>=k} exp(r_j)
    return -(rewards - suffix_lse)[:, :-1].sum(-1)  # the last factor is exp(r_K)/exp(r_K) = 1


@register("plackett_luce", LISTWISE_LOSSES)
def plackett_luce(policy_logps, ref_logps, *, beta: float) -> ListwiseLossOutput:
    """Listwise DPO under Plackett-Luce, eq. (5.2) of notebook 05 (:func:`plackett_luce_loss`), with the implicit
    rewards r_hat_k = beta log(pi_theta(y_k)/pi_ref(y_k)), (B, K), detached. K = 2 is DPO (eq. 4.2)."""
    rewards = (beta * (policy_logps - ref_logps)).detach()
    return ListwiseLossOutput(_plackett_luce(policy_logps, ref_logps, beta), rewards)


PAIR_EXPANSIONS = ("adjacent", "all")  # the pairs a ranking implies, for a pairwise loss (ranking_pairs)


def ranking_pairs(n_completions: int, which: str) -> list[tuple[int, int]]:
    """The pairs (winner, loser) of positions that a ranking of K completions (best first) implies: its K-1
    ``"adjacent"`` pairs (k, k+1), or ``"all"`` K(K-1)/2 pairs (i, j), i < j.

    Under Plackett-Luce (5.1) y_i precedes y_j with probability sigma(r_i - r_j) whatever else is ranked (the Gumbel
    race, eq. 5.4), so "all" pairs are Bradley-Terry draws, though the pairs of one ranking are not independent;
    "adjacent" pairs are picked by the ranking itself, and y_i beats y_j among them with another probability
    (K = 3, rewards 1, 0.2, -0.7: 0.657 against sigma(0.8) = 0.690). ``tests/test_listwise.py`` reports what each
    does on the toy world."""
    if which not in PAIR_EXPANSIONS:
        raise ValueError(f"pairs of a ranking: one of {PAIR_EXPANSIONS}, got {which!r}")
    if n_completions < 2:
        raise ValueError(f"a ranking has at least 2 completions, got {n_completions}")
    if which == "adjacent":
        return [(k, k + 1) for k in range(n_completions - 1)]
    return [(i, j) for i in range(n_completions) for j in range(i + 1, n_completions)]


def listwise_loss(
    names: str | Sequence[str],
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    weights: Sequence[float] | None = None,
    check_finite: bool = True,
    **params,
) -> ListwiseLossOutput:
    """sum_k weights[k] * LISTWISE_LOSSES[names[k]], per example, (B,), on (B, K) log-probs best first: the entry
    point of the listwise registry, as :func:`weighted_loss` is of the pairwise one. Each loss receives ``beta``
    (required, > 0) and those of ``params`` it takes; a parameter none takes is an error. The rewards are the first
    loss's. ``check_finite``: as :func:`preference_loss`'s."""
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0] * len(names) if weights is None else list(weights)
    unknown = [name for name in names if name not in LISTWISE_LOSSES]
    if unknown or not names or len(weights) != len(names):
        raise ValueError(
            f"listwise losses: {names} with weights {weights}; known listwise losses: {', '.join(LISTWISE_LOSSES)}"
        )
    if "beta" not in params:
        raise ValueError(f"{names}: the parameter beta is required")
    params["beta"] = check_beta(params["beta"])
    accepted = {name: set(inspect.signature(LISTWISE_LOSSES[name]).parameters) for name in names}
    unused = sorted(set(params) - set().union(*accepted.values()))
    if unused:
        raise ValueError(f"none of the losses {names} takes the parameters {unused}")
    _check_rankings(policy_logps, ref_logps, check_finite)
    outputs = [
        LISTWISE_LOSSES[name](policy_logps, ref_logps, **{k: params[k] for k in accepted[name] & set(params)})
        for name in names
    ]
    losses = sum(weight * out.losses for weight, out in zip(weights, outputs))
    return ListwiseLossOutput(losses, outputs[0].rewards)


def wpo_weights(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor) -> torch.Tensor:
    """WPO weights (Zhou et al. 2024, eq. 2), notebook 09: w = exp(mean token log pi(y_w)) * exp(mean token
    log pi(y_l)), detached; multiply any per-example loss by them to weight pairs by how on-policy they are.

    Takes per-token *mean* log-probs, shape (B,) (``dpolab.logprobs`` with ``reduction="mean"``). This is the
    paper's plain form; TRL additionally subtracts log sum_v p_v^2 per token ("aligned" weights).
    """
    return torch.exp(chosen_mean_logps + rejected_mean_logps).detach()

"""dpolab.losses against closed forms, independent re-derivations and Hypothesis properties."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpolab.losses import LOSSES, LossOutput, plackett_luce_loss, preference_loss, wpo_weights

finite = st.floats(min_value=-30, max_value=30, allow_nan=False, width=64)
batch = st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=6)
betas = st.floats(min_value=0.01, max_value=5.0)


def unpack(rows):
    t = torch.tensor(rows, dtype=torch.float64)
    return t[:, 0], t[:, 1], t[:, 2], t[:, 3]


def dpo_by_hand(pc, pr, rc, rr, beta):
    """-log sigma(z) computed as log(1 + exp(-z)), one example at a time (eq. 4.2)."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        z = beta * ((a - c) - (b - d))
        out.append(math.log1p(math.exp(-z)) if z > -30 else -z + math.log1p(math.exp(z)))
    return torch.tensor(out, dtype=torch.float64)


@settings(max_examples=50, deadline=None)
@given(batch, betas)
def test_dpo_equals_scalar_formula(rows, beta):
    pc, pr, rc, rr = unpack(rows)
    torch.testing.assert_close(preference_loss("dpo", pc, pr, rc, rr, beta=beta), dpo_by_hand(pc, pr, rc, rr, beta))


@settings(max_examples=50, deadline=None)
@given(batch, betas, finite, finite)
def test_z_cancels(rows, beta, c1, c2):
    """Adding a constant to both policy log-probs of a pair (a prompt-level log Z), or to the chosen policy and
    reference log-probs together, leaves DPO unchanged (notebook 04)."""
    pc, pr, rc, rr = unpack(rows)
    base = preference_loss("dpo", pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close(preference_loss("dpo", pc + c1, pr + c1, rc, rr, beta=beta), base)
    torch.testing.assert_close(preference_loss("dpo", pc + c2, pr, rc + c2, rr, beta=beta), base)


@settings(max_examples=50, deadline=None)
@given(batch, betas)
def test_special_parameters_reduce_to_dpo(rows, beta):
    pc, pr, rc, rr = unpack(rows)
    dpo = preference_loss("dpo", pc, pr, rc, rr, beta=beta)
    for name, params in [
        ("dpop", {"dpop_lambda": 0.0}),
        ("odpo", {"offset": 0.0}),
        ("odpo", {"offset": torch.zeros_like(pc)}),
        ("cdpo", {"label_smoothing": 0.0}),
        ("robust", {"label_smoothing": 0.0}),
        ("rpo", {"rpo_alpha": 0.0}),
        ("fdpo", {"f_divergence": "reverse_kl"}),
        ("fdpo", {"f_divergence": "alpha_divergence", "alpha": 1.0}),
    ]:
        torch.testing.assert_close(preference_loss(name, pc, pr, rc, rr, beta=beta, **params), dpo, msg=name)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=5), betas)
def test_plackett_luce_k2_equals_dpo(rows, beta):
    pc, pr, rc, rr = unpack(rows)
    pl = plackett_luce_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), beta)
    torch.testing.assert_close(pl, preference_loss("dpo", pc, pr, rc, rr, beta=beta))


def test_plackett_luce_equals_product_over_positions():
    """Eq. (5.2) by explicit loops for K = 4, and the K! ranking probabilities sum to one."""
    torch.manual_seed(0)
    pol, ref, beta = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), 0.7
    r = beta * (pol - ref)
    expected = []
    for b in range(3):
        logp = 0.0
        for k in range(4):
            logp += r[b, k].item() - math.log(sum(math.exp(r[b, j].item()) for j in range(k, 4)))
        expected.append(-logp)
    torch.testing.assert_close(plackett_luce_loss(pol, ref, beta), torch.tensor(expected, dtype=torch.float64))
    total = sum(torch.exp(-plackett_luce_loss(pol[:, p], ref[:, p], beta)) for p in itertools.permutations(range(4)))
    torch.testing.assert_close(total, torch.ones(3, dtype=torch.float64))


@given(betas)
def test_ipo_minimised_at_half_inverse_beta(beta):
    """IPO's optimum h* = 1/(2 beta) (notebook 09): the loss is 0 there and positive on either side."""
    h_star = 1 / (2 * beta)
    zero = torch.zeros(3, dtype=torch.float64)
    pc = torch.tensor([h_star - 0.1, h_star, h_star + 0.1], dtype=torch.float64)
    losses = preference_loss("ipo", pc, zero, zero, zero, beta=beta)
    assert losses[1].item() == pytest.approx(0.0, abs=1e-12)
    assert losses[0] > 0 and losses[2] > 0


def test_dpo_gradient_weight_is_sigmoid_of_reward_gap():
    """d loss / d log pi(y_w) = -beta sigma(r_l - r_w) (notebook 04, eq. 4.3)."""
    pc = torch.tensor([-3.0, -1.0], dtype=torch.float64, requires_grad=True)
    pr, rc, rr, beta = (
        torch.tensor([-2.0, -4.0]).double(),
        torch.tensor([-2.5, -1.5]).double(),
        torch.tensor([-2.0, -3.0]).double(),
        0.5,
    )
    preference_loss("dpo", pc, pr, rc, rr, beta=beta).sum().backward()
    rw, rl = beta * (pc.detach() - rc), beta * (pr - rr)
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(rl - rw))


def test_dpop_penalty_only_when_chosen_falls_below_reference():
    zero = torch.zeros(2, dtype=torch.float64)
    pc = torch.tensor([-1.0, 1.0], dtype=torch.float64)  # below, above the reference (0)
    dpop = preference_loss("dpop", pc, zero, zero, zero, beta=0.5, dpop_lambda=5.0)
    # below: h = -1, penalty 1 -> -log sigma(0.5 * (-1 - 5)); above: no penalty -> DPO
    expected = torch.tensor([math.log1p(math.exp(3.0)), math.log1p(math.exp(-0.5))], dtype=torch.float64)
    torch.testing.assert_close(dpop, expected)


def test_kl_sft_penalises_both_directions_and_sft_is_nll():
    rc = torch.zeros(3, dtype=torch.float64)
    pc = torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64)
    sft = preference_loss("sft", pc, rc, rc, rc, beta=0.1)
    torch.testing.assert_close(sft, -pc)
    kl = preference_loss("kl_sft", pc, rc, rc, rc, beta=0.1, kl_coef=0.5)
    torch.testing.assert_close(kl - sft, torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64))


def test_rewards_are_beta_logratios():
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-1.0, -2.0, -1.5, -1.0))
    out = preference_loss("dpo", pc, pr, rc, rr, beta=0.2, return_rewards=True)
    assert isinstance(out, LossOutput)
    assert out.chosen_rewards.item() == pytest.approx(0.1)
    assert out.rejected_rewards.item() == pytest.approx(-0.2)


def test_every_registered_loss_runs_and_is_differentiable():
    torch.manual_seed(0)
    pc = torch.randn(5, dtype=torch.float64, requires_grad=True)
    pr, rc, rr = (torch.randn(5, dtype=torch.float64) for _ in range(3))
    for name in LOSSES:
        losses = preference_loss(name, pc, pr, rc, rr, beta=0.3)
        assert losses.shape == (5,) and torch.isfinite(losses).all(), name
        (g,) = torch.autograd.grad(losses.sum(), pc)
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_wpo_weights():
    w = wpo_weights(torch.tensor([-0.5]), torch.tensor([-1.0]))
    assert w.item() == pytest.approx(math.exp(-1.5))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "dpox", "beta": 0.1}, "unknown loss 'dpox'; known losses: .*dpo"),
        ({"name": "dpo", "beta": 0.0}, "beta must be a finite number > 0"),
        ({"name": "dpo", "beta": -1.0}, "beta must be a finite number > 0"),
        ({"name": "dpo", "beta": float("nan")}, "beta must be a finite number > 0"),
        ({"name": "dpo"}, "beta is required"),
        ({"name": "robust", "beta": 0.1, "label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"name": "dpop", "beta": 0.1, "dpop_lambda": -1.0}, "dpop_lambda must be a finite number >= 0"),
        ({"name": "dpo", "beta": 0.1, "dpop_lambda": 1.0}, "dpo: .*dpop_lambda.*it takes \\['beta'\\]"),
        ({"name": "fdpo", "beta": 0.1, "f_divergence": "hellinger"}, "unknown f_divergence 'hellinger'"),
    ],
)
def test_bad_parameters(kwargs, match):
    x = torch.zeros(2)
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        preference_loss(name, x, x, x, x, **kwargs)


def test_bad_tensors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="same shape"):
        preference_loss("dpo", x, torch.zeros(2), x, x, beta=0.1)
    with pytest.raises(ValueError, match=r"policy_rejected_logps has non-finite values .* rows \[1\]"):
        preference_loss("dpo", x, torch.tensor([0.0, float("nan"), 0.0]), x, x, beta=0.1)
    with pytest.raises(ValueError, match="inf"):
        preference_loss("dpo", x, x, torch.tensor([0.0, 0.0, -float("inf")]), x, beta=0.1)
    with pytest.raises(ValueError, match=r"\(B, K\) with K >= 2"):
        plackett_luce_loss(torch.zeros(2, 1), torch.zeros(2, 1), 0.1)


def test_the_readmes_trl_table_is_the_registrys():
    """The README shows TRL_LOSS_TYPES as rendered by trl_loss_table (test_losses_trl.py checks each row against
    TRL's own loss), and every registry name in it is a loss of the registry."""
    from pathlib import Path

    from dpolab.losses import TRL_LOSS_TYPES, trl_loss_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    shown = readme.split("<!-- BEGIN TRL_LOSS_TYPES -->\n")[1].split("\n<!-- END TRL_LOSS_TYPES -->")[0]
    assert shown == trl_loss_table()
    assert all(name in LOSSES and reduction in ("sum", "mean") for name, reduction in TRL_LOSS_TYPES.values())

"""Notebook 08's identities (dpolab.derivations): DPO's gradient sees the margin only; DPOP's does not."""

import sympy as sp
import torch

from dpolab import derivations as d
from dpolab.losses import preference_loss

LAM = sp.Symbol("lambda", positive=True)


def _dpop(a, b, a0, b0):
    return d.dpop_pair_loss_below_reference(a, b, a0, b0, LAM)


def test_dpo_gradient_depends_on_the_margin_only_and_matches_autograd():
    assert d.gradient_depends_on_margin_only(d.dpo_pair_loss)
    (d_a, d_b), (u_w, h) = d.gradient_in_margin_coordinates(d.dpo_pair_loss)
    values = {d.beta: 0.5, h: 1.0, u_w: -3.0}
    # autograd of the library's DPO at a point with that margin and chosen log-ratio
    a = torch.tensor([-23.0], dtype=torch.float64, requires_grad=True)  # u_w = -3 against a0 = -20
    b = torch.tensor([-24.0], dtype=torch.float64, requires_grad=True)  # u_l = -4, so h = 1
    ref = torch.tensor([-20.0], dtype=torch.float64)
    grad_a, grad_b = torch.autograd.grad(preference_loss("dpo", a, b, ref, ref, beta=0.5).sum(), [a, b])
    assert abs(float(d_a.subs(values)) - grad_a.item()) < 1e-12
    assert abs(float(d_b.subs(values)) - grad_b.item()) < 1e-12


def test_dpop_below_the_reference_is_not_blind_to_the_chosen_log_ratio():
    assert not d.gradient_depends_on_margin_only(_dpop)
    (d_a, _), (u_w, h) = d.gradient_in_margin_coordinates(_dpop)
    at = {d.beta: 0.5, LAM: 5.0, h: 1.0}
    # witness: same margin, chosen log-ratio -1 and -3, different pushes on log pi(y_w)
    assert abs(float(d_a.subs({**at, u_w: -1.0})) - float(d_a.subs({**at, u_w: -3.0}))) > 1e-3
    # and lambda = 0 is DPO again
    assert d.gradient_depends_on_margin_only(lambda a, b, a0, b0: d.dpop_pair_loss_below_reference(a, b, a0, b0, 0))

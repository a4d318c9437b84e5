"""Every loss that TRL 1.x implements, checked against TRL's own DPOTrainer on identical inputs.

TRL computes its loss from the model it trains; so do we: the same tiny GPT-2, the same reference (a perturbed
copy, so that the log-ratios are not zero), the same batch built by TRL's own collator. Our side goes through
``dpolab.logprobs.concatenated_logps`` and ``dpolab.losses.preference_loss``, so this checks both.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl", reason="trl is part of the [trl] extra that `make test` installs")
from datasets import Dataset
from helpers import perturbed_copy, tiny_gpt2, word_tokenizer
from trl import DPOConfig, DPOTrainer

from dpolab.logprobs import concatenated_logps
from dpolab.losses import TRL_LOSS_TYPES, preference_loss, weighted_loss
from dpolab.train import TrainConfig

pytestmark = pytest.mark.trl

ROWS = [
    ("the sun was bright", "and we walk to the penn campus", "and we walk to the park"),
    ("my dog and my cat", "were at the university library today", "were at home today"),
    ("after the lecture we", "had tea at the penn museum", "had coffee"),
    ("the train was late so", "we walk to campus with students of penn", "we walk home in the rain"),
]

# (our name, our params, TRL DPOConfig overrides, reduction of log-probs)
CASES = [
    ("dpo", {}, {"loss_type": ["sigmoid"]}, "sum"),
    ("hinge", {}, {"loss_type": ["hinge"]}, "sum"),
    ("ipo", {}, {"loss_type": ["ipo"]}, "mean"),  # TRL normalises IPO by completion length
    ("exo_pair", {"label_smoothing": 1e-3}, {"loss_type": ["exo_pair"], "label_smoothing": 1e-3}, "sum"),
    ("nca_pair", {}, {"loss_type": ["nca_pair"]}, "sum"),
    ("robust", {"label_smoothing": 0.2}, {"loss_type": ["robust"], "label_smoothing": 0.2}, "sum"),
    ("bco_pair", {}, {"loss_type": ["bco_pair"]}, "sum"),
    ("sppo_hard", {}, {"loss_type": ["sppo_hard"]}, "sum"),
    ("aot", {}, {"loss_type": ["aot"]}, "sum"),
    ("aot_unpaired", {"label_smoothing": 0.1}, {"loss_type": ["aot_unpaired"], "label_smoothing": 0.1}, "sum"),
    ("apo_zero", {}, {"loss_type": ["apo_zero"]}, "sum"),
    ("apo_down", {}, {"loss_type": ["apo_down"]}, "sum"),
    ("fdpo", {"f_divergence": "forward_kl"}, {"f_divergence_type": "forward_kl"}, "sum"),
    ("fdpo", {"f_divergence": "js_divergence"}, {"f_divergence_type": "js_divergence"}, "sum"),
    (
        "fdpo",
        {"f_divergence": "alpha_divergence", "alpha": 0.3},
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        "sum",
    ),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = word_tokenizer()
    policy = tiny_gpt2(len(tokenizer), seed=0)
    ref = perturbed_copy(policy, seed=1, scale=0.2)
    data = Dataset.from_dict(
        {"prompt": [r[0] for r in ROWS], "chosen": [" " + r[1] for r in ROWS], "rejected": [" " + r[2] for r in ROWS]}
    )  # TRL's standard format: the completions carry the space
    return tokenizer, policy, ref, data, tmp_path_factory.mktemp("trl")


def trl_args(out, beta, overrides) -> DPOConfig:
    return DPOConfig(
        output_dir=str(out),
        beta=beta,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=len(ROWS),
        max_length=64,
        use_cpu=True,
        **overrides,
    )


def trl_loss_and_batch(setup, beta, overrides):
    tokenizer, policy, ref, data, out = setup
    args = trl_args(out, beta, overrides)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to("cpu") for k, v in batch.items()}
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    return loss, batch


@pytest.mark.parametrize("name,params,overrides,reduction", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_loss_equals_trl(setup, name, params, overrides, reduction):
    _, policy, ref, _, _ = setup
    beta = 0.3
    trl_loss, batch = trl_loss_and_batch(setup, beta, overrides)
    with torch.no_grad():
        pc, pr = concatenated_logps(policy, batch, reduction=reduction)
        rc, rr = concatenated_logps(ref, batch, reduction=reduction)
    ours = preference_loss(name, pc, pr, rc, rr, beta=beta, **params).mean()
    # the log-ratios must be far from zero, or the comparison would be weak
    assert (pc - rc).abs().min() > 1e-3 and (pr - rr).abs().min() > 1e-3
    torch.testing.assert_close(ours, trl_loss.float(), rtol=1e-5, atol=1e-5)


def test_trl_metrics_equal_our_rewards(setup):
    """rewards/chosen and rewards/rejected as TRL logs them equal our implicit rewards."""
    tokenizer, policy, ref, data, out = setup
    beta = 0.7
    args = DPOConfig(
        output_dir=str(out),
        beta=beta,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=len(ROWS),
        max_length=64,
        use_cpu=True,
    )
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trainer._compute_loss(trainer.model, batch, return_outputs=False)
        pc, pr = concatenated_logps(policy, batch)
        rc, rr = concatenated_logps(ref, batch)
    out = preference_loss("dpo", pc, pr, rc, rr, beta=beta, return_rewards=True)
    metrics = trainer._metrics["train"] if trainer.model.training else trainer._metrics["eval"]
    assert metrics["rewards/chosen"][-1] == pytest.approx(out.chosen_rewards.mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"][-1] == pytest.approx(out.rejected_rewards.mean().item(), abs=1e-5)
    assert metrics["logps/chosen"][-1] == pytest.approx(pc.mean().item(), abs=1e-4)


# TRL configurations converted by TrainConfig.from_trl: every loss type of dpolab.losses.TRL_LOSS_TYPES (with the
# label smoothing its loss needs) and combinations with loss_weights.
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1}
FROM_TRL = {
    **{t: {"loss_type": [t], "label_smoothing": SMOOTHING.get(t, 0.0)} for t in TRL_LOSS_TYPES},
    "sigmoid+bco_pair+hinge (weighted)": {
        "loss_type": ["sigmoid", "bco_pair", "hinge"],
        "loss_weights": [0.8, 0.2, 1.0],
    },
    "robust+exo_pair (shared smoothing)": {"loss_type": ["robust", "exo_pair"], "label_smoothing": 0.1},
    "ipo+sigmoid_norm (weighted)": {"loss_type": ["ipo", "sigmoid_norm"], "loss_weights": [0.5, 2.0]},
    "sigmoid, js_divergence": {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
    "sigmoid, alpha_divergence": {
        "loss_type": ["sigmoid"],
        "f_divergence_type": "alpha_divergence",
        "f_alpha_divergence_coef": 0.3,
    },
}


@pytest.mark.parametrize("case", FROM_TRL, ids=list(FROM_TRL))
def test_from_trl_gives_trls_loss(setup, case):
    """TrainConfig.from_trl(DPOConfig) names the registry losses, weights, parameters and reduction that give the
    loss TRL's DPOTrainer computes, multi-loss combinations included."""
    _, policy, ref, _, out = setup
    beta = 0.3
    trl_loss, batch = trl_loss_and_batch(setup, beta, FROM_TRL[case])
    config = TrainConfig.from_trl(trl_args(out, beta, FROM_TRL[case]), output_dir=None)
    with torch.no_grad():
        pc, pr = concatenated_logps(policy, batch, reduction=config.reduction)
        rc, rr = concatenated_logps(ref, batch, reduction=config.reduction)
        out = weighted_loss(config.losses, config.weights, pc, pr, rc, rr, beta=config.beta, **config.loss_kwargs)
    torch.testing.assert_close(out.losses.mean(), trl_loss.float(), rtol=1e-5, atol=1e-5)

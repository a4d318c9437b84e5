"""TrainConfig.from_trl: a trl.DPOConfig converted field by field, or refused by field name (dpolab/train/from_trl.py).

That the converted objective gives TRL's loss is checked in test_losses_trl.py, and that two training steps give
TRL's metrics in test_data_trl.py; here, the field mapping itself.
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("trl", reason="trl is part of the [trl] extra that `make test` installs")
from trl import DPOConfig

from dpolab.train import Speedups, TrainConfig
from dpolab.train.from_trl import _ADVICE, _CONVERTED, NO_EFFECT

pytestmark = pytest.mark.trl


@pytest.fixture
def dpo_config(tmp_path):
    def make(**fields) -> DPOConfig:
        return DPOConfig(output_dir=str(tmp_path / "out"), bf16=False, use_cpu=True, report_to="none", **fields)

    return make


def test_every_dpoconfig_field_is_converted_ignored_or_refused_with_advice():
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    groups = [_CONVERTED, NO_EFFECT, set(_ADVICE)]
    assert set().union(*groups) == names  # nothing unclassified in this TRL, nothing stale
    assert sum(len(g) for g in groups) == len(names)  # each field in one group


def test_trls_defaults_become_trls_settings(dpo_config, tmp_path):
    c = TrainConfig.from_trl(dpo_config())
    expected = {
        "loss": "dpo",
        "loss_weights": None,
        "reduction": "sum",
        "beta": 0.1,
        "learning_rate": 1e-6,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "adam_betas": (0.9, 0.999),
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "epochs": 3,
        "max_steps": None,
        "batch_size": 8,
        "grad_accum_steps": 1,
        "max_length": 1024,
        "truncation_mode": "keep_start",
        "pad_to_multiple_of": None,
        "seed": 42,
        "disable_dropout": True,
        "precision": "fp32",
        "device": "cpu",
        "output_dir": str(tmp_path / "out"),
        "save_steps": 500,
        "progress": True,
    }
    assert {k: getattr(c, k) for k in expected} == expected


def test_every_converted_field_arrives(dpo_config):
    with pytest.warns(FutureWarning, match="keep_end"):
        args = dpo_config(
            beta=0.3,
            learning_rate=5e-5,
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr": 1e-6},
            warmup_steps=0.1,
            weight_decay=0.01,
            adam_beta1=0.8,
            adam_beta2=0.99,
            adam_epsilon=1e-6,
            max_grad_norm=0.5,
            num_train_epochs=2,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_length=256,
            truncation_mode="keep_end",
            pad_to_multiple_of=8,
            seed=7,
            disable_dropout=False,
            save_steps=50,
            save_total_limit=3,
            disable_tqdm=True,
            loss_type=["robust", "bco_pair"],
            loss_weights=[0.7, 0.3],
            label_smoothing=0.1,
        )
    c = TrainConfig.from_trl(args, processes=2)
    assert (c.loss, c.loss_weights, c.loss_kwargs, c.reduction) == (
        ("robust", "bco_pair"),
        (0.7, 0.3),
        {"label_smoothing": 0.1},
        "sum",
    )
    assert (c.beta, c.learning_rate, c.lr_scheduler_type, c.lr_scheduler_kwargs) == (
        0.3,
        5e-5,
        "cosine_with_min_lr",
        {"min_lr": 1e-6},
    )
    assert (c.warmup_steps, c.weight_decay, c.adam_betas, c.adam_epsilon, c.max_grad_norm) == (
        0.1,
        0.01,
        (0.8, 0.99),
        1e-6,
        0.5,
    )
    assert (c.epochs, c.batch_size, c.grad_accum_steps) == (2, 4 * 2 * 2, 2)  # per device x accumulation x processes
    assert (c.max_length, c.truncation_mode, c.pad_to_multiple_of, c.seed, c.disable_dropout) == (
        256,
        "keep_end",
        8,
        7,
        False,
    )
    assert (c.save_steps, c.save_total_limit, c.progress) == (50, 3, False)


def test_max_steps_decides_the_length_as_in_trl(dpo_config):
    c = TrainConfig.from_trl(dpo_config(max_steps=7, num_train_epochs=1))
    assert c.max_steps == 7 and c.epochs >= 7  # TRL trains max_steps steps whatever num_train_epochs says


def test_length_normalised_losses_use_mean_log_probs(dpo_config):
    assert TrainConfig.from_trl(dpo_config(loss_type=["ipo"])).reduction == "mean"
    c = TrainConfig.from_trl(dpo_config(loss_type=["sigmoid_norm"]))
    assert (c.loss, c.reduction) == ("dpo", "mean")
    c = TrainConfig.from_trl(dpo_config(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3))
    assert (c.loss, c.loss_kwargs) == ("fdpo", {"f_divergence": "alpha_divergence", "alpha": 0.3})


def test_fields_that_change_no_number_are_accepted(dpo_config):
    quiet = dpo_config(
        logging_steps=3,
        gradient_checkpointing=False,
        precompute_ref_log_probs=True,
        dataloader_num_workers=2,
        run_name="x",
        eval_steps=5,
    )
    assert TrainConfig.from_trl(quiet) == TrainConfig.from_trl(dpo_config())


def test_every_field_dpolab_cannot_honour_is_refused_on_a_line_of_its_own(dpo_config):
    args = dpo_config(
        use_weighting=True,
        ld_alpha=0.5,
        optim="sgd",
        loss_type=["sigmoid", "sft"],
        num_train_epochs=1.5,
        eval_delay=2.0,
        neftune_noise_alpha=5.0,
        label_smoothing=0.2,
    )
    with pytest.raises(ValueError) as caught:
        TrainConfig.from_trl(args)
    header, *lines = str(caught.value).splitlines()
    assert header == "TrainConfig.from_trl: DPOConfig fields dpolab cannot honour:"
    starts = [
        "use_weighting=True: WPO",
        "ld_alpha=0.5: LD-DPO",
        "optim='sgd': ",
        "loss_type 'sft': TRL's is a per-token mean",
        "num_train_epochs=1.5: dpolab trains whole epochs",
        "eval_delay=2.0: dpolab evaluates from the first eval step on",
        "neftune_noise_alpha=5.0: ",
        "label_smoothing=0.2: no loss of ['sigmoid'] uses it",
    ]
    assert len(lines) == len(starts)
    for start in starts:
        assert sum(line.startswith(start) for line in lines) == 1, start


def test_evaluation_settings_are_converted(dpo_config):
    """TRL's eval_strategy "steps" (eval_steps defaulting to logging_steps, as TRL's TrainingArguments sets it) and
    "epoch" carry over with eval_on_start; TRL's default "no" leaves dpolab's default (each epoch, given eval data)."""
    c = TrainConfig.from_trl(dpo_config(eval_strategy="steps", eval_steps=4, eval_on_start=True))
    assert (c.eval_strategy, c.eval_steps, c.eval_on_start) == ("steps", 4, True)
    c = TrainConfig.from_trl(dpo_config(eval_strategy="steps", logging_steps=7))
    assert (c.eval_strategy, c.eval_steps) == ("steps", 7)
    c = TrainConfig.from_trl(dpo_config(eval_strategy="steps", eval_steps=0.25))
    assert (c.eval_strategy, c.eval_steps) == ("steps", 0.25)
    c = TrainConfig.from_trl(dpo_config(eval_strategy="epoch"))
    assert (c.eval_strategy, c.eval_steps, c.eval_on_start) == ("epoch", None, False)
    c = TrainConfig.from_trl(dpo_config())
    assert (c.eval_strategy, c.eval_steps, c.eval_on_start) == (None, None, False)


def test_mixing_summed_and_length_normalised_losses_is_refused(dpo_config):
    with pytest.raises(ValueError, match=r"loss_type \['ipo', 'hinge'\]: mixes losses TRL normalises by length"):
        TrainConfig.from_trl(dpo_config(loss_type=["ipo", "hinge"]))


def test_overrides_set_dpolab_fields(dpo_config):
    c = TrainConfig.from_trl(dpo_config(), output_dir=None, min_learning_rate=0.0, speedups=Speedups(packing=False))
    assert (c.output_dir, c.save_steps, c.speedups.packing) == (None, None, False)  # no folder: nothing saved
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['bogus'\]"):
        TrainConfig.from_trl(dpo_config(), bogus=1)

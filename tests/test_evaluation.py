"""Evaluation during training: TRL's eval_ metrics on eval_data, against an independent computation and TRL's own
DPOTrainer.evaluate(); the schedule of TRL's eval_strategy; the history files, TensorBoard and the progress bar;
evaluation changes nothing in the run; resume keeps the eval rows; bad input is one line."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_gpt2
from helpers import perturbed_copy, pinned_config

from dpolab.data.collate import PreferenceCollator, tokenize_preferences
from dpolab.logprobs import sequence_logps_from_logits
from dpolab.train import EVAL_METRICS, METRICS, TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")
EVAL_NAMES = EVAL_METRICS[2:]


@pytest.fixture(scope="module")
def rows(penn):
    return penn["train"].select(range(8))


@pytest.fixture(scope="module")
def eval_rows(penn):
    return penn["train"].select(range(8, 14))


def config(**kw) -> TrainConfig:
    return pinned_config(**{"batch_size": 2, **kw})


@torch.no_grad()
def own_logps(model, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_w|x), log pi(y_l|x) from the model's own forward logits on the padded batch (eval mode)."""
    model.eval()
    batch = PreferenceCollator(pad_token_id=0)(examples)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps_from_logits(logits, batch["input_ids"], batch["completion_mask"]).chunk(2)


def dpo_metrics(policy, reference, examples, beta: float) -> dict[str, float]:
    """TRL's eval_ metrics written out: -log sigmoid(beta (h_w - h_l)), h = log pi - log pi_ref, means over pairs."""
    pc, pr = own_logps(policy, examples)
    rc, rr = own_logps(reference, examples)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return {
        "eval_loss": -F.logsigmoid(chosen - rejected).mean().item(),
        "eval_rewards/chosen": chosen.mean().item(),
        "eval_rewards/rejected": rejected.mean().item(),
        "eval_rewards/margins": (chosen - rejected).mean().item(),
        "eval_rewards/accuracies": (chosen > rejected).float().mean().item(),
        "eval_logps/chosen": pc.mean().item(),
        "eval_logps/rejected": pr.mean().item(),
    }


def assert_metrics(ours: dict, theirs: dict, rel: float = 1e-5) -> None:
    scale = 1 + abs(theirs["eval_logps/chosen"]) + abs(theirs["eval_logps/rejected"])
    for name in EVAL_NAMES:
        assert ours[name] == pytest.approx(theirs[name], rel=rel, abs=1e-6 * scale), name


def test_eval_metrics_equal_an_independent_computation(small_tokenizer, rows, eval_rows):
    """Against a separate reference, before the first step (eval_on_start) and after the last: each eval_ metric equals
    the DPO formulas on log-probs from each model's own forward, averaged over the eval pairs."""
    policy = make_tiny_gpt2(small_tokenizer)
    reference = perturbed_copy(policy, seed=3, scale=0.1)
    initial = copy.deepcopy(policy)
    settings = config(max_steps=4, epochs=2, eval_steps=4, eval_on_start=True, learning_rate=1e-2)
    result = train(policy, small_tokenizer, rows, settings, ref_model=reference, eval_data=eval_rows)
    assert [row["step"] for row in result.eval_history] == [0, 4]
    assert [row["epoch"] for row in result.eval_history] == [0.0, 1.0]
    assert list(result.eval_history[0]) == list(EVAL_METRICS)
    examples = tokenize_preferences(eval_rows, small_tokenizer)
    start, end = (dpo_metrics(m, reference, examples, settings.beta) for m in (initial, result.model))
    assert abs(start["eval_loss"] - math.log(2)) > 1e-2  # another reference: not the trivial log 2
    assert abs(end["eval_loss"] - start["eval_loss"]) > 1e-3  # training moved the policy
    assert_metrics(result.eval_history[0], start)
    assert_metrics(result.eval_history[1], end)


def test_evaluation_changes_nothing_in_the_run(small_tokenizer, rows, eval_rows):
    """With the model's dropout on (it draws random numbers every step), a run that evaluates after every step has
    the same history and weights, bit for bit, as one that does not: evaluation draws no random number."""
    runs = []
    for eval_data in (None, eval_rows):
        model = make_tiny_gpt2(small_tokenizer, dropout=0.1)
        settings = config(max_steps=3, epochs=2, disable_dropout=False, eval_steps=1 if eval_data else None)
        result = train(model, small_tokenizer, rows, settings, eval_data=eval_data)
        runs.append((result.history, {k: v.clone() for k, v in model.state_dict().items()}, result.eval_history))
    (h0, w0, e0), (h1, w1, e1) = runs
    assert e0 == [] and [row["step"] for row in e1] == [1, 2, 3]
    assert h0 == h1
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.parametrize(
    "settings, steps",
    [
        ({}, [4, 8]),  # the default: each epoch's end
        ({"eval_steps": 3}, [3, 6]),  # eval_strategy None with eval_steps: "steps"
        ({"eval_strategy": "steps", "eval_steps": 0.25}, [2, 4, 6, 8]),  # a fraction of 8 steps, rounded up
        ({"eval_strategy": "epoch", "max_steps": 6}, [4, 6]),  # max_steps ends the second epoch early
        ({"eval_steps": 4, "eval_on_start": True}, [0, 4, 8]),
    ],
)
def test_the_evaluation_schedule_is_trls(small_tokenizer, rows, eval_rows, settings, steps):
    """8 pairs in batches of 2: 4 steps per epoch, 2 epochs."""
    model = make_tiny_gpt2(small_tokenizer, n_layer=1, n_embd=32)
    result = train(model, small_tokenizer, rows, config(epochs=2, **settings), eval_data=eval_rows.select(range(2)))
    assert [row["step"] for row in result.eval_history] == steps
    assert [row["epoch"] for row in result.eval_history] == [s / 4 for s in steps]


def test_history_files_tensorboard_and_progress_bar(small_tokenizer, rows, eval_rows, tmp_path, capsys):
    """history.json: TRL's log_history layout (each step's row, then its eval row); history.csv: one line per step with
    the eval_ columns, empty where no evaluation ran; TensorBoard: eval/loss, ... as transformers' TensorBoardCallback
    names TRL's eval_ logs; the progress bar shows the last eval_loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations.integration_utils import rewrite_logs

    settings = config(
        epochs=1, eval_steps=2, eval_on_start=True, output_dir=str(tmp_path), report_to="tensorboard", progress=True
    )
    result = train(make_tiny_gpt2(small_tokenizer), small_tokenizer, rows, settings, eval_data=eval_rows)
    assert "eval_loss=" in capsys.readouterr().err
    train_rows, eval_rows_ = result.history, result.eval_history
    assert [row["step"] for row in eval_rows_] == [0, 2, 4]
    expected = [eval_rows_[0], train_rows[0], train_rows[1], eval_rows_[1], train_rows[2], train_rows[3], eval_rows_[2]]
    assert json.loads((tmp_path / "history.json").read_text()) == expected
    with open(tmp_path / "history.csv") as f:
        lines = list(csv.DictReader(f))
    assert list(lines[0]) == list(METRICS) + list(EVAL_NAMES)
    assert [line["step"] for line in lines] == ["0", "1", "2", "3", "4"]
    assert lines[0]["loss"] == "" and float(lines[0]["eval_loss"]) == eval_rows_[0]["eval_loss"]
    assert lines[1]["eval_loss"] == "" and float(lines[1]["loss"]) == train_rows[0]["loss"]
    assert float(lines[2]["eval_rewards/margins"]) == eval_rows_[1]["eval_rewards/margins"]
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    tags = rewrite_logs({name: 0.0 for name in EVAL_NAMES})
    assert set(tags) <= set(events.Tags()["scalars"]) and "eval/rewards/accuracies" in tags
    for tag, name in zip(tags, EVAL_NAMES):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [0, 2, 4]
        assert [s.value for s in scalars] == pytest.approx([row[name] for row in eval_rows_], rel=1e-6, abs=1e-7)


def test_resume_keeps_the_eval_rows(small_tokenizer, rows, eval_rows, tmp_path):
    whole = train(
        make_tiny_gpt2(small_tokenizer), small_tokenizer, rows, config(epochs=1, eval_steps=1), eval_data=eval_rows
    )

    def stop(row):
        if row["step"] == 3:
            raise RuntimeError("stopped")

    settings = config(epochs=1, eval_steps=1, output_dir=str(tmp_path), save_steps=2)
    with pytest.raises(RuntimeError, match="stopped"):
        train(make_tiny_gpt2(small_tokenizer), small_tokenizer, rows, settings, eval_data=eval_rows, on_step=stop)
    resumed = train(
        make_tiny_gpt2(small_tokenizer),
        small_tokenizer,
        rows,
        TrainConfig(**{**settings.to_dict(), "resume": True}),
        eval_data=eval_rows,
    )
    assert resumed.resumed_from_step == 2
    assert resumed.eval_history == whole.eval_history and resumed.history == whole.history


@pytest.mark.trl
def test_eval_metrics_equal_trls_evaluate(tmp_path):
    """TRL's DPOTrainer.evaluate() on the same policy, reference and rows (one eval batch) gives dpolab's eval_ row
    before the first step."""
    pytest.importorskip("trl", reason="trl is part of the [trl] extra that `make test` installs")
    from datasets import Dataset
    from helpers import tiny_gpt2, word_tokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = word_tokenizer()
    data = [
        {"prompt": "the sun was bright", "chosen": " and we walk to the penn campus", "rejected": " and we walk home"},
        {"prompt": "my dog and my cat", "chosen": " were at the university library", "rejected": " were at home"},
        {"prompt": "after the lecture we", "chosen": " had tea at the penn museum", "rejected": " had coffee"},
    ]
    policy = tiny_gpt2(len(tokenizer), seed=1)
    reference = tiny_gpt2(len(tokenizer), seed=2)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.5,
        bf16=False,
        report_to="none",
        per_device_eval_batch_size=len(data),
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_length=64,
    )
    trainer = DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=Dataset.from_list(data),
        eval_dataset=Dataset.from_list(data),
        processing_class=tokenizer,
    )
    theirs = trainer.evaluate()
    settings = config(beta=0.5, batch_size=len(data), max_steps=1, eval_on_start=True, eval_steps=1)
    ours = train(policy, tokenizer, data, settings, ref_model=reference, eval_data=data).eval_history[0]
    assert abs(theirs["eval_loss"] - math.log(2)) > 1e-2
    assert_metrics(ours, theirs)


def test_rankings_are_evaluated_with_the_listwise_metrics(small_tokenizer, rows, eval_rows):
    """Rankings of two under Plackett-Luce, evaluated on rankings of two: eval_ and the listwise metrics, and (eq. 5.2
    at K = 2 is eq. 4.2) the numbers of the pairs under DPO: eval_rewards/position_1 is eval_rewards/chosen, ..."""

    def ranked(data):
        return [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]]} for r in data]

    runs = []
    for loss, train_data, eval_data in (("dpo", rows, eval_rows), ("plackett_luce", ranked(rows), ranked(eval_rows))):
        model = make_tiny_gpt2(small_tokenizer)
        reference = perturbed_copy(model, seed=3, scale=0.1)
        settings = config(loss=loss, epochs=1, eval_steps=2, eval_on_start=True)
        runs.append(train(model, small_tokenizer, train_data, settings, ref_model=reference, eval_data=eval_data))
    pairs, rankings = (run.eval_history for run in runs)
    assert [row["step"] for row in rankings] == [0, 2, 4]
    assert list(rankings[0]) == ["step", "epoch", "eval_loss", "eval_rewards/position_1", "eval_rewards/position_2",
                                 "eval_ranking/accuracy", "eval_ranking/kendall_tau", "eval_logps/position_1",
                                 "eval_logps/position_2"]  # fmt: skip
    for p, q in zip(pairs, rankings, strict=True):
        assert q["eval_loss"] == pytest.approx(p["eval_loss"], rel=1e-5)
        assert q["eval_rewards/position_1"] == pytest.approx(p["eval_rewards/chosen"], rel=1e-4, abs=1e-5)
        assert q["eval_logps/position_2"] == pytest.approx(p["eval_logps/rejected"], rel=1e-5)
        assert q["eval_ranking/accuracy"] == p["eval_rewards/accuracies"]


def test_eval_data_in_another_format_is_one_line(small_tokenizer, rows):
    conversational = [
        {
            "prompt": [{"role": "user", "content": "The sky is"}],
            "chosen": [{"role": "assistant", "content": "blue."}],
            "rejected": [{"role": "assistant", "content": "green."}],
        }
    ]
    with pytest.raises(ValueError) as caught:
        train(make_tiny_gpt2(small_tokenizer), small_tokenizer, rows, config(max_steps=1), eval_data=conversational)
    assert str(caught.value) == (
        "eval_data is in the conversational format, train_data in the standard format: give the eval rows in the "
        "training rows' format (TRL's formats, dpolab.data.formats), so that they are tokenized alike"
    )


def test_cli_eval_data_in_another_format_is_one_line(tiny_model_dir, tmp_path, capsys):
    from dpolab.cli import main

    model_dir, pairs = tiny_model_dir
    implicit = tmp_path / "implicit.jsonl"
    implicit.write_text(json.dumps({"chosen": "The sky is blue.", "rejected": "The sky is green."}) + "\n")
    status = main(["train", "--model", str(model_dir), "--data", str(pairs), "--eval-data", str(implicit),
                   "--output-dir", str(tmp_path / "run")])  # fmt: skip
    assert status == 2
    assert capsys.readouterr().err.strip() == (
        f"dpolab train: error: --eval-data {implicit} is in the standard, implicit prompt format, --data {pairs} in "
        "the standard format: give the eval rows in the training rows' format (TRL's formats, dpolab.data.formats), "
        "so that they are tokenized alike"
    )
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # refused before any work


def test_evaluation_settings_without_eval_data_and_the_reverse_are_one_line(small_tokenizer, rows, eval_rows):
    model = make_tiny_gpt2(small_tokenizer)
    with pytest.raises(ValueError, match=r"^eval_strategy, eval_steps or eval_on_start asks for evaluation, but no"):
        train(model, small_tokenizer, rows, config(eval_steps=2))
    with pytest.raises(ValueError, match=r"^eval_data is given but eval_strategy='no' evaluates nothing"):
        train(model, small_tokenizer, rows, config(eval_strategy="no"), eval_data=eval_rows)
    with pytest.raises(ValueError, match=r"^eval_data with example_loss_kwargs: the eval pairs have no per-example"):
        train(
            model,
            small_tokenizer,
            rows,
            config(loss="odpo"),
            eval_data=eval_rows,
            example_loss_kwargs={"offset": [1.0] * len(rows)},
        )
    with pytest.raises(ValueError, match=r"^eval_data has no rows"):
        train(model, small_tokenizer, rows, config(), eval_data=[])
    with pytest.raises(ValueError, match=r"^eval_strategy='steps' needs eval_steps"):
        TrainConfig(eval_strategy="steps")
    with pytest.raises(ValueError, match=r"^eval_steps must be an int >= 1, got 0"):
        TrainConfig(eval_steps=0)
    with pytest.raises(ValueError, match=r"^eval_strategy must be one of"):
        TrainConfig(eval_strategy="always")

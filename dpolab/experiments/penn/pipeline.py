"""The experiment from start to end, resumable:

    load the data and the model (the stand-in replaces GPT-2 loudly)          -> config.json (with the fingerprint)
    reference log-probs of the training pairs, once (cached on disk); the run-level times so far -> timings.json
    for every unit (method, seed) and the reference:                            units/<name>/seed-<s>/
        done.json present, same settings?  skip.   Otherwise:
        train a copy of the initial weights (checkpoints in the work folder: resumes)  -> history.json/.csv
        sample and score every test prompt                                      -> generations.jsonl, metrics.json
        write done.json (atomically, last), delete the weights unless --keep-weights
    pool the seeds                                                              -> metrics.json, metrics.csv
    judge every pair of methods (and the reference), both orders (resumes) -> judgments-<judge>.jsonl, win_rates.json
    the alignment-vs-KL frontier                                                -> frontier.json
    figures and the report                                                      -> figures/*.png, report.md

A unit is done when its done.json carries the settings hash of this run: the method's settings and the fingerprint
(the initial weights, the training pairs' token ids as dpolab.train and TRL tokenize them, the test prompts). A
done.json with another hash (other settings, or a run folder of an older layout) is refused, never reused.

The run folder holds small files only; checkpoints and weights live in the work folder (``--work-dir``, by default
under $DPOLAB_CACHE), so a committed results folder never holds weights.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import io
import json
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ...device import choose_device, resolve_precision
from ...errors import InputError
from ...files import atomic_write_text, cache_root, portable_text, read_jsonl, save_pretrained_atomically
from ...train.history import write_history
from .config import Experiment
from .evaluate import SUMMARIES, evaluate_policy, pool_seeds, summarize
from .methods import (
    METHODS,
    REFERENCE,
    TrainingInputs,
    Unit,
    dpolab_config,
    odpo_note,
    odpo_offsets,
    settings_hash,
    train_dpolab,
    unit_beta,
    unit_settings,
)
from .trl_baseline import train_trl

__all__ = [
    "InputError",
    "run",
    "say",
    "default_output_dir",
    "plan_units",
    "fingerprint",
    "check_run_folder",
]

TRAINERS = {"dpolab": train_dpolab, "trl": train_trl}


def say(message: str) -> None:
    print(f"[penn] {message}", flush=True)


def banner(lines: list[str]) -> None:
    bar = "!" * 100
    print("\n".join([bar, *[f"!! {line}" for line in lines], bar]), file=sys.stderr, flush=True)


def default_output_dir(model: str, quick: bool) -> str:
    return f"runs/penn-{Path(model).name or model}{'-quick' if quick else ''}"


def check_run_folder(out: Path) -> None:
    """The run folder is new, empty, or a run folder of this experiment (its config.json says so): the experiment
    never writes among files it did not write (as git refuses to clone into a non-empty folder)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--output-dir {out} is a file, not a folder: choose another --output-dir")
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    if not names:
        return
    try:
        ours = {"experiment", "fingerprint"} <= set(json.loads((out / "config.json").read_text()))
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise InputError(
            f"--output-dir {out} holds files the Penn experiment did not write ({listed}): choose a new or empty "
            "--output-dir"
        )


def default_work_dir(output_dir: Path) -> Path:
    tag = hashlib.sha256(str(output_dir.resolve()).encode()).hexdigest()[:12]
    return cache_root() / "penn-work" / f"{output_dir.name}-{tag}"


@dataclass
class Timer:
    """Wall-clock seconds per phase, summed over calls."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- inputs


def load_data(exp: Experiment):
    """(train rows, test prompts); a missing file, a bad row or an unreachable dataset is an InputError."""
    from datasets import DatasetDict

    from ...data import PreferenceDataError, load_penn, load_preference_data, row_format

    def load(source: str, flag: str = "--data"):
        try:
            return load_penn() if source == "penn" else load_preference_data(source)
        except (OSError, PreferenceDataError, KeyError) as err:  # missing, unreadable, invalid; hub unreachable
            raise InputError(f"{flag} {source}: {err}") from err

    data = load(exp.run.data)
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise InputError(f"--data {exp.run.data} has splits {sorted(data)}; it needs a 'train' split")
        train_rows, test = data["train"], data.get("test")
    else:
        train_rows, test = data, None
    if exp.run.test_data:
        test = load(exp.run.test_data, "--test-data")
        test = test.get("test", test) if isinstance(test, DatasetDict) else test
    if test is None:
        raise InputError(f"--data {exp.run.data} has no test split: give the test prompts with --test-data")
    for flag, source, rows in (("--data", exp.run.data, train_rows), ("--test-data", exp.run.test_data, test)):
        if len(rows) and row_format(rows[0]) != "standard":
            raise InputError(
                f"{flag} {source or exp.run.data}: the experiment needs TRL's standard format (prompt, chosen and "
                f"rejected strings), got the {row_format(rows[0])} format"
            )
    prompts = list(test["prompt"])[: exp.run.max_test_prompts]
    return train_rows, prompts


def load_initial_model(exp: Experiment):
    from ...models import ModelNotAvailableError, load_model

    try:
        return load_model(exp.run.model, device=choose_device("auto"))
    except (ModelNotAvailableError, ValueError) as err:
        raise InputError(f"--model {exp.run.model}: {err}") from err


def make_judge(exp: Experiment, model, tokenizer):
    from ...judge import EndpointJudge, OfflineJudge

    if exp.run.judge == "offline":
        return OfflineJudge(model, tokenizer)
    try:
        return EndpointJudge.from_env()
    except ValueError as err:
        raise InputError(f"--judge endpoint: {err}") from err


def train_examples(model, tokenizer, train_rows) -> list[dict]:
    """The training pairs' token ids, as dpolab.train (with the experiment's TrainConfig defaults for max_length and
    truncation) and TRL's DPOTrainer (the baseline's max_length) tokenize them."""
    from ...train import TrainConfig
    from ...train.examples import training_examples

    return training_examples(train_rows, tokenizer, TrainConfig(), model)


def fingerprint(model, info, tokenizer, train_rows, prompts) -> dict[str, Any]:
    """What every unit depends on: the initial weights (hashed, wherever they were loaded from), the training pairs'
    token ids and the test prompts."""
    from ...train.reference import examples_hash, weights_hash

    return {
        "model": info.name,
        "weights_sha256": weights_hash(model)[:16],
        "train_sha256": examples_hash(train_examples(model, tokenizer, train_rows))[:16],
        "test_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16],
    }


# ------------------------------------------------------------------------------------------------ units


def plan_units(exp: Experiment) -> tuple[list[Unit], dict[tuple[str, float], Unit]]:
    """The units to run (reference and methods at every seed, then the frontier's extra betas at the first seed)
    and the frontier's points: (method, beta) -> the unit that measures it."""
    units = [Unit(m, s) for s in range(exp.run.seeds) for m in (REFERENCE, *exp.run.methods)]
    frontier = {}
    for method in (m for m in exp.frontier.methods if m in exp.run.methods):
        for beta in exp.frontier.betas:
            own = METHODS[method].beta(exp)
            unit = Unit(method, 0) if abs(beta - own) < 1e-12 else Unit(method, 0, beta)
            frontier[(method, beta)] = unit
            if unit not in units:
                units.append(unit)
    return units, frontier


def read_done(folder: Path) -> dict | None:
    path = folder / "done.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_unit(
    unit: Unit, exp: Experiment, inputs: TrainingInputs, prompts: list[str], out: Path, work: Path, settings: dict
) -> dict:
    """Train (unless reference), evaluate, write the unit's files and its done marker; returns its metrics."""
    folder, scratch = out / unit.folder, work / unit.folder
    folder.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    policy, history = inputs.model, None
    if unit.method != REFERENCE:
        say(f"train {unit.name} seed {unit.seed} (beta {unit_beta(unit, exp):g})")
        with timer("training"):
            policy, history = TRAINERS[METHODS[unit.method].trainer](unit, exp, inputs, str(scratch))
        write_history(folder, history)  # dpolab.train's own history files
    say(f"evaluate {unit.name} seed {unit.seed} on {len(prompts)} test prompts")
    rows = evaluate_policy(
        policy,
        inputs.model,
        inputs.tokenizer,
        prompts,
        exp.sampling,
        seed=unit.seed,
        is_reference=unit.method == REFERENCE,
        timer=timer,
    )
    atomic_write_text(folder / "generations.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    metrics = {
        "unit": unit.name,
        "method": unit.method,
        "seed": unit.seed,
        "beta": unit_beta(unit, exp),
        "summary": summarize(rows),
        "timings": timer.seconds,
    }
    if history:
        metrics["final_step"] = history[-1]
        metrics["min_rewards_chosen"] = min(r["rewards/chosen"] for r in history)
    atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=1))
    done = {"settings_hash": settings_hash(settings), "settings": settings, "finished_at": time.time()}
    atomic_write_text(folder / "done.json", json.dumps(done, indent=1, default=str))  # last: the unit is complete
    if policy is not inputs.model:
        if exp.run.keep_weights:
            save_pretrained_atomically(scratch / "model", policy, inputs.tokenizer)
            for stale in scratch.glob("checkpoint-*"):
                shutil.rmtree(stale, ignore_errors=True)
            say(f"kept the weights of {unit.name} seed {unit.seed} in {scratch / 'model'}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
            for parent in (scratch.parent, scratch.parent.parent):  # units/<name>, units: removed once empty
                with contextlib.suppress(OSError):
                    parent.rmdir()
        del policy
        gc.collect()
    return metrics


def warm_reference_cache(inputs: TrainingInputs, exp: Experiment, units: list[Unit], timer: Timer) -> None:
    """Compute the reference log-probs of the training pairs that dpolab.train will need for ``units`` (once per
    reduction), as it computes them (``reference.reference_logps`` with the unit's TrainConfig), so that training finds
    them cached; timed as the phase "reference log-probs" when not already on disk."""
    from ...train.reference import reference_cached, reference_logps

    model = inputs.model
    examples = train_examples(model, inputs.tokenizer, inputs.train_data)
    device = next(model.parameters()).device
    configs = {}  # reduction -> a unit's config: the log-probs depend on nothing else that differs between units
    for unit in units:
        config = dpolab_config(unit, exp)
        configs.setdefault(config.reduction, config)
    for reduction, config in sorted(configs.items()):
        cached = reference_cached(model, examples, inputs.tokenizer, config, device)
        with contextlib.nullcontext() if cached else timer("reference log-probs"):
            reference_logps(model, examples, inputs.tokenizer, config, device)
        if cached:
            say(f"reference log-probs ({reduction}) found in the disk cache")


# ------------------------------------------------------------------------------------------------- judging


def judge_all(exp, judge, prompts, metrics_rows: dict[Unit, list[dict]], methods: list[str], out: Path) -> dict:
    """The win-rate matrix over methods + reference, per seed and pooled over seeds (wins and counts summed)."""
    from ...judge import judge_pairwise

    names = [*methods, REFERENCE]
    per_seed, wins, counts, extra = [], 0.0, 0, {"n_malformed": 0, "n_failed": 0, "n_judgments": 0}
    for seed in range(exp.run.seeds):
        texts = {m: [r["continuation"] for r in metrics_rows[Unit(m, seed)]] for m in names}
        say(f"judge seed {seed}: {len(names)} rows x {len(prompts)} prompts, both orders ({judge.id.split(':')[0]})")
        result = judge_pairwise(prompts, texts, judge, out / f"judgments-{exp.run.judge}.jsonl")
        per_seed.append(result.to_dict())
        wins = wins + np.nan_to_num(result.win_rate * result.n_valid)
        counts = counts + result.n_valid
        for key in extra:
            extra[key] += getattr(result, key)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(counts > 0, wins / np.maximum(counts, 1), np.nan)
    np.fill_diagonal(pooled, np.nan)
    return {
        "methods": names,
        "judge": judge.id,
        "win_rate": [[None if np.isnan(v) else float(v) for v in row] for row in pooled],
        "n_valid": np.asarray(counts).tolist(),
        **extra,
        "first_position_rate": [s["first_position_rate"] for s in per_seed],
        "per_seed": per_seed,
    }


# ------------------------------------------------------------------------------------------------- tables


def metrics_table(unit_metrics: dict[Unit, dict], pooled: dict[str, dict]) -> str:
    """CSV: one row per (unit, seed) and a "pooled" row per method; estimate, low, high for every metric."""
    columns = (
        ["unit", "seed", "beta"]
        + [f"{m}{s}" for m in SUMMARIES for s in ("", "_low", "_high")]
        + [f"corpus_distinct_{n}" for n in (1, 2, 3)]
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()

    def row(name, seed, beta, summary):
        values = {"unit": name, "seed": seed, "beta": beta}
        for m in SUMMARIES:
            values.update({m: summary[m]["estimate"], f"{m}_low": summary[m]["low"], f"{m}_high": summary[m]["high"]})
        values.update({k: summary[k]["estimate"] for k in columns[-3:] if k in summary})
        writer.writerow(values)

    for unit, metrics in unit_metrics.items():
        row(unit.name, unit.seed, metrics["beta"], metrics["summary"])
    for name, summary in pooled.items():
        row(name, "pooled", "", summary)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------- run


def run(exp: Experiment) -> Path:
    """Run (or resume) the experiment; returns the run folder.

    Raises InputError on bad input (before anything is written), JudgeUnavailableError when the judge endpoint is
    down (after every unit's files are written; a rerun resumes)."""
    from ...data import count_prompts
    from ...judge import JudgeUnavailableError
    from .figures import make_figures
    from .report import write_report

    timer = Timer()
    if exp.run.output_dir:
        check_run_folder(Path(exp.run.output_dir))  # before anything loads; the default folder once the model has
    with timer("load data"):
        train_rows, prompts = load_data(exp)
    with timer("load model"):
        model, tokenizer, info = load_initial_model(exp)
    try:
        precision = resolve_precision(exp.hyper.precision, next(model.parameters()).device)
    except ValueError as err:
        raise InputError(str(err)) from err
    exp = replace(exp, hyper=replace(exp.hyper, precision=precision))
    judge = make_judge(exp, model, tokenizer)
    out = Path(exp.run.output_dir or default_output_dir(info.name, exp.run.quick))  # named after the model loaded
    check_run_folder(out)
    work = Path(exp.run.work_dir) if exp.run.work_dir else default_work_dir(out)
    exp = replace(exp, run=replace(exp.run, output_dir=str(out), work_dir=str(work)))
    if info.fallback:
        banner(
            [
                "GPT-2 124M COULD NOT BE LOADED: the offline stand-in SmolLM2-135M-Instruct replaces it.",
                f"Reason: {info.fallback_reason}",
                "The numbers below are NOT GPT-2's; the report says so too.",
            ]
        )
    say(
        f"model {info.name} ({info.n_params / 1e6:.1f}M parameters, from {info.source}), training in {precision}; "
        f"{len(train_rows)} training pairs over {count_prompts(train_rows)} prompts, {len(prompts)} test prompts; "
        f"run folder {out}, work folder {work}"
    )
    fp = fingerprint(model, info, tokenizer, train_rows, prompts)
    units, frontier = plan_units(exp)
    settings = {u: unit_settings(u, exp, fp) for u in units}
    todo = []
    for unit in units:
        done = read_done(out / unit.folder)
        if done is None:
            todo.append(unit)
        elif done.get("settings_hash") == settings_hash(settings[unit]):
            say(f"skip {unit.name} seed {unit.seed}: done (resume)")
        else:
            raise InputError(
                f"{out / unit.folder} was made with other settings than this run's (or by an older dpolab); choose "
                "another --output-dir, or delete that folder to redo it"
            )
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "experiment": exp.to_dict(),
        "model_info": info.to_dict(),
        "fingerprint": fp,
        "versions": _versions(),
        "argv": sys.argv[1:],
    }
    atomic_write_text(out / "config.json", portable_text(json.dumps(config, indent=1, default=str)))
    inputs = TrainingInputs(model, tokenizer, train_rows, progress=exp.run.progress)
    dpolab_units = [u for u in todo if u.method != REFERENCE and METHODS[u.method].trainer == "dpolab"]
    if dpolab_units:
        warm_reference_cache(inputs, exp, dpolab_units, timer)
    if any(u.method == "odpo" for u in units):  # timed only when ODPO trains (otherwise read from the cache)
        with timer("odpo offsets") if any(u.method == "odpo" for u in todo) else contextlib.nullcontext():
            inputs.odpo_offsets = odpo_offsets(train_rows, exp.hyper.odpo_alpha)
        inputs.notes.append(odpo_note(inputs.odpo_offsets))
    _save_run_timings(out, timer)  # now, so an interrupted run keeps the time of its run-level phases
    for unit in todo:
        run_unit(unit, exp, inputs, prompts, out, work, settings[unit])

    unit_metrics = {u: json.loads((out / u.folder / "metrics.json").read_text()) for u in units}
    rows = {u: read_jsonl(out / u.folder / "generations.jsonl") for u in units}
    main_units = [u for u in units if u.beta is None]
    pooled = {
        m: pool_seeds({u.seed: rows[u] for u in main_units if u.method == m}) for m in (*exp.run.methods, REFERENCE)
    }
    _save_run_files(out, exp, timer, unit_metrics, pooled, frontier, inputs)

    judgments = out / f"judgments-{exp.run.judge}.jsonl"
    before = _lines(judgments)
    with timer("judging"):
        try:
            win_rates = judge_all(exp, judge, prompts, rows, list(exp.run.methods), out)
        except JudgeUnavailableError as err:
            raise JudgeUnavailableError(
                f"judging failed: {err}; the generations and metrics computed so far are kept in {out}: "
                "rerun the same command to resume"
            ) from err
    if _lines(judgments) == before:
        timer.seconds.pop("judging")  # nothing new was judged: keep the time of the run that judged
    atomic_write_text(out / "win_rates.json", json.dumps(win_rates, indent=1))
    _save_run_files(out, exp, timer, unit_metrics, pooled, frontier, inputs)
    make_figures(out)
    write_report(out)
    say(f"done: {out / 'report.md'}")
    return out


def _lines(path: Path) -> int:
    return len(read_jsonl(path)) if path.exists() else 0


def _save_run_timings(out: Path, timer: Timer) -> dict[str, float]:
    """Merge this invocation's run-level phase times into timings.json (earlier invocations' phases are kept;
    a phase this invocation timed replaces its earlier time) and return the merged times."""
    path = out / "timings.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    merged = {**old, **timer.seconds}
    atomic_write_text(path, json.dumps(merged, indent=1))
    return merged


def _save_run_files(out, exp, timer, unit_metrics, pooled, frontier, inputs) -> None:
    """metrics.json (pooled and per-unit metrics, timings), metrics.csv, frontier.json."""
    timings = {
        "run": _save_run_timings(out, timer),
        "units": {f"{u.name}/seed-{u.seed}": m["timings"] for u, m in unit_metrics.items()},
    }
    points = [
        {
            "method": m,
            "beta": b,
            "unit": u.name,
            "seed": u.seed,
            **{k: unit_metrics[u]["summary"][k] for k in ("alignment", "kl", "perplexity_ref")},
        }
        for (m, b), u in frontier.items()
    ]
    reference = next(m for u, m in unit_metrics.items() if u.method == REFERENCE and u.seed == 0)
    metrics = {
        "pooled": pooled,
        "units": {f"{u.name}/seed-{u.seed}": m for u, m in unit_metrics.items()},
        "timings": timings,
        "notes": inputs.notes,
        "seeds": exp.run.seeds,
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    atomic_write_text(out / "metrics.csv", metrics_table(unit_metrics, pooled))
    atomic_write_text(
        out / "frontier.json",
        json.dumps(
            {"points": points, "reference": {k: reference["summary"][k] for k in ("alignment", "kl")}}, indent=1
        ),
    )


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "trl", "datasets") if _installed(p)}


def _installed(package: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(package)
        return True
    except md.PackageNotFoundError:
        return False

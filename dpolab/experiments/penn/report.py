"""report.md: our numbers beside the article's, and a discussion phrased from the measured values.

Nothing here states a conclusion in advance: every comparison sentence is chosen by the numbers (which estimate is
larger, whether the 95% intervals overlap, whether the article's value lies inside ours). Overlapping intervals
are reported as "not distinguishable at this sample size", never as "equal".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ...files import atomic_write_text, portable_text, read_jsonl
from .figures import FIGURES, label
from .methods import METHODS, REFERENCE

__all__ = ["ARTICLE", "render_report", "write_report"]

# The article's reported results (seeds/README.md, "Reported results"), GPT-2 124M, one run each, GPT-4 judge.
ARTICLE = {
    "alignment": {"dpo": 1.0, "dpop": 1.0, "sft": 0.94, "kl_sft": 0.88},  # "~100%" for DPO and DPOP
    "win_rate": {("dpo", "trl"): 0.0, ("dpop", "trl"): 0.51, ("sft", "dpop"): 0.71},  # row beats column
    "dynamics": "naive DPO's chosen reward falls during training and its outputs become incoherent and repetitive; "
    "DPOP keeps the chosen reward positive",
}
ARTICLE_ALIGNMENT_TEXT = {"dpo": "~100%", "dpop": "~100%", "sft": "94%", "kl_sft": "88%"}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def _ci(entry: dict, fmt=_num) -> str:
    if entry.get("estimate") is None:
        return "n/a"
    if entry.get("low") is None:
        return fmt(entry["estimate"])
    return f"{fmt(entry['estimate'])} [{fmt(entry['low'])}, {fmt(entry['high'])}]"


def _overlap(a: dict, b: dict) -> bool:
    return not (a["low"] > b["high"] or b["low"] > a["high"])


def compare(name_a: str, a: dict, name_b: str, b: dict, what: str, fmt=_num) -> str:
    """One sentence comparing two estimates with intervals."""
    if a.get("estimate") is None or b.get("estimate") is None:
        return f"{what}: not measured for both {name_a} and {name_b}."
    if _overlap(a, b):
        return (
            f"{name_a} and {name_b} are not distinguishable on {what} at this sample size "
            f"({fmt(a['estimate'])} vs {fmt(b['estimate'])}; the 95% intervals overlap)."
        )
    word = "higher" if a["estimate"] > b["estimate"] else "lower"
    return (
        f"{name_a}'s {what} is {word} than {name_b}'s ({_ci(a, fmt)} vs {_ci(b, fmt)}; the 95% intervals do "
        f"not overlap)."
    )


def versus_reference(pooled: dict, methods: list[str], key: str, what: str, fmt=_num) -> str:
    """One sentence grouping the methods by how their ``key`` compares with the reference's."""
    ref = pooled[REFERENCE][key]
    groups = {"higher": [], "lower": [], "same": []}
    for m in methods:
        e = pooled[m][key]
        if e.get("estimate") is None or ref.get("estimate") is None:
            continue
        side = "same" if _overlap(e, ref) else "higher" if e["estimate"] > ref["estimate"] else "lower"
        groups[side].append(f"{label(m)} {fmt(e['estimate'])}")
    wording = {
        "higher": "higher (95% intervals apart)",
        "lower": "lower (95% intervals apart)",
        "same": "not distinguishable (intervals overlap)",
    }
    parts = [f"{wording[side]} for {', '.join(names)}" for side, names in groups.items() if names]
    return f"{what[0].upper() + what[1:]}, against the reference's {fmt(ref['estimate'])}: " + "; ".join(parts) + "."


def h_precision(exp: dict) -> str:
    p = exp["hyper"].get("precision", "fp32")
    return "bf16 autocast" if p == "bf16" else "fp32"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(r) + " |" for r in rows]]


def _history(out: Path, method: str, seed: int) -> list[dict]:
    path = out / "units" / method / f"seed-{seed}" / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def _alignment_verdict(method: str, entry: dict) -> str:
    article = ARTICLE["alignment"].get(method)
    if article is None or entry["estimate"] is None:
        return ""
    if entry["low"] - 0.005 <= article <= entry["high"] + 0.005:
        return f"consistent with the article's {ARTICLE_ALIGNMENT_TEXT[method]}"
    side = "below" if entry["high"] < article else "above"
    return f"{side} the article's {ARTICLE_ALIGNMENT_TEXT[method]}"


@dataclass(frozen=True)
class RunFiles:
    """What the report reads from a run folder: config.json, metrics.json, win_rates.json (once judged),
    frontier.json, and the units' histories and generations."""

    out: Path
    config: dict
    metrics: dict
    wins: dict | None
    frontier: dict

    @classmethod
    def read(cls, out: Path) -> RunFiles:
        wins = out / "win_rates.json"
        return cls(
            out,
            json.loads((out / "config.json").read_text()),
            json.loads((out / "metrics.json").read_text()),
            json.loads(wins.read_text()) if wins.exists() else None,
            json.loads((out / "frontier.json").read_text()),
        )

    @property
    def exp(self) -> dict:
        return self.config["experiment"]

    @property
    def info(self) -> dict:
        return self.config["model_info"]

    @property
    def methods(self) -> list[str]:
        return list(self.exp["run"]["methods"])

    @property
    def rows_all(self) -> list[str]:
        """The methods and the reference: the rows of every table."""
        return [*self.methods, REFERENCE]

    @property
    def pooled(self) -> dict:
        return self.metrics["pooled"]


def write_report(out: str | Path) -> Path:
    """Write ``out``/report.md from the run folder's files; returns its path."""
    path = Path(out) / "report.md"
    atomic_write_text(path, render_report(out))
    return path


def render_report(out: str | Path) -> str:
    """report.md's text: one section after another (``SECTIONS``), each a function of the run folder's files."""
    run = RunFiles.read(Path(out))
    return portable_text("\n".join(line for section in SECTIONS for line in section(run)))


def _title(run: RunFiles) -> list[str]:
    """The title, and a warning first when the model is not GPT-2 or the run is a quick one."""
    info, exp = run.info, run.exp
    lines = ["# The GPT-2 Penn experiment: run report", ""]
    if info["fallback"]:
        lines += [
            f"> **WARNING: GPT-2 124M could not be loaded; the offline stand-in `{info['name']}` replaced it** "
            f"({info['fallback_reason']}). It is not GPT-2 (a quantised instruction-tuned Llama of the same "
            "scale): compare with the article's numbers with that in mind.",
            "",
        ]
    if exp["run"]["quick"]:
        lines += [
            f"> **Quick smoke run** on the `{info['name']}` model with at most {exp['hyper']['max_steps']} "
            "steps per method: it checks the pipeline end to end; its numbers are not a replication.",
            "",
        ]
    if info["name"] != "gpt2" and not info["fallback"] and not exp["run"]["quick"]:
        lines += [f"> This run uses `{info['name']}`, not GPT-2 124M (chosen with --model).", ""]
    return lines


def _setup(run: RunFiles) -> list[str]:
    """Model, data, seeds, sampling, judge and precision; then each method's objective and optimisation."""
    info, exp, wins, sampling = run.info, run.exp, run.wins, run.exp["sampling"]
    lines = [
        "## Setup",
        "",
        f"- Model: `{info['name']}` ({info['n_params'] / 1e6:.1f}M parameters, from `{info['source']}`)"
        f"{' — FALLBACK for GPT-2' if info['fallback'] else ''}.",
        f"- Data: `{exp['run']['data']}`; {len(_generations(run.out, REFERENCE, 0))} test prompts, every one "
        "evaluated.",
        f"- Seeds: {exp['run']['seeds']}; sampling top-k {sampling['top_k']}, temperature {sampling['temperature']}, "
        f"{sampling['max_new_tokens']} new tokens, the same sampling seed for every method.",
        f"- Judge: {exp['run']['judge']}" + (f" (`{wins['judge']}`)" if wins else "") + ".",
        f"- Precision: {h_precision(exp)} for every trainer, TRL's included (fp32 master weights and optimizer "
        "state; log-probs summed in fp32).",
        "",
    ]
    h, t = exp["hyper"], exp["trl"]
    rows = []
    for m in run.methods:
        if METHODS[m].trainer == "trl":
            hp = f"lr {t['learning_rate']:g} linear, {t['epochs']} epochs, batch {t['batch_size']}"
        else:
            hp = (
                f"lr {h['learning_rate']:g} cosine to {h['min_learning_rate']:g}, {h['epochs']} epochs, "
                f"batch {h['batch_size']}"
            )
        extra = {
            "dpop": f"lambda {h['dpop_lambda']:g}",
            "kl_sft": f"kl_coef {h['kl_coef']:g}",
            "ipo": f"{h['ipo_reduction']} log-probs",
            "odpo": f"alpha {h['odpo_alpha']:g}",
        }.get(m, "")
        beta = run.metrics["units"][f"{m}/seed-0"]["beta"]
        rows.append([label(m), METHODS[m].about, _num(beta), hp, str(len(_history(run.out, m, 0))), extra])
    return lines + _table(["method", "objective", "beta", "optimisation", "steps run", "other"], rows) + [""]


def _wall_time(run: RunFiles) -> list[str]:
    """Seconds per run-level phase and per unit, and their sum."""
    lines = [
        "## Wall time",
        "",
        "Seconds per phase, on the machine that ran it. Units done by an earlier invocation "
        "keep the times recorded when they ran (a run resumed on another machine mixes machines); a training "
        "resumed from a checkpoint counts only its resumed part; a phase missing from the first table "
        "(reference log-probs, judging) was served by a cache or by an earlier invocation.",
        "",
    ]
    run_t, units_t = run.metrics["timings"]["run"], run.metrics["timings"]["units"]
    lines += _table(["phase", "seconds"], [[k, f"{v:.1f}"] for k, v in run_t.items()]) + [""]
    unit_rows = [
        [u, *(f"{secs.get(p, 0.0):.1f}" for p in ("training", "generation", "evaluation"))]
        for u, secs in units_t.items()
    ]
    lines += _table(["unit", "training", "generation", "evaluation"], unit_rows) + [""]
    total = sum(run_t.values()) + sum(sum(secs.values()) for secs in units_t.values())
    return lines + [f"Sum of the timed phases: {total:.0f} s ({total / 60:.1f} min).", ""]


def _alignment(run: RunFiles) -> list[str]:
    """Alignment accuracy per method beside the article's, and how the methods compare."""
    pooled, methods = run.pooled, run.methods
    lines = ["## Alignment accuracy: ours beside the article's", "", "![alignment](figures/alignment.png)", ""]
    rows = []
    for m in run.rows_all:
        e = pooled[m]["alignment"]
        per_seed = ", ".join(_pct(v) for v in e["per_seed"])
        rows.append([label(m), _ci(e, _pct), per_seed, ARTICLE_ALIGNMENT_TEXT.get(m, "—"), _alignment_verdict(m, e)])
    lines += _table(["method", "ours, 95% CI (pooled over seeds)", "per seed", "article", ""], rows) + [""]
    lines.append("- " + versus_reference(pooled, methods, "alignment", "alignment accuracy", _pct))
    for a, b in (("dpo", "dpop"), ("sft", "kl_sft"), ("dpop", "sft")):
        if a in methods and b in methods:
            what = "alignment accuracy"
            lines.append("- " + compare(label(a), pooled[a]["alignment"], label(b), pooled[b]["alignment"], what, _pct))
    return lines + [""]


def _dynamics(run: RunFiles) -> list[str]:
    """The implicit rewards over training (seed 0), and whether DPO and DPOP draw the article's picture."""
    out, methods = run.out, run.methods
    lines = [
        "## Training dynamics: the chosen reward",
        "",
        "![rewards](figures/rewards.png)",
        "",
        "![losses](figures/losses.png)",
        "",
        "Implicit rewards beta·log(pi/pi_ref) as TRL logs them (seed 0; IPO's are per token).",
        "",
    ]
    rows, sentences = [], []
    for m in methods:
        history = _history(out, m, 0)
        if not history:
            continue
        chosen = [r["rewards/chosen"] for r in history]
        last = history[-1]
        ends = (last["rewards/rejected"], last["rewards/margins"], last["rewards/accuracies"])
        rows.append([label(m), str(len(history)), *(f"{v:.3f}" for v in (chosen[0], min(chosen), chosen[-1], *ends))])
        if m in ("dpo", "dpop", "trl"):
            trend = "fell" if chosen[-1] < chosen[0] else "rose"
            sign = (
                "stayed positive"
                if min(chosen[1:] or chosen) > 0
                else ("ended negative" if chosen[-1] < 0 else "dipped below zero but ended positive")
            )
            sentences.append(
                f"{label(m)}: rewards/chosen {trend} from {chosen[0]:.3f} to {chosen[-1]:.3f} "
                f"(minimum {min(chosen):.3f}) and {sign} (seed 0)."
            )
    if "dpo" in methods and "dpop" in methods and _history(out, "dpo", 0) and _history(out, "dpop", 0):
        dpo, dpop = _history(out, "dpo", 0)[-1]["rewards/chosen"], _history(out, "dpop", 0)[-1]["rewards/chosen"]
        agrees = dpo < 0 <= dpop
        sentences.append(
            f"The article: {ARTICLE['dynamics']}. Here DPO ends at {dpo:.3f} and DPOP at {dpop:.3f}: "
            + (
                "the same picture."
                if agrees
                else "not the article's picture at these settings "
                "(see ENVIRONMENT.md on the dependence on the step size and the reference's prior)."
            )
        )
    header = ["method", "steps", "rewards/chosen first", "min", "last"]
    header += ["rewards/rejected last", "margins last", "accuracies last"]
    return lines + _table(header, rows) + [""] + [f"- {s}" for s in sentences] + [""]


def _quality(run: RunFiles) -> list[str]:
    """Fluency, repetition, relevance and KL per method, each against the reference's."""
    pooled, metrics, methods, rows_all = run.pooled, run.metrics, run.methods, run.rows_all
    lines = ["## Fluency, repetition, relevance, KL", "", "![quality](figures/quality.png)", ""]
    keys = ["perplexity_ref", "distinct_2", "corpus_distinct_2", "repeated_2gram", "relevance", "kl", "length"]
    header = ["method", "ref. perplexity", "distinct-2", "corpus distinct-2", "repeated bigrams", "relevance"]
    header += ["KL (nats)", "tokens"]
    rows = [[label(m), *(_ci(_pooled_or_unit(pooled, metrics, m, k)) for k in keys)] for m in rows_all]
    lines += _table(header, rows) + [""]
    for key, what in (
        ("repeated_2gram", "repeated-bigram rate (repetition within an output)"),
        ("distinct_2", "distinct-2 per output"),
        ("perplexity_ref", "reference perplexity (fluency)"),
        ("relevance", "relevance to the prompt"),
    ):
        lines.append("- " + versus_reference(pooled, methods, key, what))
    corpus = {m: _pooled_or_unit(pooled, metrics, m, "corpus_distinct_2")["estimate"] for m in rows_all}
    lowest = min(methods, key=lambda m: corpus[m] if corpus[m] is not None else math.inf)
    lines.append(
        f"- Corpus distinct-2 (templating across outputs, seed 0, no interval): lowest for {label(lowest)} "
        f"({_num(corpus[lowest])}) against the reference's {_num(corpus[REFERENCE])}."
    )
    return lines + [""]


def _notes(run: RunFiles) -> list[str]:
    """The run's own notes (e.g. ODPO's offsets), then the caveats every run shares."""
    return [
        "## Notes and caveats",
        "",
        *[f"- {n}" for n in run.metrics.get("notes", [])],
        "- KL is estimated from the evaluated samples, drawn with top-k 30: it is E_q[log pi - log pi_ref] under "
        "the truncated sampler q, not exactly KL(pi || pi_ref) (dpolab.eval.likelihood).",
        "- Intervals are percentile bootstraps over prompts; with several seeds the per-seed values and their "
        "t interval show the training noise beside it.",
        "- The article ran each method once on GPT-2 124M and judged with GPT-4; its numbers have no intervals.",
        "",
    ]


def _figure_links(run: RunFiles) -> list[str]:
    present = [f for f in FIGURES if (run.out / "figures" / f).exists()]
    return ["Figures: " + ", ".join(f"[{f}](figures/{f})" for f in present), ""]


def _pooled_or_unit(pooled, metrics, method, key) -> dict:
    """Corpus-level distinct-n has no interval: take it from seed 0's unit."""
    if key in pooled[method]:
        return pooled[method][key]
    return metrics["units"][f"{method}/seed-0"]["summary"][key]


def _generations(out: Path, method: str, seed: int) -> list[dict]:
    path = out / "units" / method / f"seed-{seed}" / "generations.jsonl"
    return read_jsonl(path) if path.exists() else []


def _win_rates(run: RunFiles) -> list[str]:
    """The judge's win-rate matrix, beside the article's pairs (nothing before the run is judged)."""
    wins = run.wins
    if not wins:
        return []
    names = wins["methods"]
    index = {m: i for i, m in enumerate(names)}
    matrix = wins["win_rate"]
    lines = [
        "## Win rates",
        "",
        "![win rates](figures/win_rates.png)",
        "",
        f"Share of judgments the row won against the column (ties half), both orders, {wins['judge'].split(':')[0]} "
        "judge; "
        f"{wins['n_malformed']} malformed and {wins['n_failed']} failed judgments left out.",
        "",
    ]
    lines += _table(
        ["", *[label(m) for m in names]],
        [[label(a), *("—" if v is None else f"{v:.2f}" for v in matrix[index[a]])] for a in names],
    ) + [""]
    rows = []
    for (a, b), article in ARTICLE["win_rate"].items():
        if a in index and b in index:
            ours = matrix[index[a]][index[b]]
            verdict = (
                "n/a"
                if ours is None
                else (
                    "same side of 50%"
                    if (ours - 0.5) * (article - 0.5) > 0
                    else "opposite side of 50%"
                    if (ours - 0.5) * (article - 0.5) < 0
                    else "one of them at 50%"
                )
            )
            rows.append(
                [f"{label(a)} vs {label(b)}", "n/a" if ours is None else f"{ours:.0%}", f"{article:.0%}", verdict]
            )
    if rows:
        lines += ["Beside the article's GPT-4 judgments:", ""]
        lines += _table(["pair", "ours", "article", ""], rows) + [""]
    if wins["judge"].startswith("offline"):
        lines += [
            "The offline judge is a fixed scoring rule (Penn mention, reference-model fluency, MiniLM relevance, "
            "discounted by repetition; dpolab.judge), not GPT-4: it agrees with GPT-4 only where those features "
            "decide. Set `--judge endpoint` and the DPOLAB_JUDGE_* variables to use a language-model judge.",
            "",
        ]
    return lines


def _frontier(run: RunFiles) -> list[str]:
    """Alignment against KL per beta (seed 0), and which beta buys the most alignment for the least KL."""
    points = run.frontier["points"]
    if not points:
        return []
    lines = [
        "## Beyond the article: the alignment-vs-KL frontier",
        "",
        "![frontier](figures/frontier.png)",
        "",
        "Alignment accuracy against the sampled KL to the reference, per beta (seed 0). Further up and to the "
        "left is better: more alignment for less drift from the reference.",
        "",
    ]
    lines += _table(
        ["method", "beta", "KL (nats)", "alignment"],
        [[label(p["method"]), f"{p['beta']:g}", _ci(p["kl"]), _ci(p["alignment"], _pct)] for p in points],
    )
    lines.append("")
    best = max(points, key=lambda p: (p["alignment"]["estimate"], -p["kl"]["estimate"]))
    cheapest = min(
        (p for p in points if _overlap(p["alignment"], best["alignment"])), key=lambda p: p["kl"]["estimate"]
    )
    lines.append(
        f"- Highest alignment: {label(best['method'])} at beta {best['beta']:g} "
        f"({_pct(best['alignment']['estimate'])}, KL {_num(best['kl']['estimate'])}). The lowest KL among the "
        f"points whose alignment interval overlaps that one: {label(cheapest['method'])} at beta "
        f"{cheapest['beta']:g} ({_pct(cheapest['alignment']['estimate'])}, KL {_num(cheapest['kl']['estimate'])})."
    )
    for method in dict.fromkeys(p["method"] for p in points):
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["beta"])
        if len(mine) >= 2:
            kl_trend = "falls" if mine[-1]["kl"]["estimate"] < mine[0]["kl"]["estimate"] else "rises"
            lines.append(
                f"- {label(method)}: from beta {mine[0]['beta']:g} to {mine[-1]['beta']:g} the KL {kl_trend} "
                f"({_num(mine[0]['kl']['estimate'])} to {_num(mine[-1]['kl']['estimate'])}) and alignment "
                f"goes from {_pct(mine[0]['alignment']['estimate'])} to "
                f"{_pct(mine[-1]['alignment']['estimate'])}."
            )
    return lines + [""]


def _samples(run: RunFiles, n: int = 4) -> list[str]:
    """Every row's continuation of the first ``n`` test prompts (seed 0)."""
    rows_all = run.rows_all
    gens = {m: _generations(run.out, m, 0) for m in rows_all}
    lines = ["## Samples (seed 0, the first test prompts)", ""]
    for i in range(min(n, len(gens[REFERENCE]))):
        lines.append(f"**{gens[REFERENCE][i]['prompt']}**")
        lines.append("")
        for m in rows_all:
            text = gens[m][i]["continuation"].replace("|", "\\|").replace("\n", " ").strip()
            lines.append(f"- {label(m)}: {text}")
        lines.append("")
    return lines


SECTIONS = (
    _title,
    _setup,
    _wall_time,
    _alignment,
    _dynamics,
    _quality,
    _win_rates,
    _frontier,
    _samples,
    _notes,
    _figure_links,
)

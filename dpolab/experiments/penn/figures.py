"""The run's figures (PNG), drawn from the run folder's files alone, so they can be redrawn without the models.

losses.png      training loss per method (one line per seed)
rewards.png     rewards/chosen and rewards/rejected per method: DPO's falling chosen reward vs DPOP's
alignment.png   alignment accuracy with 95% intervals, the article's values beside ours
quality.png     fluency, repetition and relevance with 95% intervals
win_rates.png   the judge's win-rate matrix (row beats column)
frontier.png    alignment accuracy vs KL to the reference across beta (DPO, DPOP, IPO): the alignment-vs-KL frontier
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ...files import atomic_path
from .methods import METHODS, REFERENCE

__all__ = ["make_figures", "frontier_figure", "FIGURES", "label"]

FIGURES = ("losses.png", "rewards.png", "alignment.png", "quality.png", "win_rates.png", "frontier.png")


def label(method: str) -> str:
    return METHODS[method].label if method in METHODS else method


def _histories(out: Path, method: str) -> dict[int, list[dict]]:
    folders = sorted((out / "units" / method).glob("seed-*"))
    return {
        int(f.name[5:]): json.loads((f / "history.json").read_text()) for f in folders if (f / "history.json").exists()
    }


def _grid(n: int, title: str):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat)


def _save(fig, path: Path) -> None:
    """PNG written beside ``path`` and moved into place: never a half-written figure."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def _curves(out: Path, methods: list[str], keys: list[tuple[str, str]], title: str, path: Path) -> None:
    fig, axes = _grid(len(methods), title)
    for ax, method in zip(axes, methods):
        for seed, history in _histories(out, method).items():
            steps = [r["step"] for r in history]
            for (key, style), color in zip(keys, ("C0", "C3")):
                ax.plot(steps, [r[key] for r in history], style, color=color, lw=1, label=key if seed == 0 else None)
        if len(keys) > 1:
            ax.axhline(0, color="grey", lw=0.5)
            ax.legend(fontsize=7)
        ax.set_title(label(method), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    _save(fig, path)
    return fig


def _bars(ax, names: list[str], entries: list[dict], ylabel: str, article: list[float | None] | None = None):
    x = np.arange(len(names))
    est = np.array([np.nan if e["estimate"] is None else e["estimate"] for e in entries], dtype=float)
    low = np.array([np.nan if e["low"] is None else e["low"] for e in entries], dtype=float)
    high = np.array([np.nan if e["high"] is None else e["high"] for e in entries], dtype=float)
    ax.bar(x, est, color=["C7" if n == REFERENCE else "C0" for n in names], label="ours (95% CI)")
    ax.errorbar(x, est, yerr=[est - low, high - est], fmt="none", color="k", capsize=3, lw=1)
    if article and any(a is not None for a in article):
        ax.scatter(x, [np.nan if a is None else a for a in article], marker="D", color="C3", zorder=3, label="article")
        ax.legend(fontsize=7)
    ax.set_xticks(x, [label(n) for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)


def make_figures(out: str | Path) -> list[Path]:
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    methods = list(config["experiment"]["run"]["methods"])
    pooled = metrics["pooled"]
    suffix = f" ({config['model_info']['name']}{', FALLBACK for GPT-2' if config['model_info']['fallback'] else ''})"

    _curves(out, methods, [("loss", "-")], "training loss" + suffix, figures / "losses.png")
    _curves(
        out,
        methods,
        [("rewards/chosen", "-"), ("rewards/rejected", "--")],
        "implicit rewards beta*log(pi/pi_ref)" + suffix,
        figures / "rewards.png",
    )

    rows = [*methods, REFERENCE]
    fig, ax = plt.subplots(figsize=(1.1 * len(rows) + 2, 3.4))
    article = [METHODS[m].article_alignment if m in METHODS else None for m in rows]
    _bars(ax, rows, [pooled[m]["alignment"] for m in rows], "share of outputs naming Penn", article)
    ax.set_ylim(0, 1.05)
    ax.set_title("alignment accuracy on the test prompts" + suffix, fontsize=9)
    fig.tight_layout()
    _save(fig, figures / "alignment.png")
    plt.close(fig)

    panels = [
        ("perplexity_ref", "reference perplexity (lower: more fluent)"),
        ("distinct_2", "distinct-2 per output"),
        ("repeated_2gram", "repeated-bigram rate"),
        ("relevance", "relevance (MiniLM cosine)"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(4 * 3.4, 3.4))
    for ax, (key, title) in zip(axes, panels):
        _bars(ax, rows, [pooled[m][key] for m in rows], "")
        ax.set_title(title, fontsize=9)
    fig.suptitle("fluency, repetition, relevance (95% CI)" + suffix, fontsize=10)
    fig.tight_layout()
    _save(fig, figures / "quality.png")
    plt.close(fig)

    if (out / "win_rates.json").exists():
        wins = json.loads((out / "win_rates.json").read_text())
        matrix = np.array([[np.nan if v is None else v for v in row] for row in wins["win_rate"]], dtype=float)
        names = [label(m) for m in wins["methods"]]
        fig, ax = plt.subplots(figsize=(0.8 * len(names) + 2.5, 0.7 * len(names) + 1.5))
        image = ax.imshow(matrix, cmap="RdBu", vmin=0, vmax=1)
        for i in range(len(names)):
            for j in range(len(names)):
                if not np.isnan(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_title(f"win rate of row vs column ({wins['judge'].split(':')[0]} judge, both orders)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        _save(fig, figures / "win_rates.png")
        plt.close(fig)

    plt.close(frontier_figure(out, figures / "frontier.png", suffix))
    return [figures / name for name in FIGURES if (figures / name).exists()]


BETA_MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # one marker shape per beta, in increasing order


def frontier_figure(out: str | Path, path: Path, suffix: str = ""):
    """frontier.png from a run folder's frontier.json: alignment accuracy against the sampled KL to the reference,
    one line per method in increasing beta, one marker shape per beta (a legend, not text beside the points: points
    of different methods may lie close together). Saves to `path` and returns the open figure (the caller closes
    it, or a notebook shows it)."""
    frontier = json.loads((Path(out) / "frontier.json").read_text())
    betas = sorted({p["beta"] for p in frontier["points"]})
    marker = {beta: BETA_MARKERS[i % len(BETA_MARKERS)] for i, beta in enumerate(betas)}
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    by_method: dict[str, list[dict]] = {}
    for point in frontier["points"]:
        by_method.setdefault(point["method"], []).append(point)
    for i, (method, points) in enumerate(by_method.items()):
        points.sort(key=lambda p: p["beta"])
        kl = np.array([p["kl"]["estimate"] for p in points])
        acc = np.array([p["alignment"]["estimate"] for p in points])
        xerr = [kl - [p["kl"]["low"] for p in points], [p["kl"]["high"] for p in points] - kl]
        yerr = [acc - [p["alignment"]["low"] for p in points], [p["alignment"]["high"] for p in points] - acc]
        ax.plot(kl, acc, color=f"C{i}", lw=1, label=label(method))
        for p, x, y, dx, dy in zip(points, kl, acc, np.transpose(xerr), np.transpose(yerr)):
            ax.errorbar(
                [x],
                [y],
                xerr=[[dx[0]], [dx[1]]],
                yerr=[[dy[0]], [dy[1]]],
                marker=marker[p["beta"]],
                ms=6,
                color=f"C{i}",
                capsize=2,
                lw=1,
            )
    for beta in betas:
        ax.plot([], [], ls="", marker=marker[beta], color="0.3", label=f"beta = {beta:g}")
    ref = frontier["reference"]
    ax.scatter([0], [ref["alignment"]["estimate"]], color="k", marker="*", s=80, label="reference", zorder=3)
    ax.set_xlabel("KL(pi || pi_ref) on the test prompts (nats, sampled)", fontsize=8)
    ax.set_ylabel("alignment accuracy (share naming Penn)", fontsize=8)
    ax.set_ylim(-0.05, 1.08)
    title = "alignment accuracy vs KL to the reference, across beta (seed 0)"
    ax.set_title(title + ("\n" + suffix.strip() if suffix else ""), fontsize=9)  # two lines: never clipped
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    _save(fig, path)
    return fig

"""The frontier figure of the Penn experiment, drawn from a small hand-written frontier.json."""

import json

from PIL import Image

from dpolab.experiments.penn.figures import frontier_figure  # sets matplotlib's Agg backend


def _interval(x):
    return {"estimate": x, "low": x - 0.01, "high": x + 0.01, "n": 10}


def test_frontier_figure_one_marker_per_beta_and_points_in_beta_order(tmp_path):
    # written out of beta order on purpose: each method's line must still run in increasing beta
    points = [
        {"method": "dpo", "beta": 0.5, "alignment": _interval(0.8), "kl": _interval(30.0)},
        {"method": "dpo", "beta": 0.1, "alignment": _interval(1.0), "kl": _interval(60.0)},
        {"method": "ipo", "beta": 0.1, "alignment": _interval(0.9), "kl": _interval(40.0)},
        {"method": "ipo", "beta": 0.5, "alignment": _interval(0.1), "kl": _interval(10.0)},
    ]
    (tmp_path / "frontier.json").write_text(json.dumps({"points": points, "reference": {"alignment": _interval(0.0)}}))
    fig = frontier_figure(tmp_path, tmp_path / "frontier.png")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["DPO", "IPO", "beta = 0.1", "beta = 0.5", "reference"]
    assert "alignment" in ax.get_title() and "reward" not in ax.get_title()
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["DPO"].get_xdata()) == [60.0, 30.0] and list(lines["IPO"].get_ydata()) == [0.9, 0.1]
    # every plotted point carries the marker of its beta; the two betas get different markers
    marker_at = {}
    for line in ax.get_lines():
        if len(line.get_xdata()) == 1 and line.get_marker() not in ("|", "_"):  # not an error bar's cap
            marker_at[(float(line.get_xdata()[0]), float(line.get_ydata()[0]))] = line.get_marker()
    beta_of = {(p["kl"]["estimate"], p["alignment"]["estimate"]): p["beta"] for p in points}
    assert set(marker_at) == set(beta_of)
    by_beta = {}
    for xy, m in marker_at.items():
        by_beta.setdefault(beta_of[xy], set()).add(m)
    assert all(len(ms) == 1 for ms in by_beta.values()) and by_beta[0.1] != by_beta[0.5]
    with Image.open(tmp_path / "frontier.png") as image:
        assert image.format == "PNG"

"""The report's figures as pure functions: data in, PNG bytes out (matplotlib, no display)."""

from __future__ import annotations

import io

import numpy as np

__all__ = ["bland_altman_plot", "efficiency_plot", "map_plot", "roc_plot"]

COLOURS = {"contrastive": "#1f77b4", "baseline": "#ff7f0e"}


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=100)


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def bland_altman_plot(y: np.ndarray, pred: np.ndarray, bias: float, low: float, high: float, title: str) -> bytes:
    """Difference (predicted - true) against the mean of the two, with bias and 95 % limits."""
    plt, fig = _figure(5, 4)
    ax = fig.add_subplot()
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    ax.scatter((y + pred) / 2, pred - y, s=10, alpha=0.6)
    for value, style, name in ((bias, "-", "bias"), (low, "--", "-1.96 SD"), (high, "--", "+1.96 SD")):
        ax.axhline(value, color="k", linestyle=style, linewidth=1)
        ax.annotate(f"{name} {value:+.1f}", (1.0, value), xycoords=("axes fraction", "data"), ha="right",
                    va="bottom", fontsize=8)
    ax.set_xlabel("mean of true and predicted LVEF (%)")
    ax.set_ylabel("predicted - true (LVEF points)")
    ax.set_title(title, fontsize=10)
    return _png(plt, fig)


def roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> bytes:
    """ROC curves, one per model: name -> (false positive rate, true positive rate, AUROC)."""
    plt, fig = _figure(4, 4)
    ax = fig.add_subplot()
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} ({auc:.3f})", color=COLOURS.get(name))
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return _png(plt, fig)


def efficiency_plot(rows: list[dict], metric: str, ylabel: str, title: str) -> bytes:
    """Box plots of ``metric`` per fraction of training labels, one box per model side by side
    (``rows``: dicts with model, fraction, and the metric)."""
    plt, fig = _figure(5.5, 3.8)
    ax = fig.add_subplot()
    fractions = sorted({r["fraction"] for r in rows})
    models = sorted({r["model"] for r in rows}, key=lambda m: (m != "contrastive", m))
    width = 0.8 / max(len(models), 1)
    for j, model in enumerate(models):
        data = [[r[metric] for r in rows if r["model"] == model and r["fraction"] == f and np.isfinite(r[metric])]
                for f in fractions]
        pos = np.arange(len(fractions)) + (j - (len(models) - 1) / 2) * width
        box = ax.boxplot([d if d else [np.nan] for d in data], positions=pos, widths=width * 0.9, patch_artist=True,
                         manage_ticks=False, medianprops={"color": "black"})
        for patch in box["boxes"]:
            patch.set_facecolor(COLOURS.get(model, "#999999"))
            patch.set_alpha(0.6)
        ax.plot([], [], color=COLOURS.get(model, "#999999"), linewidth=6, alpha=0.6, label=model)
    ax.set_xticks(np.arange(len(fractions)), [f"{f:.0%}" for f in fractions])
    ax.set_xlabel("share of training labels")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _png(plt, fig)


def map_plot(xy: np.ndarray, panels: dict[str, np.ndarray], title: str) -> bytes:
    """One scatter of the same 2-D map per panel, coloured by that panel's values (numbers on
    a colour scale, anything else as categories with a legend)."""
    plt, fig = _figure(4.2 * min(len(panels), 3), 3.8 * -(-len(panels) // 3))
    cols = min(len(panels), 3)
    rows = -(-len(panels) // 3)
    for i, (name, values) in enumerate(panels.items(), 1):
        ax = fig.add_subplot(rows, cols, i)
        values = np.asarray(values)
        if values.dtype.kind in "fiu" and len(np.unique(values[~np.isnan(values.astype(float))])) > 2:
            points = ax.scatter(xy[:, 0], xy[:, 1], c=values.astype(float), s=8, cmap="viridis")
            fig.colorbar(points, ax=ax, shrink=0.8)
        else:
            for category in sorted({str(v) for v in values}):
                member = np.array([str(v) == category for v in values])
                ax.scatter(xy[member, 0], xy[member, 1], s=8, label=f"{category} ({member.sum()})", alpha=0.8)
            ax.legend(fontsize=7, markerscale=1.5, loc="best")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return _png(plt, fig)

"""Figure builder for the bars stage: data in, a matplotlib Figure out (no pyplot, as in figures.audit)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure


def ig_vs_ap(effects: pd.DataFrame) -> Figure:
    """The paper's figure 3 (right): per model, IG and AP predictions against the measured
    mean-ablation effect of each component (the Bar C batch of effects.csv)."""
    labels = list(dict.fromkeys(effects["model"]))
    fig = Figure(figsize=(3.6 * len(labels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(labels), squeeze=False)[0]
    for ax, label in zip(axes, labels):
        rows = effects[(effects["model"] == label) & (effects["bar"] == "bar_c")]
        lo, hi = min(rows[["measured", "ig", "ap"]].min()), max(rows[["measured", "ig", "ap"]].max())
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--", label="predicted = measured")
        ax.scatter(rows["measured"], rows["ig"], color="#009E73", label="integrated gradients")
        ax.scatter(rows["measured"], rows["ap"], color="#D55E00", marker="x", label="attribution patching")
        ax.set_title(label)
        ax.set_xlabel("measured mean-ablation effect (nats)")
    axes[0].set_ylabel("predicted effect (nats)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Component effects: IG and AP against mean ablation")
    return fig

"""Figure builder for the steering stage: data in, a matplotlib Figure out (no pyplot, as in figures.audit)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

# Colour-blind-safe (Wong) colours, matching figure 1's self / raw / rotated / baseline series.
EFFECT_SERIES = (
    ("within_effect", "within seed", "#000000", "-"),
    ("raw_effect", "raw cross-seed", "#D55E00", "-"),
    ("rotated_effect", "rotated cross-seed", "#009E73", "-"),
    ("control_effect", "random directions (mean)", "#56B4E9", "--"),
    ("target_control_effect", "random directions on targets (mean)", "#CC79A7", ":"),
)


def effect_vs_alpha(table: pd.DataFrame, title: str = "Steering effect vs dose") -> Figure:
    """The paper's figure 4 (left): per vector, the effect (the table's `effect` column names it:
    conditional-accuracy drop on the toy, next-token KL on Hugging Face models) against alpha.

    `table` has one row per vector x alpha x target (steering.csv); a line is the mean over a
    vector's targets at each alpha and the shaded band spans their min to max, so a target seed
    that transfers differently stays visible.
    """
    vectors = list(dict.fromkeys(table["vector"]))
    fig = Figure(figsize=(3.6 * len(vectors), 3.4), layout="constrained")
    axes = fig.subplots(1, len(vectors), squeeze=False, sharey=True)[0]
    for ax, vector in zip(axes, vectors):
        grouped = table[table["vector"] == vector].groupby("alpha")
        alphas = grouped.size().index.to_numpy()
        for column, label, color, style in (series for series in EFFECT_SERIES if series[0] in table):
            ax.plot(alphas, grouped[column].mean().to_numpy(), style, marker="o", color=color, label=label)
            ax.fill_between(alphas, grouped[column].min().to_numpy(), grouped[column].max().to_numpy(),
                            color=color, alpha=0.15, linewidth=0)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("α")
        head = table.loc[table["vector"] == vector, "head"].iloc[0]
        ax.set_title(f"{vector} ({head} head)")
    axes[0].set_ylabel(table["effect"].iloc[0] if "effect" in table else "conditional-accuracy drop")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return fig

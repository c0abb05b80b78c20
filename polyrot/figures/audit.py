"""Figure builders: data in, a matplotlib Figure out.

No pyplot: a bare Figure keeps no global state, so stages can build figures in any thread or
process and save them with `Figure.savefig` (StageRun.log_figure).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

# Colour-blind-safe (Wong) colours, one per EV series of figure 1.
EV_SERIES = (
    ("sae_self_ev", "self (source SAE, source acts)", "#000000"),
    ("sae_raw_ev", "raw cross-seed", "#D55E00"),
    ("sae_rotated_ev", "rotated", "#009E73"),
    ("sae_gaussian_ev", "Gaussian (source mean, cov)", "#56B4E9"),
)


def ev_by_site(table: pd.DataFrame, title: str = "Source SAE explained variance by site") -> Figure:
    """The paper's figure 1: per site, grouped bars of the EV columns in EV_SERIES.

    `table` has one row per site x target (audit.csv); a bar is the mean over a site's rows and
    its whisker spans their min to max, so a spread across target seeds stays visible. The
    subtitle names the targets averaged over and says what the whiskers are.
    """
    sites = list(dict.fromkeys(table["site"]))
    targets = list(dict.fromkeys(table["target"]))
    over = (f"bars: mean over {len(targets)} targets ({', '.join(targets)}); whiskers: their min to max"
            if len(targets) > 1 else f"target {targets[0]} (one row per site, so no whiskers)")
    grouped = table.groupby("site", sort=False)
    fig = Figure(figsize=(1.2 * len(sites) + 2.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(sites))
    width = 0.8 / len(EV_SERIES)
    for i, (column, label, color) in enumerate(EV_SERIES):
        mean = grouped[column].mean().reindex(sites).to_numpy()
        # Clipped: the mean of equal values can round a hair past them, and matplotlib refuses that.
        spread = np.clip(np.stack([mean - grouped[column].min().reindex(sites).to_numpy(),
                                   grouped[column].max().reindex(sites).to_numpy() - mean]), 0, None)
        ax.bar(x + (i - (len(EV_SERIES) - 1) / 2) * width, mean, width, yerr=spread, capsize=2,
               color=color, label=label)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(x, sites, rotation=30, ha="right")
    ax.set_ylabel("explained variance")
    ax.set_title(f"{title}\n{over}", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def eigen_angle_histogram(angles: np.ndarray, haar: np.ndarray, ks: dict, null_angles: np.ndarray | None = None,
                          bins: int = 24, d: int | None = None, pooled: str = "") -> Figure:
    """The paper's figure 2: eigen-angles |arg lambda| in [0, pi] of the fitted rotations, pooled,
    against those of Haar-random O(d) draws; `ks` is the pooled two-sample KS result
    ({"statistic", "pvalue"}) printed in the title, `null_angles` an optional third histogram.

    Each d x d rotation gives d angles: with `d`, the legend counts rotations as well as angles,
    and `pooled` says what was pooled ("2 sites x 1 target"), so n = 128 reads as 2 x 64."""
    edges = np.linspace(0.0, np.pi, bins + 1)
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.add_subplot()

    def count(n: int, what: str = "") -> str:
        rotations = f"{n // d} rotations{f', {what}' if what else ''}: " if d else ""
        return f"{rotations}{n:,} angles"

    ax.hist(angles, bins=edges, density=True, color="#009E73", alpha=0.7,
            label=f"fitted R ({count(len(angles), pooled)})")
    ax.hist(haar, bins=edges, density=True, histtype="step", color="black", linewidth=1.5,
            label=f"Haar O({d or 'd'}) ({count(len(haar))})")
    if null_angles is not None:
        ax.hist(null_angles, bins=edges, density=True, histtype="step", color="#D55E00", linestyle="--",
                linewidth=1.2, label=f"untrained pair ({count(len(null_angles))})")
    ax.set_xlim(0.0, np.pi)
    ax.set_xticks([0, np.pi / 4, np.pi / 2, 3 * np.pi / 4, np.pi], ["0", "π/4", "π/2", "3π/4", "π"])
    ax.set_xlabel("eigen-angle |θ|")
    ax.set_ylabel("density")
    ax.set_title(f"Eigen-angles of R vs Haar: KS statistic {ks['statistic']:.4f}, p = {ks['pvalue']:.3g}")
    ax.legend(fontsize=8)
    return fig


def checkpoint_curve(table: pd.DataFrame) -> Figure:
    """Cross-checkpoint audit (§8.7 as a curve): per site, ||R - I||_F and the source SAE's raw and
    rotated EV against the target checkpoint, in the order the checkpoints were audited."""
    checkpoints = list(dict.fromkeys(table["target_checkpoint"]))
    x = np.arange(len(checkpoints))
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    panels = fig.subplots(1, 3)
    for ax, column, label in zip(panels, ("frob_from_identity", "sae_raw_ev", "sae_rotated_ev"),
                                 ("||R - I||_F", "raw EV (source SAE)", "rotated EV (source SAE)")):
        for site, rows in table.groupby("site", sort=False):
            values = rows.set_index("target_checkpoint")[column].reindex(checkpoints).to_numpy()
            ax.plot(x, values, marker="o", markersize=3, label=site)
        ax.set_xticks(x, checkpoints, rotation=30, ha="right", fontsize=8)
        ax.set_title(label)
    panels[0].axhline(table["haar_prediction"].iloc[0], color="grey", linestyle="--", linewidth=0.8)
    panels[0].legend(fontsize=7)
    fig.suptitle("Source checkpoint's SAEs applied to other checkpoints of the run")
    return fig

"""Figures of the rotation statistics' nulls and power, of which map suffices, and of mode
connectivity (data in, a bare matplotlib Figure out, as polyrot.figures.audit)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from polyrot.core.maps import MAPS
from polyrot.core.rotation import haar_angles

# Wong colours, one per series kind.
KIND_COLOURS = {"trained": "#009E73", "untrained": "#D55E00", "planted_same_model": "#0072B2", "planted_haar": "#999999",
                "planted_angle": "#CC79A7"}
STATISTIC_COLOURS = {"ks": "#E69F00", "ks_mc": "#56B4E9", "frob": "#0072B2", "det_ks": "#D55E00",
                     "det_ks_mc": "#CC79A7", "det_frob": "#009E73"}
PATH_COLOURS = {"unaligned": "#D55E00", "permuted": "#E69F00", "aligned": "#009E73"}


def determined_angle_histogram(angles: dict[str, list[np.ndarray]], *, haar_seed: int = 31, n_haar: int = 10,
                               bins: int = 24) -> Figure:
    """Figure 2 on the determined part: per kind of pair ({kind: [R_det's eigen-angles, one array per
    rotation]}), the pooled eigen-angles of R_det, against Haar angles drawn for each rotation's own
    O(k) (n_haar draws each), pooled alike; R_det is Haar O(k) exactly when R is Haar."""
    edges = np.linspace(0.0, np.pi, bins + 1)
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.add_subplot()
    reference = [haar_angles(len(a), n_haar, haar_seed) for found in angles.values() for a in found if len(a) > 1]
    if reference:
        ax.hist(np.concatenate(reference), bins=edges, density=True, histtype="step", color="black", linewidth=1.5,
                label="Haar O(k), k per rotation")
    for kind, found in angles.items():
        if not found:
            continue
        pooled = np.concatenate(found)
        ks = sorted({len(a) for a in found})
        style = {"alpha": 0.6} if kind == "trained" else {"histtype": "step", "linewidth": 1.2, "linestyle": "--"}
        ax.hist(pooled, bins=edges, density=True, color=KIND_COLOURS.get(kind, "#56B4E9"),
                label=f"{kind} ({len(found)} rotations, k {ks[0]}–{ks[-1]})", **style)
    ax.set_xlim(0.0, np.pi)
    ax.set_xticks([0, np.pi / 4, np.pi / 2, 3 * np.pi / 4, np.pi], ["0", "π/4", "π/2", "3π/4", "π"])
    ax.set_xlabel("eigen-angle |θ| of R_det")
    ax.set_ylabel("density")
    ax.set_title("Eigen-angles of R on the part the data determine", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def power_figure(power: pd.DataFrame, alpha: float = 0.05) -> Figure:
    """The power curve: per departure family (max eigen-angle; fixed fraction), the rejection rate
    at p < alpha of each statistic, mean over sites with the range as a band; the rate under the
    planted Haar null is marked on the left axis."""
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (kind, xlabel) in zip(axes, (("angle", "largest eigen-angle of the planted R (rad)"),
                                         ("fixed", "fraction of directions the planted R fixes"))):
        rows = power[power["kind"] == kind]
        for statistic, found in rows.groupby("statistic", sort=False):
            by = found.groupby("departure")["rate"]
            x, mean = by.mean().index.to_numpy(), by.mean().to_numpy()
            colour = STATISTIC_COLOURS.get(statistic, "#000000")
            ax.plot(x, mean, marker="o", color=colour, label=statistic)
            ax.fill_between(x, by.min().to_numpy(), by.max().to_numpy(), color=colour, alpha=0.15)
            haar = power[(power["kind"] == "haar") & (power["statistic"] == statistic)]["rate"]
            ax.scatter([x.min()], [haar.mean()], marker="x", color=colour)
        ax.axhline(alpha, color="black", linewidth=0.6, linestyle=":")
        ax.axhline(0.8, color="black", linewidth=0.6, linestyle="--")
        ax.set_xlabel(xlabel)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel(f"rejection rate at p < {alpha:g}")
    axes[0].legend(fontsize=7, title="statistic (x: rate under Haar)", title_fontsize=7)
    fig.suptitle("Power of the rotation statistics on planted rotations of the source's activations", fontsize=10)
    return fig


def which_map_chart(table: pd.DataFrame) -> Figure:
    """Per site, held-out EV of each map (mean over the table's targets, whiskers their range)."""
    sites = list(dict.fromkeys(table["site"]))
    kinds = [k for k in MAPS if f"map_{k}_ev" in table]
    fig = Figure(figsize=(1.3 * len(sites) + 2.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(kinds), 1)
    x = np.arange(len(sites))
    grouped = table.groupby("site", sort=False)
    for i, kind in enumerate(kinds):
        column = f"map_{kind}_ev"
        mean, lo, hi = (grouped[column].agg(f).reindex(sites).to_numpy() for f in ("mean", "min", "max"))
        ax.bar(x + (i - (len(kinds) - 1) / 2) * width, np.clip(mean, -1.0, None), width, label=kind,
               yerr=np.vstack([mean - lo, hi - mean]), capsize=2)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(x, sites, rotation=30, ha="right")
    ax.set_ylim(-1.0, 1.05)
    ax.set_ylabel("held-out EV of the mapped target (clipped at -1)")
    ax.set_title("Which map suffices: target activations mapped into the source frame", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    return fig


def connectivity_curves(table: pd.DataFrame) -> Figure:
    """Loss and min accuracy along each path (one line per pair and path) against t."""
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2, sharex=True)
    for (pair, path), rows in table.groupby(["pair", "path"], sort=False):
        colour = PATH_COLOURS.get(path, "#000000")
        loss_ax.plot(rows["t"], rows["loss"], color=colour, alpha=0.8, label=path)
        acc_ax.plot(rows["t"], rows["acc_min"], color=colour, alpha=0.8, label=path)
    handles, labels = loss_ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    loss_ax.legend(unique.values(), unique.keys(), fontsize=7)
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("t (0: seed A, 1: seed B)")
    acc_ax.set_xlabel("t (0: seed A, 1: seed B)")
    loss_ax.set_ylabel("held-out loss (sum over heads)")
    acc_ax.set_ylabel("min held-out accuracy")
    fig.suptitle("Linear mode connectivity: the straight line between two seeds' weights", fontsize=10)
    return fig

"""The claims along convergence (polyrot.experiments.convergence) as small multiples: one panel per
claim, its value at each milestone checkpoint and on the final weights, against the paper's
interval (data in, a bare matplotlib Figure out, as polyrot.figures.audit)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

STATUS_COLOURS = {"PASS": "#009E73", "FAIL": "#D55E00", "NO POWER": "#E69F00"}
COLUMNS = 4


def claims_along_convergence(table: pd.DataFrame, bounds: dict[str, tuple[float, float]]) -> Figure:
    """`table` as convergence.along returns it; `bounds` {claim id: accepted interval}. Markers
    are the claim's value, coloured by verdict; whiskers the range of its matched values; the
    shaded band (or dashed line, for a one-sided bound) is the accepted interval."""
    claims = [c for c, part in table.groupby("claim", sort=False) if part["value"].notna().sum()]
    rows = max(1, math.ceil(len(claims) / COLUMNS))
    fig = Figure(figsize=(3.2 * COLUMNS, 2.5 * rows), layout="constrained")
    checkpoints = list(dict.fromkeys(table.sort_values("level", na_position="last")["checkpoint"]))
    for i, claim in enumerate(claims):
        ax = fig.add_subplot(rows, COLUMNS, i + 1)
        part = table[table["claim"] == claim].set_index("checkpoint").reindex(checkpoints)
        x = np.arange(len(checkpoints))
        measured = part["value"].notna().to_numpy()
        ax.vlines(x[measured], part["lo"][measured], part["hi"][measured], color="#777777", linewidth=1.2)
        for xi, (_, row) in zip(x, part.iterrows()):
            if not math.isnan(row["value"]):
                ax.plot(xi, row["value"], "o", color=STATUS_COLOURS.get(row["status"], "#777777"))
        lo, hi = bounds[claim]
        if math.isfinite(lo) and math.isfinite(hi):
            ax.axhspan(lo, hi, color="#56B4E9", alpha=0.25, linewidth=0)
        for edge in (lo, hi):
            if math.isfinite(edge) and not (math.isfinite(lo) and math.isfinite(hi)):
                ax.axhline(edge, color="#56B4E9", linestyle="--", linewidth=1.2)
        ax.set_xticks(x, [c.replace("first-", "") for c in checkpoints], fontsize=7)
        ax.set_title(claim, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("Claims along convergence: value at the checkpoints first confirmed at each min held-out "
                 "accuracy, then final (blue: the paper's interval)", fontsize=9)
    return fig

"""Claims along convergence: the claims of a node evaluated again at each accuracy milestone.

An experiment node `<id>-first-<m>` is node `<id>` run on the checkpoints at which the seeds first
confirmed min held-out accuracy m (its `checkpoint: first-<m>`; a matrix over m writes them all).
Every claim that reads `<id>` is then also evaluated on each such twin, with the same metrics,
interval and null, so the table shows the claim's value at 99%, 99.5%, ... and on the final
weights: which claims depend on the last fraction of a percent, and which way they move. A twin
that was skipped (a seed never reached its milestone) or did not run reads NOT MEASURED. The null
controls (untrained models) have no checkpoint, so a twin's claims read them from the final node.
A claim marked `final_only` (its premise holds on the final weights alone) is left out.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pandas as pd

from polyrot.experiments import pipeline
from polyrot.experiments.claims import MISSING, evaluate

FINAL = "final"
_TWIN = re.compile(r"^(?P<base>.+)-first-(?P<level>0\.[0-9]+)$")


def twins(exp: pipeline.Experiment) -> dict[str, list[tuple[float, str]]]:
    """{node id: [(milestone level, twin node id), ...] in rising level} for nodes with twins."""
    out: dict[str, list[tuple[float, str]]] = {}
    for node_id in exp.nodes:
        m = _TWIN.match(node_id)
        if m and m.group("base") in exp.nodes:
            out.setdefault(m.group("base"), []).append((float(m.group("level")), node_id))
    return {base: sorted(found) for base, found in out.items()}


def along(exp: pipeline.Experiment, metrics: dict[str, dict[str, float]]) -> pd.DataFrame:
    """One row per (claim with twins, checkpoint): the claim's verdict at each milestone and final.

    Columns: claim, checkpoint (first-<m> or final), level (m; NaN for final), node, value (the
    claim's reduced value), lo / hi (the range of the matched values), n, status."""
    found = twins(exp)
    rows = []
    for claim in exp.claims:
        if claim.node not in found or claim.final_only:
            continue
        for level, node in [*found[claim.node], (math.nan, claim.node)]:
            # The null controls have no checkpoint: a twin reads them where the final node does.
            verdict = evaluate(dataclasses.replace(claim, node=node, null_node=claim.null_source), metrics)
            spread = verdict.spread or (math.nan, math.nan)
            rows.append({"claim": claim.id, "checkpoint": FINAL if math.isnan(level) else f"first-{level:g}",
                         "level": level, "node": node, "value": verdict.measured, "lo": spread[0], "hi": spread[1],
                         "n": verdict.n, "status": verdict.status})
    return pd.DataFrame(rows, columns=["claim", "checkpoint", "level", "node", "value", "lo", "hi", "n", "status"])


def trend(values: pd.Series) -> str:
    """How a claim's value moves from its first measured milestone to the final weights."""
    measured = values.dropna()
    if len(measured) < 2:
        return ""
    first, last = measured.iloc[0], measured.iloc[-1]
    if math.isclose(first, last, rel_tol=0.05, abs_tol=1e-9):
        return "flat"
    return "rises" if last > first else "falls"


def render_markdown(table: pd.DataFrame, exp: pipeline.Experiment) -> str:
    """The claims along convergence as a Markdown table: one row per claim, one column per checkpoint."""
    checkpoints = list(dict.fromkeys(table.sort_values("level", na_position="last")["checkpoint"]))
    claims = {c.id: c for c in exp.claims}
    rows = ["| claim | paper | accepted | " + " | ".join(checkpoints) + " | from first to final |",
            "|---|---|---|" + "---|" * len(checkpoints) + "---|"]
    for claim_id, part in table.groupby("claim", sort=False):
        cells = []
        by_checkpoint = part.set_index("checkpoint")
        for checkpoint in checkpoints:
            row = by_checkpoint.loc[checkpoint]
            cells.append("not measured" if row["status"] == MISSING else f"{row['value']:.4g} {row['status']}")
        ordered = part.sort_values("level", na_position="last")["value"]
        claim = claims[claim_id]
        rows.append("| " + " | ".join(str(c).replace("|", "\\|") for c in
                                      [claim_id, claim.paper, claim.expectation, *cells, trend(ordered)]) + " |")
    return "\n".join(rows) + ("\n\nEach cell is the claim's value (for claims on every value, the one "
                              "furthest outside its interval) and verdict on the seeds' checkpoints first "
                              "confirmed at that min held-out accuracy, then on the final weights.")

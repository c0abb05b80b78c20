"""The report of a reproduction: a Markdown page with the claims table and the paper's figures,
regenerated from the node runs' data and logged on the parent run under report/.

Figures, from whatever the experiment ran:
  fig1_ev_by_site.png           audit.csv of each audit node (SAE failure and recovery)
  fig2_rotation_vs_haar.png     the eigen-angles of every fit_rotation node's rotations at internal
                                sites, pooled, against Haar O(d)
  fig3_ig_vs_ap.png             effects.csv of each bars node (IG and AP against mean ablation)
  fig4_steering.png             steering.csv of each steering node
  fig_cross_checkpoint.png      audits over several checkpoints of one run
  fig_which_map.png             audit.csv: held-out EV of each map per site (which map suffices)
  fig_power.png                 power.csv of audits run with --power-draws (power curves)
  fig_connectivity.png          connectivity.csv of each connectivity node (mode connectivity)
(one file per node where an experiment has several nodes of a kind: <figure>-<node>.png)
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.entities import Run

from polyrot import tracking
from polyrot.core.rotation import Rotation, eigen_angles, haar_angles, pooled_statistics
from polyrot.errors import LineageError
from polyrot.experiments import pipeline
from polyrot.experiments.claims import Verdict, render_markdown
from polyrot.experiments.verify import node_runs
from polyrot.figures.audit import checkpoint_curve, eigen_angle_histogram, ev_by_site
from polyrot.figures.bars import ig_vs_ap
from polyrot.figures.nulls import connectivity_curves, power_figure, which_map_chart
from polyrot.figures.steering import effect_vs_alpha

# Low-rank embeddings leave R arbitrary off their span: figure 2 pools the other sites, as the audit does.
from polyrot.stages.audit import EMBEDDING_SITES, HAAR_SEED, N_HAAR

REPORT = "report/report.md"
TAG_REPORT = "polyrot.report"


def _csv(run_id: str, stage: str, path: str) -> pd.DataFrame:
    return pd.read_csv(tracking.fetch_artifact(run_id, path, stage=stage))


def _rotations(run: Run) -> list[Rotation]:
    paths = sorted(k[len(tracking.TAG_DIGEST):] for k in run.data.tags
                   if k.startswith(tracking.TAG_DIGEST + "rotations/"))
    return [Rotation.load(tracking.fetch_artifact(run.info.run_id, p, stage="fit_rotation")) for p in paths
            if Path(p).stem not in EMBEDDING_SITES]


def build_figures(exp: pipeline.Experiment, parent: Run) -> dict[str, object]:
    """{file name: matplotlib Figure} for every figure the reproduction has data for."""
    client = tracking.configure()
    runs = {node: client.get_run(rid) for node, rid in node_runs(parent).items()}
    by_stage: dict[str, list[str]] = {}
    for node in exp.order():
        if node in runs:
            by_stage.setdefault(exp.nodes[node].stage.name, []).append(node)

    def name(base: str, node: str, stage: str) -> str:
        return f"{base}.png" if len(by_stage[stage]) == 1 else f"{base}-{node}.png"

    out: dict[str, object] = {}
    for node in by_stage.get("audit", []):
        table = _csv(runs[node].info.run_id, "audit", "audit.csv")
        trained = table[table["kind"] == "trained"]
        if "target_checkpoint" in trained and trained["target_checkpoint"].nunique() > 1:
            out[name("fig_cross_checkpoint", node, "audit")] = checkpoint_curve(trained)
        else:
            out[name("fig1_ev_by_site", node, "audit")] = ev_by_site(
                trained, title=f"Source SAE explained variance by site ({node})")
        if "map_orthogonal_ev" in trained:
            out[name("fig_which_map", node, "audit")] = which_map_chart(trained)
        if tracking.TAG_DIGEST + "power.csv" in runs[node].data.tags:
            out[name("fig_power", node, "audit")] = power_figure(_csv(runs[node].info.run_id, "audit", "power.csv"))
    rotations = [r for node in by_stage.get("fit_rotation", []) for r in _rotations(runs[node])]
    if rotations:
        stats = pooled_statistics(rotations, haar_seed=HAAR_SEED, n_haar=N_HAAR)
        angles = np.concatenate([eigen_angles(r.R) for r in rotations])
        out["fig2_rotation_vs_haar.png"] = eigen_angle_histogram(
            angles, haar_angles(rotations[0].d, N_HAAR, HAAR_SEED),
            {"statistic": stats["ks_statistic"], "pvalue": stats["ks_pvalue"]})
    for node in by_stage.get("bars", []):
        effects = _csv(runs[node].info.run_id, "bars", "effects.csv")
        out[name("fig3_ig_vs_ap", node, "bars")] = ig_vs_ap(effects)
    for node in by_stage.get("connectivity", []):
        out[name("fig_connectivity", node, "connectivity")] = connectivity_curves(
            _csv(runs[node].info.run_id, "connectivity", "connectivity.csv"))
    for node in by_stage.get("steering", []):
        table = _csv(runs[node].info.run_id, "steering", "steering.csv")
        out[name("fig4_steering", node, "steering")] = effect_vs_alpha(
            table, title=f"Steering transfer ({node})")
    return out


def render(exp: pipeline.Experiment, parent: Run, verdicts: list[Verdict], figure_names: list[str]) -> str:
    runs = node_runs(parent)
    lines = [
        f"# {exp.name}: reproduction report",
        "",
        exp.description,
        "",
        f"- parent run: `{parent.info.run_id}` (MLflow experiment `{exp.mlflow_experiment}`, profile `{exp.profile}`)",
        f"- code: polyrot {parent.data.tags.get(tracking.TAG_VERSION, '?')}, commit "
        f"`{parent.data.tags.get(tracking.TAG_COMMIT, '?')[:12]}`"
        f"{' (dirty)' if parent.data.tags.get(tracking.TAG_DIRTY) == 'true' else ''}",
        f"- written: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        "## Claims",
        "",
        render_markdown(verdicts) if verdicts else "This experiment states no claims.",
        "",
        "## Figures",
        "",
    ]
    lines += [f"![{n}]({n})\n" for n in figure_names] or ["No figure: no node of this experiment has plottable data.\n"]
    lines += ["## Runs", "", "| node | stage | run |", "|---|---|---|"]
    lines += [f"| {node} | {exp.nodes[node].stage.name} | `{runs[node]}` |" for node in exp.order() if node in runs]
    return "\n".join(lines) + "\n"


def write_report(exp: pipeline.Experiment, parent: Run, verdicts: list[Verdict],
                 log_to: tracking.StageRun | None = None) -> str:
    """Render the report and its figures onto the parent run; returns the report's local path
    when the artifact store is local, else its artifact URI."""
    built = build_figures(exp, parent)
    text = render(exp, parent, verdicts, list(built))

    def log(run: tracking.StageRun) -> None:
        for file, fig in built.items():
            run.log_figure(f"report/{file}", fig)
        run.path(REPORT).write_text(text)
        run.log_artifact(REPORT)
        run.set_tags({TAG_REPORT: REPORT})

    if log_to is not None:
        log(log_to)
    else:
        with tracking.attach(parent.info.run_id) as run:
            log(run)
    try:
        return str(tracking.artifact_dir(parent.info.run_id) / REPORT)
    except LineageError:  # a remote artifact store has no local path
        return f"{parent.info.artifact_uri}/{REPORT}"

"""The report of a reproduction: a Markdown page with the claims table and the paper's figures,
regenerated from the node runs' data and logged on the parent run under report/.

Figures, from whatever the experiment ran:
  fig1_ev_by_site.png           audit.csv of each audit node (SAE failure and recovery)
  fig2_eigen_angles.png         each audit node's own figure 2: the eigen-angles of its rotations at
                                internal sites, pooled, against Haar O(d) and its untrained pair
  fig3_ig_vs_ap.png             effects.csv of each bars node (IG and AP against mean ablation)
  fig4_steering.png             steering.csv of each steering node
  fig_cross_checkpoint.png      audits over several checkpoints of one run
  fig_which_map.png             audit.csv: held-out EV of each map per site (which map suffices)
  fig_power.png                 power.csv of audits run with --power-draws (power curves)
  fig_connectivity.png          connectivity.csv of each connectivity node (mode connectivity)
  fig_convergence.png           the claims of nodes run at milestone checkpoints too, along convergence
                                (polyrot.experiments.convergence; the table is convergence.csv)
(one file per node where an experiment has several nodes of a kind: <figure>-<node>.png)
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pandas as pd
from mlflow.entities import Run

from polyrot import tracking
from polyrot.errors import LineageError
from polyrot.experiments import convergence, pipeline
from polyrot.experiments.claims import Verdict, render_markdown
from polyrot.experiments.verify import node_metrics, node_runs
from polyrot.figures.audit import checkpoint_curve, ev_by_site
from polyrot.figures.bars import ig_vs_ap
from polyrot.figures.convergence import claims_along_convergence
from polyrot.figures.nulls import connectivity_curves, power_figure, which_map_chart
from polyrot.figures.steering import effect_vs_alpha

REPORT = "report/report.md"
# What each figure shows and pools, printed under it (keyed by the file name's stem).
CAPTIONS = {
    "fig1_ev_by_site": "The source seed's SAE at each site on the source's own activations (self), on each target's "
                       "as they are (raw), mapped into the source frame by the fitted rotation (rotated), and on "
                       "Gaussian samples; bars are means over the targets named in the subtitle, whiskers their range.",
    "fig2_eigen_angles": "Eigen-angles of the audit's rotations at its internal sites (the embedding site left out), "
                         "every site and target pooled: each d x d rotation contributes d angles, so n angles = "
                         "rotations x d; an audit run with --null draws its untrained pair's angles beside them.",
    "fig3_ig_vs_ap": "Per model and component: the IG and AP predictions against the measured mean-ablation effect.",
    "fig4_steering": "Per vector, its effect against the dose alpha: lines are means over the target seeds, bands "
                     "their range.",
    "fig_cross_checkpoint": "Per site, ||R - I||_F and the source SAE's raw and rotated EV against each audited "
                            "checkpoint of the run.",
    "fig_which_map": "Per site, the held-out EV of each map from target to source activations (bars: mean over the "
                     "targets, whiskers their range): which map the data asks for.",
    "fig_power": "Power curves: the rate at which each statistic rejects Haar at p < 0.05 for planted rotations "
                 "that depart from it, mean over sites with their range as a band.",
    "fig_connectivity": "Loss and min accuracy along each interpolation path between seeds, one line per pair and "
                        "path.",
    "fig_convergence": "Each claim that is also measured at the seeds' milestone checkpoints: its value there and on "
                       "the final weights (markers coloured by verdict, whiskers the range of its values), against "
                       "the paper's interval.",
}


TAG_REPORT = "polyrot.report"


def caption(figure: str) -> str:
    return next((text for stem, text in CAPTIONS.items() if figure.startswith(stem)), "")


def _csv(run_id: str, stage: str, path: str) -> pd.DataFrame:
    return pd.read_csv(tracking.fetch_artifact(run_id, path, stage=stage))


def build_figures(exp: pipeline.Experiment, parent: Run, along: pd.DataFrame) -> dict[str, object]:
    """{file name: matplotlib Figure, or the Path of a node's own figure} for every figure the
    reproduction has data for; `along` is its claims along convergence."""
    client = tracking.configure()
    runs = {node: run for node, rid in node_runs(parent).items()
            if tracking.TAG_SKIPPED not in (run := client.get_run(rid)).data.tags}
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
        # The audit's figure 2 as it drew it: its rotations with its untrained control beside them.
        out[name("fig2_eigen_angles", node, "audit")] = tracking.fetch_artifact(
            runs[node].info.run_id, "fig2_eigen_angles.png", stage="audit")
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
    if along["value"].notna().any():
        out["fig_convergence.png"] = claims_along_convergence(along, {c.id: c.bounds for c in exp.claims})
    return out


def render(exp: pipeline.Experiment, parent: Run, verdicts: list[Verdict], figure_names: list[str],
           along: pd.DataFrame) -> str:
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
    ]
    if len(along):
        lines += ["## Claims along convergence", "", convergence.render_markdown(along, exp), ""]
    lines += [
        "## Figures",
        "",
    ]
    lines += [f"![{n}]({n})\n\n{caption(n)}\n" for n in figure_names] \
        or ["No figure: no node of this experiment has plottable data.\n"]
    lines += ["## Runs", "", "| node | stage | run |", "|---|---|---|"]
    lines += [f"| {node} | {exp.nodes[node].stage.name} | `{runs[node]}` |" for node in exp.order() if node in runs]
    return "\n".join(lines) + "\n"


def write_report(exp: pipeline.Experiment, parent: Run, verdicts: list[Verdict],
                 log_to: tracking.StageRun | None = None) -> str:
    """Render the report and its figures onto the parent run; returns the report's local path
    when the artifact store is local, else its artifact URI."""
    along = convergence.along(exp, node_metrics(parent)[0])
    built = build_figures(exp, parent, along)
    text = render(exp, parent, verdicts, list(built), along)

    def log(run: tracking.StageRun) -> None:
        if len(along):
            along.to_csv(run.path("report/convergence.csv"), index=False)
            run.log_artifact("report/convergence.csv")
        for file, fig in built.items():
            if isinstance(fig, Path):
                shutil.copyfile(fig, run.path(f"report/{file}"))
                run.log_artifact(f"report/{file}")
            else:
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

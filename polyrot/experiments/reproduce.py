"""The `reproduce` entry point: run a whole experiment from projects/ as a parent run linking every stage run.

The parent run's tags `polyrot.node.<id>` hold each node's run ID (reused or new) and
`graph.json` records the graph with the commands that ran, so the result of a reproduction is one
run ID from which everything else is reachable. At the end the experiment's claims are verified
(polyrot.experiments.verify: the table goes to stderr, the verdicts onto the parent run) and the report is
written (polyrot.experiments.report). The exit status says whether the stages ran, not whether the paper's
claims hold: `polyrot verify NAME` is the gate that exits 1 when a required claim fails.

`--executor slurm` runs each node as a Slurm job (polyrot.experiments.slurm) instead of a local
process; with `--no-wait` the graph is only submitted: no parent run, no verdicts, no report, and
the job IDs on stdout. A later `reproduce` waits for those jobs and makes the reproduction.
"""

from __future__ import annotations

import click

from polyrot import tracking
from polyrot.errors import ParameterError
from polyrot.experiments import claims, pipeline, report, slurm, verify
from polyrot.stages import specs

STAGE = specs.REPRODUCE
NAME = STAGE.name


def default_experiment(params: dict) -> str:
    """A reproduction's MLflow experiment when --experiment is not given: its definition's."""
    return pipeline.load_experiment(params["name"], params["profile"]).mlflow_experiment


def _execute(exp: pipeline.Experiment, params: dict, experiment: str, parent_run: str | None) -> pipeline.Outcome:
    """The graph through the chosen executor: the one place that knows which there are."""
    echo = lambda line: click.echo(line, err=True)  # noqa: E731
    if params["executor"] == "slurm":
        return slurm.execute(exp, experiment=experiment, parent_run=parent_run, echo=echo,
                             partition=params["partition"], time_limit=params["time"], wait=not params["no_wait"])
    return pipeline.execute(exp, experiment=experiment, parent_run=parent_run, jobs=params["jobs"], echo=echo)


def run(params: dict) -> str:
    exp = pipeline.load_experiment(params["name"], params["profile"])
    experiment = params["experiment"]
    if params["executor"] == "slurm":
        slurm.check(exp, params["partition"], params["time"])  # before any run exists
    else:
        given = [f"--{k.replace('_', '-')}" for k in ("partition", "time", "no_wait") if params[k]]
        if given:
            raise ParameterError(f"{', '.join(given)} need(s) --executor slurm")
    stale = tracking.fail_stale_runs(experiment)
    if stale:
        click.echo(f"marked {len(stale)} stale RUNNING run(s) of a dead process as FAILED", err=True)
    if params["no_wait"]:
        outcome = _execute(exp, params, experiment, parent_run=None)
        click.echo(f"{exp.name}: {len(outcome.pending)} job(s) on Slurm, {len(outcome.reused)} stage(s) reused; "
                   f"`polyrot reproduce {exp.name} --executor slurm` waits for them, verifies and reports", err=True)
        return ",".join(outcome.pending)
    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=experiment,
                            run_name=f"reproduce {exp.name} ({exp.profile})",
                            tags={verify.TAG_DEFINITION: exp.name}) as parent:
        outcome = _execute(exp, params, experiment, parent.run_id)
        parent.set_tags({f"{tracking.TAG_NODE}{node}": rid for node, rid in outcome.run_ids.items()})
        parent.log_metrics({"nodes": len(outcome.run_ids), "reused": len(outcome.reused), "ran": len(outcome.ran)})
        parent.log_json("graph.json", {
            "experiment": exp.name, "profile": exp.profile,
            "nodes": {n: {"stage": exp.nodes[n].stage.name, "run_id": outcome.run_ids[n],
                          "reused": n in outcome.reused, "upstream": exp.upstream(exp.nodes[n])}
                      for n in exp.order()},
        })
        click.echo(f"{exp.name}: {len(outcome.ran)} stage(s) ran, {len(outcome.reused)} reused; "
                   f"parent run {parent.run_id}", err=True)
        # The parent's node tags are set, so it reads as a reproduction before it is closed.
        reproduction = tracking.configure().get_run(parent.run_id)
        verdicts = verify.verify(exp, reproduction, log_to=parent)
        if verdicts:
            click.echo(claims.render_text(verdicts), err=True)
        path = report.write_report(exp, reproduction, verdicts, log_to=parent)
        click.echo(f"report: {path}\nbrowse the runs: polyrot ui", err=True)
        return parent.run_id

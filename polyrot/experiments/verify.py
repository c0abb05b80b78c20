"""Verify an experiment's claims on the runs of its latest reproduction.

A reproduction is a FINISHED `reproduce` run (the parent) whose `polyrot.node.<id>` tags name
the run of every node. `verify` reads those runs' metrics, evaluates the experiment's claims
(polyrot.experiments.claims) and writes the verdicts back onto the parent run:

  metrics   claim.<id>.value   the measured (reduced) value
            claim.<id>.pass    1 or 0 (absent when the claim was not measured)
            claims.pass / claims.fail / claims.no_power / claims.not_measured / claims.required_failing
  tags      polyrot.claim.<id> = PASS | FAIL | NO POWER | NOT MEASURED (claims.VERDICTS)
  artifact  claims.csv         the table `polyrot verify` prints
"""

from __future__ import annotations

import fnmatch

from mlflow.entities import Run

# A module import: pipeline -> stages -> reproduce -> verify runs while pipeline is half-built.
from polyrot import tracking
from polyrot.errors import LineageError
from polyrot.experiments import pipeline
from polyrot.experiments.claims import (
    MISSING,
    PASS,
    VERDICTS,
    Verdict,
    evaluate,
    failed_required,
    slug,
    verdict_table,
)

TAG_DEFINITION = "polyrot.experiment_definition"
TAG_NODE = tracking.TAG_NODE
TAG_CLAIM = "polyrot.claim."


def latest_reproduction(definition: str, experiment: str | None = None) -> Run:
    """The newest FINISHED reproduce run of `definition` in its MLflow experiment."""
    exp = pipeline.load_experiment(definition)
    name = experiment or exp.mlflow_experiment
    client = tracking.configure()
    found = client.get_experiment_by_name(name)
    runs = [] if found is None else client.search_runs(
        [found.experiment_id],
        f"tags.`{tracking.TAG_STAGE}` = 'reproduce' and tags.`{TAG_DEFINITION}` = '{exp.name}' "
        "and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise LineageError(f"no finished reproduction of {exp.name} in MLflow experiment {name!r}: "
                           f"run `polyrot reproduce {exp.name}` first")
    return runs[0]


def reproduction(definition: str, run_id: str | None = None,
                 experiment: str | None = None) -> tuple[pipeline.Experiment, Run]:
    """The experiment definition (in the reproduction's profile) and its parent run."""
    parent = tracking.fetch_run(run_id, "reproduce") if run_id else latest_reproduction(definition, experiment)
    recorded = parent.data.tags.get(TAG_DEFINITION)
    exp = pipeline.load_experiment(definition, parent.data.params.get("profile", "cpu"))
    if recorded != exp.name:
        raise LineageError(f"run {parent.info.run_id} reproduces {recorded!r}, not {exp.name!r}")
    return exp, parent


def node_runs(parent: Run) -> dict[str, str]:
    return {k[len(TAG_NODE):]: v for k, v in parent.data.tags.items() if k.startswith(TAG_NODE)}


def node_metrics(parent: Run) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """{node id: that node's run's metrics} for every node of the reproduction, and {node id: why
    it was skipped} for the nodes that had nothing to compute (polyrot.stages.skip)."""
    client = tracking.configure()
    runs = {node: client.get_run(rid) for node, rid in node_runs(parent).items()}
    skipped = {node: run.data.tags[tracking.TAG_SKIPPED] for node, run in runs.items()
               if tracking.TAG_SKIPPED in run.data.tags}
    return {node: run.data.metrics for node, run in runs.items()}, skipped


def explain_missing(verdict: Verdict, skipped: dict[str, str]) -> Verdict:
    """A claim not measured because its node was skipped says why."""
    if verdict.status == MISSING:
        why = [f"{node} skipped: {reason}" for node, reason in skipped.items()
               if fnmatch.fnmatchcase(node, verdict.claim.node)]
        verdict.reason = "; ".join(why)
    return verdict


def verify(exp: pipeline.Experiment, parent: Run, log_to: tracking.StageRun | None = None) -> list[Verdict]:
    """Evaluate every claim of `exp` on the reproduction `parent`; record the verdicts on it."""
    metrics, skipped = node_metrics(parent)
    verdicts = [explain_missing(evaluate(claim, metrics), skipped) for claim in exp.claims]
    if log_to is not None:
        record(verdicts, log_to)
    else:
        with tracking.attach(parent.info.run_id) as run:
            record(verdicts, run)
    return verdicts


def record(verdicts: list[Verdict], run: tracking.StageRun) -> None:
    values = {}
    for v in verdicts:
        if v.status != MISSING:
            values[f"claim.{v.claim.id}.value"] = v.measured
            values[f"claim.{v.claim.id}.pass"] = float(v.status == PASS)
    counts = {slug(s): sum(v.status == s for v in verdicts) for s in VERDICTS}
    run.log_metrics({**values, **{f"claims.{s}": n for s, n in counts.items()},
                     "claims.required_failing": len(failed_required(verdicts))})
    run.set_tags({TAG_CLAIM + v.claim.id: v.status for v in verdicts})
    verdict_table(verdicts).to_csv(run.path("claims.csv"), index=False)
    run.log_artifact("claims.csv")

"""Stages that cannot run on their inputs end as skipped runs, not as failures.

A node that reads the checkpoint a seed first confirmed at an accuracy milestone (`--checkpoint
first-0.999`) has nothing to read when that seed never confirmed it: how far a seed gets is a
result, not an error. Such a stage logs a FINISHED run tagged `polyrot.skipped` with the reason and
no results, and every stage that reads a skipped run is skipped in turn, the reason passed on. So a
reproduction completes on seeds that reached fewer milestones than the experiment asks about; the
claims on its skipped nodes read NOT MEASURED with that reason (polyrot.experiments.verify).

A skipped run is reused like any finished run: its inputs are FINISHED runs, which never change.
"""

from __future__ import annotations

import re

import click
from mlflow.exceptions import MlflowException

from polyrot import tracking

_MILESTONE_CHECKPOINT = re.compile(r"first-([0-9.]+)")
# Runs of these stages are seeds, whose milestones a checkpoint name refers to.
_SEED_STAGES = ("train_seed",)


def _is_seed(tags: dict[str, str]) -> bool:
    return tags.get(tracking.TAG_STAGE) in _SEED_STAGES or tags.get(tracking.TAG_PROVIDES) in _SEED_STAGES


def reason(input_runs: list[str], checkpoint: str | None) -> str | None:
    """Why a stage on these input runs (at `checkpoint`) has nothing to compute, or None."""
    if not input_runs:
        return None
    client = tracking.configure()
    try:
        runs = [client.get_run(run_id) for run_id in input_runs]
    except MlflowException:
        return None  # a run ID that names no run: the stage's own lineage check says so, in one line
    for run in runs:
        if tracking.TAG_SKIPPED in run.data.tags:
            return run.data.tags[tracking.TAG_SKIPPED]
    milestone = _MILESTONE_CHECKPOINT.fullmatch(checkpoint or "")
    if milestone:
        level = milestone.group(1)
        for run in runs:
            tags = run.data.tags
            if _is_seed(tags) and tracking.TAG_MILESTONE + level not in tags:
                name = tags.get("mlflow.runName", run.info.run_id)
                return (f"{name} ({run.info.run_id[:8]}) never confirmed {float(level):.2%} min held-out accuracy: "
                        f"it has no checkpoint {checkpoint}")
    return None


def log_skipped(stage: str, code_version: str, params: dict, why: str) -> str:
    """A FINISHED run of `stage` on `params` that holds only the reason it did not run."""
    with tracking.stage_run(stage, params, code_version=code_version, experiment=params["experiment"],
                            run_name=f"{stage.replace('_', '-')} skipped", parent_run_id=params.get("parent_run"),
                            tags={tracking.TAG_SKIPPED: why}) as run:
        click.echo(f"{stage} skipped: {why}", err=True)
        return run.run_id

"""Stage `connectivity`: linear mode connectivity between a reference seed and each other seed
(polyrot.toy.connectivity), the functional test of "the seeds differ only by symmetries".

For every run in --models, three straight-line paths from the reference to it (unaligned; permuted:
the symmetry search's permutations, per-head rotations and scales; aligned: the residual rotation
as well), evaluated at --points values of t on held-out batches (polyrot.toy.train.EvalSets of
--eval-sequences per split, seed --eval-seed). The alignment is the bars' (polyrot.toy.symmetry.align
with --starts, --outer-iters, --cayley-iters).

Artifacts:
  connectivity.csv     one row per model x path x t: loss, acc_min
  fig_connectivity.png the curves
Metrics (<m> = s<seed>; the path last, so that claims pair paths with compare_to):
  <m>.barrier.<path> (highest loss on the path minus the mean of its ends), <m>.max_loss.<path>,
  <m>.min_acc.<path> (lowest min accuracy on the path), <m>.end_loss, <m>.alignment.max_mse (Bar P of
  the alignment used).
"""

from __future__ import annotations

import pandas as pd
import torch

from polyrot import tracking
from polyrot.errors import ParameterError
from polyrot.figures.nulls import connectivity_curves
from polyrot.stages import specs
from polyrot.stages.audit import parse_run_ids, seed_labels
from polyrot.stages.bars import check_architecture
from polyrot.stages.fit_rotation import seed_of
from polyrot.stages.train_seed import NAME as TRAIN_SEED
from polyrot.stages.train_seed import load_seed
from polyrot.toy import connectivity
from polyrot.toy.symmetry import align
from polyrot.toy.train import EvalSets

STAGE = specs.CONNECTIVITY
NAME = STAGE.name


def run(params: dict) -> str:
    if params["points"] < connectivity.MIN_POINTS:
        raise ParameterError(f"--points must be at least {connectivity.MIN_POINTS}, got {params['points']}")
    reference_run, checkpoint = params["reference"], params["checkpoint"]
    reference_seed = seed_of(tracking.fetch_run(reference_run, TRAIN_SEED))
    reference = load_seed(reference_run, checkpoint)
    run_ids = [rid for rid in parse_run_ids(params["models"], "--models") if rid != reference_run]
    if not run_ids:
        raise ParameterError("--models names no run other than the reference")
    seeds = {rid: seed_of(tracking.fetch_run(rid, TRAIN_SEED)) for rid in run_ids}
    models = {rid: load_seed(rid, checkpoint) for rid in run_ids}
    for rid, model in models.items():
        check_architecture(reference_run, reference, rid, model)
    labels = seed_labels(seeds)
    if params["threads"]:
        torch.set_num_threads(params["threads"])

    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=params["experiment"],
                            upstream={"reference": reference_run, **{f"model.{labels[rid]}": rid for rid in run_ids}},
                            parent_run_id=params["parent_run"],
                            run_name=f"connectivity-s{reference_seed}-vs-{','.join(labels.values())}",
                            tags={"polyrot.reference_seed": reference_seed}) as run:
        sets = EvalSets.build(params["eval_sequences"], seed=params["eval_seed"])
        tables, metrics = [], {}
        for rid, model in models.items():
            label = labels[rid]
            alignment = align(model, reference, starts=params["starts"], outer_iters=params["outer_iters"],
                              cayley_iters=params["cayley_iters"], progress=True)
            table = connectivity.connectivity(reference, model, sets, points=params["points"], alignment=alignment)
            tables.append(table.assign(pair=f"s{reference_seed}-{label}", model=label))
            metrics[f"{label}.alignment.max_mse"] = alignment.max_mse
            metrics[f"{label}.end_loss"] = float(table.loc[table["t"] == 1.0, "loss"].iloc[0])
            for path, rows in table.groupby("path", sort=False):
                metrics[f"{label}.barrier.{path}"] = connectivity.barrier(rows)
                metrics[f"{label}.max_loss.{path}"] = float(rows["loss"].max())
                metrics[f"{label}.min_acc.{path}"] = float(rows["acc_min"].min())
        found = pd.concat(tables, ignore_index=True)
        found.to_csv(run.path("connectivity.csv"), index=False)
        run.log_artifact("connectivity.csv")
        run.log_metrics(metrics)
        run.log_figure("fig_connectivity.png", connectivity_curves(found))
        return run.run_id

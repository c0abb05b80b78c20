"""Stage `bars`: the paper's four bars for each model, within seed and against a reference (§2, §6, §7).

For every run in --models (the reference itself may be one of them: a self pair):

  Bar B    KL(spec || model) on --samples sequences (polyrot.toy.behavioural.bar_b), per head, per split
  Bar P    max per-tensor weight MSE after aligning the model to the reference under the symmetry
           group (polyrot.toy.symmetry.align: multi-start coordinate descent, then Cayley refinement)
  Bar C    Pearson r of IG and of AP predictions against measured mean-ablation effects of the
           10 components (polyrot.toy.causal, batches C_MEANS / C_EVAL)
  Bar Pr   Pearson r of IG predictions against measured ablation losses (PR_MEANS / PR_EVAL)
  cross    Bar B = KL(reference || aligned model), float64 (task.CROSS_SPEC); Bar C = Pearson r
           of the reference's IG (CROSS_MEANS / CROSS_EVAL) against the effects measured on the
           aligned model. Cross-seed Bar Pr is the same measurement (paper §7), logged under both names.

With --null A,B two untrained models (DyckTransformer(seed=A) and (seed=B), the reference's config)
are scored beside the trained ones, but for the joint sweep: the null control of the claims on the
bars (integrated gradients, for one, complete to the mean-ablation effect in any model, trained or
not).
With --decoy the reference's decoy (W_U_depth rows averaged in pairs) gets Bar B on the same
samples and its unaligned per-tensor MSE to the reference (both folded): the decoy is the
reference with one tensor changed, so no alignment can beat the identity by much.
With --lambdas the joint weight/activation loss is swept for each model (symmetry.joint_sweep) on
the paper's 1024-sequence activation batch.

Metrics (<m> = s<seed> of the model run, as seed_labels makes it):
  <m>.bar_b, <m>.bar_b.<head>, <m>.bar_b.<split>, <m>.bar_b.rel_err (standard error / mean)
  <m>.bar_p.max_mse, <m>.bar_p.global_mse, <m>.bar_p.baseline_max_mse, <m>.bar_p.baseline_global_mse
  <m>.bar_c.r_ig, <m>.bar_c.r_ap, <m>.bar_pr.r_ig
  <m>.cross.bar_b, <m>.cross.bar_c, <m>.cross.bar_pr (= cross.bar_c), <m>.cross.r_measured (reference's
      measured effects against the aligned model's)
  <m>.joint.lambda<l>.<column>     every column of symmetry.joint_sweep's row for l, with --lambdas
  <m>.time.<bar> wall seconds of bar_b, bar_p, bar_c, bar_pr, cross_b, cross_c (and joint)
  untrained<A>.*     the same for each untrained model (with --null), but for joint.*
  decoy.bar_b.real, decoy.bar_b.decoy, decoy.bar_b.ratio, decoy.bar_p  with --decoy
  time.cross_predictor, time.total
Tags: polyrot.pass.<m>.<bar> = true/false against the paper's thresholds (B < 1e-4, P < 1e-3,
C and Pr > 0.99; the cross-seed bars against the same ones).

Artifacts:
  summary.csv         one row per model (and untrained model): every bar value above
  bar_b.csv           per model x scope (overall, head, split): KL
  bar_p.csv           per model x tensor: MSE after alignment
  effects.csv         per model x bar (bar_c, bar_pr, cross) x component: measured effect, IG and AP
                      predictions (cross: the reference's IG against the aligned model's measured)
  joint.csv           per model x lambda (with --lambdas)
  aligned/<m>/model.safetensors + config.json   the aligned, folded model (polyrot.toy.model.load_model)
  fig_ig_vs_ap.png    per model, IG and AP predictions against the measured effects (Bar C batch)
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch

from polyrot import tracking
from polyrot.core.attribution import pearson
from polyrot.errors import ParameterError
from polyrot.figures.bars import ig_vs_ap
from polyrot.stages import specs
from polyrot.stages.audit import UNTRAINED, parse_null_seeds, parse_run_ids, seed_labels
from polyrot.stages.base import (
    parse_numbers,
)
from polyrot.stages.fit_rotation import seed_of
from polyrot.stages.train_seed import NAME as TRAIN_SEED
from polyrot.stages.train_seed import load_seed
from polyrot.toy import behavioural, causal, symmetry, task
from polyrot.toy.dyck import make_batch
from polyrot.toy.model import DyckTransformer, fold_rmsnorm, save_model
from polyrot.toy.task import BatchSpec

STAGE = specs.BARS
NAME = STAGE.name
THRESHOLDS = {"bar_b": ("<", behavioural.THRESHOLD), "bar_p": ("<", 1e-3), "bar_c": (">", 0.99),
              "bar_pr": (">", 0.99), "cross.bar_b": ("<", behavioural.THRESHOLD), "cross.bar_c": (">", 0.99),
              "cross.bar_pr": (">", 0.99)}


def parse_lambdas(raw: str | None) -> list[float]:
    return parse_numbers(raw, "--lambdas") if raw else []


def check_architecture(reference_run: str, reference, run_id: str, model) -> None:
    diffs = [f"{f} {getattr(model.cfg, f)} vs {getattr(reference.cfg, f)}"
             for f in symmetry.ARCHITECTURE if getattr(model.cfg, f) != getattr(reference.cfg, f)]
    if diffs:
        raise ParameterError(f"run {run_id} has another architecture than the reference {reference_run} "
                             f"({', '.join(diffs)}): no symmetry aligns them")


def joint_tokens(seed: str):
    """The joint loss's activation batch of a model seed (rng 202605200 + seed, as the paper)."""
    offset = int(seed) if seed.lstrip("-").isdigit() else 0
    return make_batch(dataclasses.replace(task.JOINT_SPEC, seed=task.JOINT_SPEC.seed + offset)).tokens


def passes(bar: str, value: float) -> bool:
    op, threshold = THRESHOLDS[bar]
    return bool(value < threshold) if op == "<" else bool(value > threshold)


@contextmanager
def timed(times: dict, key: str):
    start = time.perf_counter()
    yield
    times[key] = time.perf_counter() - start


def _resized(spec: BatchSpec, n: int | None) -> BatchSpec:
    return spec if n is None else dataclasses.replace(spec, n_sequences=n)


def run(params: dict) -> str:
    reference_run = params["reference"]
    lambdas = parse_lambdas(params["lambdas"])
    checkpoint = params["checkpoint"]
    # Everything that can be refused is checked before a run exists, so bad input leaves no run.
    reference_seed = seed_of(tracking.fetch_run(reference_run, TRAIN_SEED))
    reference = load_seed(reference_run, checkpoint)
    run_ids = parse_run_ids(params["models"], "--models")
    seeds = {rid: seed_of(tracking.fetch_run(rid, TRAIN_SEED)) for rid in run_ids}
    models = {rid: reference if rid == reference_run else load_seed(rid, checkpoint) for rid in run_ids}
    for rid, model in models.items():
        check_architecture(reference_run, reference, rid, model)
    labels = seed_labels(seeds)
    null_seeds = parse_null_seeds(params["null"]) if params["null"] else ()
    if params["threads"]:
        torch.set_num_threads(params["threads"])
    ig_steps, samples = params["ig_steps"], params["samples"]
    batch_specs = {name: _resized(spec, params["means_sequences"]) for name, spec in
                   (("c_means", task.C_MEANS), ("pr_means", task.PR_MEANS), ("cross_means", task.CROSS_MEANS))}
    batch_specs |= {name: _resized(spec, params["eval_sequences"]) for name, spec in
                    (("c_eval", task.C_EVAL), ("pr_eval", task.PR_EVAL), ("cross_eval", task.CROSS_EVAL))}
    batches = {name: make_batch(spec) for name, spec in batch_specs.items()}
    started = time.perf_counter()

    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=params["experiment"],
                            upstream={"reference": reference_run, **{f"model.{labels[rid]}": rid for rid in run_ids}},
                            parent_run_id=params["parent_run"],
                            run_name=f"bars-s{reference_seed}{f'@{checkpoint}' if checkpoint else ''}-vs-"
                                     f"{','.join(labels.values())}",
                            tags={"polyrot.reference_seed": reference_seed}) as run:
        for name, spec in batch_specs.items():
            run.log_params(spec.as_params(f"batch_{name}"))
        times: dict[str, float] = {}
        with timed(times, "time.cross_predictor"):
            reference_means = causal.component_means(reference, batches["cross_means"])
            predictor = causal.effect_table(reference, batches["cross_eval"], reference_means, ig_steps=ig_steps,
                                            ap=False, progress=True).set_index("component")

        summary, bar_b_rows, bar_p_rows, effect_rows, joint_rows, bar_b_of = [], [], [], [], [], {}
        # (label, run ID, model): every trained model, then the untrained null, scored alike but for the
        # joint sweep (its activation batch is the seed's).
        scored = [(labels[rid], rid, model) for rid, model in models.items()]
        scored += [(f"{UNTRAINED}{seed}", "", DyckTransformer(reference.cfg, seed=seed)) for seed in null_seeds]
        for label, rid, model in scored:
            own: dict[str, float] = {}
            with timed(own, "time.bar_b"):
                b = behavioural.bar_b(model, samples, progress=True)
            bar_b_of[label] = b
            bar_b_rows.append(b.table().assign(model=label))
            own |= {"bar_b": b.mean, "bar_b.rel_err": b.relative_error,
                    **{f"bar_b.{k}": v for k, v in (b.per_head | b.per_split).items()}}

            with timed(own, "time.bar_p"):
                alignment = symmetry.align(model, reference, starts=params["starts"], outer_iters=params["outer_iters"],
                                           cayley_iters=params["cayley_iters"], progress=True)
            own |= {"bar_p.max_mse": alignment.max_mse, "bar_p.global_mse": alignment.global_mse,
                    "bar_p.baseline_max_mse": alignment.baseline_max_mse,
                    "bar_p.baseline_global_mse": alignment.baseline_global_mse}
            bar_p_rows += [{"model": label, "tensor": k, "mse": v} for k, v in alignment.per_tensor.items()]
            save_model(alignment.model, run.path(f"aligned/{label}"))
            run.log_artifact(f"aligned/{label}/model.safetensors")
            run.log_artifact(f"aligned/{label}/config.json")
            if lambdas and rid:
                with timed(own, "time.joint"):
                    sweep = symmetry.joint_sweep(model, reference, joint_tokens(seeds[rid]), lambdas,
                                                 starts=params["starts"], outer_iters=params["outer_iters"],
                                                 cayley_iters=params["cayley_iters"], progress=True)
                joint_rows.append(sweep.assign(model=label))
                for row in sweep.to_dict("records"):
                    own |= {f"joint.lambda{row['lambda']:g}.{k}": v for k, v in row.items() if k != "lambda"}

            for bar, means_spec, eval_spec, ap in (("bar_c", "c_means", "c_eval", True),
                                                   ("bar_pr", "pr_means", "pr_eval", False)):
                with timed(own, f"time.{bar}"):
                    table = causal.effect_table(model, batches[eval_spec],
                                                causal.component_means(model, batches[means_spec]),
                                                ig_steps=ig_steps, ap=ap, progress=True)
                effect_rows.append(table.assign(model=label, bar=bar))
                own[f"{bar}.r_ig"] = pearson(table["ig"], table["measured"])
                if ap:
                    own[f"{bar}.r_ap"] = pearson(table["ap"], table["measured"])

            with timed(own, "time.cross_b"):
                own["cross.bar_b"] = behavioural.model_kl(reference, alignment.model,
                                                          make_batch(task.CROSS_SPEC))[0]
            with timed(own, "time.cross_c"):
                aligned = alignment.model
                _, measured = causal.ablation_effects(aligned, batches["cross_eval"],
                                                      causal.component_means(aligned, batches["cross_means"]))
            cross = pd.DataFrame({"component": list(measured), "measured": list(measured.values())})
            cross["ig"] = predictor.loc[cross["component"], "ig"].to_numpy()
            effect_rows.append(cross.assign(model=label, bar="cross"))
            own["cross.bar_c"] = own["cross.bar_pr"] = pearson(cross["ig"], cross["measured"])
            own["cross.r_measured"] = pearson(predictor.loc[cross["component"], "measured"], cross["measured"])

            run.log_metrics({f"{label}.{k}": v for k, v in own.items()})
            run.set_tags({f"polyrot.pass.{label}.{bar}": str(passes(bar, own[key])).lower()
                          for bar, key in (("bar_b", "bar_b"), ("bar_p", "bar_p.max_mse"), ("bar_c", "bar_c.r_ig"),
                                           ("bar_pr", "bar_pr.r_ig"), ("cross.bar_b", "cross.bar_b"),
                                           ("cross.bar_c", "cross.bar_c"), ("cross.bar_pr", "cross.bar_pr"))})
            summary.append({"model": label, "run_id": rid, **own})

        if params["decoy"]:
            decoy = behavioural.decoy(reference)
            real = bar_b_of.get(labels.get(reference_run)) or behavioural.bar_b(reference, samples, progress=True)
            fake = behavioural.bar_b(decoy, samples, progress=True)
            decoy_p = max(symmetry.per_tensor_mse(fold_rmsnorm(decoy), fold_rmsnorm(reference)).values())
            run.log_metrics({"decoy.bar_b.real": real.mean, "decoy.bar_b.decoy": fake.mean,
                             "decoy.bar_b.ratio": fake.mean / real.mean if real.mean else np.nan,
                             "decoy.bar_p": decoy_p})

        effects = pd.concat(effect_rows, ignore_index=True)
        tables = {"summary.csv": pd.DataFrame(summary), "bar_b.csv": pd.concat(bar_b_rows, ignore_index=True),
                  "bar_p.csv": pd.DataFrame(bar_p_rows), "effects.csv": effects}
        if joint_rows:
            tables["joint.csv"] = pd.concat(joint_rows, ignore_index=True)
        for path, table in tables.items():
            table.to_csv(run.path(path), index=False)
            run.log_artifact(path)
        run.log_figure("fig_ig_vs_ap.png", ig_vs_ap(effects))
        run.log_metrics({**times, "time.total": time.perf_counter() - started})
        return run.run_id

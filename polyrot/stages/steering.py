"""Stage `steering`: do a source seed's steering vectors steer other seeds, raw and rotated (paper §8.6)?

On one batch (default: the paper's evaluation batch) the three toy vectors of polyrot.toy.steering are
built from the source model's activations at one residual site. For every vector and alpha each is
added at all positions, and its effect (conditional-accuracy drop on the vector's head at its
targeted rows) is measured:

  within_effect     on the source model itself
  control_effect    on the source model, for random directions of the vector's norm (the mean over
                    --controls draws)
  raw_effect        on each target model, the vector added as it is
  rotated_effect    on each target model, the vector mapped into the target's frame by the rotation
                    target -> source (rotate_vector); fit here on the batch's activations, or with
                    --use-registry the newest registered rotation of the pair (registry.find_rotation)
  target_control_effect  on each target model, the source's random control directions: how much
                    of a cross-seed effect any direction of that norm would have had (a raw effect
                    near it transfers nothing specific to the vector)
  raw_ratio, ...    cross / within (NaN when within is negligible) and the regime label, both as
                    defined in polyrot.toy.steering
  raw_gap, rotated_gap   |cross - within|: how far each transfer lands from the source's own effect
                    (rotation helps where rotated_gap < raw_gap)
  raw_dose, rotated_dose  the multiple of alpha at which the target reaches the within-seed effect
                    at alpha, read off the alpha grid (polyrot.toy.steering.dose_multiple; NaN if no
                    dose of the grid reaches it)

Hugging Face models (--source and --targets hf_activations runs, polyrot.hf): the paper's Pythia
panel. The vectors are diffs of means over the contrastive sentence sets of --sentences (default
projects/steering/pythia.yaml: sentiment, name, magnitude) on the source model at a block output
(--site; its Dyck default stands for the middle block, layer3 of Pythia-70m), added to that block's
output at every position; the effect is the mean KL(clean || steered) of the next-token
distributions over the first --eval-sequences sequences of the source's sample (the paper: 64),
and the rotation is fit on the runs' stored activations at the site. The models are loaded as
their hf_activations runs loaded them. The paper's transfer ratio is raw_ratio averaged over the
targets.

Artifacts:
  steering.csv            one row per vector x alpha x target
  vectors.safetensors     the three directions as added (sign applied); header metadata: site,
                          source run, and each vector's definition and head
  fig4_steering.png       effect against alpha per vector: within / raw / rotated / control
Metrics: <vector>.alpha<a>.{within,control}_effect and <vector>.alpha<a>.<target>.<column>
(target = s<seed>), <target>.rotation_ev for the rotation used.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from polyrot import tracking
from polyrot.core.rotation import fit_rotation
from polyrot.errors import ParameterError
from polyrot.figures.steering import effect_vs_alpha
from polyrot.hf import lm
from polyrot.stages import specs
from polyrot.stages.audit import parse_run_ids, seed_labels
from polyrot.stages.base import (
    batch_spec,
    parse_numbers,
)
from polyrot.stages.fit_rotation import check_same_d_model, seed_of
from polyrot.stages.hf_activations import (
    is_hf_run,
    load_hf_activations,
    load_hf_model,
    load_hf_tokens,
)
from polyrot.stages.train_seed import NAME as TRAIN_SEED
from polyrot.stages.train_seed import load_seed
from polyrot.toy import steering
from polyrot.toy.activations import condition_rows, extract
from polyrot.toy.dyck import make_batch
from polyrot.toy.model import residual_sites, resolve_site
from polyrot.toy.task import EVAL_SPEC
from polyrot.tracking import registry

STAGE = specs.STEERING
NAME = STAGE.name
# Hugging Face models (the paper's §8.6): its contrastive sets.
HF_SENTENCES = Path(__file__).resolve().parents[2] / "projects" / "steering" / "pythia.yaml"
HF_EFFECT = "next-token KL"
HF_EFFECT_NAME, TOY_EFFECT_NAME = "KL(clean || steered)", "conditional-accuracy drop"


def parse_alphas(raw: str) -> list[float]:
    alphas = parse_numbers(raw, "--alphas")
    if any(not a > 0 for a in alphas):
        raise ParameterError(f"--alphas must all be positive (a vector's sign is part of its definition), got {raw!r}")
    return alphas


def residual_site(name: str, cfg) -> str:
    """The canonical name of a residual site: a steering vector lives in the residual stream, where a
    rotation can carry it to another seed."""
    site = resolve_site(name, cfg)
    if site not in residual_sites(cfg):
        raise ParameterError(f"site {site} is not a residual site; residual sites: {', '.join(residual_sites(cfg))}")
    return site


def _effect_rows(name: str, head: str, effect: str, alpha: float, within: float, control: float, n_targeted: int,
                 cross: dict[str, tuple[str, float, float, float]]) -> list[dict]:
    """One steering.csv row per target: cross = {target run: (label, raw effect, rotated effect,
    the same random controls' mean effect on the target)}; `effect` names what the effects measure."""
    return [{"vector": name, "head": head, "effect": effect, "alpha": alpha, "target": label, "target_run": rid,
             "n_targeted": n_targeted, "within_effect": within, "control_effect": control, "raw_effect": raw,
             "rotated_effect": rotated, "target_control_effect": target_control,
             "within_negligible": abs(within) < steering.NEGLIGIBLE,
             "raw_ratio": steering.transfer_ratio(raw, within), "rotated_ratio": steering.transfer_ratio(rotated, within),
             "raw_regime": steering.regime(raw, within), "rotated_regime": steering.regime(rotated, within),
             "raw_gap": abs(raw - within), "rotated_gap": abs(rotated - within)}
            for rid, (label, raw, rotated, target_control) in cross.items()]


def _with_doses(table: pd.DataFrame) -> pd.DataFrame:
    """Add raw_dose and rotated_dose: the multiple of each row's alpha the target needs, raw or
    rotated, for the within-seed effect at that alpha (steering.dose_multiple over the alpha grid)."""
    parts = []
    for _, group in table.groupby(["vector", "target"], sort=False):
        group = group.copy()
        for kind in ("raw", "rotated"):
            group[f"{kind}_dose"] = [steering.dose_multiple(group["alpha"], group[f"{kind}_effect"], within, alpha)
                                     for alpha, within in zip(group["alpha"], group["within_effect"])]
        parts.append(group)
    return pd.concat(parts).loc[table.index]


def _log_table(run, rows: list[dict], title: str) -> None:
    """steering.csv, its metrics and figure 4."""
    table = _with_doses(pd.DataFrame(rows))
    table.to_csv(run.path("steering.csv"), index=False)
    run.log_artifact("steering.csv")
    metrics = {}
    for row in table.to_dict("records"):
        prefix = f"{row['vector']}.alpha{row['alpha']:g}"
        metrics[f"{prefix}.within_effect"] = row["within_effect"]
        metrics[f"{prefix}.control_effect"] = row["control_effect"]
        for column in ("raw_effect", "rotated_effect", "target_control_effect", "raw_ratio", "rotated_ratio",
                       "raw_gap", "rotated_gap", "raw_dose", "rotated_dose"):
            if pd.notna(row[column]):
                metrics[f"{prefix}.{row['target']}.{column}"] = row[column]
    run.log_metrics(metrics)
    run.log_figure("fig4_steering.png", effect_vs_alpha(table, title=title))


def _run_hf(params: dict) -> str:
    """Steering on Hugging Face models (the paper's Pythia panel): vectors from contrastive sentence sets on
    the source model at a block output, effect = KL(clean || steered) on the source's sample."""
    source = params["source"]
    alphas = parse_alphas(params["alphas"])
    if params["use_registry"]:
        raise ParameterError("--use-registry reads rotations of train_seed pairs; with hf_activations runs the "
                             "rotation is fit on their stored activations")
    if batch_spec(params) != EVAL_SPEC:
        raise ParameterError("--batch-* describe a Dyck batch; hf_activations runs bring their own sample")
    # Everything that can be refused is checked before a run exists, so bad input leaves no run.
    acts_src, info = load_hf_activations(source)
    # The Dyck default stands for the middle block's output (layer3 of Pythia-70m, the paper's site).
    site = (f"layer{info['n_layers'] // 2}_resid_post" if params["site"] == "resid_mid_1"
            else lm.resolve_site(params["site"], info["n_layers"]))
    lm.block_of(site)
    if site not in acts_src:
        raise ParameterError(f"activations run {source} has no site {site!r}; it has: {', '.join(acts_src)}")
    sets = lm.load_sentence_sets(params["sentences"] or HF_SENTENCES)
    targets = {}
    for rid in parse_run_ids(params["targets"], "--targets"):
        acts, target_info = load_hf_activations(rid)
        if target_info["tokens_sha256"] != info["tokens_sha256"] or site not in acts:
            raise ParameterError(f"target run {rid} does not hold {site} on the source's tokens: the rotation is fit "
                                 "row by row, so both need one corpus sample and the site")
        targets[rid] = (target_info["label"], acts[site])
    tokens = load_hf_tokens(source)[:params["eval_sequences"] or specs.HF_STEERING_SEQUENCES]
    if params["threads"]:
        torch.set_num_threads(params["threads"])
    source_model, tokenizer = load_hf_model(source)
    models = {rid: load_hf_model(rid)[0] for rid in targets}

    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=params["experiment"],
                            upstream={"source": source, **{f"target.{label}": rid for rid, (label, _) in targets.items()}},
                            parent_run_id=params["parent_run"], run_name=f"steering-{info['label']}",
                            tags={"polyrot.source_seed": info["label"]}) as run:
        run.log_params({"resolved_site": site, "n_eval_sequences": len(tokens)})
        vectors = {name: lm.steering_vector(source_model, tokenizer, spec, site) for name, spec in sets.items()}
        save_file({name: v.contiguous() for name, v in vectors.items()}, run.path("vectors.safetensors"),
                  metadata={"site": site, "source_run": source,
                            **{f"{name}.definition": f"mean({spec['reduce']} of positive) - mean({spec['reduce']} "
                               "of negative)" for name, spec in sets.items()}})
        run.log_artifact("vectors.safetensors")
        rotations = {rid: fit_rotation(acts_src[site], acts, metadata={"site": site})
                     for rid, (_, acts) in targets.items()}
        run.log_metrics({f"{targets[rid][0]}.rotation_ev": r.metadata["rotation_ev"] for rid, r in rotations.items()})
        rows = []
        for name, vector in vectors.items():
            controls = steering.random_controls(vector, params["control_seed"], params["controls"])
            for alpha in alphas:
                def control_kl(model) -> float:
                    return sum(lm.steering_kl(model, tokens, site, c, alpha) for c in controls) / len(controls)

                within = lm.steering_kl(source_model, tokens, site, vector, alpha)
                cross = {rid: (label, lm.steering_kl(models[rid], tokens, site, vector, alpha),
                               lm.steering_kl(models[rid], tokens, site, rotations[rid].rotate_vector(vector), alpha),
                               control_kl(models[rid]))
                         for rid, (label, _) in targets.items()}
                rows += _effect_rows(name, HF_EFFECT, HF_EFFECT_NAME, alpha, within, control_kl(source_model),
                                     tokens.numel(), cross)
        _log_table(run, rows, f"Steering at {site}: vectors of {info['label']}")
        return run.run_id


def run(params: dict) -> str:
    source = params["source"]
    if is_hf_run(source):
        return _run_hf(params)
    if params["sentences"] or params["eval_sequences"]:
        raise ParameterError("--sentences and --eval-sequences apply to hf_activations runs; the toy vectors are "
                             "built from the batch")
    spec = batch_spec(params)
    alphas = parse_alphas(params["alphas"])
    # Everything that can be refused is checked before a run exists, so bad input leaves no run.
    source_seed = seed_of(tracking.fetch_run(source, TRAIN_SEED))
    source_model = load_seed(source)
    site = residual_site(params["site"], source_model.cfg)
    targets = {rid: load_seed(rid) for rid in parse_run_ids(params["targets"], "--targets")}
    for rid, model in targets.items():
        check_same_d_model(source, source_model, rid, model)
    labels = seed_labels({rid: seed_of(tracking.fetch_run(rid, TRAIN_SEED)) for rid in targets})
    registered = ({rid: registry.find_rotation(source_run=source, target_run=rid, site=site) for rid in targets}
                  if params["use_registry"] else {})
    if params["threads"]:
        torch.set_num_threads(params["threads"])
    batch = make_batch(spec)
    acts_src = extract(source_model, batch, [site])[site]
    vectors = steering.toy_vectors(acts_src, condition_rows(batch))

    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=params["experiment"],
                            upstream={"source": source, **{f"target.{labels[rid]}": rid for rid in targets}},
                            parent_run_id=params["parent_run"],
                            run_name=f"steering-s{source_seed}-to-{','.join(labels.values())}",
                            tags={"polyrot.source_seed": source_seed}) as run:
        save_file({name: v.direction.contiguous() for name, v in vectors.items()}, run.path("vectors.safetensors"),
                  metadata={"site": site, "source_run": source,
                            **{f"{name}.definition": v.definition for name, v in vectors.items()},
                            **{f"{name}.head": v.head for name, v in vectors.items()}})
        run.log_artifact("vectors.safetensors")

        rotations = {rid: registered.get(rid) or fit_rotation(acts_src, extract(model, batch, [site])[site],
                                                              metadata={"site": site})
                     for rid, model in targets.items()}
        run.log_metrics({f"{labels[rid]}.rotation_ev": r.metadata["rotation_ev"]
                         for rid, r in rotations.items() if "rotation_ev" in r.metadata})
        with torch.no_grad():
            base = {rid: model(batch.tokens) for rid, model in {source: source_model, **targets}.items()}

        def measure(rid: str, model, direction: torch.Tensor, alpha: float, vector) -> float:
            return steering.effect(model, batch, site, direction, alpha, vector.head, vector.targets, base=base[rid])

        rows = []
        for name, vector in vectors.items():
            controls = steering.random_controls(vector.direction, params["control_seed"], params["controls"])
            for alpha in alphas:
                def control_effect(rid: str, model) -> float:
                    return sum(measure(rid, model, c, alpha, vector) for c in controls) / len(controls)

                within = measure(source, source_model, vector.direction, alpha, vector)
                cross = {rid: (labels[rid], measure(rid, model, vector.direction, alpha, vector),
                               measure(rid, model, rotations[rid].rotate_vector(vector.direction), alpha, vector),
                               control_effect(rid, model))
                         for rid, model in targets.items()}
                rows += _effect_rows(name, vector.head, TOY_EFFECT_NAME, alpha, within,
                                     control_effect(source, source_model), int(vector.targets.sum()), cross)
        _log_table(run, rows, f"Steering at {site}: vectors of seed {source_seed}")
        return run.run_id

"""Stage `fit_rotation`: the orthogonal map from one seed's residual stream to another's, per site.

Both models run on one batch (default: the paper's evaluation batch, task.EVAL_SPEC); their
row-aligned activations give R by Procrustes (polyrot.core.rotation.fit_rotation), which maps target
activations into the source frame. Only residual-width sites are accepted: R turns the residual
basis, and the pooled statistics need one dimension.

Artifacts:
  rotations/<site>.safetensors   the Rotation (R, both means, provenance in the header)
Metrics: <site>.<statistic> (frob_ratio, ks_pvalue, signed_perm_distance, ...; see
rotation_statistics) and <site>.rotation_ev / identity_ev / raw_ev (fit quality), each linked to
the site's registered model; pooled.* (KS and mean cos over every site's eigen-angles).
Registry: a version of `polyrot.<experiment>.<site>` per site, alias s<source seed>-to-s<target
seed> (see polyrot.tracking.registry); tags polyrot.registered.<site> = models:/<name>/<version>.

Source and target may also be hf_activations runs (Hugging Face models, polyrot.hf) on one token
sample: R is then fit on their stored activations, sites default to every stored site and the
alias to s<source label>-to-s<target label>.

Source and target may be the same run: R is then the identity on the activations' span, the run
is tagged polyrot.self_pair=true and a warning says so.
"""

from __future__ import annotations

import warnings

from polyrot import tracking
from polyrot.core.rotation import fit_rotation, pooled_statistics, rotation_statistics
from polyrot.errors import ParameterError, UnknownSiteError
from polyrot.hf import lm
from polyrot.stages import specs
from polyrot.stages.activations import parse_sites
from polyrot.stages.base import batch_spec
from polyrot.stages.hf_activations import is_hf_run, load_hf_activations
from polyrot.stages.train_seed import NAME as TRAIN_SEED
from polyrot.stages.train_seed import load_seed
from polyrot.toy.activations import extract
from polyrot.toy.dyck import make_batch
from polyrot.toy.model import residual_sites
from polyrot.toy.task import EVAL_SPEC
from polyrot.tracking import registry

STAGE = specs.FIT_ROTATION
NAME = STAGE.name
TAG_SEED = "polyrot.seed"
TAG_SELF_PAIR = "polyrot.self_pair"
TAG_REGISTERED = "polyrot.registered."  # + site, value = models:/<name>/<version>
FIT_QUALITY = ("rotation_ev", "identity_ev", "raw_ev")


def seed_of(run) -> str:
    """The seed a train_seed run records, as text (it becomes part of aliases and tags)."""
    return run.data.tags.get(TAG_SEED, "unknown")


def shared_sites(names: list[str], source_cfg, target_cfg) -> list[str]:
    """Canonical names of `names`, each once; a site either model lacks is an UnknownSiteError
    that says which model and lists that model's sites."""
    try:
        sites = parse_sites(names, source_cfg)
    except UnknownSiteError as exc:
        raise UnknownSiteError(f"source model: {exc}") from None
    try:
        parse_sites(sites, target_cfg)
    except UnknownSiteError as exc:
        raise UnknownSiteError(f"target model: {exc}") from None
    return sites


def check_widths(acts: dict, d_model: int) -> None:
    for site, a in acts.items():
        if a.shape[1] != d_model:
            raise ParameterError(f"site {site} is {a.shape[1]} wide, not d_model={d_model}: a rotation turns the "
                                 "residual basis, so it is fit at residual-width sites")


def check_same_d_model(source: str, source_model, target: str, target_model) -> None:
    d_src, d_tgt = source_model.cfg.d_model, target_model.cfg.d_model
    if d_src != d_tgt:
        raise ParameterError(f"source run {source} has d_model {d_src} but target run {target} has {d_tgt}: "
                             "no rotation maps one residual stream onto the other")


def run(params: dict) -> str:
    source, target = params["source"], params["target"]
    if is_hf_run(source):
        return _run_hf(params)
    spec = batch_spec(params)
    # Everything that can be refused is checked before a run exists, so bad input leaves no run.
    seeds = {role: seed_of(tracking.fetch_run(rid, TRAIN_SEED))
             for role, rid in (("source", source), ("target", target))}
    self_pair = source == target
    source_model = load_seed(source)
    target_model = source_model if self_pair else load_seed(target)
    check_same_d_model(source, source_model, target, target_model)
    names = params["sites"].split(",") if params["sites"] else residual_sites(source_model.cfg)
    sites = shared_sites(names, source_model.cfg, target_model.cfg)
    alias = registry.check_alias(params["alias"] or registry.pair_alias(seeds["source"], seeds["target"]))
    batch = make_batch(spec)
    acts_src = extract(source_model, batch, sites)
    acts_tgt = acts_src if self_pair else extract(target_model, batch, sites)
    check_widths(acts_src, source_model.cfg.d_model)
    if self_pair:
        warnings.warn(f"source and target are the same run {source}: each rotation is the identity on the "
                      "activations' span; the run is tagged polyrot.self_pair=true", stacklevel=2)

    return _fit_and_register(params, seeds, alias, sites, acts_src, acts_tgt, spec.as_params())


def _fit_and_register(params: dict, seeds: dict[str, str], alias: str, sites: list[str], acts_src: dict,
                      acts_tgt: dict, extra: dict) -> str:
    """The run: one rotation per site, logged and registered; `extra` goes into params and metadata."""
    source, target = params["source"], params["target"]
    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=params["experiment"],
                            upstream={"source": source, "target": target}, parent_run_id=params["parent_run"],
                            run_name=f"rotation-{alias}",
                            tags={TAG_SELF_PAIR: str(source == target).lower(), registry.TAG_SOURCE_SEED: seeds["source"],
                                  registry.TAG_TARGET_SEED: seeds["target"]}) as run:
        run.log_params(extra)
        # Under `mlflow run` the adopted run's experiment, not --experiment, is where the run lives.
        experiment = run.client.get_experiment(run.client.get_run(run.run_id).info.experiment_id).name
        rotations = []
        for site in sites:
            rotation = fit_rotation(acts_src[site], acts_tgt[site], metadata={
                "site": site, "source_run": source, "target_run": target, "source_seed": seeds["source"],
                "target_seed": seeds["target"], **extra})
            rotation.save(run.path(f"rotations/{site}.safetensors"))
            run.log_artifact(f"rotations/{site}.safetensors")
            statistics = {**rotation_statistics(rotation), **{k: rotation.metadata[k] for k in FIT_QUALITY}}
            version = registry.register_rotation(rotation, run, name=registry.model_name(experiment, site),
                                                 alias=alias, statistics=statistics)
            run.set_tags({TAG_REGISTERED + site: f"models:/{version.name}/{version.version}"})
            rotations.append(rotation)
        run.log_metrics({f"pooled.{k}": v for k, v in pooled_statistics(rotations).items()})
        return run.run_id


def _run_hf(params: dict) -> str:
    """Rotations between two hf_activations runs' stored activations (one token sample, checked by digest)."""
    source, target = params["source"], params["target"]
    if batch_spec(params) != EVAL_SPEC:
        raise ParameterError("--batch-* describe a Dyck batch; hf_activations runs bring their own rows")
    acts_src, info_src = load_hf_activations(source)
    acts_tgt, info_tgt = (acts_src, info_src) if source == target else load_hf_activations(target)
    if info_src["d_model"] != info_tgt["d_model"]:
        raise ParameterError(f"source run {source} has d_model {info_src['d_model']} but target run {target} has "
                             f"{info_tgt['d_model']}: no rotation maps one residual stream onto the other")
    if info_src["tokens_sha256"] != info_tgt["tokens_sha256"]:
        raise ParameterError(f"target run {target} ran on other tokens than source run {source}: Procrustes pairs "
                             "rows, so both need one corpus, tokenizer, seed and sample size")
    names = params["sites"].split(",") if params["sites"] else list(acts_src)
    sites = lm.parse_sites(names, info_src["n_layers"])
    missing = [(run, site) for run, acts in ((source, acts_src), (target, acts_tgt)) for site in sites
               if site not in acts]
    if missing:
        raise ParameterError(f"run {missing[0][0]} has no site {missing[0][1]!r}")
    seeds = {"source": info_src["label"], "target": info_tgt["label"]}
    alias = registry.check_alias(params["alias"] or registry.pair_alias(seeds["source"], seeds["target"]))
    if source == target:
        warnings.warn(f"source and target are the same run {source}: each rotation is the identity on the "
                      "activations' span; the run is tagged polyrot.self_pair=true", stacklevel=2)
    return _fit_and_register(params, seeds, alias, sites, acts_src, acts_tgt,
                             {"tokens_sha256": info_src["tokens_sha256"]})

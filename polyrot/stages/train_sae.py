"""Stage `train_sae`: an SAE (or an MLP transcoder) on one model's activations at one site.

The data come from `--model-run` (extracted on the fly on the `--batch-*` spec, default the
paper's 4096 training sequences) or from `--activations-run` (that run's stored activations; its
model run is the upstream model). Held-out metrics always use the `--heldout-*` spec (default the
paper's 1024-sequence evaluation batch) extracted from the same model.

`--activations-run` may also be an hf_activations run (a Hugging Face model's residual sites,
polyrot.hf): its run ID then stands for the model in cfg.json's model_run_id (the audit matches
SAEs to its source by it), and there are no heldout.* metrics, since no batch can be extracted.

A transcoder for layer L (`--kind transcoder --layer L`, or a site ln2_out_L / mlp_out_L) reads
the MLP's normalised input ln2_out_L and predicts its output mlp_out_L; cfg.json's `site` is the
input site and the run's `target_site` param names the output.

Artifacts (the contract later stages read):
  sae.safetensors, cfg.json   the weights and the SAEConfig that rebuilds them (site and
                              model_run_id filled in); `load_trained_sae` reads them

Metrics: loss, mse, ev, l0, dead_fraction every --eval-every steps on the training data; at the
end final.* (the same on the training data) and heldout.* (on the held-out batch).

Several sites (`--sites a,b,c`) give one group run with one child run per site. A child is a
complete train_sae run whose params are those of a standalone single-site run (so it fetches,
and is reused, like one); the group carries the same stage tag plus `polyrot.group=sites`,
`children.json` ({site: child run ID}) and each child's final metrics suffixed by its site.
`load_trained_sae` refuses a group with the list of its children; `sae_runs` expands it.
"""

from __future__ import annotations

import json
import re

import torch

from polyrot import tracking
from polyrot.core.sae import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    SAEConfig,
    SparseAutoencoder,
    evaluate_sae,
    load_sae,
    save_sae,
    train_sae,
)
from polyrot.errors import ParameterError, WrongStageError
from polyrot.hf import lm
from polyrot.stages import specs
from polyrot.stages.activations import load_activations, parse_sites
from polyrot.stages.base import (
    batch_spec,
)
from polyrot.stages.fit_rotation import seed_of
from polyrot.stages.hf_activations import is_hf_run, load_hf_activations
from polyrot.stages.train_seed import load_seed
from polyrot.toy.activations import extract
from polyrot.toy.model import ModelConfig
from polyrot.toy.task import EVAL_SPEC, SAE_SPEC

STAGE = specs.TRAIN_SAE
NAME = STAGE.name
TAG_GROUP = "polyrot.group"
TAG_SITE = "polyrot.site"
CHILDREN_FILE = "children.json"
METRICS = ("loss", "mse", "ev", "l0", "dead_fraction")


_LAYER_SITE = re.compile(r"(?:ln2|mlp)_out_(\d+)")


def _site_pairs(params: dict, cfg: ModelConfig) -> list[tuple[str, str | None]]:
    """(input site, target site or None) for each SAE to train, from --site / --sites / --layer."""
    given = [o for o in ("site", "sites", "layer") if params[o] is not None]
    if len(given) != 1:
        raise ParameterError("give exactly one of --site, --sites and --layer")
    if params["layer"] is not None:
        if params["kind"] != "transcoder":
            raise ParameterError("--layer selects a transcoder's layer; an SAE takes --site")
        names = [f"ln2_out_{params['layer']}"]
    else:
        names = (params["site"] or params["sites"]).split(",")
        if params["site"] and len(names) > 1:
            raise ParameterError("--site takes one site; --sites takes several")
    sites = parse_sites(names, cfg)
    if params["kind"] == "sae":
        return [(s, None) for s in sites]
    layers = []
    for s in sites:
        match = _LAYER_SITE.fullmatch(s)
        if not match:
            raise ParameterError(f"a transcoder reads ln2_out_L and predicts mlp_out_L; {s!r} names no layer L")
        layers.append(int(match[1]))
    return [(f"ln2_out_{layer}", f"mlp_out_{layer}") for layer in dict.fromkeys(layers)]


def _prepare_dyck(params: dict, spec, heldout):
    """(data, held-out data, site pairs, configs, upstream, data params) for a Dyck model's activations."""
    if params["activations_run"]:
        if spec != SAE_SPEC:
            raise ParameterError("--batch-* describe data extracted from --model-run; "
                                 "--activations-run brings its own")
        stored, spec, model_run = load_activations(params["activations_run"])
    else:
        model_run = params["model_run"]
    if params["checkpoint"] and params["activations_run"]:
        raise ParameterError("--checkpoint picks the model of --model-run; an activations run brings its own")
    model = load_seed(model_run, params["checkpoint"])
    pairs = _site_pairs(params, model.cfg)
    sites = list(dict.fromkeys(s for pair in pairs for s in pair if s))
    if params["activations_run"]:
        missing = [s for s in sites if s not in stored]
        if missing:
            raise ParameterError(f"activations run {params['activations_run']} has no site {missing[0]!r}; "
                                 f"it has: {', '.join(stored)}")
    configs = _configs(params, pairs, model.cfg.d_model, model_run)

    if params["threads"]:
        torch.set_num_threads(params["threads"])
    data = stored if params["activations_run"] else extract(model, spec, sites)
    held = extract(model, heldout, sites)
    upstream = {"model": model_run}
    if params["activations_run"]:
        upstream["activations"] = params["activations_run"]
    # The data's spec: with --activations-run, that run's, whatever the --batch-* defaults say.
    return data, held, pairs, configs, upstream, {**spec.as_params(), **heldout.as_params("heldout")}


def _prepare_hf(params: dict, spec, heldout):
    """The same for an hf_activations run: the SAE's "model" is that run (its model at one revision on
    one corpus sample), and there is no held-out batch to extract, so no heldout.* metrics."""
    run_id = params["activations_run"]
    if spec != SAE_SPEC or heldout != EVAL_SPEC or params["checkpoint"]:
        raise ParameterError("--batch-*, --heldout-* and --checkpoint describe a Dyck model; "
                             "an hf_activations run brings its own data")
    if params["kind"] != "sae" or params["layer"] is not None:
        raise ParameterError("hf_activations runs hold residual sites only: train an SAE (--site / --sites)")
    stored, info = load_hf_activations(run_id)
    given = [o for o in ("site", "sites") if params[o] is not None]
    if len(given) != 1:
        raise ParameterError("give exactly one of --site and --sites")
    sites = lm.parse_sites((params["site"] or params["sites"]).split(","), info["n_layers"])
    missing = [s for s in sites if s not in stored]
    if missing:
        raise ParameterError(f"activations run {run_id} has no site {missing[0]!r}; it has: {', '.join(stored)}")
    pairs = [(s, None) for s in sites]
    if params["threads"]:
        torch.set_num_threads(params["threads"])
    upstream = {"activations": run_id}
    return stored, None, pairs, _configs(params, pairs, info["d_model"], run_id), upstream, {}


def _configs(params: dict, pairs, d_in: int, model_run: str) -> list[SAEConfig]:
    return [SAEConfig(d_in=d_in, expansion=params["expansion"], l1=params["l1"], lr=params["lr"],
                      batch_size=params["batch_size"], steps=params["steps"], seed=params["sae_seed"],
                      precision=params["precision"],
                      kind=params["kind"], site=site, model_run_id=model_run, eval_every=params["eval_every"],
                      model_checkpoint=params["checkpoint"])
            for site, _ in pairs]


def run(params: dict) -> str:
    if bool(params["model_run"]) == bool(params["activations_run"]):
        raise ParameterError("give exactly one of --model-run and --activations-run")
    spec, heldout = batch_spec(params), batch_spec(params, "heldout")
    # Everything that can be refused is checked before a run exists, so bad input leaves no run.
    hf = bool(params["activations_run"]) and is_hf_run(params["activations_run"])
    data, held, pairs, configs, upstream, data_params = (_prepare_hf if hf else _prepare_dyck)(params, spec, heldout)
    # Run names say whose SAE it is: s<seed> (@checkpoint) of the model, or the hf model's label.
    seed = seed_of(tracking.configure().get_run(upstream["activations" if hf else "model"]))
    model = seed if hf else f"s{seed}" + (f"@{params['checkpoint']}" if params["checkpoint"] else "")
    # The run's batch_* params name the data it trained on: an activations run's own spec, if given.
    params = {**params, **data_params}

    def train_one(cfg: SAEConfig, target_site: str | None, run_params: dict, adopt: bool = True) -> tuple[str, dict]:
        with tracking.stage_run(NAME, run_params, code_version=STAGE.code_version, experiment=run_params["experiment"],
                                upstream=upstream, parent_run_id=run_params["parent_run"],
                                run_name=f"{cfg.kind}-{model}-{cfg.site}-x{cfg.expansion}",
                                tags={TAG_SITE: cfg.site, "polyrot.kind": cfg.kind}, adopt=adopt) as run:
            run.log_params({"target_site": target_site, "n_rows": len(data[cfg.site]),
                            "d_sae": cfg.d_sae})
            target = data[target_site] if target_site else None
            sae, history = train_sae(data[cfg.site], cfg, target,
                                     eval_fn=lambda r: run.log_metrics({k: r[k] for k in METRICS}, r["step"]))
            final = {f"final.{k}": history[-1][k] for k in METRICS}
            if held is not None:
                heldout_metrics = evaluate_sae(sae, held[cfg.site], held[target_site] if target_site else None)
                final.update({f"heldout.{k}": heldout_metrics[k] for k in METRICS if k != "loss"})
            run.log_metrics(final, cfg.steps)
            save_sae(sae, run.staging)
            run.log_artifact(WEIGHTS_FILE)
            run.log_artifact(CONFIG_FILE)
            return run.run_id, final

    if len(configs) == 1:
        return train_one(configs[0], pairs[0][1], params)[0]
    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=params["experiment"],
                            upstream=upstream, parent_run_id=params["parent_run"],
                            run_name=f"{params['kind']}-{model}-x{params['expansion']} ({len(configs)} sites)",
                            tags={TAG_GROUP: "sites", "polyrot.kind": params["kind"]}) as group:
        # Under `mlflow run` the adopted group may live elsewhere than --experiment says; the UI
        # nests only children of the same experiment.
        client = tracking.configure()
        experiment = client.get_experiment(client.get_run(group.run_id).info.experiment_id).name
        children = {}
        for cfg, (_, target_site) in zip(configs, pairs):
            # A child's params are those of the equivalent standalone run, so it is reused like one.
            alone = {**params, "site": cfg.site, "sites": None, "layer": None, "parent_run": group.run_id,
                     "experiment": experiment}
            children[cfg.site], final = train_one(cfg, target_site, alone, adopt=False)
            group.log_metrics({f"{k}.{cfg.site}": v for k, v in final.items()}, cfg.steps)
        group.log_json(CHILDREN_FILE, children)
        return group.run_id


def sae_runs(run_id: str) -> dict[str, str]:
    """{site: train_sae run ID}: the run itself, or a group's children."""
    run = tracking.fetch_run(run_id, NAME)
    if run.data.tags.get(TAG_GROUP):
        return json.loads(tracking.fetch_artifact(run_id, CHILDREN_FILE, stage=NAME).read_text())
    return {run.data.tags[TAG_SITE]: run_id}


def load_trained_sae(run_id: str) -> SparseAutoencoder:
    """The SparseAutoencoder of a (single-site) train_sae run, fetched through the lineage check."""
    if tracking.fetch_run(run_id, NAME).data.tags.get(TAG_GROUP):
        children = ", ".join(f"{site}={child}" for site, child in sae_runs(run_id).items())
        raise WrongStageError(f"run {run_id} groups one train_sae run per site; load one of them: {children}")
    weights = tracking.fetch_artifact(run_id, WEIGHTS_FILE, stage=NAME)
    tracking.fetch_artifact(run_id, CONFIG_FILE, stage=NAME, dst=weights.parent)
    return load_sae(weights.parent)

"""Stage `activations`: one model's activations at named sites on one BatchSpec, stored for reuse.

Artifacts (the contract later stages read):
  activations.safetensors   one [n_rows, d] tensor per site, keyed by the canonical site name
                            (float32, or float16 with --float16)
  rows.safetensors          per-row labels: token, depth, valid, position (int64, [n_rows])

Rows follow `polyrot.toy.activations`' order (non-PAD positions, sequence-major), so two models' files
on the same spec align row by row. The spec is the run's `batch_*` params, which is all a later
stage needs to regenerate the batch, and `site_activations` recomputes the same tensors on the fly
from the model run, so a stage may take either route: with float32 storage both are bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from safetensors.torch import load_file, save_file

from polyrot import tracking
from polyrot.errors import ParameterError
from polyrot.stages import specs
from polyrot.stages.base import (
    batch_spec,
)
from polyrot.stages.train_seed import load_seed
from polyrot.toy.activations import condition_rows, extract
from polyrot.toy.dyck import make_batch
from polyrot.toy.model import ModelConfig, resolve_site
from polyrot.toy.task import BatchSpec

STAGE = specs.ACTIVATIONS
NAME = STAGE.name
ACTIVATIONS_FILE = "activations.safetensors"
ROWS_FILE = "rows.safetensors"


def parse_sites(names: Iterable[str], cfg: ModelConfig) -> list[str]:
    """Canonical names of `names` (aliases resolved), each once, in the order given."""
    canonical = [resolve_site(s.strip(), cfg) for s in names if s.strip()]
    if not canonical:
        raise ParameterError("no site given")
    return list(dict.fromkeys(canonical))


def run(params: dict) -> str:
    spec = batch_spec(params)
    # Everything that can be refused is checked before a run exists, so bad input leaves no run.
    model = load_seed(params["model_run"])
    sites = parse_sites(params["sites"].split(","), model.cfg)
    if params["threads"]:
        torch.set_num_threads(params["threads"])
    batch = make_batch(spec)
    acts = extract(model, batch, sites)
    dtype = "float16" if params["float16"] else "float32"
    n_rows = len(next(iter(acts.values())))

    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=params["experiment"],
                            upstream={"model": params["model_run"]}, parent_run_id=params["parent_run"],
                            run_name=f"activations-{spec.name}") as run:
        run.log_params({"dtype": dtype,
                        **{f"d.{site}": a.shape[1] for site, a in acts.items()}})
        save_file({site: a.to(getattr(torch, dtype)).contiguous() for site, a in acts.items()},
                  run.path(ACTIVATIONS_FILE))
        save_file(condition_rows(batch), run.path(ROWS_FILE))
        run.log_artifact(ACTIVATIONS_FILE)
        run.log_artifact(ROWS_FILE)
        run.log_metrics({"n_rows": n_rows, "n_sequences": len(batch)})
        return run.run_id


def load_activations(run_id: str) -> tuple[dict[str, torch.Tensor], BatchSpec, str]:
    """({site: float32 [n_rows, d]}, the batch spec, the model run ID) of an activations run.

    float16 artifacts come back widened to float32, the dtype every consumer of `extract` expects.
    """
    run = tracking.fetch_run(run_id, NAME)
    acts = load_file(tracking.fetch_artifact(run_id, ACTIVATIONS_FILE, stage=NAME))
    spec = BatchSpec.from_params(run.data.params)
    return {site: a.float() for site, a in acts.items()}, spec, run.data.tags[tracking.TAG_UPSTREAM + "model"]


def load_rows(run_id: str) -> dict[str, torch.Tensor]:
    """The per-row labels of an activations run (see `polyrot.toy.activations.condition_rows`)."""
    return load_file(tracking.fetch_artifact(run_id, ROWS_FILE, stage=NAME))


def site_activations(model_run_id: str, spec: BatchSpec, sites: Iterable[str]) -> dict[str, torch.Tensor]:
    """What an activations run of `model_run_id` on `spec` stores (float32), computed on the fly."""
    model = load_seed(model_run_id)
    return extract(model, spec, parse_sites(sites, model.cfg))

"""Stage `hf_activations`: a Hugging Face causal LM's hidden states at residual sites on a corpus sample.

The model is a hub name with --revision (EleutherAI/pythia-70m-seed3 at step143000), a local
folder, or --model-run: a train_neox run, whose stored hub cache is fetched and loaded through
the same `from_pretrained(name, revision=..., cache_dir=...)` call (polyrot.hf). The sample is
--sequences x --tokens ids packed from --corpus in the order of --corpus-seed; the tokens are
stored, so two runs on one tokenizer and sample align row by row (the audit checks the digest).

Artifacts (the contract train_sae, fit_rotation and audit read):
  activations.safetensors   one float32 [sequences * tokens, d_model] tensor per site, rows
                            sequence-major, keyed by site (layer0_resid_pre, layerL_resid_post)
  tokens.safetensors        "tokens": int64 [sequences, tokens]
Params: the resolved model, revision and commit, n_layers, d_model. Metrics: n_rows, loss (mean
next-token cross-entropy on the sample). Tags: polyrot.seed (--label), polyrot.toy.model
(name@revision), polyrot.tokens_sha256.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException
from safetensors.torch import load_file, save_file

from polyrot import tracking
from polyrot.errors import ParameterError
from polyrot.hf import lm
from polyrot.hf.config import PAPER_CORPUS
from polyrot.stages import specs
from polyrot.stages.train_neox import CORPUS_FILE, fetch_revision
from polyrot.stages.train_neox import NAME as TRAIN_NEOX

STAGE = specs.HF_ACTIVATIONS
NAME = STAGE.name
ACTIVATIONS_FILE = "activations.safetensors"
TOKENS_FILE = "tokens.safetensors"
TAG_SEED = "polyrot.seed"
TAG_MODEL = "polyrot.model"
TAG_TOKENS = "polyrot.tokens_sha256"

def default_label(name: str, revision: str | None) -> str:
    """'pythia-70m-seed3-step143000': the last part of the name, the revision, as a registry-safe word."""
    text = Path(name.rstrip("/")).name + (f"-{revision}" if revision else "")
    return re.sub(r"[^\w-]", "-", text)


def tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()


def load_model(params: dict):
    """(model, tokens, sample) of specs.HF_MODEL_OPTIONS + specs.HF_RUNTIME_OPTIONS params and `sequences` x `tokens`
    from `corpus_seed`; sample = {name, revision, corpus, upstream}. Checked before any run exists."""
    if bool(params["model"]) == bool(params["model_run"]):
        raise ParameterError("give exactly one of --model and --model-run")
    if params["threads"]:
        torch.set_num_threads(params["threads"])
    upstream = {}
    if params["model_run"]:
        if params["cache_dir"]:
            raise ParameterError("--cache-dir locates --model; a train_neox run brings its own revisions")
        name, cache_dir = fetch_revision(params["model_run"], params["revision"])
        revision = params["revision"] or "main"
        corpus = params["corpus"] or str(tracking.fetch_artifact(params["model_run"], CORPUS_FILE, stage=TRAIN_NEOX))
        upstream["model"] = params["model_run"]
    else:
        name, cache_dir, revision = params["model"], params["cache_dir"], params["revision"]
        corpus = params["corpus"] or PAPER_CORPUS
    model, tokenizer = lm.load_causal_lm(name, revision, cache_dir, device=params["device"], dtype=params["dtype"])
    if params["tokens"] > model.config.max_position_embeddings:
        raise ParameterError(f"--tokens {params['tokens']} exceeds the model's context of "
                             f"{model.config.max_position_embeddings}")
    tokens = lm.sample_corpus(corpus, tokenizer, params["sequences"], params["tokens"], seed=params["corpus_seed"],
                              split=params["split"], text_field=params["text_field"])
    return model, tokens, {"name": name, "revision": revision, "corpus": corpus, "upstream": upstream}


def resolved_params(model, sample: dict) -> dict:
    """What the run actually loaded, as params."""
    return {"resolved_model": sample["name"], "resolved_revision": sample["revision"] or "main",
            "commit": getattr(model.config, "_commit_hash", None), "resolved_corpus": sample["corpus"],
            "n_layers": lm.n_layers(model), "d_model": model.config.hidden_size}


def run(params: dict) -> str:
    # Everything that can be refused is checked before a run exists, so bad input leaves no run.
    model, tokens, sample = load_model(params)
    depth = lm.n_layers(model)
    sites = lm.parse_sites(params["sites"].split(",") if params["sites"] else lm.site_names(depth), depth)
    name, revision = sample["name"], sample["revision"]
    label = params["label"] or default_label(name, revision)

    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=params["experiment"],
                            upstream=sample["upstream"], parent_run_id=params["parent_run"],
                            run_name=f"hf-activations-{label}",
                            tags={TAG_SEED: label, TAG_MODEL: f"{name}@{revision or 'main'}",
                                  TAG_TOKENS: tokens_digest(tokens)}) as run:
        run.log_params(resolved_params(model, sample))
        acts = lm.hidden_states(model, tokens, sites, batch_size=params["batch_size"])
        save_file({site: a.contiguous() for site, a in acts.items()}, run.path(ACTIVATIONS_FILE))
        save_file({"tokens": tokens}, run.path(TOKENS_FILE))
        run.log_artifact(ACTIVATIONS_FILE)
        run.log_artifact(TOKENS_FILE)
        run.log_metrics({"n_rows": len(tokens) * tokens.shape[1], "loss": sample_loss(model, tokens,
                                                                                        params["batch_size"])})
        return run.run_id


@torch.no_grad()
def sample_loss(model, tokens: torch.Tensor, batch_size: int) -> float:
    device = next(model.parameters()).device
    losses = [float(model(part.to(device), labels=part.to(device)).loss) for part in tokens.split(batch_size)]
    return sum(losses) / len(losses)


def is_hf_run(run_id: str) -> bool:
    """Whether `run_id` is an hf_activations run (without validating it further)."""
    try:
        return tracking.configure().get_run(run_id).data.tags.get(tracking.TAG_STAGE) == NAME
    except MlflowException:
        return False  # the caller's own lineage check says the run does not exist


def load_hf_activations(run_id: str) -> tuple[dict[str, torch.Tensor], dict]:
    """({site: float32 [n_rows, d]}, info) of an hf_activations run; info: label, model, tokens_sha256,
    n_layers, d_model."""
    found = tracking.fetch_run(run_id, NAME)
    acts = load_file(tracking.fetch_artifact(run_id, ACTIVATIONS_FILE, stage=NAME))
    tags, params = found.data.tags, found.data.params
    return acts, {"label": tags[TAG_SEED], "model": tags[TAG_MODEL], "tokens_sha256": tags[TAG_TOKENS],
                  "n_layers": int(params["n_layers"]), "d_model": int(params["d_model"])}


def load_hf_tokens(run_id: str) -> torch.Tensor:
    """The int64 [sequences, tokens] sample of an hf_activations run."""
    return load_file(tracking.fetch_artifact(run_id, TOKENS_FILE, stage=NAME))["tokens"]


def load_hf_model(run_id: str, device: str | None = None):
    """(model, tokenizer) an hf_activations run read, loaded the way the run loaded it (on `device`, or the
    run's own device setting)."""
    params = tracking.fetch_run(run_id, NAME).data.params
    device = device or params.get("device") or "auto"
    revision = params.get("revision") or None
    if params.get("model_run"):
        name, cache_dir = fetch_revision(params["model_run"], revision)
    else:
        name, cache_dir = params["model"], params.get("cache_dir") or None
    return lm.load_causal_lm(name, revision, cache_dir, device=device, dtype=params.get("dtype") or "float32")

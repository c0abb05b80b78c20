"""Stage `train_neox`: one tiny GPT-NeoX seed on a local English corpus, stored as a hub cache (polyrot.hf.neox).

The corpus is the standard library's docstrings unless --corpus names a local text file (one
document per line); the tokenizer is trained on it here, identically for every seed.

Artifacts (the contract hf_activations reads):
  hub/models--ORG--NAME/refs/<revision>           the commit id of each branch: step<N> for every
                                                  --checkpoint-steps entry and the last step, main
                                                  for the final weights
  hub/models--ORG--NAME/snapshots/<commit>/...    save_pretrained files (config.json,
                                                  model.safetensors, tokenizer.json, ...)
  corpus.txt                                      the corpus the seed was trained on
  train.json                                      recipe, corpus sha256 and Python version, loss
                                                  history, {revision: commit}
Metrics: train_loss and heldout_loss at each checkpoint step, n_parameters, corpus_tokens.
Tags: polyrot.seed, polyrot.repo_id.

`--cache-dir` also writes the tree into a hub cache of the user's (e.g. ~/.cache/huggingface/hub),
so that `from_pretrained(REPO_ID, revision="step300")` finds it outside polyrot.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
from pathlib import Path

import torch

from polyrot import tracking
from polyrot.errors import HubResolutionError, ParameterError
from polyrot.hf import neox
from polyrot.hf.config import NeoxRecipe
from polyrot.stages import specs

STAGE = specs.TRAIN_NEOX
NAME = STAGE.name
HUB_DIR = "hub"
CORPUS_FILE = "corpus.txt"
TAG_SEED = "polyrot.seed"
TAG_REPO = "polyrot.repo_id"
MAIN = "main"


def parse_steps(raw: str, last: int) -> tuple[int, ...]:
    try:
        steps = sorted({int(x) for x in raw.split(",") if x.strip()})
    except ValueError:
        raise ParameterError(f"--checkpoint-steps takes comma-separated integers, got {raw!r}") from None
    bad = [s for s in steps if not 0 <= s <= last]
    if bad:
        raise ParameterError(f"--checkpoint-steps must lie in [0, --steps={last}], got {bad[0]}")
    return tuple(steps)


def run(params: dict) -> str:
    recipe = NeoxRecipe(**{k: params[k] for k in NeoxRecipe.__dataclass_fields__ if k in params})
    if recipe.d_model % recipe.n_heads:
        raise ParameterError(f"--d-model {recipe.d_model} is not a multiple of --n-heads {recipe.n_heads}")
    steps = parse_steps(params["checkpoint_steps"], recipe.steps)
    repo_id = params["repo_id"] or f"polyrot/neox-tiny-seed{params['seed']}"
    if repo_id.count("/") != 1:
        raise ParameterError(f"--repo-id is ORG/NAME, got {repo_id!r}")
    if params["corpus"] and not Path(params["corpus"]).is_file():
        raise HubResolutionError(f"corpus {params['corpus']} is not a local text file")
    if params["threads"]:
        torch.set_num_threads(params["threads"])

    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=params["experiment"],
                            parent_run_id=params["parent_run"], run_name=f"neox-seed{params['seed']}",
                            tags={TAG_SEED: params["seed"], TAG_REPO: repo_id}) as run:
        corpus = run.path(CORPUS_FILE)
        if params["corpus"]:
            shutil.copyfile(params["corpus"], corpus)
            corpus_sha = tracking.sha256_file(corpus)
        else:
            corpus_sha = neox.write_corpus(corpus)
        tokenizer = neox.train_tokenizer(corpus, recipe.vocab_size)
        stream = neox.token_stream(corpus, tokenizer)
        cache = run.path(HUB_DIR)
        revisions: dict[str, str] = {}

        def on_checkpoint(step: int, model, record: dict) -> None:
            revisions[f"step{step}"] = neox.write_hub_revision(cache, repo_id, f"step{step}", model, tokenizer)
            run.log_metrics({k: v for k, v in record.items() if k != "step" and v == v}, step)

        model, history = neox.train_neox(stream, tokenizer, recipe, params["seed"], checkpoint_steps=steps,
                                         on_checkpoint=on_checkpoint)
        revisions[MAIN] = neox.write_hub_revision(cache, repo_id, MAIN, model, tokenizer)
        run.log_metrics({"n_parameters": sum(p.numel() for p in model.parameters()), "corpus_tokens": len(stream),
                         **{f"final.{k}": v for k, v in history[-1].items() if k != "step"}})
        for path in sorted(p for p in cache.rglob("*") if p.is_file()):
            run.log_artifact(str(path.relative_to(run.staging)))
        run.log_artifact(CORPUS_FILE)
        run.log_json("train.json", {"recipe": recipe.to_dict(), "seed": params["seed"], "repo_id": repo_id,
                                    "corpus_sha256": corpus_sha, "python": platform.python_version(),
                                    "history": history, "revisions": revisions})
        if params["cache_dir"]:
            shutil.copytree(cache, params["cache_dir"], dirs_exist_ok=True)
        return run.run_id


def fetch_revision(run_id: str, revision: str | None) -> tuple[str, Path]:
    """(repo ID, a local hub cache holding `revision` of a train_neox run), fetched through the lineage check."""
    found = tracking.fetch_run(run_id, NAME)
    repo_id = found.data.tags[TAG_REPO]
    refs = f"{HUB_DIR}/{neox.repo_dir('', repo_id)}/refs/"
    branches = sorted(k[len(tracking.TAG_DIGEST + refs):] for k in found.data.tags
                      if k.startswith(tracking.TAG_DIGEST + refs))
    revision = revision or MAIN
    if revision not in branches:
        raise HubResolutionError(f"train_neox run {run_id} has no revision {revision!r}; it has: {', '.join(branches)}")
    cache = Path(tempfile.mkdtemp(prefix="polyrot-hub-"))

    def fetch(path: str) -> Path:
        # Each file lands where the hub cache layout puts it.
        return tracking.fetch_artifact(run_id, path, stage=NAME, dst=(cache / path).parent)

    commit = fetch(refs + revision).read_text().strip()
    snapshot = f"{HUB_DIR}/{neox.repo_dir('', repo_id)}/snapshots/{commit}/"
    for key in found.data.tags:
        if key.startswith(tracking.TAG_DIGEST + snapshot):
            fetch(key[len(tracking.TAG_DIGEST):])
    return repo_id, cache / HUB_DIR

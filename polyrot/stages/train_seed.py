"""Stage `train_seed`: train one Dyck-3 seed (Cohort B, or Cohort A with --shared-io-from).

Artifacts (the contract later stages read):
  model.safetensors, config.json          the best evaluated weights (+ W_pos buffer) and the model config
  train.json                              the resolved recipe, milestones, the paper's early-stop step
                                          (quick_crossing) and the final evaluation
  errors.csv                              where the kept model is still wrong on the confirmation sets
                                          (polyrot.toy.error_analysis: split, head, depth, distance
                                          from the first violation, position)
  violations.csv                          how it reads each row's first violation, by configuration
                                          (kind; for a wrong-family closer, the closed pairs before
                                          it and the opener its family matches)
  checkpoints/step-NNNNNN.safetensors     model + optimizer tensors, every checkpoint_every steps
  checkpoints/step-NNNNNN.json            step, data-stream position, optimizer groups, recipe
  checkpoints/first-0.99.*                the first checkpoint confirmed at each accuracy milestone
                                          (a resumed run copies those of the run it continues),
                                          with its own tables (first-0.99.errors.csv, .violations.csv)

Metrics final.* score the kept model on the confirmation sets (~10^6 tokens a split); final.draws.*
read it as the paper's early stop would, on 1,000 draws of 8 x 256 of those rows a split
(polyrot.toy.error_analysis.draw_readings): the fraction of draws at target_acc, the median min.
"""

from __future__ import annotations

import json
import re

import torch
from safetensors.torch import load_file, save_file

from polyrot import tracking
from polyrot.core.device import resolve_device
from polyrot.errors import ArtifactMissingError, ParameterError
from polyrot.stages import specs
from polyrot.toy.error_analysis import draw_readings, error_table, row_errors, violation_table
from polyrot.toy.model import SHARED_IO, load_model, save_model
from polyrot.toy.recipe import TrainConfig
from polyrot.toy.task import PAPER_EVAL_SEQUENCES
from polyrot.toy.train import (
    checkpoint_payload,
    confirm_sets,
    evaluate,
    new_state,
    restore_checkpoint,
    train,
)

STAGE = specs.TRAIN_SEED
NAME = STAGE.name

_STEP_FILE = re.compile(r"checkpoints/step-(\d{6})\.safetensors$")


def _last_checkpoint(run_id: str) -> str:
    """Artifact path stem of the newest step checkpoint of a (possibly killed) training run, which
    the caller has fetched through `tracking.fetch_run`."""
    stems = sorted(a.path[:-len(".safetensors")] for a in tracking.configure().list_artifacts(run_id, "checkpoints")
                   if _STEP_FILE.match(a.path))
    if not stems:
        raise ArtifactMissingError(f"run {run_id} has no checkpoint to resume from")
    return stems[-1]


# What a resumed run may change: its budget. Every other field of the recipe shaped the weights, the
# optimizer state and the data stream that the checkpoint holds. A new max_steps re-spans the cosine,
# so from the resumed step on the rate follows the longer schedule.
RESUME_BUDGET = ("max_steps", "extra_steps")


def _resume_state(params: dict):
    stem = _last_checkpoint(params["resume"])
    tensors = load_file(tracking.fetch_artifact(params["resume"], stem + ".safetensors", stage=NAME, finished=False))
    meta = json.loads(tracking.fetch_artifact(params["resume"], stem + ".json", stage=NAME, finished=False).read_text())
    state, cfg = restore_checkpoint(tensors, meta)
    for name in specs.RECIPE_OPTIONS + ("seed",):
        if name not in RESUME_BUDGET and params[name] is not None and params[name] != getattr(cfg, name):
            may_change = ", ".join("--" + b.replace("_", "-") for b in RESUME_BUDGET)
            raise ParameterError(f"--{name.replace('_', '-')} {params[name]} conflicts with the resumed run's "
                                 f"{getattr(cfg, name)}; only {may_change} may change")
    budget = {name: params[name] for name in RESUME_BUDGET if params[name] is not None}
    if budget.get("max_steps", state.step + 1) <= state.step:
        raise ParameterError(f"--max-steps {budget['max_steps']} must exceed the step of {params['resume']}'s "
                             f"last checkpoint, {state.step}")
    return state, TrainConfig.from_dict({**cfg.to_dict(), **budget, "threads": params["threads"],
                                         "device": params["device"] or "auto"})


def _carry_milestones(run, source, milestones: dict[str, int]) -> None:
    """Copy into a resumed run the milestone checkpoints (and their tables) that the MLflow run
    `source` already holds, so that a seed's run holds every milestone it passed and
    `--checkpoint first-0.99` reads the same weights whichever run of the chain got there."""
    for m in milestones:
        prefix = f"{tracking.TAG_DIGEST}checkpoints/first-{m}."
        for path in sorted(tag[len(tracking.TAG_DIGEST):] for tag in source.data.tags if tag.startswith(prefix)):
            tracking.fetch_artifact(source.info.run_id, path, stage=NAME, dst=run.path(path).parent, finished=False)
            run.log_artifact(path)


def _shared_io(run_id: str) -> dict[str, torch.Tensor]:
    weights = tracking.fetch_artifact(run_id, "model.safetensors", stage=NAME)
    source = load_file(weights)
    return {k: source[k] for k in SHARED_IO}


def run(params: dict) -> str:
    if params["resume"]:
        resumed = tracking.fetch_run(params["resume"], NAME, finished=False)
        state, cfg = _resume_state(params)  # bad flags are refused before the resumed run is touched
        tracking.claim_interrupted_run(resumed)
        shared_from = resumed.data.tags.get(tracking.TAG_UPSTREAM + "shared_io")
        shared = _shared_io(shared_from) if shared_from else None
    else:
        cfg = TrainConfig.from_profile(
            params["profile"], seed=params["seed"] if params["seed"] is not None else 0,
            threads=params["threads"], device=params["device"], **{k: params[k] for k in specs.RECIPE_OPTIONS})
        shared_from = params["shared_io_from"]
        shared = _shared_io(shared_from) if shared_from else None
        state = new_state(cfg, shared)

    device = resolve_device(cfg.device)
    upstream = {k: v for k, v in (("shared_io", shared_from), ("resume", params["resume"])) if v}
    cohort = "A" if shared_from else "B"
    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=params["experiment"],
                            upstream=upstream, parent_run_id=params["parent_run"],
                            run_name=f"seed-{cfg.seed}", tags={"polyrot.seed": cfg.seed, "polyrot.cohort": cohort}) as run:
        run.log_params({f"recipe.{k}": v for k, v in cfg.to_dict().items()} | {"resolved_device": device})

        def on_eval(step: int, metrics: dict) -> None:
            run.log_metrics(metrics, step)

        confirm = confirm_sets(cfg)
        if params["resume"]:
            _carry_milestones(run, resumed, state.milestones)

        def on_checkpoint(st, tag: str) -> None:
            tensors, meta = checkpoint_payload(st, cfg)
            save_file(tensors, run.path(f"checkpoints/{tag}.safetensors"))
            run.path(f"checkpoints/{tag}.json").write_text(json.dumps(meta))
            run.log_artifact(f"checkpoints/{tag}.safetensors")
            run.log_artifact(f"checkpoints/{tag}.json")
            if tag.startswith("first-"):  # where a milestone's model is wrong aims the next training-mix lever
                _log_error_tables(run, st.evaluated_model(), confirm, f"checkpoints/{tag}.")

        state = train(state, cfg, on_eval=on_eval, on_checkpoint=on_checkpoint)
        if state.step % cfg.checkpoint_every:
            on_checkpoint(state, f"step-{state.step:06d}")

        # The model a seed keeps is its best evaluated one (the paper's choice), the EMA's if that won.
        model = state.best_model()
        final = evaluate(model, confirm)
        draws = draw_readings(row_errors(model, confirm.batches), min(PAPER_EVAL_SEQUENCES, cfg.confirm_sequences),
                              cfg.target_acc)
        run.log_metrics({f"final.{k}": v for k, v in final.items()} | {f"final.draws.{k}": v for k, v in draws.items()},
                        state.step)
        if state.best is not None:
            run.set_tags({"polyrot.final_step": state.best.step, "polyrot.final_weights": state.best.source})
        if shared is not None:
            identical = all(torch.equal(getattr(model, k).detach(), shared[k]) for k in SHARED_IO)
            run.set_tags({"polyrot.shared_io_identical": str(identical).lower()})
            if not identical:
                raise RuntimeError("shared I/O tensors changed during training: they were not frozen")
        save_model(model, run.staging)
        run.log_artifact("model.safetensors")
        run.log_artifact("config.json")
        _log_error_tables(run, model, confirm, "")
        run.log_json("train.json", {"recipe": cfg.to_dict(), "steps": state.step, "milestones": state.milestones,
                                    "first_crossing": state.first_crossing, "quick_crossing": state.quick_crossing,
                                    "final": final, "final_draws": draws,
                                    "final_weights": state.best and {"step": state.best.step, "source": state.best.source}})
        run.set_tags({tracking.TAG_MILESTONE + k: v for k, v in state.milestones.items()})
        return run.run_id


def _log_error_tables(run, model, confirm, prefix: str) -> None:
    """Where `model` is still wrong on the confirmation sets, as the artifacts {prefix}errors.csv
    and {prefix}violations.csv."""
    for name, table in (("errors", error_table), ("violations", violation_table)):
        table(model, confirm.batches).to_csv(run.path(f"{prefix}{name}.csv"), index=False)
        run.log_artifact(f"{prefix}{name}.csv")


_CHECKPOINT_NAME = re.compile(r"(step-\d{6}|first-[0-9.]+)")


def load_seed(run_id: str, checkpoint: str | None = None):
    """The final model of a train_seed run, or one of its checkpoints, fetched through the lineage check."""
    if checkpoint is None:
        weights = tracking.fetch_artifact(run_id, "model.safetensors", stage=NAME)
        config = tracking.fetch_artifact(run_id, "config.json", stage=NAME, dst=weights.parent)
        return load_model(weights, config)
    if not _CHECKPOINT_NAME.fullmatch(checkpoint):
        raise ParameterError(f"--checkpoint names a checkpoint like first-0.99 or step-002000, got {checkpoint!r}")
    tensors = load_file(tracking.fetch_artifact(run_id, f"checkpoints/{checkpoint}.safetensors", stage=NAME))
    meta = json.loads(tracking.fetch_artifact(run_id, f"checkpoints/{checkpoint}.json", stage=NAME).read_text())
    return restore_checkpoint(tensors, meta)[0].evaluated_model()

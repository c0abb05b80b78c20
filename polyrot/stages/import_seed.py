"""Stage `import_seed`: a checkpoint of the paper's reference implementation as a polyrot seed run.

The file is read with torch.load(weights_only=True) (polyrot.toy.reference), its RMSNorm gains
renamed from `.gain` to `.w`, and the resulting DyckTransformer is checked, before any run
exists, to give the logits the reference forward computes on the checkpoint's own tensors, on
one batch (default: the paper's evaluation batch). Anything else is refused in one line: a file
that needs code to unpickle, another architecture, missing tensors, logits that differ.

The run holds what a train_seed run holds for the stages that read one (model.safetensors and
config.json) and is tagged `polyrot.provides=train_seed`, so activations, train_sae,
fit_rotation, audit, steering, bars and lenses take its run ID as a seed. It has no training
checkpoints: --checkpoint and --resume do not apply to it.

Artifacts: model.safetensors, config.json (polyrot's layout), import.json (source file and
sha256, step, the renamed tensors, the reference's cfg and metrics, the logit check).
Tags: polyrot.seed, polyrot.source_sha256, polyrot.mapping. Metrics: logits_max_abs_diff,
source_step, source.<metric> for the checkpoint's numeric metrics.
"""

from __future__ import annotations

from pathlib import Path

import torch

from polyrot import tracking
from polyrot.errors import ParameterError
from polyrot.stages import specs
from polyrot.stages.base import batch_spec
from polyrot.stages.fit_rotation import TAG_SEED
from polyrot.stages.train_seed import NAME as TRAIN_SEED
from polyrot.toy import reference
from polyrot.toy.dyck import make_batch
from polyrot.toy.model import DyckTransformer, save_model

STAGE = specs.IMPORT_SEED
NAME = STAGE.name
# float32 both ways, in different orders of summation: agreement to ~1e-6 is expected.
LOGIT_TOLERANCE = 1e-4
TAG_SOURCE_SHA256, TAG_MAPPING = "polyrot.source_sha256", "polyrot.mapping"


def seed_from_path(path: Path) -> int | None:
    """N of a `seeds/N/` folder among the path's parents (where the reference code saves), else None."""
    for parent in path.resolve().parents:
        if parent.parent.name == "seeds" and parent.name.isdigit():
            return int(parent.name)
    return None


def run(params: dict) -> str:
    path = Path(params["path"])
    if not path.is_file():
        raise ParameterError(f"no checkpoint file {path}")
    seed = params["seed"] if params["seed"] is not None else seed_from_path(path)
    if seed is None:
        raise ParameterError(f"cannot tell the seed of {path} from its folders: give --seed")
    # Everything is checked before a run exists, so a refused file leaves no run.
    checkpoint = reference.read_checkpoint(path)
    cfg = reference.model_config(checkpoint["cfg"], path)
    state, renamed = reference.polyrot_state(checkpoint["model_state"], cfg, path)
    model = DyckTransformer(cfg)
    model.load_state_dict(state)
    tokens = make_batch(batch_spec(params)).tokens
    with torch.no_grad():
        ours = model(tokens)
        theirs = reference.forward({k: v.detach().to(torch.float32) for k, v in checkpoint["model_state"].items()},
                                   cfg, tokens)
    diff = max(float((ours[h] - theirs[h]).abs().max()) for h in ours)
    if not diff <= LOGIT_TOLERANCE:
        raise ParameterError(f"{path}: the imported model's logits differ from the reference forward's by {diff:.3g} "
                             f"(tolerance {LOGIT_TOLERANCE:g})")
    metrics = {k: float(v) for k, v in (checkpoint.get("metrics") or {}).items() if isinstance(v, int | float)}
    step = checkpoint.get("step")
    digest = tracking.sha256_file(path)
    mapping = "; ".join(f"{old} -> {new}" for old, new in renamed)

    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=params["experiment"],
                            parent_run_id=params["parent_run"], run_name=f"seed-{seed}-imported",
                            tags={TAG_SEED: seed, tracking.TAG_PROVIDES: TRAIN_SEED, TAG_SOURCE_SHA256: digest,
                                  TAG_MAPPING: mapping}) as run:
        run.log_params({"source_file": str(path.resolve()), "source_step": step})
        save_model(model, run.staging)
        run.log_artifact("model.safetensors")
        run.log_artifact("config.json")
        run.log_json("import.json", {
            "source": str(path.resolve()), "sha256": digest, "step": step, "renamed": renamed,
            "reference_cfg": checkpoint["cfg"], "metrics": metrics,
            "logit_check": {**batch_spec(params).as_params(), "max_abs_diff": diff, "tolerance": LOGIT_TOLERANCE},
        })
        run.log_metrics({"logits_max_abs_diff": diff, **({"source_step": step} if isinstance(step, int) else {}),
                         **{f"source.{k}": v for k, v in metrics.items()}})
        return run.run_id

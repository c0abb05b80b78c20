"""Stages: thin `run(params) -> run_id` functions over the maths, one module per entry point."""

from polyrot.stages.base import Option, Stage
from polyrot.stages.train_seed import STAGE as TRAIN_SEED

STAGES: dict[str, Stage] = {s.name: s for s in (TRAIN_SEED,)}

__all__ = ["STAGES", "Option", "Stage"]

"""Stages: thin `run(params) -> run_id` functions over the maths, one module per entry point."""

from polyrot.stages.activations import STAGE as ACTIVATIONS
from polyrot.stages.audit import STAGE as AUDIT
from polyrot.stages.bars import STAGE as BARS
from polyrot.stages.base import Option, Stage
from polyrot.stages.fit_rotation import STAGE as FIT_ROTATION
from polyrot.stages.hf_activations import STAGE as HF_ACTIVATIONS
from polyrot.stages.hf_attribution import STAGE as HF_ATTRIBUTION
from polyrot.stages.lenses import STAGE as LENSES
from polyrot.stages.steering import STAGE as STEERING
from polyrot.stages.train_neox import STAGE as TRAIN_NEOX
from polyrot.stages.train_sae import STAGE as TRAIN_SAE
from polyrot.stages.train_seed import STAGE as TRAIN_SEED

STAGES: dict[str, Stage] = {s.name: s for s in (
    TRAIN_SEED,
    ACTIVATIONS,
    TRAIN_SAE,
    FIT_ROTATION,
    AUDIT,
    STEERING,
    BARS,
    LENSES,
    TRAIN_NEOX,
    HF_ACTIVATIONS,
    HF_ATTRIBUTION,
)}


def _register_reproduce() -> None:
    # reproduce reads STAGES itself (to validate experiment files), so it joins last.
    from polyrot.stages.reproduce import STAGE as REPRODUCE

    STAGES[REPRODUCE.name] = REPRODUCE


_register_reproduce()

__all__ = ["STAGES", "Option", "Stage"]

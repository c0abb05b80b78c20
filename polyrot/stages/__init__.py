"""Stages: thin `run(params) -> run_id` functions over the maths, one module per entry point.

`STAGES` maps each stage's name to its specification (polyrot.stages.specs); importing it loads
no stage module, so it is as cheap as the command line needs it to be.
"""

from polyrot.stages.base import Option, Stage
from polyrot.stages.specs import STAGES

__all__ = ["STAGES", "Option", "Stage"]

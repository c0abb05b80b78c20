"""The configuration of an SAE or transcoder as plain data, saved verbatim as cfg.json. No torch
here, so that the stage specifications take their defaults from it cheaply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from polyrot.core.precision import PRECISIONS

KINDS = ("sae", "transcoder")
# What a cfg.json saved before a field existed was trained with.
ADDED_SINCE = {"precision": "fp32"}


@dataclass
class SAEConfig:
    """Everything needed to rebuild or retrain an SAE; saved verbatim as cfg.json.

    seed drives both the initialisation and the batch sampling. site, model_run_id
    and model_checkpoint record where the training activations came from.
    """

    d_in: int
    expansion: int
    l1: float = 1e-3
    lr: float = 5e-4
    batch_size: int = 4096
    steps: int = 4000
    seed: int = 0
    kind: str = "sae"
    d_out: int | None = None  # None means d_in; an SAE must reconstruct its own input
    site: str | None = None
    model_run_id: str | None = None
    eval_every: int = 500
    model_checkpoint: str | None = None  # None: the run's final weights
    # bf16: the training step under bf16 autocast, with fp32 weights, loss and evaluation. On Dyck-3's
    # SAEs it moved self and rotated EV by under 2.5e-4 and ran 2.4x faster on the CPU (docs/findings.md).
    precision: str = "bf16"

    def __post_init__(self):
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}")

        if self.kind not in KINDS:
            raise ValueError(f"SAEConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"SAEConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.d_out is None:
            self.d_out = self.d_in
        for name in ("d_in", "d_out", "expansion", "batch_size", "steps", "eval_every"):
            positive_int(name)
        if self.kind == "sae" and self.d_out != self.d_in:
            raise ValueError(f"SAEConfig.d_out must equal d_in for kind='sae', got {self.d_out} != {self.d_in}")
        if not self.l1 >= 0:
            raise ValueError(f"SAEConfig.l1 must be >= 0, got {self.l1!r}")
        if not self.lr > 0:
            raise ValueError(f"SAEConfig.lr must be > 0, got {self.lr!r}")

    @property
    def d_sae(self) -> int:
        return self.expansion * self.d_in

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        if not isinstance(d, dict):
            raise ValueError(f"SAEConfig.from_dict needs a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown SAEConfig fields: {sorted(unknown)}")
        try:
            return cls(**{**ADDED_SINCE, **d})
        except TypeError as e:  # a required field is missing
            raise ValueError(f"bad SAEConfig: {e}") from None

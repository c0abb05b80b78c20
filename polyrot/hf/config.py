"""The Hugging Face world's settings as plain data: the paper's Pythia corpus and sample seed, the
dtypes a model may run in, and the tiny GPT-NeoX recipe. No torch or transformers here, so that
the stage specifications read them cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# The paper's Pythia settings (its §4.4, §8.3 and appendix D).
PAPER_CORPUS = "monology/pile-uncopyrighted"
CORPUS_SEED = 2026
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class NeoxRecipe:
    """Architecture and training of a tiny seed; Pythia's shape (parallel residual, partial rotary, untied)."""

    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 256
    vocab_size: int = 1024
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 600
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    heldout_fraction: float = 0.05

    def to_dict(self) -> dict:
        return asdict(self)

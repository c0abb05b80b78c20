"""The Dyck-3 task and the paper's protocol on it, as plain data: no torch, so that the stage
specifications (and with them the command line) can read their defaults without loading it.

The vocabulary and context, the splits, and every named batch a stage regenerates from its
parameters alone (polyrot.toy.dyck.make_batch turns a BatchSpec into tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

PAD, BOS, EOS = 0, 1, 2
OPENERS = (3, 5, 7)  # ( [ {
CLOSERS = (4, 6, 8)  # ) ] }
VOCAB_SIZE = 40  # ids 9..39 are unused; the embedding table is sized as in the paper
N_CTX = 64
MAX_DEPTH = 8
N_DEPTH_CLASSES = MAX_DEPTH + 1
MAX_CONTENT = N_CTX - 2  # BOS + content + EOS fills the context exactly at this length

SPLITS = ("train", "compositional", "long")
HEADS = ("tok", "depth", "valid")
DEFAULT_LENGTHS = {"train": (2, 62), "long": (50, 60)}
# The paper's held-out evaluation: 8 batches of 256 sequences a split, fixed, read once every 500
# steps; its early stop fires on the first such reading of 99.99% (reference train.py).
PAPER_EVAL_SEQUENCES = 8 * 256

# Range of k for the k-deep single-family nest at the heart of each compositional sequence.
NEST_DEPTHS = (3, MAX_DEPTH)


@dataclass(frozen=True)
class BatchSpec:
    """A named batch that any stage regenerates bit-identically from these parameters alone.

    min_len and max_len bound the content length; the compositional split ignores them.
    """

    name: str = "eval"
    seed: int = 12345
    n_sequences: int = 1024
    min_len: int = 2
    max_len: int = 48
    split: str = "train"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"BatchSpec name must be a non-empty string, got {self.name!r}")
        for key in ("seed", "n_sequences", "min_len", "max_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"BatchSpec {key} must be an int, got {value!r}")
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; expected one of {', '.join(SPLITS)}")
        if self.n_sequences <= 0:
            raise ValueError(f"BatchSpec n_sequences must be positive, got {self.n_sequences}")
        if self.split != "compositional" and not 1 <= self.min_len <= self.max_len <= MAX_CONTENT:
            raise ValueError(
                f"BatchSpec needs 1 <= min_len <= max_len <= {MAX_CONTENT}, got {self.min_len}, {self.max_len}"
            )

    def as_params(self, prefix: str = "batch") -> dict[str, str | int]:
        """The spec as run parameters, named as the stage options that describe it
        (`batch_name`, `batch_seed`, `batch_sequences`, ...), so a run lists each of them once."""
        return {f"{prefix}_{PARAM_SUFFIX[f.name]}": getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_params(cls, params: dict, prefix: str = "batch") -> BatchSpec:
        """Inverse of as_params; values may be strings (as logged params come back). Other keys,
        `batch_size` among them, are ignored, so a whole run's params can be passed in."""
        # Every field has a default, whose type is the type to parse the logged value into.
        keys = {f.name: f"{prefix}_{PARAM_SUFFIX[f.name]}" for f in fields(cls)}
        missing = sorted(key for key in keys.values() if key not in params)
        if missing:
            raise ValueError(f"params under {prefix!r}: missing {missing}")
        try:
            return cls(**{name: type(getattr(cls, name))(params[key]) for name, key in keys.items()})
        except (TypeError, ValueError) as err:
            raise ValueError(f"bad BatchSpec params under {prefix!r}: {err}") from None


# The parameter name of each BatchSpec field after its prefix: the stage options' spelling.
PARAM_SUFFIX = {"name": "name", "seed": "seed", "n_sequences": "sequences", "min_len": "min_len",
                "max_len": "max_len", "split": "split"}


# The batches the paper names (its §4, §7 and §8), each regenerated bit-identically from its spec.
EVAL_SPEC = BatchSpec()
SAE_SPEC = BatchSpec(name="sae", seed=2026, n_sequences=4096)
# Causal bars: means over 4096 (C), 2048 (Pr) and 1024 (cross-seed) sequences, evaluation on 256
# sequences, all of content length 2-48; rng 7 for C, 11 for Pr.
C_MEANS = BatchSpec("bar_c.means", seed=0, n_sequences=4096)
C_EVAL = BatchSpec("bar_c.eval", seed=7, n_sequences=256)
PR_MEANS = BatchSpec("bar_pr.means", seed=0, n_sequences=2048)
PR_EVAL = BatchSpec("bar_pr.eval", seed=11, n_sequences=256)
CROSS_MEANS = BatchSpec("cross.means", seed=0, n_sequences=1024)
CROSS_EVAL = C_EVAL
# Cross-seed Bar B: 2048 sequences of lengths 2-48.
CROSS_SPEC = BatchSpec("cross.bar_b", seed=99, n_sequences=2048)
# Bar P's joint-loss activation batch: 1024 sequences of lengths 2-48, rng 202605200 + seed.
JOINT_SPEC = BatchSpec("joint", seed=202605200, n_sequences=1024)
# Lens 3 (ACDC): means over 2048 sequences, effects on a 256-sequence batch of rng 42; lens 4
# counts activation patterns on 8192 sequences.
LENS_MEANS = PR_MEANS
LENS_EVAL = BatchSpec("lens3.eval", seed=42, n_sequences=256)
LENS4_SPEC = BatchSpec("lens4", seed=0, n_sequences=8192)

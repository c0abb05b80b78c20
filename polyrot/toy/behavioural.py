"""Bar B: how far a model's output distributions are from the task's specification, and the decoy.

Against the spec (paper §2, §6): the spec puts 1 - eps on the true class of each head and
eps / (K - 1) on each of the K - 1 others (eps = 1e-6, so the KL is finite), and

    Bar B = mean over (sequence, non-PAD position, head) of KL(spec || model).

Every non-PAD position carries all three heads, so this overall mean equals the arithmetic mean
of the three per-head means (the paper's seed 0: (3.75e-5 + 3.63e-4 + 1.22e-4) / 3 = 1.74e-4).
A split's value is the same mean over that split's positions only, so the overall value is their
position-weighted mean, not the mean of the three.

Samples are sequences, drawn in batches of 2048 whose split is chosen 60/20/20 from train
(content lengths 2–48, as the paper's Bar B code), compositional and long (50–60). Every batch
is determined by (seed, batch index); the batch totals give the ratio estimator's standard error,
reported relative to the mean (the paper asks for < 5% at 10^7 samples).

Between two models (cross-seed Bar B): KL(reference || model) per position and head, both models
run in float64, on the paper's 2048 sequences of lengths 2–48 (CROSS_SPEC).

The decoy (§6a): the model with its depth unembedding rows averaged in pairs (0,1), (2,3), ...;
with an odd number of depth classes (9) the last row has no partner and is left as it is.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from polyrot.errors import ParameterError
from polyrot.toy import dyck
from polyrot.toy.dyck import Batch
from polyrot.toy.model import HEADS, DyckTransformer

EPS = 1e-6
THRESHOLD = 1e-4
BATCH_SEQUENCES = 2048
# Rows a forward pass takes, in order of length (Batch.by_length): the KL is a sum over positions,
# so length-sorted, trimmed chunks give the padded batch's sums without computing its PAD.
FORWARD_ROWS = 256
MIX = {"train": 0.6, "compositional": 0.2, "long": 0.2}
LENGTHS = {"train": (2, 48), "long": (50, 60)}
# The paper's cross-seed sample: 8 batches of 256 sequences, lengths 2–48, rng 99.


def kl_to_spec(logits: torch.Tensor, labels: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """KL(spec || softmax(logits)) per position [...], in float64, for the eps-smoothed one-hot spec.

    With p the spec and q the model, KL = sum p log p - sum p log q; both sums have closed forms,
    so no [..., K] spec tensor is built.
    """
    K = logits.shape[-1]
    log_q = torch.log_softmax(logits.to(torch.float64), dim=-1)
    off = eps / (K - 1)
    neg_entropy = (1 - eps) * math.log1p(-eps) + eps * math.log(off)
    log_q_true = log_q.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    cross = (1 - eps) * log_q_true + off * (log_q.sum(-1) - log_q_true)
    return neg_entropy - cross


def kl_between(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per position, in float64."""
    log_p = torch.log_softmax(p_logits.to(torch.float64), dim=-1)
    log_q = torch.log_softmax(q_logits.to(torch.float64), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@dataclass(frozen=True)
class BarB:
    """Bar B over `samples` sequences: overall, per head and per split, with its CLT error."""

    mean: float
    per_head: dict[str, float]
    per_split: dict[str, float]
    samples: int
    positions: int            # non-PAD positions (each carries the three heads)
    batches: int
    relative_error: float     # standard error / mean; NaN with fewer than two batches

    def table(self) -> pd.DataFrame:
        """One row per scope (overall, head, split): KL and the positions it averages over."""
        rows = [{"scope": "overall", "name": "all", "kl": self.mean}]
        rows += [{"scope": "head", "name": h, "kl": v} for h, v in self.per_head.items()]
        rows += [{"scope": "split", "name": s, "kl": v} for s, v in self.per_split.items()]
        return pd.DataFrame(rows)


def _ratio_error(totals: np.ndarray, counts: np.ndarray) -> float:
    """Relative standard error of sum(totals) / sum(counts) over i.i.d. batches (ratio estimator)."""
    m = len(totals)
    ratio = totals.sum() / counts.sum()
    if m < 2 or ratio == 0:
        return math.nan
    residual = totals - ratio * counts
    se = math.sqrt((residual ** 2).sum() / (m * (m - 1))) / counts.mean()
    return se / ratio


def draw_batch(index: int, n: int, seed: int) -> tuple[str, Batch]:
    """Batch `index` of the Bar B stream: its split (60/20/20) and n sequences of it."""
    rng = np.random.default_rng([seed, index])
    split = str(rng.choice(list(MIX), p=list(MIX.values())))
    return split, dyck.generate(split, n, seed=rng, length_range=LENGTHS.get(split))


@torch.no_grad()
def bar_b(model: DyckTransformer, samples: int, *, seed: int = 0, batch_sequences: int = BATCH_SEQUENCES,
          eps: float = EPS, progress: bool = False, chunk: int = FORWARD_ROWS) -> BarB:
    """Bar B of `model` against the spec on `samples` sequences (see the module docstring)."""
    if samples <= 0:
        raise ParameterError(f"Bar B needs a positive number of samples, got {samples}")
    if batch_sequences <= 0:
        raise ParameterError(f"batch_sequences must be positive, got {batch_sequences}")
    model.eval()
    n_batches = -(-samples // batch_sequences)
    head_kl = dict.fromkeys(HEADS, 0.0)
    split_kl, split_n = dict.fromkeys(MIX, 0.0), dict.fromkeys(MIX, 0)
    totals, counts = np.zeros(n_batches), np.zeros(n_batches)
    for i in tqdm(range(n_batches), desc="Bar B", disable=not progress, leave=False):
        split, batch = draw_batch(i, min(batch_sequences, samples - i * batch_sequences), seed)
        n = int(batch.mask.sum())
        for _, part in batch.by_length(chunk):
            logits = model(part.tokens)
            for head in HEADS:
                kl = float(kl_to_spec(logits[head][part.mask], getattr(part, head)[part.mask], eps).sum())
                head_kl[head] += kl
                split_kl[split] += kl
                totals[i] += kl
        split_n[split] += n
        counts[i] = len(HEADS) * n
    positions = int(counts.sum()) // len(HEADS)
    return BarB(
        mean=float(totals.sum() / counts.sum()),
        per_head={h: v / positions for h, v in head_kl.items()},
        per_split={s: split_kl[s] / (len(HEADS) * split_n[s]) for s in MIX if split_n[s]},
        samples=samples, positions=positions, batches=n_batches,
        relative_error=float(_ratio_error(totals, counts)),
    )


def _float64(model: DyckTransformer) -> DyckTransformer:
    return copy.deepcopy(model).to(torch.float64).eval()


@torch.no_grad()
def model_kl(reference: DyckTransformer, model: DyckTransformer, batch: Batch,
             chunk: int = 256) -> tuple[float, dict[str, float]]:
    """(mean, per head) of KL(reference || model) over the non-PAD positions of `batch`, both
    models run in float64."""
    ref64, model64 = _float64(reference), _float64(model)
    sums = dict.fromkeys(HEADS, 0.0)
    for _, part in batch.by_length(chunk):
        p, q = ref64(part.tokens), model64(part.tokens)
        for head in HEADS:
            sums[head] += float(kl_between(p[head][part.mask], q[head][part.mask]).sum())
    n = int(batch.mask.sum())
    per_head = {h: v / n for h, v in sums.items()}
    return sum(per_head.values()) / len(HEADS), per_head


def decoy(model: DyckTransformer) -> DyckTransformer:
    """The paper's decoy: W_U_depth rows averaged in pairs (0,1), (2,3), ...; an odd last row stays."""
    fake = copy.deepcopy(model)
    with torch.no_grad():
        W = fake.W_U_depth
        for row in range(0, W.shape[0] - 1, 2):
            W[row:row + 2] = W[row:row + 2].mean(0)
    return fake

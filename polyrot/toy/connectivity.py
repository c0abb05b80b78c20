"""Linear mode connectivity: is the straight line between two seeds' weights a path of low loss?

If two seeds differ only by a symmetry of the architecture (polyrot.toy.symmetry), then once one is
aligned to the other under that symmetry their weights coincide and the path between them is flat.
The paper does not run this functional test; it is the one that tells "the same solution in another
basis" from "another solution".

Paths, all between folded models (folding changes no function; the gains are 1 on both ends, so
only the alignment differs between paths):
  unaligned    seed B as it is
  permuted     seed B under the symmetry search's head and neuron permutations, per-head rotations
               and neuron scales, in its own residual basis (the residual rotation undone)
  aligned      seed B under the whole alignment, residual rotation included

At t in [0, 1] the weights are (1 - t) A + t B (every tensor of the state dict, W_pos too), and the
model is evaluated on held-out batches (polyrot.toy.train.evaluate): loss = the mean over splits of
the summed per-head cross-entropy, accuracy = the minimum over split and head. The barrier is the
highest loss on the path minus the mean of its two ends; 0 for a flat path (and for A with itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from polyrot.errors import ParameterError
from polyrot.toy.model import HEADS, DyckTransformer, fold_rmsnorm, rotate_residual
from polyrot.toy.symmetry import Alignment, align
from polyrot.toy.task import SPLITS
from polyrot.toy.train import EvalSets, evaluate

UNALIGNED, PERMUTED, ALIGNED = "unaligned", "permuted", "aligned"
PATHS = (UNALIGNED, PERMUTED, ALIGNED)
MIN_POINTS = 11


def interpolate(a: DyckTransformer, b: DyckTransformer, t: float) -> DyckTransformer:
    """The model with weights (1 - t) a + t b, every floating tensor of the state dict."""
    if a.cfg != b.cfg:
        raise ParameterError("cannot interpolate models of different configurations")
    sa, sb = a.state_dict(), b.state_dict()
    mixed = {k: ((1 - t) * sa[k].to(torch.float64) + t * sb[k].to(torch.float64)).to(sa[k].dtype)
             if sa[k].is_floating_point() else sa[k] for k in sa}
    model = DyckTransformer(a.cfg)
    model.load_state_dict(mixed)
    return model


def path_loss(metrics: dict[str, float]) -> float:
    """Mean over splits of the per-head cross-entropy summed over heads (the training loss's form)."""
    return float(np.mean([sum(metrics[f"loss.{split}.{h}"] for h in HEADS) for split in SPLITS]))


def curve(a: DyckTransformer, b: DyckTransformer, sets: EvalSets, points: int = MIN_POINTS) -> pd.DataFrame:
    """Loss and min accuracy at `points` evenly spaced t in [0, 1] on the straight line a -> b."""
    if points < MIN_POINTS:
        raise ParameterError(f"a connectivity curve needs at least {MIN_POINTS} points, got {points}")
    rows = []
    for t in np.linspace(0.0, 1.0, points):
        metrics = evaluate(interpolate(a, b, float(t)), sets)
        rows.append({"t": float(t), "loss": path_loss(metrics), "acc_min": metrics["acc.min"]})
    return pd.DataFrame(rows)


def barrier(table: pd.DataFrame) -> float:
    """max loss on the path - mean of the two ends' losses."""
    losses = table.sort_values("t")["loss"].to_numpy()
    return float(losses.max() - (losses[0] + losses[-1]) / 2)


def aligned_ends(a: DyckTransformer, b: DyckTransformer, alignment: Alignment | None = None,
                 **align_options) -> tuple[DyckTransformer, dict[str, DyckTransformer]]:
    """(folded a, {path: b's end of it}) for every path in PATHS; `alignment` of b to a, or searched
    here with `align_options` (polyrot.toy.symmetry.align)."""
    found = alignment or align(b, a, **align_options)
    reference = fold_rmsnorm(a)
    # The aligned model's residual stream is b's times the rotation; undoing it leaves the
    # permutations, per-head rotations and scales, which commute with a residual rotation.
    permuted = rotate_residual(found.model, found.rotation.T.contiguous())
    return reference, {UNALIGNED: fold_rmsnorm(b), PERMUTED: permuted, ALIGNED: found.model}


def connectivity(a: DyckTransformer, b: DyckTransformer, sets: EvalSets, *, points: int = MIN_POINTS,
                 paths: Sequence[str] = PATHS, alignment: Alignment | None = None,
                 **align_options) -> pd.DataFrame:
    """One row per (path, t): loss and min accuracy, for every path in `paths`."""
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ParameterError(f"unknown path {unknown[0]!r}; paths: {', '.join(PATHS)}")
    reference, ends = aligned_ends(a, b, alignment, **align_options) if set(paths) - {UNALIGNED} \
        else (fold_rmsnorm(a), {UNALIGNED: fold_rmsnorm(b)})
    return pd.concat([curve(reference, ends[p], sets, points).assign(path=p) for p in paths], ignore_index=True)


def barriers(table: pd.DataFrame) -> dict[str, float]:
    """{path: barrier} of a `connectivity` table."""
    return {path: barrier(rows) for path, rows in table.groupby("path", sort=False)}

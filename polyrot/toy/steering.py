"""Diff-of-means steering vectors, the intervention that adds them, and how well they transfer.

The paper's toy vectors (all at one site, built from one model's activations on one batch):

    depth     mean(depth = 5) - mean(depth = 4), added as is; read on the depth head at depth-4 rows
    sticky    mean(valid = 1, depth = 4) - mean(valid = 0, depth = 4), added with a minus sign, i.e.
              the applied direction points from invalid prefixes to valid ones; read on the valid head
              at the invalid depth-4 rows
    closer    mean(closers) - mean(openers), added as is; read on the tok head at opener rows

Each vector is read on the head whose label defines its two conditions (depth, valid, token class)
and at the rows of the condition it moves away from, where steering it is meant to turn the
model's answer. The paper does not name the closer vector's head; the depth head, which a closer
also moves, is the wrong reader on our seeds: there the vector does no more than random directions
of its norm (0.36 against 0.29 at alpha = 2), while on the tok head it does (1.00 against 0.49).
`SteeringVector.direction` already carries the sign: steering adds alpha * direction, and that is
also what vectors.safetensors stores.

Effect: the conditional-accuracy drop, base accuracy minus steered accuracy of the target head over
the targeted (non-PAD) positions. Positive means steering moved the answer.

Control: random directions of the vector's norm. One draw is not a control: on the depth head at
alpha = 2 single draws range from 0.00 to 0.70, so the effect of a control is the mean over several.

Transfer: ratio = cross-seed effect / within-seed effect, NaN when the within-seed effect is
negligible (|effect| < NEGLIGIBLE). The paper also speaks in doses ("cross needs ~4x the within-seed
dose"): `dose_multiple` reads that off the alpha grid. Regimes, decided by `regime` only:

    clean     0.5 <= ratio <= 2 (so the effects share their sign)
    inverted  the cross effect is not negligible and has the opposite sign, or ratio > 4, or the
              within effect is negligible while the cross effect is not
    none      both effects negligible: there is nothing to transfer
    partial   every other case (ratio in (0, 0.5) or (2, 4], or a negligible cross effect)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from polyrot.toy.dyck import Batch
from polyrot.toy.model import DyckTransformer
from polyrot.toy.task import CLOSERS, OPENERS

# Half a percentage point of accuracy: below it an effect is indistinguishable from a few flipped rows.
NEGLIGIBLE = 0.005
CLEAN, PARTIAL, INVERTED, NONE = "clean", "partial", "inverted", "none"


def diff_of_means(acts: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """mean(acts[mask_a]) - mean(acts[mask_b]) over rows of acts [N, d]."""
    for name, mask in (("mask_a", mask_a), ("mask_b", mask_b)):
        if not bool(mask.any()):
            raise ValueError(f"{name} selects no row: a diff of means needs both conditions present")
    return acts[mask_a].mean(dim=0) - acts[mask_b].mean(dim=0)


@dataclass(frozen=True)
class SteeringVector:
    name: str
    direction: torch.Tensor  # [d], as added (sign applied)
    head: str                # the output head its effect is read on
    targets: torch.Tensor    # bool [n_rows]: the rows (activations' order) its effect is read at
    definition: str


def toy_vectors(acts: torch.Tensor, rows: Mapping[str, torch.Tensor]) -> dict[str, SteeringVector]:
    """The three toy vectors from one site's activations [n_rows, d] and `condition_rows` labels."""
    depth, valid, token = rows["depth"], rows["valid"], rows["token"]
    at4 = depth == 4
    invalid4, valid4 = at4 & (valid == 1), at4 & (valid == 0)
    openers, closers = torch.isin(token, torch.tensor(OPENERS)), torch.isin(token, torch.tensor(CLOSERS))
    specs = (
        ("depth", 1, depth == 5, at4, "depth", at4, "+(mean(depth=5) - mean(depth=4))"),
        ("sticky", -1, invalid4, valid4, "valid", invalid4, "-(mean(valid=1, depth=4) - mean(valid=0, depth=4))"),
        ("closer", 1, closers, openers, "tok", openers, "+(mean(closers) - mean(openers))"),
    )
    vectors = {}
    for name, sign, mask_a, mask_b, head, targets, definition in specs:
        try:
            diff = diff_of_means(acts, mask_a, mask_b)
        except ValueError as exc:
            # Small batches can lack a condition (invalid prefixes at depth 4 are rare): say which.
            raise ValueError(f"{name} vector {definition}: {exc}; use a larger batch") from None
        vectors[name] = SteeringVector(name, sign * diff, head, targets, definition)
    return vectors


@torch.no_grad()
def steer(model: DyckTransformer, tokens: torch.Tensor, site: str, vector: torch.Tensor, alpha: float,
          positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Logits with alpha * vector added to `site` at `positions` (bool [B, T]; default: everywhere)."""
    shift = alpha * vector
    if positions is None:
        return model.run(tokens, patches={site: lambda x: x + shift})[0]
    where = positions.unsqueeze(-1).to(vector.dtype)
    return model.run(tokens, patches={site: lambda x: x + where * shift})[0]


def accuracy(logits: Mapping[str, torch.Tensor], batch: Batch, head: str, targets: torch.Tensor) -> float:
    """Accuracy of `head` over the targeted rows (non-PAD positions, sequence-major)."""
    predicted = logits[head][batch.mask].argmax(dim=-1)[targets]
    return float((predicted == getattr(batch, head)[batch.mask][targets]).float().mean())


def effect(model: DyckTransformer, batch: Batch, site: str, vector: torch.Tensor, alpha: float, head: str,
           targets: torch.Tensor, positions: torch.Tensor | None = None,
           base: Mapping[str, torch.Tensor] | None = None) -> float:
    """Conditional-accuracy drop: base accuracy minus steered accuracy of `head` at `targets`.

    `base` (the unsteered logits) may be passed in, since every vector and alpha shares it.
    """
    if base is None:
        base = steer(model, batch.tokens, site, vector, 0.0)
    steered = steer(model, batch.tokens, site, vector, alpha, positions)
    return accuracy(base, batch, head, targets) - accuracy(steered, batch, head, targets)


def random_controls(vector: torch.Tensor, seed: int, n: int = 1) -> list[torch.Tensor]:
    """`n` Gaussian-random directions with the norm of `vector`, drawn in turn from `seed`."""
    if n < 1:
        raise ValueError(f"need at least one control direction, got {n}")
    generator = torch.Generator().manual_seed(seed)
    controls = []
    for _ in range(n):
        noise = torch.randn(vector.shape, generator=generator, dtype=torch.float64)
        controls.append((noise * (vector.double().norm() / noise.norm())).to(vector.dtype))
    return controls


def transfer_ratio(cross: float, within: float) -> float:
    """cross / within, NaN when the within-seed effect is negligible (see `regime`)."""
    return math.nan if abs(within) < NEGLIGIBLE else cross / within


def dose_multiple(alphas: Sequence[float], cross: Sequence[float], within: float, alpha: float) -> float:
    """How many times the dose `alpha` another model needs for the within-seed effect `within`.

    The dose is where the cross effects, measured at the doses `alphas`, first reach `within`,
    interpolated linearly in log alpha between neighbouring doses (the paper's grid doubles). NaN when
    `within` is not a positive, non-negligible effect (there is no dose to match) or no dose of the
    grid reaches it; when the smallest dose already does, the result is that dose's multiple, an
    upper bound.
    """
    if within < NEGLIGIBLE:
        return math.nan
    points = sorted(zip(alphas, cross))
    if points[0][1] >= within:
        return points[0][0] / alpha
    for (a0, e0), (a1, e1) in zip(points, points[1:]):
        if e1 >= within:
            t = (within - e0) / (e1 - e0)
            return math.exp(math.log(a0) + t * (math.log(a1) - math.log(a0))) / alpha
    return math.nan


def regime(cross: float, within: float) -> str:
    """The transfer regime of a (cross, within) effect pair, by the rule in the module docstring."""
    cross_matters, within_matters = abs(cross) >= NEGLIGIBLE, abs(within) >= NEGLIGIBLE
    if not within_matters:
        return INVERTED if cross_matters else NONE
    ratio = cross / within
    if 0.5 <= ratio <= 2:
        return CLEAN
    if ratio > 4 or (cross_matters and ratio < 0):
        return INVERTED
    return PARTIAL

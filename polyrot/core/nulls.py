"""Calibrated nulls and power for the rotation statistics: does a statistic tell Haar from not-Haar
at the sizes it is used at?

A statistic of R is tested against Haar O(d) by a p-value, small when R looks unlike Haar:

  ks          the paper's two-sample KS of R's eigen-angles against Haar angles (ks_vs_haar)
  ks_mc       the same KS statistic, its p-value calibrated by Monte Carlo: the fraction of Haar
              draws H whose angles lie at least as far (in KS distance) from the reference angles
  frob        Monte-Carlo, one-sided: the fraction of Haar draws H with ||H - I||_F <= ||R - I||_F
              (R near the identity is the departure that matters; a ratio near 1 is Haar-like)
  det_ks,     the same three on R's determined part R_det in O(k) (polyrot.core.rotation.restrict),
  det_ks_mc,  against Haar O(k), which is R_det's exact law when R is Haar
  det_frob

A Monte-Carlo p-value (1 + #{null >= observed}) / (1 + n) is uniform under its null by construction;
the asymptotic KS p-value is not guaranteed to be (the angles of one matrix come in conjugate pairs
and repel, so they sit closer to the Haar reference than independent draws would), which
`pvalue_uniformity` measures rather than assumes; ks_mc keeps the paper's statistic and replaces
only its p-value by the one its own null gives. The KS distance of d angles takes few distinct
values, so ties leave ks_mc slightly conservative (its size at most ALPHA) rather than exactly
uniform.

Planted nulls use a model's own activations X (rows): the target is X Q for a known Q, so the fitted
R maps it back (R ~ Q^T on the determined part, arbitrary elsewhere):
  - Q Haar: every statistic should accept (p uniform, rejection rate ~ ALPHA);
  - Q = small_angle_rotation(d, theta): every eigen-angle at most theta; the statistic should reject
    when theta is small. A statistic's detection angle is the largest theta on the grid it still
    rejects in at least POWER of the draws (a larger angle: a more sensitive test);
  - Q = partial_haar_rotation(d, f): Haar except on a random f-fraction of directions that it fixes.
    The detection fraction is the smallest f rejected in at least POWER of the draws: the smallest
    departure from Haar the statistic detects. The power curve is the rejection rate at p < ALPHA
    against theta and against f.
  - the same-model pair: X against X rounded to bfloat16 (what a bf16 forward pass perturbs), so
    R should be ~I on the determined part and is free on the directions below rounding noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats
import torch

from polyrot.core.rotation import (
    DeterminedPart,
    _as_float64_array,
    determined_part,
    eigen_angles,
    fit_rotation,
    frobenius_from_identity,
    haar_angles,
    ks_vs_haar,
    one_blas_thread,
    partial_haar_rotation,
    restrict,
    small_angle_rotation,
)

ALPHA = 0.05
POWER = 0.8
STATISTICS = ("ks", "ks_mc", "frob", "det_ks", "det_ks_mc", "det_frob")
# Default grid of maximal eigen-angles (radians) for the power curve; pi is the largest a rotation has.
ANGLES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.2, 1.6, 2.0, 2.5, float(np.pi))
# Default grid of fixed fractions (partial_haar_rotation): the share of directions R leaves alone.
FIXED = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
N_MONTE_CARLO = 200


@dataclass(frozen=True, eq=False)
class HaarReference:
    """The Haar samples one dimension's p-values need: eigen-angles of n_haar draws (the KS
    reference, as the audit's), and for n_mc further draws their ||H - I||_F and the KS statistic of
    their angles against that reference (the Monte-Carlo nulls)."""

    d: int
    angles: np.ndarray
    frobenius: np.ndarray
    ks_statistics: np.ndarray

    @classmethod
    def draw(cls, d: int, *, n_haar: int = 10, n_mc: int = N_MONTE_CARLO, seed: int = 31) -> HaarReference:
        draws = scipy.stats.ortho_group.rvs(d, size=n_mc, random_state=seed + 1).reshape(n_mc, d, d) \
            if d > 1 else np.sign(np.random.default_rng(seed + 1).standard_normal((n_mc, 1, 1)))
        angles = haar_angles(d, n_haar, seed) if d > 1 else np.zeros(1)
        return cls(d, angles, np.array([frobenius_from_identity(h) for h in draws]),
                   np.array([ks_vs_haar(eigen_angles(h), angles)["statistic"] for h in draws]))

    def frob_pvalue(self, R) -> float:
        """One-sided Monte-Carlo p: small when R is nearer the identity than Haar draws are."""
        observed = frobenius_from_identity(R)
        return float((1 + np.sum(self.frobenius <= observed)) / (1 + len(self.frobenius)))

    def ks_pvalue(self, R) -> float:
        return ks_vs_haar(eigen_angles(R), self.angles)["pvalue"]

    def ks_mc_pvalue(self, R) -> float:
        """Monte-Carlo p of the KS statistic: small when R's angles are farther from Haar's than
        Haar draws' are."""
        observed = ks_vs_haar(eigen_angles(R), self.angles)["statistic"]
        return float((1 + np.sum(self.ks_statistics >= observed)) / (1 + len(self.ks_statistics)))


class References:
    """HaarReference per dimension, drawn once each (the determined part's k varies by site)."""

    def __init__(self, *, n_haar: int = 10, n_mc: int = N_MONTE_CARLO, seed: int = 31):
        self.n_haar, self.n_mc, self.seed = n_haar, n_mc, seed
        self._found: dict[int, HaarReference] = {}

    def __getitem__(self, d: int) -> HaarReference:
        if d not in self._found:
            self._found[d] = HaarReference.draw(d, n_haar=self.n_haar, n_mc=self.n_mc, seed=self.seed)
        return self._found[d]


def pvalues(R, part: DeterminedPart, references: References) -> dict[str, float]:
    """{statistic: p-value against Haar} for every statistic in STATISTICS."""
    matrix = _as_float64_array(R)
    R_det = restrict(matrix, part)
    full, det = references[len(matrix)], references[part.k]
    return {"ks": full.ks_pvalue(matrix), "ks_mc": full.ks_mc_pvalue(matrix), "frob": full.frob_pvalue(matrix),
            "det_ks": det.ks_pvalue(R_det), "det_ks_mc": det.ks_mc_pvalue(R_det), "det_frob": det.frob_pvalue(R_det)}


def bf16_rounded(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16 and back: the perturbation a bf16 forward pass leaves (~2^-9 relative)."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).to(torch.float64).numpy()


def planted_pair(acts, Q, *, rounded: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) = (X, X Q): a model's activations against themselves turned by a known Q;
    `rounded`: the target rounded to bfloat16, so that directions below rounding noise are as free
    as in a real pair (an exact X Q would fix R even there)."""
    x = _as_float64_array(acts)
    target = x @ _as_float64_array(Q)
    return x, bf16_rounded(target) if rounded else target


def same_model_pair(acts) -> tuple[np.ndarray, np.ndarray]:
    """(X, X rounded to bfloat16): one model paired with itself; R should be ~I on the determined part."""
    x = _as_float64_array(acts)
    return x, bf16_rounded(x)


def _trial(source: np.ndarray, target: np.ndarray, references: References, fraction: float) -> dict[str, float]:
    R = fit_rotation(source, target).R.numpy()
    return pvalues(R, determined_part(source, target, fraction), references)


@one_blas_thread
def power_curve(acts, *, angles: Sequence[float] = ANGLES, fixed: Sequence[float] = FIXED, draws: int = 20,
                seed: int = 0,
                references: References | None = None, fraction: float = 0.99, rounded: bool = True) -> pd.DataFrame:
    """Rejection rates at p < ALPHA of every statistic, on `acts` turned by known rotations.

    One row per (kind, departure, statistic): kind "haar" (departure NaN: Q Haar, the rate should be
    ~ALPHA), "angle" (Q = small_angle_rotation(d, departure)) or "fixed" (Q =
    partial_haar_rotation(d, departure)); columns rate (fraction of `draws` rejected), median_p, and
    for the Haar rows uniformity_p (KS of the p-values against U(0, 1)).
    """
    if draws < 2:
        raise ValueError(f"a power curve needs at least 2 draws per angle, got {draws}")
    x = _as_float64_array(acts)
    d = x.shape[1]
    references = references or References()
    rows = []
    haar = [scipy.stats.ortho_group.rvs(d, random_state=seed + i) for i in range(draws)]
    trials = {("haar", float("nan")): [_trial(*planted_pair(x, Q, rounded=rounded), references, fraction)
                                       for Q in haar]}
    for kind, grid, make in (("angle", angles, small_angle_rotation), ("fixed", fixed, partial_haar_rotation)):
        for departure in grid:
            trials[kind, float(departure)] = [
                _trial(*planted_pair(x, make(d, float(departure), seed + i), rounded=rounded), references, fraction)
                for i in range(draws)]
    for (kind, departure), found in trials.items():
        for statistic in STATISTICS:
            p = np.array([t[statistic] for t in found])
            row = {"kind": kind, "departure": departure, "statistic": statistic, "rate": float(np.mean(p < ALPHA)),
                   "median_p": float(np.median(p)), "draws": len(p)}
            if kind == "haar":
                row["uniformity_p"] = pvalue_uniformity(p)
            rows.append(row)
    return pd.DataFrame(rows)


def pvalue_uniformity(p) -> float:
    """KS p-value of p-values against U(0, 1): small when they are not uniform (miscalibrated)."""
    return float(scipy.stats.kstest(np.asarray(p, dtype=np.float64), "uniform").pvalue)


def detection(curve: pd.DataFrame) -> dict[str, float]:
    """{"angle.<statistic>": the largest angle rejected in >= POWER of the draws (0 if none),
    "fixed.<statistic>": the smallest fixed fraction rejected so (NaN if none)}: the smallest
    departure from Haar each statistic detects at p < ALPHA, on the grids the curve ran."""
    out = {}
    for (kind, statistic), rows in curve[curve["kind"] != "haar"].groupby(["kind", "statistic"], sort=False):
        rejected = rows.loc[rows["rate"] >= POWER, "departure"]
        if kind == "angle":
            out[f"angle.{statistic}"] = float(rejected.max()) if len(rejected) else 0.0
        else:
            out[f"fixed.{statistic}"] = float(rejected.min()) if len(rejected) else float("nan")
    return out


def null_size(curve: pd.DataFrame) -> dict[str, float]:
    """{statistic: rejection rate under the planted Haar null} (~ALPHA for a calibrated test)."""
    haar = curve[curve["kind"] == "haar"]
    return dict(zip(haar["statistic"], haar["rate"]))

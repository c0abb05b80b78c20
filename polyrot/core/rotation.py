"""Orthogonal alignment between two models' activations at one site, and the statistics of R.

The paper fits, on the same batch with rows aligned, R = argmin_{O in O(d)} ||A_tgt O - A_src||_F
on centred float64 activations. R ranges over all of O(d): a reflection is as good an answer as a
rotation, so nothing forces det R = +1.

Row-vector convention throughout (activations are rows):

    target activation  x_t  ->  source frame   x_t R + c,   c = mu_src - mu_tgt R
    target direction   v_t  ->  source frame   v_t R
    source direction   v_s  ->  target frame   v_s R^T

The statistics ask whether R looks like a Haar-random element of O(d), as for two unrelated
bases, or like something structured: near the identity, near a signed permutation, or with
eigen-angles bunched near zero.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.stats
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from threadpoolctl import threadpool_limits

from polyrot.errors import ArtifactCorruptError

TENSOR_KEYS = ("R", "mu_src", "mu_tgt")
METADATA_HEADER_KEY = "polyrot.rotation.metadata"
# Float32 rounding of an orthogonal R leaves about 1e-6 at d = 512; anything far above that is not
# a rotation, and the angles of its symmetric part would mean nothing.
ORTHOGONALITY_TOLERANCE = 1e-4


class RotationFileError(ArtifactCorruptError, ValueError):
    """A rotation file is unreadable or inconsistent; a ValueError so callers need not know the hierarchy."""


# eq=False: the generated __eq__ would compare tensors elementwise and fail on truth-testing.
@dataclass(frozen=True, eq=False)
class Rotation:
    """An orthogonal map from the target model's activation frame into the source model's.

    `R` is float64 [d, d], `mu_src` / `mu_tgt` float64 [d] are the batch means the fit centred on,
    and `metadata` is free-form JSON-able provenance (site, run ids, seeds, n_rows, fit quality).
    """

    R: torch.Tensor
    mu_src: torch.Tensor
    mu_tgt: torch.Tensor
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.R.ndim != 2 or self.R.shape[0] != self.R.shape[1]:
            raise ValueError(f"R must be square [d, d], got shape {tuple(self.R.shape)}")
        for name in ("mu_src", "mu_tgt"):
            shape = tuple(getattr(self, name).shape)
            if shape != (self.d,):
                raise ValueError(f"{name} has shape {shape}, expected ({self.d},) to match R")
        for name in TENSOR_KEYS:
            dtype = getattr(self, name).dtype
            if dtype != torch.float64:
                raise ValueError(f"{name} must be float64, got {dtype}")

    @property
    def d(self) -> int:
        return self.R.shape[0]

    @property
    def translation(self) -> torch.Tensor:
        """c = mu_src - mu_tgt R: the offset that completes the affine map target -> source."""
        return self.mu_src - self.mu_tgt @ self.R

    def apply(self, acts: torch.Tensor) -> torch.Tensor:
        """Map target activations [..., d] into the source frame: acts R + c, computed in float64."""
        self._check_last_dim(acts, "acts")
        out = acts.to(torch.float64) @ self.R.to(acts.device) + self.translation.to(acts.device)
        return out.to(acts.dtype)

    def to_source(self, v: torch.Tensor) -> torch.Tensor:
        """Map a target-frame direction [..., d] into the source frame: v R (no translation)."""
        self._check_last_dim(v, "v")
        return (v.to(torch.float64) @ self.R.to(v.device)).to(v.dtype)

    def to_target(self, v: torch.Tensor) -> torch.Tensor:
        """Map a source-frame direction [..., d] into the target frame: v R^T (no translation)."""
        self._check_last_dim(v, "v")
        return (v.to(torch.float64) @ self.R.T.to(v.device)).to(v.dtype)

    def rotate_vector(self, v: torch.Tensor) -> torch.Tensor:
        """Source -> target for a direction, i.e. `to_target`.

        Steering vectors are built on the source model and added to the target model's residual
        stream, so this is the direction a caller almost always wants. Adding the result to a target
        activation moves its source-frame image by exactly v: apply(x + rotate_vector(v)) = apply(x) + v.
        """
        return self.to_target(v)

    def inverse(self) -> Rotation:
        """The map from the source frame into the target frame: R^T with the two means swapped."""
        metadata = {**self.metadata, "inverted": not self.metadata.get("inverted", False)}
        return Rotation(self.R.T.contiguous(), self.mu_tgt.clone(), self.mu_src.clone(), metadata)

    def save(self, path: str | Path) -> None:
        """One safetensors file: tensors R, mu_src, mu_tgt; metadata as JSON in the header."""
        # Own contiguous copies: safetensors refuses tensors that are views of one another.
        tensors = {name: getattr(self, name).detach().cpu().clone(memory_format=torch.contiguous_format)
                   for name in TENSOR_KEYS}
        save_file(tensors, str(path), metadata={METADATA_HEADER_KEY: json.dumps(self.metadata)})

    @classmethod
    def load(cls, path: str | Path) -> Rotation:
        try:
            with safe_open(str(path), framework="pt") as f:
                missing = [name for name in TENSOR_KEYS if name not in f.keys()]
                if missing:
                    raise ValueError(f"missing tensor(s) {', '.join(missing)}")
                tensors = {name: f.get_tensor(name) for name in TENSOR_KEYS}
                header = f.metadata() or {}
            metadata = json.loads(header.get(METADATA_HEADER_KEY, "{}"))
            return cls(**tensors, metadata=metadata)
        except (ValueError, SafetensorError) as e:
            # Missing tensors, a bad header, bad JSON or inconsistent shapes: one line for the CLI.
            raise RotationFileError(f"{path}: {str(e).splitlines()[0]}") from e

    def _check_last_dim(self, x: torch.Tensor, name: str) -> None:
        if x.shape[-1:] != (self.d,):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected last dimension {self.d}")


def _as_float64_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        # Through torch, not .numpy(): numpy has no bfloat16.
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _as_square(R) -> np.ndarray:
    matrix = _as_float64_array(R.R if isinstance(R, Rotation) else R)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {matrix.shape}")
    return matrix


def _explained_variance(approx: np.ndarray, acts_src: np.ndarray, total: float) -> float:
    return 1.0 - float(np.sum((approx - acts_src) ** 2)) / total


def _quality(R: np.ndarray, mu_src: np.ndarray, mu_tgt: np.ndarray,
             acts_src: np.ndarray, acts_tgt: np.ndarray) -> dict:
    total = float(np.sum((acts_src - mu_src) ** 2))
    return {
        "rotation_ev": _explained_variance(acts_tgt @ R + (mu_src - mu_tgt @ R), acts_src, total),
        "identity_ev": _explained_variance(acts_tgt + (mu_src - mu_tgt), acts_src, total),
        "raw_ev": _explained_variance(acts_tgt, acts_src, total),
    }


def _paired_arrays(acts_src, acts_tgt) -> tuple[np.ndarray, np.ndarray]:
    shape_src, shape_tgt = tuple(acts_src.shape), tuple(acts_tgt.shape)
    if len(shape_src) != 2 or shape_src != shape_tgt:
        raise ValueError(f"acts_src {shape_src} and acts_tgt {shape_tgt} must share one shape [N, d]")
    if shape_src[0] < 2:
        raise ValueError(f"need at least 2 aligned rows to fit a rotation, got N={shape_src[0]}")
    return _as_float64_array(acts_src), _as_float64_array(acts_tgt)


def fit_quality(rotation: Rotation, acts_src, acts_tgt) -> dict:
    """Fraction of the source's centred variance that the mapped target activations explain.

    rotation_ev = 1 - ||A_tgt R + c - A_src||^2 / ||A_src - mu_src||^2. identity_ev is the same with
    R = I (means still aligned) and raw_ev compares A_tgt to A_src untouched. Trained model pairs
    reach a rotation_ev near 1 while their identity_ev stays low; untrained pairs reach neither.
    The batch need not be the one the rotation was fitted on: a held-out batch tests generalisation.
    """
    src, tgt = _paired_arrays(acts_src, acts_tgt)
    fitted = map(_as_float64_array, (rotation.R, rotation.mu_src, rotation.mu_tgt))
    return _quality(*fitted, src, tgt)


def fit_rotation(acts_src, acts_tgt, metadata: dict | None = None) -> Rotation:
    """Orthogonal Procrustes in float64 on centred, row-aligned activations [N, d].

    The returned metadata is the caller's, plus n_rows, d and the `fit_quality` numbers, so that a
    saved rotation carries how well it fitted.
    """
    src, tgt = _paired_arrays(acts_src, acts_tgt)
    mu_src, mu_tgt = src.mean(axis=0), tgt.mean(axis=0)
    R, _ = scipy.linalg.orthogonal_procrustes(tgt - mu_tgt, src - mu_src)
    fitted = {**(metadata or {}), "n_rows": src.shape[0], "d": src.shape[1],
              **_quality(R, mu_src, mu_tgt, src, tgt)}
    return Rotation(torch.from_numpy(R), torch.from_numpy(mu_src), torch.from_numpy(mu_tgt), fitted)


def transfer_sae(sae: torch.nn.Module, rotation: Rotation) -> torch.nn.Module:
    """A copy of a source-model SAE that reads the target model's activations directly.

    In the SAE's column convention the source activation is x_s = R^T x_t + c, so
    W_enc (x_s - b_pre) = (W_enc R^T)(x_t - R (b_pre - c)). Hence W_enc' = W_enc R^T,
    b_pre' = R (b_pre - c), and the decoder W_dec' = R W_dec puts the reconstruction in the target
    frame: it equals the source-frame reconstruction mapped back by `rotation.inverse()`. Features
    stay unit-norm because R is orthogonal; b_enc is unchanged.
    """
    d_in = sae.W_dec.shape[0]
    if d_in != rotation.d:
        raise ValueError(f"SAE reads d_in={d_in} but the rotation is {rotation.d}-dimensional")
    R, c = rotation.R, rotation.translation

    def float64(name: str) -> torch.Tensor:
        return getattr(sae, name).detach().to(device="cpu", dtype=torch.float64)

    transferred = copy.deepcopy(sae)
    with torch.no_grad():
        # copy_ casts back to each parameter's own dtype and device.
        transferred.W_enc.copy_(float64("W_enc") @ R.T)
        transferred.W_dec.copy_(R @ float64("W_dec"))
        transferred.b_pre.copy_(R @ (float64("b_pre") - c))
    return transferred


def frobenius_from_identity(R) -> float:
    """||R - I||_F."""
    matrix = _as_square(R)
    return float(np.linalg.norm(matrix - np.eye(len(matrix))))


def haar_frobenius_prediction(d: int) -> float:
    """sqrt(2d), the typical ||R - I||_F of a Haar-random R in O(d).

    ||R - I||_F^2 = tr(R^T R) - 2 tr R + d = 2d - 2 tr R for orthogonal R, and E[tr R] = 0 under the
    Haar measure on O(d) (the measure is invariant under R -> -R). The trace has O(1) spread, so the
    norm concentrates at sqrt(2d); a ratio well below 1 means R sits closer to the identity.
    """
    return math.sqrt(2 * d)


def orthogonality_error(R) -> float:
    """||R^T R - I||_F (Frobenius, not max-abs): how far a stored R has drifted off O(d)."""
    matrix = _as_square(R)
    return float(np.linalg.norm(matrix.T @ matrix - np.eye(len(matrix))))


def determinant(R) -> float:
    return float(np.linalg.det(_as_square(R)))


def operator_norm(R) -> float:
    """Largest singular value; 1 for any orthogonal R."""
    return float(np.linalg.norm(_as_square(R), ord=2))


def signed_permutation_distance(R) -> float:
    """||R - P||_F for the signed permutation P nearest R.

    The permutation maximises sum |R_ij| over its support (Hungarian), which minimises ||R - P||_F
    once each sign is taken from R's entry; 0 means the two models differ only by relabelling and
    flipping neurons.
    """
    matrix = _as_square(R)
    rows, cols = scipy.optimize.linear_sum_assignment(np.abs(matrix), maximize=True)
    P = np.zeros_like(matrix)
    P[rows, cols] = np.where(matrix[rows, cols] < 0, -1.0, 1.0)
    return float(np.linalg.norm(matrix - P))


def eigen_angles(R) -> np.ndarray:
    """|arg lambda| in [0, pi] for all d eigenvalues of an orthogonal R, ascending.

    An orthogonal R is normal with eigenvalues e^{+-i theta}, so its symmetric part (R + R^T) / 2
    has the eigenvalues cos theta with the same multiplicities (each conjugate pair gives its angle
    twice). The symmetric solver is an order of magnitude faster than a general eigensolve at
    d = 512, which matters when drawing Haar references, and it never leaves spurious imaginary
    parts on eigenvalues +-1. The identity needs R orthogonal, hence the check.
    """
    matrix = _as_square(R)
    error = orthogonality_error(matrix)
    if error > ORTHOGONALITY_TOLERANCE:
        raise ValueError(f"eigen_angles needs an orthogonal matrix, ||R^T R - I||_F = {error:.3g}")
    cosines = np.linalg.eigvalsh((matrix + matrix.T) / 2)
    return np.arccos(np.clip(cosines, -1.0, 1.0))[::-1]


def haar_rotation(d: int, seed: int) -> torch.Tensor:
    """One Haar-random element of O(d) (either determinant), float64."""
    return torch.from_numpy(scipy.stats.ortho_group.rvs(d, random_state=seed))


def haar_angles(d: int, n_samples: int = 10, seed: int = 31) -> np.ndarray:
    """The eigen-angles of n_samples Haar O(d) draws, concatenated: the null sample for KS tests."""
    draws = scipy.stats.ortho_group.rvs(d, size=n_samples, random_state=seed).reshape(n_samples, d, d)
    return np.concatenate([eigen_angles(draw) for draw in draws])


def ks_vs_haar(angles, haar=None, *, d: int | None = None, n_samples: int = 10, seed: int = 31) -> dict:
    """Two-sample KS of eigen-angles against Haar angles (given, or drawn for dimension d).

    The angles of one matrix are not independent (they come in conjugate pairs and repel), so the
    p-value is a yardstick for comparing rotations rather than an exact test level.
    """
    if haar is None:
        if d is None:
            raise ValueError("ks_vs_haar needs either Haar angles or the dimension d to draw them")
        haar = haar_angles(d, n_samples, seed)
    result = scipy.stats.ks_2samp(np.asarray(angles), np.asarray(haar))
    return {"statistic": float(result.statistic), "pvalue": float(result.pvalue)}


def rotation_statistics(R, *, haar_seed: int = 31, n_haar: int = 10) -> dict:
    """Every per-rotation number the paper reports, as plain floats; R must be orthogonal."""
    matrix = _as_square(R)
    d = len(matrix)
    angles = eigen_angles(matrix)
    ks = ks_vs_haar(angles, d=d, n_samples=n_haar, seed=haar_seed)
    frob = frobenius_from_identity(matrix)
    return {
        "d": d,
        "frob_from_identity": frob,
        "haar_prediction": haar_frobenius_prediction(d),
        "frob_ratio": frob / haar_frobenius_prediction(d),
        "orthogonality_error": orthogonality_error(matrix),
        "det": determinant(matrix),
        "operator_norm": operator_norm(matrix),
        "signed_perm_distance": signed_permutation_distance(matrix),
        "ks_statistic": ks["statistic"],
        "ks_pvalue": ks["pvalue"],
        "mean_cos_angle": float(np.mean(np.cos(angles))),
    }


def pooled_statistics(Rs: list, *, haar_seed: int = 31, n_haar: int = 10) -> dict:
    """KS and mean cos theta over the eigen-angles of several same-d rotations pooled together.

    Pooling gives the KS test power that one d-dimensional rotation lacks; the per-rotation p-value
    range shows whether a pooled verdict is carried by a few pairs.
    """
    matrices = [_as_square(R) for R in Rs]
    if not matrices:
        raise ValueError("pooled_statistics needs at least one rotation")
    dims = sorted({len(matrix) for matrix in matrices})
    if len(dims) > 1:
        raise ValueError(f"pooled_statistics needs rotations of one dimension, got d in {dims}")
    haar = haar_angles(dims[0], n_haar, haar_seed)
    per_rotation = [eigen_angles(matrix) for matrix in matrices]
    pooled = np.concatenate(per_rotation)
    ks = ks_vs_haar(pooled, haar)
    pvalues = [ks_vs_haar(angles, haar)["pvalue"] for angles in per_rotation]
    return {
        "n_rotations": len(matrices),
        "d": dims[0],
        "ks_statistic": ks["statistic"],
        "ks_pvalue": ks["pvalue"],
        "mean_cos_angle": float(np.mean(np.cos(pooled))),
        "pvalue_min": min(pvalues),
        "pvalue_max": max(pvalues),
    }


def small_angle_rotation(d: int, max_angle: float, seed: int) -> torch.Tensor:
    """exp(S) for a random skew S scaled so every eigen-angle is at most max_angle.

    The eigenvalues of a real skew matrix are +-i theta_k and exp maps them to e^{+-i theta_k}, so
    scaling S to spectral norm max_angle bounds the angles: a rotation clearly unlike Haar, used to
    check that the KS test has power.
    """
    gaussian = np.random.default_rng(seed).standard_normal((d, d))
    skew = gaussian - gaussian.T
    skew *= max_angle / np.linalg.norm(skew, ord=2)
    return torch.from_numpy(scipy.linalg.expm(skew))


# ---------------------------------------------------------------- determinacy: the part of R the data fix
#
# Procrustes on centred rows maximises tr(R^T C) over O(d), C = A_tgt^T A_src = U S V^T, at R = U V^T.
# Write any orthogonal R as U Q V^T: tr(R^T C) = sum_i s_i Q_ii. Turning Q by a small angle e in the
# plane of directions (i, j) lowers the objective by (s_i + s_j)(1 - cos e) ~ (s_i + s_j) e^2 / 2, so
# the data pin R down along directions with large singular values and leave it free where s_i and
# s_j are both ~0: a residual site whose last principal directions hold 1e-6 of the variance has an
# R that is arbitrary there, and statistics of the whole of R then partly measure noise.
#
# The determined part is the leading k singular pairs (U_k, V_k) of C, k the fewest whose singular
# values hold DETERMINED_FRACTION of their sum (the nuclear norm, i.e. the Procrustes objective at its
# optimum). R maps them exactly, u_i^T R = v_i^T. Restricted to them, R is the k x k compression
# M = U_k^T R U_k (= V_k^T U_k for the fitted R, so it depends on the data's leading directions only),
# made orthogonal by its polar factor: R_det = polar(M) in O(k). Two facts make R_det a fair statistic:
#   - R = I on the determined directions (R u_i = u_i) gives M = I, so R_det = I;
#   - for Haar R in O(d) and U_k fixed, R_det is Haar in O(k): for Q in O(k) put
#     Q~ = U_k Q U_k^T + (I - U_k U_k^T) in O(d); Q~ R is Haar too and its compression is Q M, and
#     polar(Q M) = Q polar(M), so the law of R_det is invariant under every Q: it is Haar on O(k).
# Hence ||R_det - I||_F / sqrt(2k) and the eigen-angles of R_det against Haar O(k) are the paper's
# statistics on the part of R the data determine, with the paper's nulls (haar_frobenius_prediction(k),
# haar_angles(k)). The weighted variant needs no cut-off: with w_i = s_i / sum s,
# ||R - I||_w^2 = sum_i w_i ||u_i^T (R - I)||^2 has expectation 2 under Haar (each row of R - I has
# E||.||^2 = 2), so weighted_frob_ratio = ||R - I||_w / sqrt(2) is 1 for Haar and 0 for R = I there.

DETERMINED_FRACTION = 0.99
# Decorator: run with one BLAS thread. The rotation maths makes many small d x d decompositions, where
# threads only add start-up and, on a loaded machine, oversubscription: a 64 x 64 SVD took 0.115 s
# with OpenBLAS's default threads on 2 busy cores against 0.0017 s with one, and a 3-draw power curve
# at d = 64, 34 s against 2 s.
one_blas_thread = threadpool_limits.wrap(limits=1, user_api="blas")
# An eigen-angle of R_a R_b^T above this (radians) counts as a direction in which two fits disagree.
TURNED_ANGLE = 0.1


def _covariance_eigenvalues(acts) -> np.ndarray:
    x = _as_float64_array(acts)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need activations [N >= 2, d], got shape {x.shape}")
    x = x - x.mean(axis=0)
    return np.clip(np.linalg.eigvalsh(x.T @ x / (len(x) - 1))[::-1], 0.0, None)


def _count_for_fraction(values: np.ndarray, fraction: float) -> int:
    """The fewest leading entries of a descending, non-negative `values` that hold `fraction` of its sum."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    total = values.sum()
    if total <= 0:
        return 0
    return int(min(len(values), np.searchsorted(np.cumsum(values) / total, fraction - 1e-12) + 1))


def participation_ratio(acts) -> float:
    """(sum lambda)^2 / sum lambda^2 over the covariance eigenvalues: d for isotropic rows, 1 for one direction."""
    lam = _covariance_eigenvalues(acts)
    return float(lam.sum() ** 2 / np.sum(lam ** 2)) if lam.sum() > 0 else 0.0


def variance_dims(acts, fraction: float = DETERMINED_FRACTION) -> int:
    """How many principal directions hold `fraction` of the centred variance."""
    return _count_for_fraction(_covariance_eigenvalues(acts), fraction)


@dataclass(frozen=True, eq=False)
class DeterminedPart:
    """The singular pairs of the cross-covariance C = A_tgt^T A_src (centred rows), descending:
    U [d, d] target-frame directions, V [d, d] their source-frame images, s the d singular values;
    the first k are the determined part."""

    U: np.ndarray
    V: np.ndarray
    s: np.ndarray
    k: int

    @property
    def d(self) -> int:
        return len(self.s)

    @property
    def weights(self) -> np.ndarray:
        """w_i = s_i / sum s (uniform when C = 0)."""
        total = self.s.sum()
        return self.s / total if total > 0 else np.full(self.d, 1.0 / self.d)


def determined_part(acts_src, acts_tgt, fraction: float = DETERMINED_FRACTION) -> DeterminedPart:
    """The directions the data determine R along (see the section comment above)."""
    src, tgt = _paired_arrays(acts_src, acts_tgt)
    C = (tgt - tgt.mean(axis=0)).T @ (src - src.mean(axis=0))
    U, s, Vt = np.linalg.svd(C)
    return DeterminedPart(U, Vt.T, s, max(1, _count_for_fraction(s, fraction)))


def _check_part(matrix: np.ndarray, part: DeterminedPart) -> None:
    if matrix.shape[0] != part.d:
        raise ValueError(f"R is {matrix.shape[0]}-dimensional, the determined part lives in {part.d}")


def restrict(R, part: DeterminedPart) -> np.ndarray:
    """R_det = polar(U_k^T R U_k) in O(k): R on its determined part (Haar O(k) when R is Haar O(d))."""
    matrix = _as_square(R)
    _check_part(matrix, part)
    U_k = part.U[:, :part.k]
    orthogonal, _ = scipy.linalg.polar(U_k.T @ matrix @ U_k)
    return orthogonal


def determined_frobenius(R, part: DeterminedPart) -> float:
    """||U_k^T R||_F: the size of R (or of a difference of rotations) along the determined directions."""
    matrix = _as_square(R)
    _check_part(matrix, part)
    return float(np.linalg.norm(part.U[:, :part.k].T @ matrix))


def determined_statistics(R, part: DeterminedPart, *, haar_seed: int = 31, n_haar: int = 10) -> dict:
    """The paper's rotation statistics on R's determined part (R_det = restrict(R, part)) and the
    singular-value-weighted Frobenius ratio; every ratio is ~1 for Haar R and 0 for R = I there."""
    matrix = _as_square(R)
    R_det = restrict(matrix, part)
    angles = eigen_angles(R_det)
    ks = ks_vs_haar(angles, d=part.k, n_samples=n_haar, seed=haar_seed)
    row_norms = np.sum((part.U.T @ (matrix - np.eye(len(matrix)))) ** 2, axis=1)
    frob = frobenius_from_identity(R_det)
    return {
        "det_k": part.k,
        "det_frob_from_identity": frob,
        "det_frob_ratio": frob / haar_frobenius_prediction(part.k),
        "det_ks_statistic": ks["statistic"],
        "det_ks_pvalue": ks["pvalue"],
        "det_mean_cos_angle": float(np.mean(np.cos(angles))),
        "weighted_frob_ratio": math.sqrt(float(np.sum(part.weights * row_norms)) / 2.0),
    }


def split_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random halves of n rows, of equal size (the odd row out is left out)."""
    if n < 4:
        raise ValueError(f"a split into halves needs at least 4 rows, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return order[:half], order[half:2 * half]


def split_half_stability(acts_src, acts_tgt, *, seed: int = 0, fraction: float = DETERMINED_FRACTION) -> dict:
    """R fitted on two disjoint halves of the rows, R_a and R_b, compared.

    split_frob = ||R_a - R_b||_F (0 when the data fix R; ~sqrt(2 d_free) when d_free directions are
    arbitrary), split_det_frob = ||U_k^T (R_a - R_b)||_F on the determined part of the whole batch,
    split_max_angle and split_n_turned: the largest eigen-angle of R_a R_b^T and how many exceed
    TURNED_ANGLE (in how many directions the fits disagree), split_det_max_angle the same for
    restrict(R_a) restrict(R_b)^T.
    """
    src, tgt = _paired_arrays(acts_src, acts_tgt)
    a, b = split_halves(len(src), seed)
    R_a, R_b = (fit_rotation(src[rows], tgt[rows]).R.numpy() for rows in (a, b))
    part = determined_part(src, tgt, fraction)
    angles = eigen_angles(R_a @ R_b.T)
    det_angles = eigen_angles(restrict(R_a, part) @ restrict(R_b, part).T)
    return {
        "split_frob": float(np.linalg.norm(R_a - R_b)),
        "split_det_frob": determined_frobenius(R_a - R_b, part),
        "split_max_angle": float(angles.max()),
        "split_n_turned": int(np.sum(angles > TURNED_ANGLE)),
        "split_det_max_angle": float(det_angles.max()),
    }


@one_blas_thread
def determinacy(acts_src, acts_tgt, R, *, seed: int = 0, fraction: float = DETERMINED_FRACTION,
                haar_seed: int = 31, n_haar: int = 10) -> dict:
    """Everything about how far the data determine R, for one pair and site: the effective rank of
    both sides (participation ratio, dimensions holding `fraction` of the variance), the rotation
    statistics on the determined part, and split-half stability."""
    part = determined_part(acts_src, acts_tgt, fraction)
    return {
        "src_participation_ratio": participation_ratio(acts_src),
        "tgt_participation_ratio": participation_ratio(acts_tgt),
        "src_dims_99": variance_dims(acts_src, fraction),
        "tgt_dims_99": variance_dims(acts_tgt, fraction),
        **determined_statistics(R, part, haar_seed=haar_seed, n_haar=n_haar),
        **split_half_stability(acts_src, acts_tgt, seed=seed, fraction=fraction),
    }


def partial_haar_rotation(d: int, fixed: float, seed: int) -> torch.Tensor:
    """Haar-random on a random subspace of round((1 - fixed) d) dimensions, the identity on the rest:
    `fixed` = 0 is a Haar draw, 1 the identity, and in between R is 'Haar except for a fixed part',
    the departure a shared basis (Cohort A's frozen embeddings) would leave."""
    if not 0.0 <= fixed <= 1.0:
        raise ValueError(f"fixed must lie in [0, 1], got {fixed}")
    rng = np.random.default_rng(seed)
    turned = round((1.0 - fixed) * d)
    basis = scipy.stats.ortho_group.rvs(d, random_state=rng) if d > 1 else np.ones((1, 1))
    inner = np.eye(d)
    if turned >= 2:
        inner[:turned, :turned] = scipy.stats.ortho_group.rvs(turned, random_state=rng)
    elif turned == 1:
        inner[0, 0] = rng.choice([-1.0, 1.0])
    return torch.from_numpy(basis @ inner @ basis.T)

"""Which map from the target model's activations to the source's suffices: a ladder of map classes,
each fitted by least squares on aligned rows, and linear CKA beside them.

Every map takes target rows x (row vectors, as polyrot.core.rotation) into the source frame:

  identity            x - mu_t + mu_s                        the means aligned, nothing turned
  signed_permutation  (x - mu_t) P + mu_s                    P the signed permutation nearest the
                                                             orthogonal fit's objective (Hungarian on
                                                             |C|, C = A_t^T A_s centred, signs of C)
  orthogonal          (x - mu_t) Q + mu_s                    Procrustes, Q in O(d) (the paper's map)
  orthogonal_scale    s (x - mu_t) Q + mu_s                  s = tr(Q^T C) / ||A_t||^2, optimal for Q
  linear              x W                                    least squares, no intercept, uncentred
  affine              x W + b                                least squares with an intercept

On the rows they were fitted on, EV can only grow where one class contains another: identity and
signed_permutation <= orthogonal (both lie in O(d)) <= orthogonal_scale <= affine, and linear <=
affine. The step from orthogonal to affine measures what a rotation misses; "rotation suffices" is
that step being small on held-out rows.

EV of a map = 1 - ||map(A_t) - A_s||^2 / ||A_s - mu_s||^2 (the source's centred variance), as
polyrot.core.rotation.fit_quality.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize
import torch

from polyrot.core.rotation import one_blas_thread, split_halves

MAPS = ("identity", "signed_permutation", "orthogonal", "orthogonal_scale", "linear", "affine")


def _array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _pair(acts_src, acts_tgt) -> tuple[np.ndarray, np.ndarray]:
    src, tgt = _array(acts_src), _array(acts_tgt)
    if src.ndim != 2 or src.shape != tgt.shape:
        raise ValueError(f"acts_src {src.shape} and acts_tgt {tgt.shape} must share one shape [N, d]")
    if len(src) < 2:
        raise ValueError(f"need at least 2 aligned rows to fit a map, got N={len(src)}")
    return src, tgt


@dataclass(frozen=True, eq=False)
class Map:
    """x -> x W + b (float64): every map class above in this one form."""

    kind: str
    W: np.ndarray
    b: np.ndarray

    def apply(self, acts) -> np.ndarray:
        return _array(acts) @ self.W + self.b


def fit_map(kind: str, acts_src, acts_tgt) -> Map:
    """The least-squares map of class `kind` (one of MAPS) from target rows to source rows."""
    if kind not in MAPS:
        raise ValueError(f"unknown map {kind!r}; maps: {', '.join(MAPS)}")
    src, tgt = _pair(acts_src, acts_tgt)
    d = src.shape[1]
    mu_s, mu_t = src.mean(axis=0), tgt.mean(axis=0)
    S, T = src - mu_s, tgt - mu_t
    if kind == "linear":
        W = np.linalg.lstsq(tgt, src, rcond=None)[0]
        return Map(kind, W, np.zeros(d))
    if kind == "affine":
        W = np.linalg.lstsq(T, S, rcond=None)[0]  # centring solves the intercept exactly
        return Map(kind, W, mu_s - mu_t @ W)
    if kind == "identity":
        W = np.eye(d)
    elif kind == "signed_permutation":
        C = T.T @ S
        rows, cols = scipy.optimize.linear_sum_assignment(np.abs(C), maximize=True)
        W = np.zeros((d, d))
        W[rows, cols] = np.where(C[rows, cols] < 0, -1.0, 1.0)
    else:
        W, _ = scipy.linalg.orthogonal_procrustes(T, S)
        if kind == "orthogonal_scale":
            norm = float(np.sum(T ** 2))
            W = W * (float(np.sum(W * (T.T @ S))) / norm if norm > 0 else 1.0)
    return Map(kind, W, mu_s - mu_t @ W)


def map_ev(mapping: Map, acts_src, acts_tgt) -> float:
    """Fraction of the source's centred variance the mapped target rows explain."""
    src, tgt = _pair(acts_src, acts_tgt)
    total = float(np.sum((src - src.mean(axis=0)) ** 2))
    return 1.0 - float(np.sum((mapping.apply(tgt) - src) ** 2)) / total


def fit_maps(acts_src, acts_tgt) -> dict[str, Map]:
    """{kind: fitted map} for every class in MAPS."""
    return {kind: fit_map(kind, acts_src, acts_tgt) for kind in MAPS}


def linear_cka(X, Y) -> float:
    """Linear CKA of two row-aligned representations [N, d_x], [N, d_y]:
    ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F), centred; 1 for X and any scaled rotation
    of it, invariant to orthogonal maps and isotropic scaling but not to general linear ones."""
    x, y = _array(X), _array(Y)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"CKA needs row-aligned matrices, got shapes {x.shape} and {y.shape}")
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    denominator = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.linalg.norm(y.T @ x) ** 2 / denominator) if denominator > 0 else 0.0



@one_blas_thread
def held_out_maps(acts_src, acts_tgt, *, seed: int = 0) -> tuple[dict[str, float], dict[str, np.ndarray], np.ndarray]:
    """Every map fitted on one random half of the rows and applied to the other (split_halves):
    ({kind: EV on the held-out half}, {kind: the held-out target rows mapped}, the held-out source rows)."""
    src, tgt = _pair(acts_src, acts_tgt)
    fit, held = split_halves(len(src), seed)
    maps = fit_maps(src[fit], tgt[fit])
    return ({kind: map_ev(m, src[held], tgt[held]) for kind, m in maps.items()},
            {kind: m.apply(tgt[held]) for kind, m in maps.items()}, src[held])

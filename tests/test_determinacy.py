"""Rotation determinacy, the calibrated nulls and power of the rotation statistics, and the map
ladder with CKA, against planted ground truth at toy size."""

import numpy as np
import pytest
import torch

from polyrot.core import nulls
from polyrot.core.maps import MAPS, fit_map, fit_maps, linear_cka, map_ev
from polyrot.core.rotation import (
    determinacy,
    determined_part,
    determined_statistics,
    eigen_angles,
    fit_rotation,
    haar_rotation,
    partial_haar_rotation,
    participation_ratio,
    restrict,
    small_angle_rotation,
    split_half_stability,
    variance_dims,
)

D = 16


def low_rank_rows(n: int = 2000, d: int = D, rank: int = 8, tail: float = 1e-4, seed: int = 0) -> np.ndarray:
    """Rows whose last d - rank principal directions hold almost nothing, as at a residual site."""
    rng = np.random.default_rng(seed)
    scales = np.r_[np.linspace(3.0, 1.0, rank), np.full(d - rank, tail)]
    basis = haar_rotation(d, seed + 100).numpy()
    return 5.0 + (rng.standard_normal((n, d)) * scales) @ basis


def test_effective_rank_counts_the_directions_that_hold_variance():
    x = low_rank_rows()
    assert variance_dims(x, 0.99) == 8
    lam = np.linspace(3.0, 1.0, 8) ** 2  # the planted variances; the unequal ones pull it below the rank
    assert participation_ratio(x) == pytest.approx(lam.sum() ** 2 / np.sum(lam ** 2), rel=0.05)
    iso = np.random.default_rng(1).standard_normal((5000, D))
    assert participation_ratio(iso) == pytest.approx(D, rel=0.05)


def test_planted_exact_rotation_is_split_half_stable_on_the_determined_part():
    x = low_rank_rows()
    Q = haar_rotation(D, 3).numpy()
    rng = np.random.default_rng(2)
    target = x @ Q + 1e-3 * rng.standard_normal(x.shape)  # noise swamps the 1e-4 tail only
    stats = split_half_stability(x, target, seed=0)
    assert stats["split_det_frob"] < 1e-2 and stats["split_det_max_angle"] < 1e-2
    # Off the determined part the two fits disagree wildly: R is arbitrary there.
    assert stats["split_frob"] > 1.0 and stats["split_n_turned"] >= 2
    part = determined_part(x, target)
    assert part.k == 8
    R = fit_rotation(x, target).R.numpy()
    # R maps each determined target direction onto its source image exactly: u_i^T R = v_i^T.
    np.testing.assert_allclose(part.U[:, :part.k].T @ R, part.V[:, :part.k].T, atol=1e-6)


def test_same_model_pair_gives_identity_on_the_determined_part_only():
    x = low_rank_rows(tail=1e-5)
    src, tgt = nulls.same_model_pair(x)
    R = fit_rotation(src, tgt).R.numpy()
    stats = determinacy(src, tgt, R)
    assert stats["det_frob_ratio"] < 1e-2 and stats["weighted_frob_ratio"] < 1e-2
    assert stats["det_mean_cos_angle"] > 0.9999
    # The whole R is far from I: the bf16 rounding noise decides it on the empty directions.
    assert np.linalg.norm(R - np.eye(D)) > 1.0


def test_restriction_of_identity_and_of_haar():
    x = low_rank_rows()
    part = determined_part(x, x)
    np.testing.assert_allclose(restrict(np.eye(D), part), np.eye(part.k), atol=1e-12)
    R_det = restrict(haar_rotation(D, 5), part)
    assert R_det.shape == (part.k, part.k)
    np.testing.assert_allclose(R_det.T @ R_det, np.eye(part.k), atol=1e-10)


def test_restricted_haar_is_haar_in_the_smaller_group():
    """R_det of Haar R in O(d) is Haar in O(k): its mean cos angle is ~0 and its KS p-values are
    not small, as for Haar O(k) draws (the derivation in rotation.py)."""
    x = low_rank_rows()
    part = determined_part(x, x)
    cosines = [np.mean(np.cos(eigen_angles(restrict(haar_rotation(D, s), part)))) for s in range(200)]
    assert abs(np.mean(cosines)) < 0.03
    p = [determined_statistics(haar_rotation(D, s), part)["det_ks_pvalue"] for s in range(20)]
    assert np.median(p) > 0.3


def test_small_angle_rotation_is_rejected_and_haar_is_not():
    x = low_rank_rows(n=1000)
    refs = nulls.References(n_mc=100)
    curve = nulls.power_curve(x, angles=(0.2,), fixed=(0.5,), draws=6, references=refs)
    rates = {(k, s): r for k, s, r in zip(curve["kind"], curve["statistic"], curve["rate"])}
    for statistic in nulls.STATISTICS:
        assert rates["angle", statistic] == 1.0, statistic
        assert rates["haar", statistic] <= 1 / 6, statistic
    assert set(nulls.detection(curve)) == {f"{k}.{s}" for k in ("angle", "fixed") for s in nulls.STATISTICS}


def test_monte_carlo_pvalues_are_calibrated_under_haar_and_the_asymptotic_ks_is_not():
    """The Monte-Carlo Frobenius p-value is uniform under Haar by construction; a test of it. The
    Monte-Carlo KS p has the size it claims (the KS distance of d angles takes a dozen values, so
    ties leave it a little conservative rather than uniform). The asymptotic KS p of the same
    statistic never rejects a Haar draw: one matrix's angles repel, so it sits near 1."""
    ref = nulls.HaarReference.draw(D, n_mc=200, seed=7)
    haar = [haar_rotation(D, 1000 + s) for s in range(300)]
    assert nulls.pvalue_uniformity([ref.frob_pvalue(R) for R in haar]) > 0.01
    ks_mc = np.array([ref.ks_mc_pvalue(R) for R in haar])
    assert 0.005 < np.mean(ks_mc < nulls.ALPHA) < nulls.ALPHA + 0.03 and 0.4 < np.median(ks_mc) < 0.7
    asymptotic = np.array([ref.ks_pvalue(R) for R in haar])
    assert np.mean(asymptotic < nulls.ALPHA) == 0 and np.median(asymptotic) > 0.8
    # And a rotation near the identity gets the smallest p there is.
    near = small_angle_rotation(D, 0.1, 0)
    assert ref.frob_pvalue(near) == ref.ks_mc_pvalue(near) == pytest.approx(1 / 201)


def test_partial_haar_fixes_its_share_of_directions():
    R = partial_haar_rotation(D, 0.5, 0).numpy()
    np.testing.assert_allclose(R.T @ R, np.eye(D), atol=1e-10)
    assert np.sum(eigen_angles(R) < 1e-6) >= D // 2  # arccos near 1 resolves ~1e-8
    np.testing.assert_allclose(partial_haar_rotation(D, 1.0, 0).numpy(), np.eye(D), atol=1e-10)
    with pytest.raises(ValueError, match="fixed must lie"):
        partial_haar_rotation(D, 1.5, 0)


def test_map_ladder_on_the_rows_it_was_fitted_on():
    rng = np.random.default_rng(4)
    src = rng.standard_normal((500, D)) * np.linspace(2, 0.5, D) + 3.0
    A = rng.standard_normal((D, D))
    tgt = src @ A + 1.0 + 0.1 * rng.standard_normal(src.shape)  # not a rotation: a linear map
    ev = {kind: map_ev(m, src, tgt) for kind, m in fit_maps(src, tgt).items()}
    assert set(ev) == set(MAPS)
    assert ev["linear"] >= ev["orthogonal"] - 1e-12
    assert ev["affine"] >= ev["orthogonal_scale"] - 1e-12 >= ev["orthogonal"] - 2e-12
    assert ev["orthogonal"] >= max(ev["identity"], ev["signed_permutation"]) - 1e-12
    assert ev["affine"] >= ev["linear"] - 1e-12 and ev["affine"] > 0.95


def test_maps_recover_their_own_class():
    rng = np.random.default_rng(5)
    src = rng.standard_normal((400, D))
    perm = rng.permutation(D)
    P = np.zeros((D, D))
    P[np.arange(D), perm] = rng.choice([-1.0, 1.0], D)
    # target = source in a signed-permuted basis: the signed permutation map undoes it exactly.
    tgt = src @ P.T
    assert map_ev(fit_map("signed_permutation", src, tgt), src, tgt) == pytest.approx(1.0, abs=1e-12)
    Q = haar_rotation(D, 6).numpy()
    tgt = 2.5 * src @ Q
    assert map_ev(fit_map("orthogonal_scale", src, tgt), src, tgt) == pytest.approx(1.0, abs=1e-10)
    assert map_ev(fit_map("orthogonal", src, tgt), src, tgt) < 0.99
    with pytest.raises(ValueError, match="unknown map"):
        fit_map("conformal", src, tgt)


def test_linear_cka_against_the_gram_definition():
    rng = np.random.default_rng(6)
    X, Y = rng.standard_normal((60, 5)), rng.standard_normal((60, 7))
    n = len(X)
    H = np.eye(n) - 1.0 / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    reference = np.sum(K * L) / np.sqrt(np.sum(K * K) * np.sum(L * L))
    assert linear_cka(X, Y) == pytest.approx(reference, rel=1e-10)
    Q = haar_rotation(5, 1).numpy()
    assert linear_cka(X, 3.0 * X @ Q + 2.0) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(torch.as_tensor(X), torch.as_tensor(X)) == pytest.approx(1.0)

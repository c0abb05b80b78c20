import math

import pytest
import torch

from polyrot.core.metrics import (
    dead_fraction,
    decoder_cosine,
    explained_variance,
    firing_correlation,
    firing_summary,
    l0,
    mse,
)


def test_explained_variance_of_mean_prediction_is_zero():
    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(500, 7, generator=g, dtype=torch.float64) + 10.0
    x_hat = x.mean(dim=0).expand_as(x)
    assert abs(explained_variance(x, x_hat)) < 1e-12


def test_explained_variance_of_perfect_reconstruction_is_one():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(1))
    assert explained_variance(x, x.clone()) == 1.0


def test_explained_variance_and_mse_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    x_hat = torch.tensor([[1.0, 3.0], [3.0, 3.0], [4.0, 9.0]])
    # SSE = 1 + 1 + 1 = 3; column means (3, 5): SST = (4 + 0 + 4) + (9 + 1 + 16) = 34
    assert explained_variance(x, x_hat) == pytest.approx(1 - 3 / 34, abs=1e-15)
    assert mse(x, x_hat) == pytest.approx(0.5, abs=1e-15)


def test_explained_variance_is_pooled_over_dims_not_averaged():
    # dim 0 is perfect, dim 1 (100x the variance) is predicted by its mean:
    # pooled EV ~ 1/101, whereas a per-dim average would give 0.5
    x = torch.tensor([[1.0, 10.0], [-1.0, -10.0]])
    x_hat = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert explained_variance(x, x_hat) == pytest.approx(2 / 202, abs=1e-15)


def test_explained_variance_edge_cases():
    x = torch.ones(4, 3)
    assert math.isnan(explained_variance(x, x))
    with pytest.raises(ValueError, match="shape mismatch"):
        explained_variance(torch.zeros(4, 3), torch.zeros(4, 2))


def test_l0_and_dead_fraction_by_hand():
    f = torch.tensor([[0.0, 1.0, 0.0, 2.0],
                      [0.0, 0.0, 0.0, 3.0],
                      [0.0, 5.0, 0.0, 0.0]])
    assert l0(f) == pytest.approx(4 / 3, abs=1e-15)
    assert dead_fraction(f) == 0.5
    assert l0(torch.zeros(3, 4)) == 0.0
    assert dead_fraction(torch.zeros(3, 4)) == 1.0
    assert dead_fraction(torch.ones(3, 4)) == 0.0


def test_decoder_cosine_of_permuted_rescaled_copy_is_one_both_ways():
    g = torch.Generator().manual_seed(0)
    W_a = torch.randn(16, 10, generator=g)
    perm = torch.randperm(10, generator=g)
    W_b = W_a[:, perm] * (0.5 + torch.rand(10, generator=g))  # positive rescaling keeps direction
    out = decoder_cosine(W_a, W_b)
    for key in ("max_mean", "hungarian_mean"):
        assert out[key] == pytest.approx(1.0, abs=1e-12)
    assert out["max_frac_above"] == 1.0
    assert out["hungarian_frac_above"] == 1.0
    assert torch.equal(out["hungarian_match"], perm)


def test_decoder_cosine_hungarian_forbids_sharing_a_feature():
    e1, e2, e3 = torch.eye(3, dtype=torch.float64)
    W_a = torch.stack([e1, e2], dim=1)
    b2 = e1 + 0.3 * e3  # close to e1, orthogonal to e2
    W_b = torch.stack([e1, b2], dim=1)
    out = decoder_cosine(W_a, W_b, threshold=0.5)
    cos_b2_e1 = 1 / math.sqrt(1.09)
    assert out["max_mean"] == pytest.approx((1 + cos_b2_e1) / 2, abs=1e-12)
    assert out["max_frac_above"] == 1.0
    # one-to-one: b1 takes e1, so b2 must take e2 with cosine 0
    assert out["hungarian_mean"] == pytest.approx(0.5, abs=1e-12)
    assert out["hungarian_frac_above"] == 0.5
    assert out["hungarian_match"].tolist() == [0, 1]
    assert out["hungarian_mean"] < out["max_mean"]


def test_decoder_cosine_is_signed_and_scores_unmatched_as_zero():
    e1, e2 = torch.eye(2)
    out = decoder_cosine(e1[:, None], -e1[:, None])
    assert out["max_mean"] == pytest.approx(-1.0, abs=1e-12)
    assert out["hungarian_mean"] == pytest.approx(-1.0, abs=1e-12)

    out = decoder_cosine(e1[:, None], torch.stack([e2, e1], dim=1))
    assert out["hungarian_match"].tolist() == [-1, 0]
    assert out["hungarian_cos"].tolist() == [0.0, 1.0]
    assert out["max_cos"].tolist() == [0.0, 1.0]


def test_decoder_cosine_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="equal d"):
        decoder_cosine(torch.zeros(4, 3), torch.zeros(5, 3))


def test_firing_correlation_identical_is_one():
    f = torch.relu(torch.randn(1000, 20, generator=torch.Generator().manual_seed(0)))
    r = firing_correlation(f, f)
    assert torch.allclose(r, torch.ones(20, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(firing_correlation(f, -2 * f + 1), -torch.ones(20, dtype=torch.float64), atol=1e-12)


def test_firing_correlation_independent_noise_is_near_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(20000, 50, generator=g))
    b = torch.relu(torch.randn(20000, 50, generator=g))
    r = firing_correlation(a, b)
    # each r has std ~ 1/sqrt(20000) = 0.007
    assert r.abs().max() < 0.05
    assert abs(r.mean().item()) < 0.01


def test_firing_correlation_matches_numpy_on_a_known_pair():
    a = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    b = torch.tensor([[1.0], [3.0], [2.0], [5.0]])
    # centred: a = (-1.5, -.5, .5, 1.5), b = (-1.75, .25, -.75, 2.25); cov 5.5, |a|^2 5, |b|^2 8.75
    assert firing_correlation(a, b).item() == pytest.approx(5.5 / math.sqrt(5 * 8.75), abs=1e-12)


def test_firing_correlation_constant_feature_is_zero_not_nan():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(100, 3, generator=g)
    b = a.clone()
    a[:, 0] = 0.0  # dead in a
    b[:, 1] = 2.5  # constant but alive in b
    r = firing_correlation(a, b)
    assert not torch.isnan(r).any()
    assert r[0].item() == 0.0
    assert r[1].item() == 0.0
    assert r[2].item() == pytest.approx(1.0, abs=1e-12)


def test_firing_summary():
    s = firing_summary(torch.tensor([1.0, 0.6, 0.5, -1.0], dtype=torch.float64))
    assert s["mean"] == pytest.approx(0.275, abs=1e-12)
    assert s["frac_above"] == 0.5  # strictly above: 0.5 itself does not count
    assert firing_summary(torch.tensor([0.1, 0.2]), threshold=0.15)["frac_above"] == 0.5

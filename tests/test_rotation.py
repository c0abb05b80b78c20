import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from polyrot.core.rotation import (
    Rotation,
    determinant,
    eigen_angles,
    fit_quality,
    fit_rotation,
    frobenius_from_identity,
    haar_angles,
    haar_frobenius_prediction,
    haar_rotation,
    ks_vs_haar,
    operator_norm,
    orthogonality_error,
    pooled_statistics,
    rotation_statistics,
    signed_permutation_distance,
    small_angle_rotation,
    transfer_sae,
)
from polyrot.errors import ArtifactCorruptError

D = 64


def source_acts(n=2048, d=D, seed=0):
    """Anisotropic, off-centre activations, so that the fit cannot lean on a round cloud."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.2, 3.0, d, dtype=torch.float64)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) * scales + 5.0


def target_from(acts_src, R0, mu_tgt):
    """Target activations whose ground-truth map back to the source is x_t R0 + c."""
    mu_src = acts_src.mean(dim=0)
    return (acts_src - mu_src) @ R0.T + mu_tgt


def reference_procrustes(acts_src, acts_tgt):
    """The textbook solution: SVD of A_tgt^T A_src = U S V^T gives R = U V^T."""
    src = acts_src.numpy() - acts_src.numpy().mean(axis=0)
    tgt = acts_tgt.numpy() - acts_tgt.numpy().mean(axis=0)
    U, _, Vt = np.linalg.svd(tgt.T @ src)
    return U @ Vt


@pytest.fixture(scope="module")
def exact_pair():
    acts_src = source_acts()
    R0 = haar_rotation(D, seed=1)
    mu_tgt = torch.linspace(-2.0, 2.0, D, dtype=torch.float64)
    return acts_src, target_from(acts_src, R0, mu_tgt), R0


def test_fit_recovers_exact_rotation(exact_pair):
    acts_src, acts_tgt, R0 = exact_pair
    rotation = fit_rotation(acts_src, acts_tgt, metadata={"site": "resid_pre_0"})
    assert rotation.R.dtype == torch.float64
    torch.testing.assert_close(rotation.R, R0, rtol=0, atol=1e-8)
    torch.testing.assert_close(rotation.apply(acts_tgt), acts_src, rtol=0, atol=1e-8)
    assert rotation.metadata["site"] == "resid_pre_0"
    assert rotation.metadata["n_rows"] == 2048 and rotation.metadata["d"] == D
    assert rotation.metadata["rotation_ev"] == pytest.approx(1.0, abs=1e-12)


def test_fit_with_noise_matches_reference_svd(exact_pair):
    acts_src, acts_tgt, R0 = exact_pair
    gen = torch.Generator().manual_seed(2)
    noisy = acts_tgt + 0.01 * torch.randn(acts_tgt.shape, generator=gen, dtype=torch.float64)
    rotation = fit_rotation(acts_src, noisy)
    np.testing.assert_allclose(rotation.R.numpy(), reference_procrustes(acts_src, noisy), rtol=0, atol=1e-10)
    assert frobenius_from_identity(rotation.R @ R0.T) < 0.05
    assert rotation.metadata["rotation_ev"] > 0.999


def test_fit_recovers_a_reflection():
    acts_src = source_acts(seed=3)
    R0 = haar_rotation(D, seed=4)
    if torch.linalg.det(R0) > 0:
        R0[:, 0] = -R0[:, 0]
    rotation = fit_rotation(acts_src, target_from(acts_src, R0, torch.zeros(D, dtype=torch.float64)))
    torch.testing.assert_close(rotation.R, R0, rtol=0, atol=1e-8)
    assert determinant(rotation.R) == pytest.approx(-1.0, abs=1e-10)


def test_fit_accepts_float32_and_returns_float64(exact_pair):
    acts_src, acts_tgt, R0 = exact_pair
    rotation = fit_rotation(acts_src.float(), acts_tgt.float())
    assert rotation.R.dtype == rotation.mu_src.dtype == torch.float64
    torch.testing.assert_close(rotation.R, R0, rtol=0, atol=1e-4)
    mapped = rotation.apply(acts_tgt.float())
    assert mapped.dtype == torch.float32
    torch.testing.assert_close(mapped, acts_src.float(), rtol=0, atol=1e-4)


def test_fit_quality_separates_rotated_from_unrelated(exact_pair):
    acts_src, acts_tgt, _ = exact_pair
    rotation = fit_rotation(acts_src, acts_tgt)
    quality = fit_quality(rotation, acts_src, acts_tgt)
    assert quality["rotation_ev"] == pytest.approx(1.0, abs=1e-12)
    # A Haar rotation is far from I: ||A(R0^T - I)||^2 is about twice the variance.
    assert quality["identity_ev"] < 0.0
    assert quality["raw_ev"] < quality["identity_ev"]
    unrelated = source_acts(seed=5)
    assert fit_quality(fit_rotation(acts_src, unrelated), acts_src, unrelated)["rotation_ev"] < 0.2


@pytest.mark.parametrize(
    "shape_src, shape_tgt, match",
    [
        ((10, D), (10, D + 1), r"\(10, 64\).*\(10, 65\)"),
        ((10, D), (11, D), r"\(10, 64\).*\(11, 64\)"),
        ((10,), (10,), r"\[N, d\]"),
        ((1, D), (1, D), "at least 2"),
    ],
)
def test_fit_rejects_bad_shapes(shape_src, shape_tgt, match):
    with pytest.raises(ValueError, match=match) as excinfo:
        fit_rotation(torch.zeros(shape_src), torch.zeros(shape_tgt))
    assert "\n" not in str(excinfo.value)


def test_directions_inverse_and_steering_identities(exact_pair):
    acts_src, acts_tgt, _ = exact_pair
    rotation = fit_rotation(acts_src, acts_tgt)
    inverse = rotation.inverse()
    x_tgt, v = acts_tgt[:16], acts_src[:3] - acts_src[3:6]
    torch.testing.assert_close(inverse.apply(rotation.apply(x_tgt)), x_tgt, rtol=0, atol=1e-10)
    torch.testing.assert_close(rotation.apply(inverse.apply(acts_src[:16])), acts_src[:16], rtol=0, atol=1e-10)
    torch.testing.assert_close(rotation.to_source(rotation.to_target(v)), v, rtol=0, atol=1e-12)
    assert torch.equal(rotation.rotate_vector(v), rotation.to_target(v))
    torch.testing.assert_close(inverse.to_target(v), rotation.to_source(v), rtol=0, atol=1e-12)
    # A source-built steering vector added on the target moves the source-frame image by itself.
    torch.testing.assert_close(
        rotation.apply(x_tgt + rotation.rotate_vector(v[0])), rotation.apply(x_tgt) + v[0], rtol=0, atol=1e-10
    )
    assert inverse.metadata["inverted"] is True and inverse.inverse().metadata["inverted"] is False
    assert torch.equal(inverse.inverse().R, rotation.R)


def test_apply_rejects_wrong_dimension(exact_pair):
    rotation = fit_rotation(*exact_pair[:2])
    with pytest.raises(ValueError, match="last dimension 64"):
        rotation.apply(torch.zeros(4, D + 1))


def test_save_load_round_trip_is_bitwise(tmp_path, exact_pair):
    metadata = {"site": "ln2_out_1", "source_run": "abc", "target_run": "def", "seeds": [0, 1]}
    rotation = fit_rotation(*exact_pair[:2], metadata=metadata)
    path = tmp_path / "rotation.safetensors"
    rotation.save(path)
    loaded = Rotation.load(path)
    for name in ("R", "mu_src", "mu_tgt"):
        assert torch.equal(getattr(loaded, name), getattr(rotation, name))
    assert loaded.metadata == rotation.metadata
    assert loaded.metadata["seeds"] == [0, 1]


def write_tensors(path, metadata=None, **tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({"R": torch.eye(4, dtype=torch.float64), "mu_src": torch.zeros(4, dtype=torch.float64)}, "missing.*mu_tgt"),
        ({"R": torch.zeros(4, 3, dtype=torch.float64), "mu_src": torch.zeros(4, dtype=torch.float64),
          "mu_tgt": torch.zeros(4, dtype=torch.float64)}, "square"),
        ({"R": torch.eye(4, dtype=torch.float64), "mu_src": torch.zeros(4, dtype=torch.float64),
          "mu_tgt": torch.zeros(5, dtype=torch.float64)}, r"mu_tgt has shape \(5,\)"),
        ({"R": torch.eye(4), "mu_src": torch.zeros(4), "mu_tgt": torch.zeros(4)}, "float64"),
    ],
)
def test_load_rejects_inconsistent_files(tmp_path, tensors, match):
    path = write_tensors(tmp_path / "bad.safetensors", **tensors)
    with pytest.raises(ValueError, match=match) as excinfo:
        Rotation.load(path)
    assert "\n" not in str(excinfo.value)
    assert isinstance(excinfo.value, ArtifactCorruptError)


def test_load_rejects_garbage_and_bad_metadata(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        Rotation.load(garbage)
    eye = torch.eye(3, dtype=torch.float64)
    bad_json = write_tensors(tmp_path / "json.safetensors", {"polyrot.rotation.metadata": "{"},
                             R=eye, mu_src=eye[0].clone(), mu_tgt=eye[1].clone())
    with pytest.raises(ValueError, match="json.safetensors"):
        Rotation.load(bad_json)


def test_load_without_metadata_header_gives_empty_metadata(tmp_path):
    eye = torch.eye(3, dtype=torch.float64)
    path = write_tensors(tmp_path / "plain.safetensors", R=eye, mu_src=eye[0].clone(), mu_tgt=eye[1].clone())
    assert Rotation.load(path).metadata == {}


@dataclass
class StandInConfig:
    d_in: int
    d_sae: int


class StandInSAE(torch.nn.Module):
    """Exactly the interface transfer_sae relies on, so this test does not depend on polyrot.core.sae."""

    def __init__(self, d_in, d_sae, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.cfg = StandInConfig(d_in, d_sae)
        W_dec = torch.randn(d_in, d_sae, generator=gen)
        W_dec /= W_dec.norm(dim=0)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.T + 0.1 * torch.randn(d_sae, d_in, generator=gen))
        self.b_enc = torch.nn.Parameter(0.1 * torch.randn(d_sae, generator=gen))
        self.b_pre = torch.nn.Parameter(5.0 + torch.randn(d_in, generator=gen))

    def encode(self, x):
        return torch.relu((x - self.b_pre) @ self.W_enc.T + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec.T + self.b_pre


def test_transfer_sae_reads_target_activations(exact_pair):
    acts_src, acts_tgt, _ = exact_pair
    rotation = fit_rotation(acts_src, acts_tgt)
    sae = StandInSAE(D, 4 * D, seed=6)
    original = {name: p.detach().clone() for name, p in sae.named_parameters()}
    transferred = transfer_sae(sae, rotation)
    x_tgt = acts_tgt[:256].float()

    f_transferred = transferred.encode(x_tgt)
    f_source = sae.encode(rotation.apply(x_tgt))
    assert (f_source > 0).float().mean() > 0.1
    torch.testing.assert_close(f_transferred, f_source, rtol=0, atol=1e-5)

    recon_tgt = transferred.decode(f_transferred)
    recon_src = sae.decode(f_source)
    torch.testing.assert_close(recon_tgt, rotation.inverse().apply(recon_src), rtol=0, atol=1e-4)
    torch.testing.assert_close(rotation.apply(recon_tgt), recon_src, rtol=0, atol=1e-4)

    assert transferred is not sae and transferred.cfg == sae.cfg
    for name, p in sae.named_parameters():
        assert torch.equal(p, original[name])
        assert getattr(transferred, name).dtype == torch.float32
    torch.testing.assert_close(transferred.b_enc, sae.b_enc, rtol=0, atol=0)
    torch.testing.assert_close(transferred.W_dec.norm(dim=0), torch.ones(4 * D), rtol=0, atol=1e-6)


def test_transfer_sae_rejects_dimension_mismatch(exact_pair):
    rotation = fit_rotation(*exact_pair[:2])
    with pytest.raises(ValueError, match="d_in=32"):
        transfer_sae(StandInSAE(32, 64, seed=7), rotation)


def signed_permutation(d, seed):
    rng = np.random.default_rng(seed)
    P = np.zeros((d, d))
    P[np.arange(d), rng.permutation(d)] = rng.choice([-1.0, 1.0], size=d)
    return P


def test_statistics_of_identity_and_signed_permutation():
    stats = rotation_statistics(torch.eye(D, dtype=torch.float64))
    assert stats["frob_from_identity"] == 0.0
    assert stats["det"] == pytest.approx(1.0)
    assert stats["signed_perm_distance"] == 0.0
    assert stats["mean_cos_angle"] == pytest.approx(1.0)
    assert stats["orthogonality_error"] == 0.0 and stats["operator_norm"] == pytest.approx(1.0)
    assert stats["d"] == D and stats["haar_prediction"] == pytest.approx(np.sqrt(2 * D))

    P = signed_permutation(D, seed=8)
    assert signed_permutation_distance(P) == 0.0
    assert signed_permutation_distance(P + 0.01 * np.eye(D)) == pytest.approx(0.01 * np.sqrt(D), rel=0.5)
    assert signed_permutation_distance(haar_rotation(D, seed=9)) > 3.0


def test_orthogonality_error_norm_and_determinant_of_non_orthogonal():
    twice = 2.0 * np.eye(D)
    assert orthogonality_error(twice) == pytest.approx(3.0 * np.sqrt(D))
    assert operator_norm(twice) == pytest.approx(2.0)
    assert determinant(np.diag([2.0, -1.0, 1.0])) == pytest.approx(-2.0)
    assert orthogonality_error(haar_rotation(D, seed=10)) < 1e-12


def test_eigen_angles_of_block_rotation():
    def plane(theta):
        return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])

    R = np.zeros((5, 5))
    R[:2, :2], R[2:4, 2:4], R[4, 4] = plane(0.5), plane(-1.2), -1.0
    np.testing.assert_allclose(eigen_angles(R), [0.5, 0.5, 1.2, 1.2, np.pi], atol=1e-12)


def test_eigen_angles_match_a_general_eigensolve():
    R = haar_rotation(D, seed=15).numpy()
    reference = np.sort(np.abs(np.angle(np.linalg.eigvals(R))))
    np.testing.assert_allclose(eigen_angles(R), reference, atol=1e-7)
    np.testing.assert_allclose(eigen_angles(R.astype(np.float32)), reference, atol=1e-3)
    with pytest.raises(ValueError, match="orthogonal"):
        eigen_angles(2.0 * np.eye(D))


def test_haar_draws_look_haar():
    for seed in range(3):
        stats = rotation_statistics(haar_rotation(D, seed=100 + seed))
        assert 0.9 <= stats["frob_ratio"] <= 1.1
        assert stats["ks_pvalue"] > 0.01
        assert abs(stats["mean_cos_angle"]) < 0.1
        assert abs(abs(stats["det"]) - 1.0) < 1e-10
    assert haar_frobenius_prediction(D) == pytest.approx(np.sqrt(128))


def test_ks_has_power_against_small_angle_rotation():
    R = small_angle_rotation(D, 0.3, seed=11)
    assert orthogonality_error(R) < 1e-12 and determinant(R) == pytest.approx(1.0)
    assert eigen_angles(R).max() <= 0.3 + 1e-12
    stats = rotation_statistics(R)
    assert stats["ks_pvalue"] < 1e-6
    assert stats["frob_ratio"] < 0.3


def test_haar_angles_are_seeded_and_ks_needs_a_reference():
    np.testing.assert_array_equal(haar_angles(16, 4, seed=5), haar_angles(16, 4, seed=5))
    assert haar_angles(16, 4, seed=5).shape == (64,)
    assert haar_angles(16, 1, seed=5).shape == (16,)
    angles = eigen_angles(haar_rotation(16, seed=12))
    assert ks_vs_haar(angles, d=16) == ks_vs_haar(angles, haar_angles(16))
    with pytest.raises(ValueError, match="dimension d"):
        ks_vs_haar(angles)


def test_pooled_statistics():
    haar = pooled_statistics([haar_rotation(32, seed=200 + i) for i in range(6)])
    assert haar["n_rotations"] == 6 and haar["d"] == 32
    assert haar["ks_pvalue"] > 0.01 and abs(haar["mean_cos_angle"]) < 0.1
    assert haar["pvalue_min"] <= haar["pvalue_max"]

    small = pooled_statistics([small_angle_rotation(32, 0.3, seed=300 + i) for i in range(3)])
    assert small["ks_pvalue"] < 1e-6 and small["pvalue_max"] < 1e-3
    assert small["mean_cos_angle"] > 0.95

    with pytest.raises(ValueError, match=r"\[16, 32\]"):
        pooled_statistics([haar_rotation(32, seed=1), haar_rotation(16, seed=1)])
    with pytest.raises(ValueError, match="at least one"):
        pooled_statistics([])


def test_rotation_statistics_are_json_serialisable(exact_pair):
    rotation = fit_rotation(*exact_pair[:2])
    json.dumps(rotation_statistics(rotation))
    json.dumps(pooled_statistics([rotation, rotation.inverse()]))

"""Bar P's symmetry group and alignment search, against ground truth: a model hidden behind a known
random group element must be recovered exactly, with its function intact."""

import pandas as pd
import pytest
import torch
from scipy.stats import ortho_group

from polyrot.errors import ParameterError
from polyrot.toy import dyck, task
from polyrot.toy.model import (
    DyckTransformer,
    ModelConfig,
    fold_rmsnorm,
    rotate_residual,
)
from polyrot.toy.symmetry import (
    activation_sites,
    align,
    cayley,
    joint_sweep,
    per_tensor_mse,
    permute_heads,
    permute_neurons,
    random_symmetry,
    rotate_heads_qk,
    rotate_heads_vo,
    scale_neurons,
)
from tests.conftest import model_with_gains

# Small search settings: every test here would pass at the paper's 16 starts × 6 iterations × 400
# Cayley steps too, only slower.
QUICK = dict(starts=2, outer_iters=3, cayley_iters=40)


@pytest.fixture(scope="module")
def model() -> DyckTransformer:
    """A model with non-trivial gains, so that align has something to fold."""
    return model_with_gains()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return dyck.generate("train", 64, seed=5, length_range=(2, 48)).tokens


@pytest.fixture(scope="module")
def hidden(model) -> DyckTransformer:
    return random_symmetry(model, seed=3)


@pytest.fixture(scope="module")
def strangers() -> tuple[DyckTransformer, DyckTransformer]:
    """Two independent random models, at a weight scale where an MSE of 1e-3 means something
    (at the default 0.02 any two tensors are within 2 × 0.02² = 8e-4 of each other)."""
    cfg = ModelConfig(init_scale=0.2)
    return DyckTransformer(cfg, seed=2), DyckTransformer(cfg, seed=1)


def logit_gap(a: DyckTransformer, b: DyckTransformer, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        la, lb = a(tokens), b(tokens)
    return max(float((la[h] - lb[h]).abs().max()) for h in la)


def haar(d: int, n: int, seed: int) -> torch.Tensor:
    return torch.as_tensor(ortho_group.rvs(d, size=n, random_state=seed)).reshape(n, d, d)


def test_every_group_action_preserves_the_function(model, tokens):
    folded = fold_rmsnorm(model)
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    moved = {
        "heads": permute_heads(model, 1, [2, 0, 3, 1]),
        "qk": rotate_heads_qk(model, 0, haar(cfg.d_head, cfg.n_heads, 1)),
        "vo": rotate_heads_vo(model, 1, haar(cfg.d_head, cfg.n_heads, 2)),
        "neurons": permute_neurons(model, 0, torch.randperm(cfg.d_mlp, generator=gen)),
        "scales": scale_neurons(model, 1, 0.1 + 5 * torch.rand(cfg.d_mlp, generator=gen)),
        "residual": rotate_residual(folded, haar(cfg.d_model, 1, 3)[0]),
        "all": random_symmetry(model, seed=4),
    }
    for kind, m in moved.items():
        assert logit_gap(m, model, tokens) < 1e-4, kind
        assert max(per_tensor_mse(m, model).values()) > 1e-6, f"{kind} moved no weight"


def test_self_alignment_is_exact(model, tokens):
    a = align(model, model, **QUICK)
    assert a.max_mse <= 1e-8 and a.global_mse <= 1e-8  # paper: 1.3e-10
    assert a.start == 0 and a.head_perms == [[0, 1, 2, 3]] * 2
    assert logit_gap(a.model, model, tokens) < 1e-4


def test_alignment_recovers_a_hidden_group_element(model, hidden, tokens):
    """The ground truth: heads permuted and rotated, neurons permuted and scaled, the residual
    basis turned by a Haar rotation; the search must undo all of it."""
    before = {k: v.clone() for k, v in hidden.state_dict().items()}
    assert max(per_tensor_mse(hidden, fold_rmsnorm(model)).values()) > 1e-4
    a = align(hidden, model, starts=1, outer_iters=6, cayley_iters=40)
    assert a.max_mse <= 1e-8, a.per_tensor
    assert set(a.per_tensor) == set(model.state_dict())
    # Same function as the input, and the input untouched.
    assert logit_gap(a.model, hidden, tokens) < 1e-4
    assert all(torch.equal(v, before[k]) for k, v in hidden.state_dict().items())
    # The recorded rotation is the one between the two residual streams.
    sites = activation_sites(model.cfg)
    _, ours = a.model.run_with_cache(tokens, sites)
    _, theirs = hidden.run_with_cache(tokens, sites)
    for s in sites:
        assert torch.allclose(ours[s].double(), theirs[s].double() @ a.rotation, atol=1e-4)


def test_the_papers_head_cost_misses_the_hidden_element(model, hidden):
    """Why head_cost defaults to "procrustes": raw Frobenius distances between heads that differ by
    a per-head rotation carry no signal, so the paper's literal cost locks in wrong pairings."""
    a = align(hidden, model, starts=1, outer_iters=6, cayley_iters=0, head_cost="frobenius")
    assert a.max_mse > 1e-5


def test_independent_models_do_not_align(strangers, tokens):
    a = align(*strangers, **QUICK)
    assert a.max_mse > 1e-2  # measured 0.067
    assert a.max_mse <= a.baseline_max_mse * (1 + 1e-6)
    assert logit_gap(a.model, strangers[0], tokens) < 1e-4
    assert len(a.configurations) == 2 * QUICK["starts"]
    assert a.baseline_max_mse == a.configurations.max_mse.min()
    # Bar P of the pair as it stands is worse than after alignment.
    assert max(per_tensor_mse(*strangers).values()) > a.max_mse


def test_cayley_never_worsens_the_baseline_even_for_activation_losses(strangers, tokens):
    sites = activation_sites(strangers[1].cfg)
    with torch.no_grad():
        _, theirs = fold_rmsnorm(strangers[1]).run_with_cache(tokens, sites)
    mask = tokens != task.PAD
    for lam in (0.0, 10.0):
        a = align(*strangers, **QUICK, lam=lam, tokens=tokens)
        assert a.max_mse <= a.baseline_max_mse * (1 + 1e-6), lam
        # The reported activation MSE is the aligned model's own, on the non-PAD positions.
        with torch.no_grad():
            _, ours = a.model.run_with_cache(tokens, sites)
        direct = sum(float(((ours[s][mask] - theirs[s][mask]) ** 2).mean()) for s in sites) / len(sites)
        assert a.activation_mse == pytest.approx(direct, rel=1e-4), lam


def test_cayley_alone_undoes_a_residual_rotation(strangers):
    """With no coordinate descent (outer_iters=0) only the Cayley step can align: it must find a
    near-identity rotation hidden in the residual basis (100 steps: measured 2.9e-7, from 1.2e-2)."""
    reference = fold_rmsnorm(strangers[1])
    gen = torch.Generator().manual_seed(0)
    Q = cayley(0.05 * torch.randn(reference.cfg.d_model, reference.cfg.d_model, dtype=torch.float64, generator=gen))
    a = align(rotate_residual(reference, Q), reference, starts=1, outer_iters=0, cayley_iters=100)
    assert a.baseline_max_mse > 1e-3
    assert a.max_mse < 1e-5 and a.cayley_step == 100


def test_joint_sweep_tabulates_each_lambda_from_one_baseline(strangers, tokens):
    table = joint_sweep(*strangers, tokens, lambdas=(0.0, 1.0, 100.0), **QUICK)
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns[:4]) == ["lambda", "weight_mse", "activation_mse", "max_mse"]
    assert table["lambda"].tolist() == [0.0, 1.0, 100.0]
    single = align(*strangers, **QUICK, tokens=tokens)
    assert table.max_mse[0] == pytest.approx(single.max_mse, rel=1e-6)
    assert table.activation_mse[0] == pytest.approx(single.activation_mse, rel=1e-6)
    assert (table.max_mse <= single.baseline_max_mse * (1 + 1e-6)).all()
    # Where each λ-loss itself leads: an activation term lowers the activation MSE (measured 60 at
    # λ = 0, 9.0 at λ = 1 and 100).
    assert (table.final_activation_mse[1:] < table.final_activation_mse[0] / 2).all()


def test_per_tensor_mse_compares_models_as_they_stand(model):
    other = DyckTransformer(model.cfg)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.W_U_depth.add_(0.1)
    mse = per_tensor_mse(other, model)
    assert set(mse) == set(model.state_dict())
    assert mse["W_U_depth"] == pytest.approx(0.01, rel=1e-5)
    assert sum(v for k, v in mse.items() if k != "W_U_depth") == 0


def test_progress_bars(model, capsys):
    align(model, model, starts=1, outer_iters=1, cayley_iters=20, progress=True)
    err = capsys.readouterr().err
    assert "alignment starts" in err and "Cayley" in err


@pytest.mark.parametrize("field, value", [("d_model", 32), ("n_heads", 2), ("d_mlp", 128)])
def test_models_of_different_architecture_refuse_to_align(model, field, value):
    other = DyckTransformer(ModelConfig(**{field: value}), seed=0)
    for call in (lambda: align(other, model, **QUICK), lambda: per_tensor_mse(other, model)):
        with pytest.raises(ParameterError, match=f"different architecture: {field}") as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("options, pattern", [
    (dict(starts=0), "starts must be positive"),
    (dict(outer_iters=-1), "outer_iters must be >= 0"),
    (dict(cayley_iters=-1), "cayley_iters must be >= 0"),
    (dict(cayley_lr=0.0), "cayley_lr must be positive"),
    (dict(head_cost="cosine"), "head_cost must be one of"),
    (dict(lam=1.0), "pass tokens"),
    (dict(tokens=torch.zeros(2, 65, dtype=torch.long)), "1..64 positions"),
    (dict(tokens=torch.zeros(2, 8, dtype=torch.long)), "no non-PAD position"),
])
def test_bad_search_options(model, options, pattern):
    with pytest.raises(ParameterError, match=pattern) as err:
        align(model, model, **options)
    assert "\n" not in str(err.value)


def test_bad_group_elements(model):
    cfg = model.cfg
    with pytest.raises(ParameterError, match="hold each of 0..3 once"):
        permute_heads(model, 0, [0, 0, 1, 2])
    with pytest.raises(ParameterError, match="layer must lie in 0..1"):
        permute_heads(model, 2, [0, 1, 2, 3])
    with pytest.raises(ParameterError, match="finite positive"):
        scale_neurons(model, 0, -torch.ones(cfg.d_mlp))
    with pytest.raises(ParameterError, match="must be orthogonal"):
        rotate_heads_qk(model, 0, 2 * torch.eye(cfg.d_head).repeat(cfg.n_heads, 1, 1))
    with pytest.raises(ParameterError, match="shape"):
        rotate_heads_vo(model, 0, torch.eye(cfg.d_head))

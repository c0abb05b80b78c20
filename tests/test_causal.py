"""Causal bars: IG and AP against closed forms, completeness on a model, ablation of a silent component."""

import numpy as np
import pytest
import torch

from polyrot import causal
from polyrot.activations import extract
from polyrot.dyck import BatchSpec
from polyrot.errors import ParameterError
from polyrot.model import DyckTransformer, ModelConfig

torch.set_num_threads(1)

SMALL = BatchSpec("small", seed=3, n_sequences=16, max_len=20)


def quadratic(a: torch.Tensor) -> torch.Tensor:
    return (a ** 2).sum()


@pytest.mark.parametrize("n", [1, 4, 32, 256])
def test_ig_of_a_quadratic_is_the_exact_difference_minus_the_right_riemann_bias(n):
    gen = torch.Generator().manual_seed(0)
    clean, baseline = torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen,
                                                                                         dtype=torch.float64)
    exact = float(quadratic(baseline.expand(3, 5)) - quadratic(clean))
    # The gradient 2a is linear along the path and the right sum's alphas average (n + 1) / 2n, not 1/2:
    # the sum falls short of the exact difference by |baseline - clean|^2 / n.
    gap = float(((baseline - clean) ** 2).sum())
    assert causal.integrated_gradients(quadratic, clean, baseline, n) == pytest.approx(exact - gap / n, abs=1e-9)


def test_ap_is_ig_with_one_step_and_the_gradient_at_clean():
    gen = torch.Generator().manual_seed(1)
    clean, baseline = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    ap = causal.attribution_patching(quadratic, clean, baseline)
    assert ap == causal.integrated_gradients(quadratic, clean, baseline, 1)
    assert ap == pytest.approx(float((2 * clean * (baseline - clean)).sum()), rel=1e-6)


@pytest.mark.parametrize("steps", [0, -3])
def test_non_positive_steps_are_refused(steps):
    with pytest.raises(ParameterError, match="positive number of steps"):
        causal.integrated_gradients(quadratic, torch.ones(2), torch.zeros(2), steps)


@pytest.fixture(scope="module")
def sharp_model():
    """An untrained model with weights large enough that every component matters."""
    return DyckTransformer(ModelConfig(init_scale=0.08), seed=5).eval()


def test_components_and_their_means(sharp_model):
    names = causal.components(sharp_model.cfg)
    assert names == ["attn_0_h0", "attn_0_h1", "attn_0_h2", "attn_0_h3", "mlp_0",
                     "attn_1_h0", "attn_1_h1", "attn_1_h2", "attn_1_h3", "mlp_1"]
    assert [causal.component_site(n) for n in ("attn_1_h3", "mlp_0")] == ["head_out_1_3", "mlp_out_0"]
    batch = SMALL.generate()
    means = causal.component_means(sharp_model, batch, chunk=5)
    rows = extract(sharp_model, batch, ["head_out_1_2", "mlp_out_0"])
    assert torch.allclose(means["attn_1_h2"], rows["head_out_1_2"].mean(0), atol=1e-6)
    assert torch.allclose(means["mlp_0"], rows["mlp_out_0"].mean(0), atol=1e-6)


def test_completeness_ig_with_32_steps_recovers_every_measured_effect(sharp_model):
    batch = SMALL.generate()
    means = causal.component_means(sharp_model, BatchSpec("means", seed=4, n_sequences=64).generate())
    table = causal.effect_table(sharp_model, batch, means, ig_steps=32)
    assert table["measured"].abs().max() > 0.1  # the effects are not trivially small
    ig_error, ap_error = np.abs(table["ig"] - table["measured"]).max(), np.abs(table["ap"] - table["measured"]).max()
    assert ig_error < 1e-3 and ap_error > 10 * ig_error
    assert causal.pearson(table["ig"], table["measured"]) > 0.9999
    # Untrimmed and trimmed batches give the same losses: PAD columns change nothing.
    _, untrimmed = causal.ablation_effects(sharp_model, batch, means)
    assert np.allclose(list(untrimmed.values()), table["measured"], atol=1e-6)


def test_a_silent_component_has_no_effect_and_no_prediction(sharp_model):
    silent = DyckTransformer(sharp_model.cfg)
    silent.load_state_dict(sharp_model.state_dict())
    with torch.no_grad():
        silent.blocks[1].attn.W_O[2].zero_()
        silent.blocks[0].mlp.W_out.zero_()
    batch = SMALL.generate()
    table = causal.effect_table(silent, batch, causal.component_means(silent, batch), ig_steps=4).set_index("component")
    for name in ("attn_1_h2", "mlp_0"):
        assert table.loc[name, "measured"] == 0.0
        assert table.loc[name, "ig"] == 0.0 and table.loc[name, "ap"] == 0.0
    assert (table["measured"].drop(["attn_1_h2", "mlp_0"]).abs() > 0).all()


def test_pearson_and_acdc():
    assert causal.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.9933992677987828)
    assert np.isnan(causal.pearson([1, 1, 1], [1, 2, 3]))
    effects = {"attn_0_h0": 2.0, "attn_0_h1": 5e-4, "mlp_0": 0.0, "attn_1_h0": 1e-3, "attn_1_h1": 0.3}
    assert causal.acdc_heads(effects) == (["attn_0_h0", "attn_1_h1"], ["attn_0_h1", "attn_1_h0"])

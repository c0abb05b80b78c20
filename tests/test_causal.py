"""Causal bars: IG completeness on a model, ablation of a silent component, ACDC pruning."""

import numpy as np
import pytest
import torch

from polyrot.core.attribution import pearson
from polyrot.stages.specs import ACDC_THRESHOLD
from polyrot.toy import causal
from polyrot.toy.activations import extract
from polyrot.toy.dyck import make_batch
from polyrot.toy.model import DyckTransformer, ModelConfig
from polyrot.toy.task import BatchSpec

torch.set_num_threads(1)

SMALL = BatchSpec("small", seed=3, n_sequences=16, max_len=20)


@pytest.fixture(scope="module")
def sharp_model():
    """An untrained model with weights large enough that every component matters."""
    return DyckTransformer(ModelConfig(init_scale=0.08), seed=5).eval()


def test_components_and_their_means(sharp_model):
    names = causal.components(sharp_model.cfg)
    assert names == ["attn_0_h0", "attn_0_h1", "attn_0_h2", "attn_0_h3", "mlp_0",
                     "attn_1_h0", "attn_1_h1", "attn_1_h2", "attn_1_h3", "mlp_1"]
    assert [causal.component_site(n) for n in ("attn_1_h3", "mlp_0")] == ["head_out_1_3", "mlp_out_0"]
    batch = make_batch(SMALL)
    means = causal.component_means(sharp_model, batch, chunk=5)
    rows = extract(sharp_model, batch, ["head_out_1_2", "mlp_out_0"])
    assert torch.allclose(means["attn_1_h2"], rows["head_out_1_2"].mean(0), atol=1e-6)
    assert torch.allclose(means["mlp_0"], rows["mlp_out_0"].mean(0), atol=1e-6)


def test_completeness_ig_with_32_steps_recovers_every_measured_effect(sharp_model):
    batch = make_batch(SMALL)
    means = causal.component_means(sharp_model, make_batch(BatchSpec("means", seed=4, n_sequences=64)))
    table = causal.effect_table(sharp_model, batch, means, ig_steps=32)
    assert table["measured"].abs().max() > 0.1  # the effects are not trivially small
    ig_error, ap_error = np.abs(table["ig"] - table["measured"]).max(), np.abs(table["ap"] - table["measured"]).max()
    assert ig_error < 1e-3 and ap_error > 10 * ig_error
    assert pearson(table["ig"], table["measured"]) > 0.9999


def test_length_chunks_add_up_to_the_whole_batch(sharp_model):
    """The fast path (length-sorted chunks of 4 rows, each trimmed) against the slow reference (the
    whole padded batch as one chunk): every loss is a sum over tokens, so the two agree to rounding."""
    batch = make_batch(BatchSpec("mixed", seed=5, n_sequences=16))
    assert batch.lengths.min() < batch.lengths.max() / 2  # the chunks really are trimmed
    means = causal.component_means(sharp_model, batch)
    fast = causal.effect_table(sharp_model, batch, means, ig_steps=4, chunk=4)
    slow = causal.effect_table(sharp_model, batch, means, ig_steps=4, chunk=len(batch))
    assert fast.attrs["clean_loss"] == pytest.approx(slow.attrs["clean_loss"], rel=1e-6)
    for column in ("measured", "ig", "ap"):
        assert np.allclose(fast[column], slow[column], rtol=1e-4, atol=1e-6), column
    assert slow["measured"].abs().min() > 1e-3  # no component trivially zero


def test_a_silent_component_has_no_effect_and_no_prediction(sharp_model):
    silent = DyckTransformer(sharp_model.cfg)
    silent.load_state_dict(sharp_model.state_dict())
    with torch.no_grad():
        silent.blocks[1].attn.W_O[2].zero_()
        silent.blocks[0].mlp.W_out.zero_()
    batch = make_batch(SMALL)
    table = causal.effect_table(silent, batch, causal.component_means(silent, batch), ig_steps=4).set_index("component")
    for name in ("attn_1_h2", "mlp_0"):
        assert table.loc[name, "measured"] == 0.0
        assert table.loc[name, "ig"] == 0.0 and table.loc[name, "ap"] == 0.0
    assert (table["measured"].drop(["attn_1_h2", "mlp_0"]).abs() > 0).all()


def test_acdc_keeps_the_heads_above_the_threshold():
    effects = {"attn_0_h0": 2.0, "attn_0_h1": 5e-4, "mlp_0": 0.0, "attn_1_h0": 1e-3, "attn_1_h1": 0.3}
    assert causal.acdc_heads(effects, ACDC_THRESHOLD) == (["attn_0_h0", "attn_1_h1"], ["attn_0_h1", "attn_1_h0"])

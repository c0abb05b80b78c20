import copy

import pytest
import torch
from scipy.stats import ortho_group

from polyrot.errors import UnknownSiteError
from polyrot.toy import dyck
from polyrot.toy.model import (
    DyckTransformer,
    ModelConfig,
    count_parameters,
    fold_rmsnorm,
    is_folded,
    load_model,
    residual_sites,
    resolve_site,
    rotate_residual,
    save_model,
    site_names,
)
from tests.conftest import model_with_gains


@pytest.fixture(scope="module")
def model() -> DyckTransformer:
    """A model with non-trivial gains, so folding has something to fold."""
    return model_with_gains()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return dyck.generate("train", 64, seed=5).tokens


def max_logit_gap(a: dict, b: dict) -> float:
    return max(float((a[h] - b[h]).detach().abs().max()) for h in a)


def test_parameter_count_is_the_papers():
    assert count_parameters(DyckTransformer()) == 104_448


def test_shapes_follow_the_papers_layouts():
    shapes = {n: tuple(p.shape) for n, p in DyckTransformer().named_parameters()}
    assert shapes["W_E"] == (40, 64)
    assert shapes["blocks.0.attn.W_Q"] == (4, 16, 64)
    assert shapes["blocks.1.attn.W_O"] == (4, 64, 16)
    assert shapes["blocks.0.mlp.W_in"] == (256, 64)
    assert shapes["blocks.0.mlp.W_out"] == (64, 256)
    assert shapes["W_U_tok"] == (40, 64) and shapes["W_U_depth"] == (9, 64) and shapes["W_U_valid"] == (2, 64)
    assert sum(n.endswith(".w") for n in shapes) == 5  # ln1, ln2 per block + ln_f


def test_no_bias_parameters():
    assert not [n for n, _ in DyckTransformer().named_parameters() if "bias" in n or n.startswith("b_")]


def test_positional_buffer_is_fixed_and_six_dimensional():
    m = DyckTransformer()
    assert "W_pos" not in dict(m.named_parameters())
    assert torch.count_nonzero(m.W_pos[:, 6:]) == 0
    assert m.W_pos[0, 3] == 1 and m.W_pos[1, 3] == 0
    assert torch.isclose(m.W_pos[63, 0], torch.tensor(63 / 64))


def test_same_seed_same_init_different_seed_differs():
    a, b, c = DyckTransformer(seed=3), DyckTransformer(seed=3), DyckTransformer(seed=4)
    assert torch.equal(a.W_E, b.W_E) and not torch.equal(a.W_E, c.W_E)


def test_folding_gives_an_equivalent_gain_free_model(model, tokens):
    folded = fold_rmsnorm(model)
    assert is_folded(folded) and not is_folded(model)
    assert max_logit_gap(model(tokens), folded(tokens)) < 1e-5


def test_sites_have_the_papers_names_and_shapes(model, tokens):
    cfg = model.cfg
    assert residual_sites(cfg) == ["resid_pre_0", "resid_mid_0", "resid_post_0", "resid_pre_1",
                                   "resid_mid_1", "resid_post_1", "resid_pre_2"]
    _, cache = model.run_with_cache(tokens, site_names(cfg))
    assert set(cache) == set(site_names(cfg))
    assert cache["mlp_pre_1"].shape == (64, 64, 256)
    assert cache["head_out_0_3"].shape == (64, 64, 64)
    # resid_post_L and resid_pre_{L+1} are one tensor; heads sum to the attention output.
    assert torch.equal(cache["resid_post_0"], cache["resid_pre_1"])
    heads = sum(cache[f"head_out_1_{h}"] for h in range(4))
    assert torch.allclose(heads, cache["attn_out_1"], atol=1e-6)
    assert torch.allclose(cache["resid_mid_0"], cache["resid_pre_0"] + cache["attn_out_0"], atol=1e-6)
    assert torch.allclose(cache["mlp_post_0"], torch.relu(cache["mlp_pre_0"]))


def test_recording_head_sites_does_not_change_logits(model, tokens):
    plain = model(tokens)
    recorded, _ = model.run(tokens, sites=["head_out_0_0"])
    assert max_logit_gap(plain, recorded) < 1e-5


def test_patch_replaces_a_site_and_flows_downstream(model, tokens):
    clean, cache = model.run(tokens, sites=["mlp_out_1"])
    patched, _ = model.run(tokens, patches={"mlp_out_1": torch.zeros_like})
    assert max_logit_gap(clean, patched) > 1e-3
    same, _ = model.run(tokens, patches={"mlp_out_1": lambda x: x})
    assert max_logit_gap(clean, same) == 0


def test_unknown_site_lists_the_valid_ones():
    with pytest.raises(UnknownSiteError, match="valid sites: resid_pre_0, ln1_out_0"):
        resolve_site("resid_mid_7", ModelConfig())


def test_transformerlens_aliases_resolve():
    cfg = ModelConfig()
    assert resolve_site("blocks.1.hook_resid_mid", cfg) == "resid_mid_1"
    assert resolve_site("blocks.0.ln2.hook_normalized", cfg) == "ln2_out_0"
    assert resolve_site("ln_final.hook_normalized", cfg) == "ln_f_out"


def test_rotated_copy_computes_the_same_function(model, tokens):
    folded = fold_rmsnorm(model)
    Q = torch.tensor(ortho_group.rvs(64, random_state=7))
    rotated = rotate_residual(folded, Q)
    assert max_logit_gap(folded(tokens), rotated(tokens)) < 1e-5
    _, a = folded.run_with_cache(tokens, ["resid_mid_1"])
    _, b = rotated.run_with_cache(tokens, ["resid_mid_1"])
    assert torch.allclose(a["resid_mid_1"].double() @ Q, b["resid_mid_1"].double(), atol=1e-5)


def test_rotation_needs_a_folded_model(model):
    with pytest.raises(ValueError, match="folded"):
        rotate_residual(model, torch.eye(64))


def test_save_load_round_trip_and_errors(model, tokens, tmp_path):
    weights, config = save_model(model, tmp_path)
    loaded = load_model(weights)
    assert max_logit_gap(model(tokens), loaded(tokens)) == 0
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model(weights, config)
    small = DyckTransformer(ModelConfig(d_model=32, d_head=8))
    save_model(small, tmp_path / "small")
    with pytest.raises(ValueError, match="shape"):
        load_model(tmp_path / "small" / "model.safetensors", config)


def test_a_float64_copy_runs_in_float64_and_agrees(model, tokens):
    # The cross-seed Bar B compares models in float64; attention must not fall back to fp32 there.
    wide = copy.deepcopy(model).double()
    logits = wide(tokens)
    assert all(v.dtype == torch.float64 for v in logits.values())
    narrow = model(tokens)
    assert all(torch.allclose(logits[h].float(), narrow[h], atol=1e-5) for h in narrow)

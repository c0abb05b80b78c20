import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from polyrot.core.metrics import decoder_cosine, explained_variance
from polyrot.core.sae import (
    SAEConfig,
    SparseAutoencoder,
    evaluate_sae,
    export_saelens,
    load_sae,
    save_sae,
    to_saelens,
    train_sae,
)

# The recipe that recovers the planted dictionary below: l1 large enough that
# L0 falls to a few latents per row, 4x more latents than planted features.
PLANTED = dict(d_in=32, expansion=4, l1=1e-2, lr=3e-3, batch_size=512, steps=1500, eval_every=250)


def planted_codes(n=20000, n_features=64, seed=0):
    """Sparse non-negative codes: each row uses 2-3 of n_features, coefficients in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(2, 4, (n,), generator=g)
    ranks = torch.rand(n, n_features, generator=g).argsort(dim=1).argsort(dim=1)
    return (ranks < k[:, None]) * (0.5 + torch.rand(n, n_features, generator=g))


def unit_columns(d, n, seed):
    W = torch.randn(d, n, generator=torch.Generator().manual_seed(seed))
    return W / W.norm(dim=0)


@pytest.fixture(scope="module")
def planted_run():
    codes = planted_codes()
    D = unit_columns(32, 64, seed=1)
    x = codes @ D.T
    calls = []
    sae, history = train_sae(x, SAEConfig(**PLANTED), eval_fn=calls.append, progress=False)
    return x, D, sae, history, calls


def random_sae(**cfg_kwargs):
    """An untrained module with every parameter randomised, so no bias hides behind a zero."""
    cfg = SAEConfig(**{"d_in": 8, "expansion": 3, **cfg_kwargs})
    sae = SparseAutoencoder(cfg)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name.startswith("b_"):
                p.copy_(torch.randn(p.shape, generator=g))
    return sae


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, message", [
    (dict(expansion=0), "expansion"),
    (dict(expansion=-2), "expansion"),
    (dict(expansion=2.5), "expansion"),
    (dict(l1=-1e-3), "l1"),
    (dict(lr=0.0), "lr"),
    (dict(lr=-1.0), "lr"),
    (dict(batch_size=0), "batch_size"),
    (dict(steps=0), "steps"),
    (dict(eval_every=0), "eval_every"),
    (dict(d_in=0), "d_in"),
    (dict(kind="crosscoder"), "kind"),
    (dict(d_out=16), "d_out"),
    (dict(precision="fp16"), "precision"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        SAEConfig(**{"d_in": 8, "expansion": 2, **kwargs})
    assert "\n" not in str(err.value)


def test_config_defaults_and_round_trip():
    cfg = SAEConfig(d_in=64, expansion=8)
    assert (cfg.l1, cfg.lr, cfg.batch_size, cfg.steps, cfg.seed, cfg.kind, cfg.eval_every, cfg.precision) == \
        (1e-3, 5e-4, 4096, 4000, 0, "sae", 500, "bf16")
    assert cfg.d_sae == 512 and cfg.d_out == 64

    tc = SAEConfig(d_in=16, expansion=2, kind="transcoder", d_out=24, site="blocks.0.mlp", model_run_id="abc")
    assert tc.d_sae == 32
    for c in (cfg, tc):
        assert SAEConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert SAEConfig(d_in=16, expansion=2, kind="transcoder").d_out == 16

    with pytest.raises(ValueError, match="unknown SAEConfig fields"):
        SAEConfig.from_dict({**cfg.to_dict(), "l2": 1.0})
    with pytest.raises(ValueError, match="bad SAEConfig"):
        SAEConfig.from_dict({"d_in": 8})


def test_a_cfg_saved_before_precision_reads_fp32():
    # Every SAE trained before the field existed trained in fp32.
    saved = {k: v for k, v in SAEConfig(d_in=8, expansion=2).to_dict().items() if k != "precision"}
    assert SAEConfig.from_dict(saved).precision == "fp32"


# ---------------------------------------------------------------- module


def test_init():
    cfg = SAEConfig(d_in=8, expansion=4, seed=3)
    sae = SparseAutoencoder(cfg)
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert shapes == {"W_enc": (32, 8), "b_enc": (32,), "W_dec": (8, 32), "b_pre": (8,)}
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(32), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_pre.any()
    assert torch.equal(SparseAutoencoder(cfg).W_dec, sae.W_dec)
    assert not torch.equal(SparseAutoencoder(SAEConfig(d_in=8, expansion=4, seed=4)).W_dec, sae.W_dec)

    tc = SparseAutoencoder(SAEConfig(d_in=8, expansion=4, kind="transcoder", d_out=5))
    shapes = {name: tuple(p.shape) for name, p in tc.named_parameters()}
    assert shapes == {"W_enc": (32, 8), "b_enc": (32,), "W_dec": (5, 32), "b_pre": (8,), "b_out": (5,)}
    assert torch.allclose(tc.W_enc.norm(dim=1), torch.ones(32), atol=1e-6)


def test_forward_formula_and_b_pre():
    sae = random_sae()
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    recon, f = sae(x)
    assert torch.allclose(f, torch.relu((x - sae.b_pre) @ sae.W_enc.T + sae.b_enc), atol=1e-6)
    assert torch.allclose(recon, f @ sae.W_dec.T + sae.b_pre, atol=1e-6)
    assert (f > 0).any() and (f == 0).any()

    # b_pre is the origin of the coordinate system: moving data and origin together changes nothing
    c = torch.randn(8, generator=torch.Generator().manual_seed(1)) * 5
    with torch.no_grad():
        sae.b_pre += c
    recon_c, f_c = sae(x + c)
    assert torch.allclose(f_c, f, atol=1e-5)
    assert torch.allclose(recon_c, recon + c, atol=1e-5)


def test_transcoder_decodes_with_b_out():
    tc = random_sae(kind="transcoder", d_out=5)
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    y_hat, f = tc(x)
    assert y_hat.shape == (50, 5)
    assert torch.allclose(f, torch.relu((x - tc.b_pre) @ tc.W_enc.T + tc.b_enc), atol=1e-6)
    assert torch.allclose(y_hat, f @ tc.W_dec.T + tc.b_out, atol=1e-6)


def test_normalize_decoder():
    sae = SparseAutoencoder(SAEConfig(d_in=8, expansion=4))
    with torch.no_grad():
        sae.W_dec *= torch.rand(32) * 10 + 0.1
    direction = sae.W_dec[:, 0] / sae.W_dec[:, 0].norm()
    sae.normalize_decoder_()
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(32), atol=1e-6)
    assert torch.allclose(sae.W_dec[:, 0], direction, atol=1e-6)


def test_remove_parallel_grad():
    sae = SparseAutoencoder(SAEConfig(d_in=8, expansion=4))
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(8, 32, generator=g)
    sae.W_dec.grad = grad.clone()
    sae.remove_parallel_grad_()
    W = sae.W_dec.detach()
    # the radial components start O(1); float32 rounding leaves ~1e-6
    assert (grad * W).sum(dim=0).abs().max() > 0.5
    assert (sae.W_dec.grad * W).sum(dim=0).abs().max() < 1e-5
    # only the radial part went: what was removed is parallel to each column
    removed = grad - sae.W_dec.grad
    assert torch.allclose(removed, (grad * W).sum(dim=0) * W, atol=1e-6)


# ---------------------------------------------------------------- training


def test_training_lowers_loss_and_recovers_planted_features(planted_run):
    x, D, sae, history, _ = planted_run
    untrained = SparseAutoencoder(sae.cfg)
    with torch.no_grad():
        untrained.b_pre.copy_(x.mean(dim=0))
    start = evaluate_sae(untrained, x)
    start_loss = start["mse"] + sae.cfg.l1 * start["l1_norm"]

    assert [h["step"] for h in history] == [250, 500, 750, 1000, 1250, 1500]
    assert history[-1]["loss"] < 0.2 * start_loss
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["ev"] > 0.9
    assert history[-1]["l0"] < 10  # truth is 2.5 per row
    recovered = decoder_cosine(sae.W_dec.detach(), D, threshold=0.9)
    assert recovered["max_frac_above"] >= 0.9


def test_a_bf16_sae_follows_the_fp32_one(planted_run):
    """The default bf16 step against the fp32 reference, from the same start and batches."""
    x, _, bf16, _, _ = planted_run
    fp32, _ = train_sae(x, SAEConfig(**PLANTED, precision="fp32"), progress=False)
    assert bf16.cfg.precision == "bf16" and all(p.dtype == torch.float32 for p in bf16.parameters())
    assert not torch.equal(bf16.W_dec, fp32.W_dec)  # autocast was on
    assert evaluate_sae(bf16, x)["ev"] == pytest.approx(evaluate_sae(fp32, x)["ev"], abs=2e-3)
    assert decoder_cosine(bf16.W_dec.detach(), fp32.W_dec.detach())["hungarian_mean"] > 0.99


def test_decoder_unit_norm_after_training(planted_run):
    sae = planted_run[2]
    assert (sae.W_dec.norm(dim=0) - 1).abs().max() < 1e-5


def test_history_matches_evaluate_and_eval_fn(planted_run):
    x, _, sae, history, calls = planted_run
    assert calls == history
    assert set(history[-1]) == {"step", "loss", "mse", "ev", "l0", "dead_fraction"}
    final = evaluate_sae(sae, x)
    for key in ("mse", "ev", "l0", "dead_fraction"):
        assert history[-1][key] == final[key]
    assert history[-1]["loss"] == pytest.approx(final["mse"] + sae.cfg.l1 * final["l1_norm"], rel=1e-12)


def test_evaluate_chunking_matches_whole(planted_run):
    x, _, trained, _, _ = planted_run
    x = x[:3000]
    sae = copy.deepcopy(trained)
    with torch.no_grad():
        sae.b_enc[:5] = -1e6  # dead features must survive the chunked bookkeeping
        recon, f = sae(x)
    chunked = evaluate_sae(sae, x, chunk_size=700)
    assert chunked["ev"] == pytest.approx(explained_variance(x, recon), abs=1e-7)
    assert chunked["l0"] == pytest.approx((f > 0).sum(dim=1).double().mean().item(), abs=1e-9)
    assert chunked["dead_fraction"] == ((f > 0).sum(dim=0) == 0).double().mean().item()
    assert chunked["dead_fraction"] >= 5 / sae.cfg.d_sae
    assert chunked["l1_norm"] == pytest.approx(f.sum(dim=1).double().mean().item(), rel=1e-5)


def test_eval_schedule_includes_final_step():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    _, history = train_sae(x, SAEConfig(d_in=8, expansion=2, batch_size=32, steps=7, eval_every=5), progress=True)
    assert [h["step"] for h in history] == [5, 7]


def test_transcoder_learns_planted_sparse_map():
    codes = planted_codes(seed=2)
    x = codes @ unit_columns(32, 64, seed=3).T
    D_out = unit_columns(24, 64, seed=4)
    y = codes @ D_out.T
    cfg = SAEConfig(**{**PLANTED, "kind": "transcoder", "d_out": 24, "eval_every": 1500})
    tc, history = train_sae(x, cfg, y, progress=False)
    assert history[-1]["ev"] > 0.85
    assert evaluate_sae(tc, x, y)["ev"] == history[-1]["ev"]
    assert decoder_cosine(tc.W_dec.detach(), D_out, threshold=0.9)["max_frac_above"] >= 0.9


def test_train_input_validation():
    x = torch.randn(100, 8)
    with pytest.raises(ValueError, match=r"x must be \[N, 8\]"):
        train_sae(torch.randn(100, 9), SAEConfig(d_in=8, expansion=2))
    with pytest.raises(ValueError, match="needs target"):
        train_sae(x, SAEConfig(d_in=8, expansion=2, kind="transcoder", d_out=4))
    with pytest.raises(ValueError, match="target must be"):
        train_sae(x, SAEConfig(d_in=8, expansion=2, kind="transcoder", d_out=4), torch.randn(100, 5))
    with pytest.raises(ValueError, match="only for transcoders"):
        train_sae(x, SAEConfig(d_in=8, expansion=2), x)


def test_training_is_deterministic():
    x = planted_codes(n=2000) @ unit_columns(32, 64, seed=1).T
    cfg = SAEConfig(d_in=32, expansion=2, batch_size=256, steps=60, eval_every=20)
    a, hist_a = train_sae(x, cfg, progress=False)
    b, hist_b = train_sae(x, cfg, progress=False)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert hist_a == hist_b
    c, _ = train_sae(x, SAEConfig(**{**cfg.to_dict(), "seed": 1}), progress=False)
    assert not torch.equal(a.W_dec, c.W_dec)


# ---------------------------------------------------------------- persistence


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_save_load_round_trip_is_bitwise(tmp_path, kind):
    sae = random_sae(kind=kind, d_out=8 if kind == "sae" else 5, site="blocks.1.hook_resid_post", model_run_id="r1")
    save_sae(sae, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cfg.json", "sae.safetensors"]
    loaded = load_sae(tmp_path / "out")
    assert loaded.cfg == sae.cfg
    state, loaded_state = sae.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name in state:
        assert torch.equal(state[name], loaded_state[name]), name


def test_load_errors(tmp_path):
    sae = random_sae()
    save_sae(sae, tmp_path)
    weights, cfg_path = tmp_path / "sae.safetensors", tmp_path / "cfg.json"
    good_weights, good_cfg = weights.read_bytes(), cfg_path.read_text()

    def expect(match):
        with pytest.raises(ValueError, match=match) as err:
            load_sae(tmp_path)
        assert "\n" not in str(err.value)
        weights.write_bytes(good_weights)
        cfg_path.write_text(good_cfg)

    weights.unlink()
    expect("missing sae.safetensors")
    cfg_path.unlink()
    expect("missing cfg.json")

    weights.write_bytes(b"not a safetensors file at all")
    expect("unreadable safetensors")
    weights.write_bytes(good_weights[: len(good_weights) // 2])
    expect("unreadable safetensors")

    cfg_path.write_text("{not json")
    expect("not valid JSON")
    cfg_path.write_text(json.dumps({**json.loads(good_cfg), "expansion": 2}))
    expect("W_enc is torch.float32 \\(24, 8\\), cfg.json implies torch.float32 \\(16, 8\\)")
    cfg_path.write_text(json.dumps({**json.loads(good_cfg), "kind": "transcoder"}))
    expect("do not match transcoder parameters")
    cfg_path.write_text(json.dumps({**json.loads(good_cfg), "lr": -1}))
    expect("lr must be > 0")

    save_file({**load_file(weights), "b_enc": torch.zeros(24, dtype=torch.float64)}, weights)
    expect("b_enc is torch.float64")

    assert torch.equal(load_sae(tmp_path).W_dec, sae.W_dec)


# ---------------------------------------------------------------- SAELens export


def saelens_forward(tensors, x):
    """SAELens' standard SAE with apply_b_dec_to_input=True, written out independently."""
    f = torch.relu((x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"])
    return f @ tensors["W_dec"] + tensors["b_dec"], f


def test_saelens_export_reproduces_reconstructions(tmp_path, planted_run):
    x, _, sae, _, _ = planted_run
    export_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    tensors = load_file(tmp_path / "sae_weights.safetensors")

    assert {k: cfg[k] for k in ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                                "architecture", "normalize_activations")} == \
        {"d_in": 32, "d_sae": 128, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
         "architecture": "standard", "normalize_activations": "none"}
    assert {k: tuple(t.shape) for k, t in tensors.items()} == \
        {"W_enc": (32, 128), "b_enc": (128,), "W_dec": (128, 32), "b_dec": (32,)}

    x = x[:1000]
    with torch.no_grad():
        recon, f = sae(x)
    recon_sl, f_sl = saelens_forward(tensors, x)
    assert (recon_sl - recon).abs().max() < 1e-6
    assert (f_sl - f).abs().max() < 1e-6


def test_saelens_hook_name_and_transcoder_refusal():
    cfg, _ = to_saelens(random_sae(site="blocks.2.hook_resid_post"))
    assert cfg["hook_name"] == "blocks.2.hook_resid_post"
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    with pytest.raises(ValueError, match="kind='sae' only"):
        to_saelens(random_sae(kind="transcoder", d_out=4))

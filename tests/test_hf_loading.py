"""polyrot.hf and polyrot.hf.neox: a tiny GPT-NeoX seed stored as a hub cache resolves by revision offline,
hidden states sit at the right sites, corpus samples are seeded, and bad input is refused."""

import os

import pytest
import torch

from polyrot.errors import HubResolutionError, ParameterError, UnknownSiteError
from polyrot.hf import lm, neox
from polyrot.hf.config import PAPER_CORPUS, NeoxRecipe

torch.set_num_threads(1)

REPO = "polyrot/neox-test-seed0"
RECIPE = NeoxRecipe(d_model=32, n_layers=2, n_heads=4, d_mlp=64, vocab_size=300, seq_len=32, batch_size=8,
                         steps=30, warmup=5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 400 stdlib docstrings: the real corpus, small enough to train on in seconds."""
    path = tmp_path_factory.mktemp("corpus") / "docstrings.txt"
    path.write_text("\n".join(neox.stdlib_docstrings()[:400]) + "\n")
    return path


@pytest.fixture(scope="module")
def hub(corpus, tmp_path_factory):
    """A seed trained 30 steps, stored as revisions step0, step30 and main of a hub cache: (cache, tokenizer)."""
    cache = tmp_path_factory.mktemp("hub")
    tokenizer = neox.train_tokenizer(corpus, RECIPE.vocab_size)

    def store(step, model, record):
        neox.write_hub_revision(cache, REPO, f"step{step}", model, tokenizer)

    model, history = neox.train_neox(neox.token_stream(corpus, tokenizer), tokenizer, RECIPE, seed=0,
                                     checkpoint_steps=(0,), on_checkpoint=store, progress=False)
    neox.write_hub_revision(cache, REPO, "main", model, tokenizer)
    return cache, tokenizer, history


def test_the_corpus_is_english_docstrings_and_the_tokenizer_is_deterministic(corpus):
    lines = corpus.read_text().splitlines()
    assert len(lines) == 400 and all(len(line) >= neox.MIN_DOCSTRING and line.isascii() for line in lines)
    assert sum(" the " in line for line in lines) > 200
    a, b = neox.train_tokenizer(corpus, 300), neox.train_tokenizer(corpus, 300)
    assert a.get_vocab() == b.get_vocab() and len(a) == 300 and a.eos_token == neox.EOS


def test_training_lowers_the_heldout_loss(hub):
    _, _, history = hub
    assert [r["step"] for r in history] == [0, 30]
    # From ln(300) = 5.7 at initialisation.
    assert history[0]["heldout_loss"] > 5.5 and history[-1]["heldout_loss"] < history[0]["heldout_loss"] - 0.5


def test_two_revisions_resolve_offline_to_different_weights(hub):
    cache, _, _ = hub
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert sorted((neox.repo_dir(cache, REPO) / "refs").iterdir()) == \
        sorted(neox.repo_dir(cache, REPO) / "refs" / r for r in ("main", "step0", "step30"))
    first, tokenizer = lm.load_causal_lm(REPO, "step0", cache)
    last, _ = lm.load_causal_lm(REPO, "step30", cache)
    main, _ = lm.load_causal_lm(REPO, None, cache)
    w = {name: m.gpt_neox.embed_in.weight for name, m in (("first", first), ("last", last), ("main", main))}
    assert not torch.equal(w["first"], w["last"]) and torch.equal(w["last"], w["main"])
    # step0 is the initialisation: N(0, 0.02^2) embeddings.
    assert abs(float(w["first"].detach().std()) - 0.02) < 0.002
    assert tokenizer.eos_token == neox.EOS


def test_hidden_states_are_the_embedding_and_each_blocks_output(hub, corpus):
    cache, _, _ = hub
    model, tokenizer = lm.load_causal_lm(REPO, "step30", cache)
    tokens = lm.sample_corpus(str(corpus), tokenizer, 4, 16, seed=1)
    acts = lm.hidden_states(model, tokens, lm.site_names(2), batch_size=3, progress=False)
    assert list(acts) == ["layer0_resid_pre", "layer0_resid_post", "layer1_resid_post"]
    assert all(a.shape == (64, 32) and a.dtype == torch.float32 for a in acts.values())
    blocks = {}
    for layer, block in enumerate(model.gpt_neox.layers):
        block.register_forward_hook(lambda m, a, out, layer=layer: blocks.__setitem__(layer, out[0] if isinstance(
            out, tuple) else out))
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    assert torch.equal(acts["layer0_resid_pre"], model.gpt_neox.embed_in(tokens).flatten(0, 1))
    assert torch.equal(acts["layer0_resid_post"], blocks[0].flatten(0, 1))
    assert torch.equal(acts["layer1_resid_post"], blocks[1].flatten(0, 1))
    # transformers' last hidden state is after the final LayerNorm: not the block's output.
    assert not torch.allclose(out.hidden_states[2].flatten(0, 1), acts["layer1_resid_post"])


def test_corpus_samples_are_seeded_and_packed(hub, corpus):
    _, tokenizer, _ = hub
    a = lm.sample_corpus(str(corpus), tokenizer, 8, 24, seed=5)
    assert torch.equal(a, lm.sample_corpus(str(corpus), tokenizer, 8, 24, seed=5))
    assert not torch.equal(a, lm.sample_corpus(str(corpus), tokenizer, 8, 24, seed=6))
    assert a.shape == (8, 24) and int((a == tokenizer.eos_token_id).sum()) >= 1
    with pytest.raises(ParameterError, match="fewer than"):
        lm.sample_corpus(str(corpus), tokenizer, 10_000, 64, seed=5)


def test_sites_beyond_the_depth_and_unknown_names_are_refused():
    assert lm.site_names(6) == ["layer0_resid_pre"] + [f"layer{i}_resid_post" for i in range(6)]
    assert lm.resolve_site("layer3_resid_pre", 6) == "layer2_resid_post"
    with pytest.raises(UnknownSiteError, match="beyond the model's depth: it has 6 layers"):
        lm.resolve_site("layer6_resid_post", 6)
    with pytest.raises(UnknownSiteError, match="unknown site"):
        lm.resolve_site("resid_mid_0", 6)


def test_unresolvable_models_and_revisions_say_so(hub, tmp_path):
    cache, _, _ = hub
    with pytest.raises(HubResolutionError, match="cannot be resolved offline .* pass a local path"):
        lm.load_causal_lm("EleutherAI/pythia-70m-seed1", "step143000", tmp_path)
    with pytest.raises(HubResolutionError, match="no revision 'step999' .* cached revisions: main, step0, step30"):
        lm.load_causal_lm(REPO, "step999", cache)
    snapshot = next((neox.repo_dir(cache, REPO) / "snapshots").iterdir())
    model, _ = lm.load_causal_lm(str(snapshot))
    assert model.config.num_hidden_layers == 2
    with pytest.raises(ParameterError, match="is a local folder.*ignores a revision"):
        lm.load_causal_lm(str(snapshot), "step0")
    with pytest.raises(HubResolutionError, match="cannot be streamed offline"):
        lm.sample_corpus(PAPER_CORPUS, hub[1], 1, 8)

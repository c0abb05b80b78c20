"""Stages train_neox and hf_activations, and the SAE / audit path on their runs, on two tiny GPT-NeoX seeds."""

import json

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from polyrot import tracking
from polyrot.hf import lm, neox
from polyrot.stages import STAGES
from polyrot.stages.audit import PLANTED
from tests.conftest import cli, one_line_error

torch.set_num_threads(1)

EXPERIMENT = "tests-hf"
TINY_NEOX = dict(d_model=32, n_layers=2, n_heads=4, d_mlp=64, vocab_size=300, seq_len=32, batch_size=8, steps=40,
                 warmup=5, checkpoint_steps="0,20", threads=1, experiment=EXPERIMENT)
SAMPLE = dict(sequences=16, tokens=32, batch_size=8, threads=1, experiment=EXPERIMENT)
TINY_SAE = dict(expansion=2, steps=150, batch_size=256, eval_every=150, threads=1, experiment=EXPERIMENT)
SITES = "layer0_resid_pre,layer0_resid_post,layer1_resid_post"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docstrings.txt"
    path.write_text("\n".join(neox.stdlib_docstrings()[:600]) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def seeds(store, corpus):
    """{seed: train_neox run ID} for seeds 1 and 2."""
    return {seed: STAGES["train_neox"](seed=seed, corpus=corpus, **TINY_NEOX) for seed in (1, 2)}


@pytest.fixture(scope="module")
def acts(seeds):
    """hf_activations runs: each seed's final weights, and seed 1's initialisation (step0)."""
    runs = {seed: STAGES["hf_activations"](model_run=rid, **SAMPLE) for seed, rid in seeds.items()}
    runs["1-step0"] = STAGES["hf_activations"](model_run=seeds[1], revision="step0", **SAMPLE)
    return runs


def test_train_neox_stores_its_revisions_as_a_hub_cache_that_from_pretrained_resolves(seeds):
    from transformers import AutoModelForCausalLM

    run = MlflowClient().get_run(seeds[1])
    assert run.info.status == "FINISHED" and run.data.tags["polyrot.repo_id"] == "polyrot/neox-tiny-seed1"
    root = tracking.artifact_dir(seeds[1])
    refs = root / "hub" / "models--polyrot--neox-tiny-seed1" / "refs"
    assert sorted(p.name for p in refs.iterdir()) == ["main", "step0", "step20", "step40"]
    info = json.loads((root / "train.json").read_text())
    assert info["revisions"]["main"] != info["revisions"]["step0"] and len(info["revisions"]["main"]) == 40
    assert info["history"][0]["step"] == 0 and info["history"][-1]["heldout_loss"] < info["history"][0]["heldout_loss"]
    # The artifact tree is a hub cache: the same call that loads a Pythia checkpoint loads a revision.
    model = AutoModelForCausalLM.from_pretrained("polyrot/neox-tiny-seed1", revision="step20",
                                                 cache_dir=root / "hub", use_safetensors=True)
    assert model.config.hidden_size == 32
    assert run.data.metrics["n_parameters"] == sum(p.numel() for p in model.parameters())
    # Seeds share nothing but the tokenizer.
    other = tracking.artifact_dir(seeds[2]) / "hub" / "models--polyrot--neox-tiny-seed2"
    snapshot = other / "snapshots" / (other / "refs" / "step0").read_text()
    first = load_file(snapshot / "model.safetensors")
    mine = root / "hub" / "models--polyrot--neox-tiny-seed1"
    mine_first = load_file(mine / "snapshots" / (mine / "refs" / "step0").read_text() / "model.safetensors")
    assert not torch.equal(first["gpt_neox.embed_in.weight"], mine_first["gpt_neox.embed_in.weight"])
    assert (snapshot / "tokenizer.json").read_text() == \
        (mine / "snapshots" / (mine / "refs" / "step0").read_text() / "tokenizer.json").read_text()


def test_hf_activations_store_every_residual_site_on_one_token_sample(acts, seeds):
    client = MlflowClient()
    runs = {key: client.get_run(rid) for key, rid in acts.items()}
    assert len({r.data.tags["polyrot.tokens_sha256"] for r in runs.values()}) == 1
    assert runs[1].data.tags["polyrot.upstream.model"] == seeds[1]
    assert runs[1].data.tags["polyrot.seed"] == "neox-tiny-seed1-main"
    assert runs["1-step0"].data.tags["polyrot.model"] == "polyrot/neox-tiny-seed1@step0"
    stored = load_file(tracking.artifact_dir(acts[1]) / "activations.safetensors")
    assert sorted(stored) == sorted(SITES.split(",")) and all(a.shape == (16 * 32, 32) for a in stored.values())
    tokens = load_file(tracking.artifact_dir(acts[1]) / "tokens.safetensors")["tokens"]
    assert tokens.shape == (16, 32)
    # Trained below the initialisation's ln(300) = 5.7 nats.
    assert runs[1].data.metrics["loss"] < runs["1-step0"].data.metrics["loss"] < 6.0


def test_saes_and_the_audit_run_on_hf_activations(acts):
    saes = {seed: STAGES["train_sae"](activations_run=acts[seed], sites=SITES, sae_seed=seed, **TINY_SAE)
            for seed in (1, 2)}
    child = MlflowClient().get_run(json.loads((tracking.artifact_dir(saes[1]) / "children.json").read_text())
                                   ["layer0_resid_post"])
    assert child.data.metrics["final.ev"] > 0.5 and "heldout.ev" not in child.data.metrics
    run_id = STAGES["audit"](source=acts[1], saes=saes[1], targets=f"{acts[2]},{acts['1-step0']}",
                             target_saes=saes[2], experiment=EXPERIMENT)
    root = tracking.artifact_dir(run_id)
    table = pd.read_csv(root / "audit.csv").set_index(["target", "site"])
    # The two real targets, and the planted nulls the audit adds beside every source (issue 15).
    assert set(table.index.get_level_values(0)) == {"neox-tiny-seed2-main", "neox-tiny-seed1-step0", *PLANTED}
    for (target, site), row in table.iterrows():
        assert row["rotation_ev"] >= row["identity_ev"] - 1e-9 and abs(row["d"] - 32) < 1e-9
    # Another seed's basis is turned by about a Haar rotation; the same seed 40 steps earlier, much less.
    other, early = table.loc["neox-tiny-seed2-main"], table.loc["neox-tiny-seed1-step0"]
    assert (other["frob_ratio"] > 0.8).all() and (early["frob_ratio"] < other["frob_ratio"]).all()
    pairs = pd.read_csv(root / "decoder_pairs.csv")
    assert len(pairs) == 3 and set(pairs["model_b"]) == {"neox-tiny-seed2-main"}
    assert ((pairs["decoder_max_frac_above"] >= 0) & (pairs["decoder_max_frac_above"] <= 1)).all()
    assert {"fig1_ev_by_site.png", "fig2_eigen_angles.png"} <= {p.name for p in root.iterdir()}


def test_bad_input_gets_one_line(seeds, acts, store):
    one_line_error(cli("hf-activations", "--model", "EleutherAI/pythia-70m-seed1", "--revision", "step143000",
                       "--experiment", EXPERIMENT), "cannot be resolved offline")
    one_line_error(cli("hf-activations", "--model-run", seeds[1], "--revision", "step999", "--experiment",
                       EXPERIMENT), "has no revision 'step999'; it has: main, step0, step20, step40")
    one_line_error(cli("hf-activations", "--model-run", seeds[1], "--sites", "layer2_resid_post", "--tokens", "32",
                       "--experiment", EXPERIMENT), "beyond the model's depth: it has 2 layers")
    one_line_error(cli("hf-activations", "--model-run", seeds[1], "--experiment", EXPERIMENT),
                   "--tokens 256 exceeds the model's context of 32")
    one_line_error(cli("hf-activations", "--experiment", EXPERIMENT), "exactly one of --model and --model-run")
    other = STAGES["hf_activations"](model_run=seeds[2], **{**SAMPLE, "corpus_seed": 1})
    sae = STAGES["train_sae"](activations_run=acts[1], site="layer1_resid_post", **TINY_SAE)
    one_line_error(cli("audit", "--source", acts[1], "--saes", sae, "--targets", other, "--experiment", EXPERIMENT),
                   "ran on other tokens than source run")
    one_line_error(cli("audit", "--source", acts[1], "--saes", sae, "--targets", acts[2], "--null", "1,2",
                       "--experiment", EXPERIMENT), "--null applies to train_seed runs")
    one_line_error(cli("train-sae", "--activations-run", acts[1], "--kind", "transcoder", "--layer", "0",
                       "--experiment", EXPERIMENT), "residual sites only")


def test_hub_cache_revisions_of_a_run_resolve_through_hf(seeds):
    from polyrot.stages.train_neox import fetch_revision

    repo, cache = fetch_revision(seeds[2], "step20")
    assert repo == "polyrot/neox-tiny-seed2" and lm.cached_revisions(repo, cache) == ["step20"]
    model, _ = lm.load_causal_lm(repo, "step20", cache)
    assert lm.n_layers(model) == 2


def test_ig_tracks_block_ablations_and_ap_does_not(seeds):
    run_id = STAGES["hf_attribution"](model_run=seeds[1], sequences=4, tokens=32, ig_steps=16, threads=1,
                                      experiment=EXPERIMENT)
    table = pd.read_csv(tracking.artifact_dir(run_id) / "attribution.csv").set_index("block")
    assert list(table.index) == ["layer0", "layer1"]
    for block, row in table.iterrows():
        # Replacing the whole residual stream by its mean costs real loss; IG recovers it, AP does not.
        assert row["measured"] > 0.05, block
        assert abs(row["ig"] - row["measured"]) < 0.2 * row["measured"], block
        assert abs(row["ap"] - row["measured"]) > 2 * abs(row["ig"] - row["measured"]), block
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert metrics["clean_loss"] < 6.0 and abs(metrics["layer0.measured"] - table.loc["layer0", "measured"]) < 1e-9


def test_steering_vectors_from_the_shipped_sentence_sets_transfer_across_seeds(acts):
    run_id = STAGES["steering"](source=acts[1], targets=acts[2], alphas="1,4", eval_sequences=4, threads=1,
                                experiment=EXPERIMENT)
    root = tracking.artifact_dir(run_id)
    vectors = load_file(root / "vectors.safetensors")
    assert sorted(vectors) == ["magnitude", "name", "sentiment"] and all(v.shape == (32,) for v in vectors.values())
    table = pd.read_csv(root / "steering.csv").set_index(["vector", "alpha"])
    assert len(table) == 6 and (table["target"] == "neox-tiny-seed2-main").all()
    assert (table["head"] == "next-token KL").all() and (table["n_targeted"] == 4 * 32).all()
    for vector in ("sentiment", "name", "magnitude"):
        # KL grows with the dose, within seed and across.
        assert 0 < table.loc[(vector, 1.0), "within_effect"] < table.loc[(vector, 4.0), "within_effect"]
        assert 0 < table.loc[(vector, 1.0), "raw_effect"] < table.loc[(vector, 4.0), "raw_effect"]
    run = MlflowClient().get_run(run_id)
    assert run.data.params["resolved_site"] == "layer1_resid_post"
    one_line_error(cli("steering", "--source", acts[1], "--targets", acts[2], "--site", "layer0_resid_pre",
                       "--experiment", EXPERIMENT), "steering adds to a block's output")


def test_fit_rotation_registers_rotations_between_hf_activations_runs(acts):
    from polyrot.tracking import registry

    run_id = STAGES["fit_rotation"](source=acts[1], target=acts[2], sites="layer1_resid_post", experiment=EXPERIMENT)
    run = MlflowClient().get_run(run_id)
    assert run.data.metrics["pooled.n_rotations"] == 1 and run.data.params["tokens_sha256"]
    rotation = registry.load_rotation(registry.model_name(EXPERIMENT, "layer1_resid_post"),
                                      alias="sneox-tiny-seed1-main-to-sneox-tiny-seed2-main")
    assert rotation.R.shape == (32, 32) and rotation.metadata["target_run"] == acts[2]
    assert rotation.metadata["rotation_ev"] >= rotation.metadata["identity_ev"]

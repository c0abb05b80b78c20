"""The experiment definitions of the scale test: pythia70m names exactly the paper's models, revisions,
corpus, sites and sizes, and neox-tiny runs the same stages on seeds trained here."""

from polyrot.experiments import pipeline
from polyrot.experiments.claims import MISSING, NO_POWER, PASS, evaluate
from polyrot.hf import lm
from polyrot.hf.config import PAPER_CORPUS

PAPER_SITES = ["layer0_resid_pre"] + [f"layer{layer}_resid_post" for layer in range(6)]


def nodes_of(exp, stage):
    return {node.id: node.params for node in exp.nodes.values() if node.stage.name == stage}


def test_pythia70m_names_the_papers_models_revisions_corpus_sites_and_sizes():
    for profile in ("paper", "cpu"):
        exp = pipeline.load_experiment("pythia70m", profile)
        acts = nodes_of(exp, "hf_activations")
        final = {node: p for node, p in acts.items() if p["revision"] == "step143000"}
        assert {p["model"] for p in final.values()} == {f"EleutherAI/pythia-70m-seed{seed}" for seed in range(1, 10)}
        # The null control: seeds 1 and 2 at their initialisation, on the same sample.
        assert {node: (p["model"], p["revision"]) for node, p in acts.items() if node not in final} == {
            "acts1-step3000": ("EleutherAI/pythia-70m-seed1", "step3000"),
            "untrained-acts1": ("EleutherAI/pythia-70m-seed1", "step0"),
            "untrained-acts2": ("EleutherAI/pythia-70m-seed2", "step0")}
        for node, p in acts.items():
            assert (p["corpus"], p["split"], p["sequences"], p["tokens"], p["corpus_seed"]) == \
                (PAPER_CORPUS, "train", "256", "256", "2026"), node
            if node != "acts1-step3000":
                assert p["sites"].split(",") == PAPER_SITES == lm.site_names(6)
        assert acts["acts1-step3000"]["model"] == "EleutherAI/pythia-70m-seed1"

        saes = nodes_of(exp, "train_sae")
        assert len(saes) == 12
        for node, p in saes.items():
            assert (int(p["expansion"]), float(p["lr"]), int(p["batch_size"]), int(p["steps"])) == (8, 5e-4, 4096, 4000)
            assert float(p["l1"]) == (1e-3 if node == "sae1-step3000" else 1e-5), node
        assert saes["sae1-step3000"]["site"] == "layer3_resid_post"

        audit = exp.nodes["audit"].params
        assert audit["source"] == "@acts1" and audit["targets"].split(",") == [f"@acts{s}" for s in range(2, 10)]
        assert audit["target_saes"].split(",") == [f"@sae{s}" for s in range(2, 10)]
        check = exp.nodes["audit-checkpoint"].params
        assert (check["source"], check["targets"]) == ("@acts1-step3000", "@acts1")
        null = exp.nodes["untrained-audit"].params
        assert (null["source"], null["saes"], null["targets"], null["target_saes"]) == \
            ("@untrained-acts1", "@untrained-sae1", "@untrained-acts2", "@untrained-sae2")
        assert exp.nodes["untrained-attribution"].params["revision"] == "step0"

        attribution = exp.nodes["attribution"].params
        assert (attribution["model"], attribution["revision"], attribution["sequences"], attribution["tokens"],
                attribution["ig_steps"]) == ("EleutherAI/pythia-70m-seed1", "step143000", "8", "128", "32")
        steer = exp.nodes["steering"].params
        assert (steer["source"], steer["site"], steer["eval_sequences"], steer["alphas"]) == \
            ("@acts1", "layer3_resid_post", "64", "0.5,1,2,4")
    assert nodes_of(pipeline.load_experiment("pythia70m", "paper"), "hf_activations")["acts1"]["dtype"] == "bfloat16"


def test_neox_tiny_runs_the_same_stages_on_four_seeds_trained_here():
    exp = pipeline.load_experiment("neox-tiny")
    pythia = pipeline.load_experiment("pythia70m", "cpu")
    assert {n.stage.name for n in exp.nodes.values()} >= {n.stage.name for n in pythia.nodes.values()}
    seeds = nodes_of(exp, "train_neox")
    assert sorted(p["seed"] for p in seeds.values()) == ["1", "2", "3", "4"]
    assert all(p["model_run"] == f"@seed{node[-1]}" for node, p in nodes_of(exp, "hf_activations").items()
               if node != "acts1-step60")
    assert exp.nodes["acts1-step60"].params["revision"] == "step60"
    assert all(exp.nodes[node].params["revision"] == "step0" for node in ("untrained-acts1", "untrained-acts2",
                                                                          "untrained-attribution"))


def test_the_scale_claims_read_seeds_not_the_planted_nulls_and_have_an_untrained_null():
    # An audit logs its planted nulls beside the seeds; only the model labels hold "seed".
    names = ["layer2_resid_post.{}.frob_ratio", "layer2_resid_post.{}.firing_raw_mean"]
    planted = {name.format(kind): 0.0 for name in names for kind in ("planted_same_model", "planted_haar")}
    for experiment, label in (("neox-tiny", "neox-tiny-seed2-main"), ("pythia70m", "pythia-70m-seed2-step143000")):
        claims = {c.id: c for c in pipeline.load_experiment(experiment).claims}
        untrained = label.replace("main", "step0").replace("step143000", "step0")
        for cid, value, null in (("rotation-frobenius-haar", 1.0, 1.0), ("firing-raw", 0.05, 0.0)):
            claim = claims[cid]
            assert evaluate(claim, {"audit": planted}).status == MISSING
            measured = {name.format(label): value for name in names}
            assert evaluate(claim, {"audit": {**planted, **measured}}).status == PASS
            # The untrained pair at the same value leaves the claim without power.
            v = evaluate(claim, {"audit": measured, "untrained-audit": {name.format(untrained): null for name in names}})
            assert v.null_n == 1 and v.status == (NO_POWER if null == value else PASS), (experiment, cid)

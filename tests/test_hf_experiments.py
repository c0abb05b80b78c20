"""The experiment definitions of the scale test: pythia70m names exactly the paper's models, revisions,
corpus, sites and sizes, and neox-tiny runs the same stages on seeds trained here."""

from polyrot.experiments import pipeline
from polyrot.hf import lm
from polyrot.hf.config import PAPER_CORPUS

PAPER_SITES = ["layer0_resid_pre"] + [f"layer{layer}_resid_post" for layer in range(6)]


def nodes_of(exp, stage):
    return {node.id: node.params for node in exp.nodes.values() if node.stage.name == stage}


def test_pythia70m_names_the_papers_models_revisions_corpus_sites_and_sizes():
    for profile in ("paper", "cpu"):
        exp = pipeline.load_experiment("pythia70m", profile)
        acts = nodes_of(exp, "hf_activations")
        seeds = {p["model"] for node, p in acts.items() if node != "acts1-step3000"}
        assert seeds == {f"EleutherAI/pythia-70m-seed{seed}" for seed in range(1, 10)}
        for node, p in acts.items():
            assert (p["corpus"], p["split"], p["sequences"], p["tokens"], p["corpus_seed"]) == \
                (PAPER_CORPUS, "train", "256", "256", "2026"), node
            assert p["revision"] == ("step3000" if node == "acts1-step3000" else "step143000"), node
            if node != "acts1-step3000":
                assert p["sites"].split(",") == PAPER_SITES == lm.site_names(6)
        assert acts["acts1-step3000"]["model"] == "EleutherAI/pythia-70m-seed1"

        saes = nodes_of(exp, "train_sae")
        assert len(saes) == 10
        for node, p in saes.items():
            assert (int(p["expansion"]), float(p["lr"]), int(p["batch_size"]), int(p["steps"])) == (8, 5e-4, 4096, 4000)
            assert float(p["l1"]) == (1e-3 if node == "sae1-step3000" else 1e-5), node
        assert saes["sae1-step3000"]["site"] == "layer3_resid_post"

        audit = exp.nodes["audit"].params
        assert audit["source"] == "@acts1" and audit["targets"].split(",") == [f"@acts{s}" for s in range(2, 10)]
        assert audit["target_saes"].split(",") == [f"@sae{s}" for s in range(2, 10)]
        check = exp.nodes["audit-checkpoint"].params
        assert (check["source"], check["targets"]) == ("@acts1-step3000", "@acts1")

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

"""The bars stage on tiny seeds (a self pair and a second seed), its artifacts, and bad input."""

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from polyrot import tracking
from polyrot.stages import STAGES
from polyrot.stages.train_seed import NAME as TRAIN_SEED
from polyrot.stages.train_seed import load_seed
from polyrot.toy.dyck import make_batch
from polyrot.toy.model import DyckTransformer, ModelConfig, load_model, save_model
from polyrot.toy.task import BatchSpec
from tests.conftest import TINY_TRAIN, cli, one_line_error

torch.set_num_threads(1)

EXPERIMENT = "tests-bars"
SMALL = dict(samples=1024, ig_steps=4, eval_sequences=24, means_sequences=48, starts=2, outer_iters=2,
             cayley_iters=20, threads=1)


@pytest.fixture(scope="module")
def second_seed(seed_run):
    return STAGES["train_seed"](seed=1, shared_io_from=seed_run, experiment="tests", **TINY_TRAIN)


@pytest.fixture(scope="module")
def bars_run(seed_run, second_seed):
    return STAGES["bars"](reference=seed_run, models=f"{seed_run},{second_seed}", decoy=True, lambdas="0,1",
                          null="1000,1001", experiment=EXPERIMENT, **SMALL)


def test_run_logs_every_bar_for_every_model(bars_run):
    run = MlflowClient().get_run(bars_run)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for m in ("s0", "s1"):
        for key in ("bar_b", "bar_b.depth", "bar_b.rel_err", "bar_p.max_mse", "bar_p.baseline_max_mse",
                    "bar_p.global_mse", "bar_c.r_ig", "bar_c.r_ap", "bar_pr.r_ig", "cross.bar_b", "cross.bar_c",
                    "cross.bar_pr", "joint.lambda1.max_mse", "time.bar_b", "time.bar_p", "time.bar_c"):
            assert f"{m}.{key}" in metrics, f"{m}.{key}"
        assert run.data.tags[f"polyrot.pass.{m}.bar_b"] in ("true", "false")
        # One batch of 1024 sequences: one split, and no batch-to-batch spread to estimate an error from.
        assert sum(f"{m}.bar_b.{split}" in metrics for split in ("train", "compositional", "long")) == 1
    assert {"decoy.bar_b.real", "decoy.bar_b.decoy", "decoy.bar_p", "time.total"} <= set(metrics)
    assert metrics["decoy.bar_b.real"] == metrics["s0.bar_b"] and metrics["decoy.bar_p"] > 0
    # The self pair: alignment finds the identity, the aligned model is the reference's function.
    assert metrics["s0.bar_p.max_mse"] < 1e-8 and run.data.tags["polyrot.pass.s0.bar_p"] == "true"
    assert metrics["s0.cross.bar_b"] < 1e-10 and metrics["s0.cross.r_measured"] > 0.9999
    assert metrics["s1.bar_p.max_mse"] > 1e-6 and metrics["s1.cross.bar_b"] > 1e-6
    assert metrics["s1.cross.bar_c"] == metrics["s1.cross.bar_pr"]
    # The untrained null: every bar but the joint sweep.
    for m in ("untrained1000", "untrained1001"):
        assert {f"{m}.{k}" for k in ("bar_b", "bar_b.depth", "bar_p.max_mse", "bar_c.r_ig", "bar_c.r_ap",
                                     "bar_pr.r_ig", "cross.bar_b", "cross.bar_c")} <= set(metrics)
        assert not any(k.startswith(f"{m}.joint") for k in metrics)
        # Integrated gradients complete to the ablation effect in an untrained model as well (4 steps).
        assert metrics[f"{m}.bar_c.r_ig"] > 0.99 and metrics[f"{m}.bar_b"] > metrics["s0.bar_b"]


def test_tables_and_figure(bars_run):
    artifacts = tracking.artifact_dir(bars_run)
    summary = pd.read_csv(artifacts / "summary.csv")
    assert list(summary["model"]) == ["s0", "s1", "untrained1000", "untrained1001"]
    bar_b = pd.read_csv(artifacts / "bar_b.csv")
    assert set(bar_b["scope"]) == {"overall", "head", "split"} and set(bar_b["model"]) == set(summary["model"])
    bar_p = pd.read_csv(artifacts / "bar_p.csv")
    assert bar_p.groupby("model")["mse"].max().to_dict() == pytest.approx(
        summary.set_index("model")["bar_p.max_mse"].to_dict())
    effects = pd.read_csv(artifacts / "effects.csv")
    assert effects.groupby(["model", "bar"]).size().to_dict() == {
        (m, b): 10 for m in ("s0", "s1", "untrained1000", "untrained1001") for b in ("bar_c", "bar_pr", "cross")}
    assert effects[effects["bar"] == "bar_c"]["ap"].notna().all()
    assert len(pd.read_csv(artifacts / "joint.csv")) == 4
    assert (artifacts / "fig_ig_vs_ap.png").stat().st_size > 0


def test_aligned_models_compute_the_original_function(bars_run, seed_run, second_seed):
    tokens = make_batch(BatchSpec("check", seed=5, n_sequences=32)).tokens
    for label, rid in (("s0", seed_run), ("s1", second_seed)):
        path = tracking.artifact_dir(bars_run) / "aligned" / label / "model.safetensors"
        aligned, original = load_model(path), load_seed(rid)
        with torch.no_grad():
            a, o = aligned(tokens), original(tokens)
        for head in a:
            assert torch.allclose(a[head], o[head], atol=1e-4), (label, head)


@pytest.fixture(scope="module")
def odd_runs(store):
    """A train_seed run of another architecture and a run of another stage."""
    with tracking.stage_run(TRAIN_SEED, {"seed": 7}, code_version="1", experiment=EXPERIMENT,
                            tags={"polyrot.seed": 7}) as wide:
        save_model(DyckTransformer(ModelConfig(d_mlp=128), seed=7), wide.staging)
        wide.log_artifact("model.safetensors")
        wide.log_artifact("config.json")
    with tracking.stage_run("train_sae", {}, code_version="1", experiment=EXPERIMENT) as other:
        pass
    return {"wide": wide.run_id, "other": other.run_id}


@pytest.mark.parametrize("args,message", [
    (["--reference", "{other}"], "expected a train_seed run"),
    (["--models", "{other}"], "expected a train_seed run"),
    (["--models", "{wide}"], "has another architecture than the reference"),
    (["--ig-steps", "0"], "--ig-steps must be positive, got 0"),
    (["--samples", "-1"], "--samples must be positive, got -1"),
    (["--lambdas", "0,x"], "--lambdas takes comma-separated numbers"),
    (["--models", ","], "--models names no run"),
    (["--null", "1000"], "--null takes two different integer seeds 'A,B', got '1000'"),
])
def test_bad_input_is_one_line_and_starts_no_run(seed_run, odd_runs, args, message):
    given = {"--reference": seed_run, "--models": seed_run, **dict(zip(args[::2], args[1::2]))}
    flags = [x for k, v in given.items() for x in (k, v.format(**odd_runs))]
    client = MlflowClient()
    before = len(client.search_runs([tracking.experiment_id(EXPERIMENT)]))
    one_line_error(cli("bars", "--experiment", EXPERIMENT, *flags), message)
    assert len(client.search_runs([tracking.experiment_id(EXPERIMENT)])) == before

"""The train_sae stage and export-sae against a temporary store: records, routes, groups, transcoders, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from polyrot import tracking
from polyrot.core.sae import evaluate_sae
from polyrot.errors import WrongStageError
from polyrot.stages import STAGES
from polyrot.stages.activations import site_activations
from polyrot.stages.train_sae import load_trained_sae, sae_runs
from polyrot.toy.dyck import make_batch
from polyrot.toy.task import BatchSpec
from tests.conftest import cli, one_line_error

EXPERIMENT = "tests-sae"
TINY_SAE = dict(steps=50, batch_size=256, eval_every=25, batch_sequences=300, heldout_sequences=128, threads=1)
TRAIN_SPEC = BatchSpec(name="sae", seed=2026, n_sequences=300)
HELDOUT_SPEC = BatchSpec(n_sequences=128)


@pytest.fixture(scope="module")
def sae_run(seed_run) -> str:
    return STAGES["train_sae"](model_run=seed_run, site="resid_mid_1", experiment=EXPERIMENT, **TINY_SAE)


@pytest.fixture(scope="module")
def acts_run(seed_run) -> str:
    """Activations on exactly the spec sae_run extracts on the fly."""
    return STAGES["activations"](model_run=seed_run, sites="resid_mid_0,resid_mid_1", batch_name="sae",
                                 batch_seed=2026, batch_sequences=300, experiment=EXPERIMENT, threads=1)


def run_count() -> int:
    return len(MlflowClient().search_runs([tracking.experiment_id(EXPERIMENT)]))


def weights(run_id: str) -> dict[str, torch.Tensor]:
    return load_file(tracking.artifact_dir(run_id) / "sae.safetensors")


def test_a_run_records_the_sae_its_config_and_its_metrics(sae_run, seed_run):
    client = MlflowClient()
    run = client.get_run(sae_run)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags[tracking.TAG_STAGE] == "train_sae" and tags[tracking.TAG_UPSTREAM + "model"] == seed_run
    assert tags["polyrot.site"] == "resid_mid_1" and "polyrot.group" not in tags
    assert BatchSpec.from_params(params) == TRAIN_SPEC and BatchSpec.from_params(params, "heldout") == HELDOUT_SPEC
    assert params["expansion"] == "8" and params["d_sae"] == "512" and params["target_site"] == ""
    assert int(params["n_rows"]) == int(make_batch(TRAIN_SPEC).mask.sum())

    artifacts = tracking.artifact_dir(sae_run)
    for path in ("sae.safetensors", "cfg.json"):
        assert tags[tracking.TAG_DIGEST + path] == tracking.sha256_file(artifacts / path)
    cfg = json.loads((artifacts / "cfg.json").read_text())
    assert cfg == {"d_in": 64, "expansion": 8, "l1": 0.001, "lr": 0.0005, "batch_size": 256, "steps": 50, "seed": 0,
                   "kind": "sae", "d_out": 64, "site": "resid_mid_1", "model_run_id": seed_run, "eval_every": 25,
                   "model_checkpoint": None, "precision": "bf16"}

    for name in ("loss", "mse", "ev", "l0", "dead_fraction"):
        assert [m.step for m in client.get_metric_history(sae_run, name)] == [25, 50]
        assert metrics[f"final.{name}"] == metrics[name]
    loss = [m.value for m in client.get_metric_history(sae_run, "loss")]
    assert loss[1] < loss[0]
    assert 0 < metrics["final.ev"] < 1 and 0 < metrics["final.l0"] <= 512 and 0 <= metrics["final.dead_fraction"] < 1
    assert abs(metrics["heldout.ev"] - metrics["final.ev"]) < 0.05  # same distribution, other sequences


def test_the_reloaded_sae_gives_the_logged_metrics(sae_run, seed_run):
    metrics = MlflowClient().get_run(sae_run).data.metrics
    sae = load_trained_sae(sae_run)
    assert sae.cfg.site == "resid_mid_1" and sae.cfg.model_run_id == seed_run
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(512), atol=1e-5)
    for spec, prefix in ((TRAIN_SPEC, "final"), (HELDOUT_SPEC, "heldout")):
        x = site_activations(seed_run, spec, ["resid_mid_1"])["resid_mid_1"]
        m = evaluate_sae(sae, x)
        for name in ("ev", "mse", "l0", "dead_fraction"):
            assert m[name] == pytest.approx(metrics[f"{prefix}.{name}"], rel=1e-9, abs=1e-12), (prefix, name)


def test_an_activations_run_trains_the_same_sae_as_its_model_run(sae_run, acts_run, seed_run):
    result = cli("train-sae", "--activations-run", acts_run, "--site", "resid_mid_1", "--experiment", EXPERIMENT,
                 *[x for k, v in TINY_SAE.items() if k != "batch_sequences"
                   for x in (f"--{k.replace('_', '-')}", str(v))])
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip()
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags[tracking.TAG_UPSTREAM + "model"] == seed_run and tags[tracking.TAG_UPSTREAM + "activations"] == acts_run
    assert load_trained_sae(run_id).cfg.model_run_id == seed_run
    a, b = weights(run_id), weights(sae_run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_several_sites_are_child_runs_of_a_group(sae_run, seed_run):
    client = MlflowClient()
    group = STAGES["train_sae"](model_run=seed_run, sites="resid_mid_0,resid_mid_1", experiment=EXPERIMENT, **TINY_SAE)
    run = client.get_run(group)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_STAGE] == "train_sae" and run.data.tags["polyrot.group"] == "sites"
    children = client.search_runs([tracking.experiment_id(EXPERIMENT)], f"tags.mlflow.parentRunId = '{group}'")
    by_site = {c.data.tags["polyrot.site"]: c for c in children}
    assert sorted(by_site) == ["resid_mid_0", "resid_mid_1"]
    assert sae_runs(group) == {site: c.info.run_id for site, c in by_site.items()}
    for site, child in by_site.items():
        assert child.info.status == "FINISHED" and child.data.tags[tracking.TAG_STAGE] == "train_sae"
        assert child.data.params["site"] == site and child.data.params["sites"] == ""
        assert child.data.params["parent_run"] == group
        assert run.data.metrics[f"final.ev.{site}"] == child.data.metrics["final.ev"]
        assert load_trained_sae(child.info.run_id).cfg.site == site
    # A child is the standalone run of its site: the same weights, and one reuse key.
    child = by_site["resid_mid_1"]
    a, b = weights(child.info.run_id), weights(sae_run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    reuse = "polyrot.reuse_key"
    assert child.data.tags.get(reuse) == client.get_run(sae_run).data.tags.get(reuse)
    with pytest.raises(WrongStageError, match=f"resid_mid_0={by_site['resid_mid_0'].info.run_id}"):
        load_trained_sae(group)
    one_line_error(cli("export-sae", group, "unused"), "groups one train_sae run per site")


def test_under_mlflow_run_the_entry_point_run_is_the_group(seed_run, store):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": tracking.tracking_uri(), "MLFLOW_REGISTRY_URI": tracking.registry_uri()}
    params = {"model_run": seed_run, "sites": "resid_mid_0,resid_mid_1", "steps": 10, "eval_every": 10,
              "batch_size": 64, "batch_sequences": 50, "heldout_sequences": 20, "threads": 1}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(Path(__file__).resolve().parents[1]),
           "-e", "train_sae", "--env-manager", "local", "--experiment-name", "tests-sae-mlflow-run",
           *[x for k, v in params.items() for x in ("-P", f"{k}={v}")]]
    tracking.experiment_id("tests-sae-mlflow-run")  # made by polyrot, not with MLflow's ./mlruns default
    done = subprocess.run(cmd, env=env, cwd=store, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    group = done.stdout.strip().splitlines()[-1]
    client = MlflowClient()
    assert client.get_run(group).data.tags["polyrot.group"] == "sites"
    # The children nest under the adopted run in its experiment, not in --experiment's default.
    experiment = tracking.experiment_id("tests-sae-mlflow-run")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{group}'")
    assert sorted(c.data.tags["polyrot.site"] for c in children) == ["resid_mid_0", "resid_mid_1"]
    assert sae_runs(group) == {c.data.tags["polyrot.site"]: c.info.run_id for c in children}


def test_a_transcoder_maps_the_mlp_input_to_its_output(seed_run):
    client = MlflowClient()
    run_id = STAGES["train_sae"](model_run=seed_run, kind="transcoder", layer=1, experiment=EXPERIMENT, **TINY_SAE)
    run = client.get_run(run_id)
    assert run.data.params["target_site"] == "mlp_out_1" and run.data.tags["polyrot.kind"] == "transcoder"
    sae = load_trained_sae(run_id)
    assert sae.cfg.kind == "transcoder" and sae.cfg.site == "ln2_out_1" and sae.b_out.shape == (64,)
    acts = site_activations(seed_run, TRAIN_SPEC, ["ln2_out_1", "mlp_out_1"])
    m = evaluate_sae(sae, acts["ln2_out_1"], acts["mlp_out_1"])
    assert m["ev"] == pytest.approx(run.data.metrics["final.ev"], rel=1e-9)
    mse = [x.value for x in client.get_metric_history(run_id, "mse")]
    assert mse[1] < mse[0]
    # Naming the layer by its output site trains the same transcoder.
    same = STAGES["train_sae"](model_run=seed_run, kind="transcoder", site="mlp_out_1", experiment=EXPERIMENT,
                               **TINY_SAE)
    a, b = weights(same), weights(run_id)
    assert all(torch.equal(a[k], b[k]) for k in a)
    one_line_error(cli("export-sae", run_id, "unused"), "SAELens export supports kind='sae' only")


def test_export_sae_reproduces_the_reconstructions_with_saelens_formulas(sae_run, seed_run, tmp_path):
    result = cli("export-sae", sae_run, str(tmp_path / "export"))
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "export" / "cfg.json").read_text())
    assert cfg["d_in"] == 64 and cfg["d_sae"] == 512 and cfg["hook_name"] == "resid_mid_1"
    t = load_file(tmp_path / "export" / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in t.items()} == {"W_enc": (64, 512), "b_enc": (512,), "W_dec": (512, 64),
                                                         "b_dec": (64,)}
    x = site_activations(seed_run, HELDOUT_SPEC, ["resid_mid_1"])["resid_mid_1"]
    # SAELens' standard SAE with apply_b_dec_to_input: row vectors times [d_in, d_sae] matrices.
    f = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    x_hat = f @ t["W_dec"] + t["b_dec"]
    ours, f_ours = load_trained_sae(sae_run)(x)
    assert torch.allclose(x_hat, ours, atol=1e-5) and torch.allclose(f, f_ours, atol=1e-5)
    assert (x_hat - x).square().mean() < x.var(dim=0).mean()


def test_a_corrupt_activations_artifact_is_refused(acts_run):
    path = tracking.artifact_dir(acts_run) / "activations.safetensors"
    original = path.read_bytes()
    before = run_count()
    try:
        path.write_bytes(original[:-8] + b"\x00" * 8)
        one_line_error(cli("train-sae", "--activations-run", acts_run, "--site", "resid_mid_1",
                           "--experiment", EXPERIMENT), "is corrupt: sha256")
    finally:
        path.write_bytes(original)
    assert run_count() == before


@pytest.mark.parametrize("args,message", [
    (["--site", "resid_mid_7"], "unknown site 'resid_mid_7'; valid sites: resid_pre_0, ln1_out_0"),
    (["--sites", "resid_mid_1,bogus"], "unknown site 'bogus'; valid sites:"),
    (["--site", "resid_mid_1", "--expansion", "0"], "--expansion must be positive, got 0"),
    (["--site", "resid_mid_1", "--expansion", "-8"], "--expansion must be positive, got -8"),
    (["--site", "resid_mid_1", "--steps", "0"], "--steps must be positive"),
    (["--site", "resid_mid_1", "--l1", "-1"], "--l1 must be non-negative"),
    (["--site", "resid_mid_1", "--kind", "crosscoder"], "--kind must be one of sae, transcoder"),
    (["--site", "resid_mid_0,resid_mid_1"], "--site takes one site; --sites takes several"),
    (["--site", "resid_mid_1", "--sites", "resid_mid_0"], "give exactly one of --site, --sites and --layer"),
    ([], "give exactly one of --site, --sites and --layer"),
    (["--layer", "1"], "--layer selects a transcoder's layer"),
    (["--kind", "transcoder", "--site", "resid_mid_1"], "'resid_mid_1' names no layer L"),
    (["--kind", "transcoder", "--layer", "2"], "unknown site 'ln2_out_2'; valid sites:"),
])
def test_bad_input(seed_run, args, message):
    before = run_count()
    one_line_error(cli("train-sae", "--model-run", seed_run, *args, "--experiment", EXPERIMENT), message)
    assert run_count() == before


def test_bad_runs(seed_run, acts_run, sae_run):
    cases = [
        (["--model-run", sae_run], "is a train_sae run; expected a train_seed run"),
        (["--model-run", acts_run], "is a activations run; expected a train_seed run"),
        (["--activations-run", seed_run], "is a train_seed run; expected a activations run"),
        (["--model-run", "0123456789abcdef0123456789abcdef"], "not found"),
        ([], "give exactly one of --model-run and --activations-run"),
        (["--model-run", seed_run, "--activations-run", acts_run],
         "give exactly one of --model-run and --activations-run"),
        (["--activations-run", acts_run, "--batch-sequences", "100"], "--activations-run brings its own"),
    ]
    before = run_count()
    for args, message in cases:
        one_line_error(cli("train-sae", *args, "--site", "resid_mid_1", "--experiment", EXPERIMENT), message)
    one_line_error(cli("train-sae", "--activations-run", acts_run, "--site", "resid_post_1",
                       "--experiment", EXPERIMENT), "has no site 'resid_post_1'; it has: resid_mid_0, resid_mid_1")
    assert run_count() == before


def test_a_checkpoint_of_the_model_run_is_audited_with_saes_of_that_checkpoint(seed_run):
    early = STAGES["train_sae"](model_run=seed_run, site="resid_mid_1", checkpoint="step-000020",
                                experiment=EXPERIMENT, **TINY_SAE)
    sae = load_trained_sae(early)
    assert sae.cfg.model_checkpoint == "step-000020" and sae.cfg.model_run_id == seed_run
    acts = site_activations(seed_run, HELDOUT_SPEC, ["resid_mid_1"])["resid_mid_1"]
    final_ev = evaluate_sae(sae, acts)["ev"]
    logged = MlflowClient().get_run(early).data.metrics["heldout.ev"]
    assert abs(final_ev - logged) > 1e-3  # the SAE was fit to the step-20 model, not the final one
    audit = STAGES["audit"](source=seed_run, saes=early, targets=seed_run, checkpoint="step-000020",
                            batch_sequences=64, experiment=EXPERIMENT, threads=1)
    row = MlflowClient().get_run(audit).data.metrics
    assert abs(row["resid_mid_1.s0.sae_self_ev"] - row["resid_mid_1.s0.sae_rotated_ev"]) < 1e-6
    one_line_error(cli("audit", "--source", seed_run, "--saes", early, "--targets", seed_run,
                       "--experiment", EXPERIMENT), "was trained on step-000020 of its model, the audit reads the final weights")

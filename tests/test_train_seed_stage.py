"""The train_seed stage against a temporary store: what a run records, Cohort A, resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from polyrot import tracking
from polyrot.stages import STAGES
from polyrot.stages.specs import RECIPE, RECIPE_OPTIONS, TRAIN_SEED
from polyrot.stages.train_seed import load_seed
from polyrot.toy import train as train_module
from polyrot.toy.error_analysis import error_table, violation_table
from polyrot.toy.model import SHARED_IO
from polyrot.toy.recipe import PROFILES, TrainConfig
from polyrot.toy.train import confirm_sets
from tests.conftest import TINY_TRAIN, cli, one_line_error

BIN = Path(sys.executable).parent


def tiny_flags(**overrides) -> list[str]:
    opts = {**TINY_TRAIN, **overrides}
    return [f for k, v in opts.items() for f in (f"--{k.replace('_', '-')}", str(v))]


def test_a_run_records_params_metrics_artifacts_and_provenance(seed_run):
    run = MlflowClient().get_run(seed_run)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags[tracking.TAG_STAGE] == "train_seed" and tags["polyrot.cohort"] == "B"
    assert tags[tracking.TAG_VERSION] and len(tags[tracking.TAG_COMMIT]) in (40, 7) or tags[tracking.TAG_COMMIT] == "unknown"
    assert tags[tracking.TAG_DIRTY] in ("true", "false")
    assert params["seed"] == "0" and params["max_steps"] == "40" and params["profile"] == "cpu"
    assert params["recipe.lr"] == "0.002" and params["recipe.batch_size"] == "32"
    assert params["resolved_device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    for key in ("acc.train.tok", "acc.compositional.depth", "acc.long.valid", "loss.train.tok", "acc.min",
                "final.acc.min", "train.loss"):
        assert key in metrics
    history = MlflowClient().get_metric_history(seed_run, "acc.min")
    assert [m.step for m in history] == [20, 40]
    artifacts = tracking.artifact_dir(seed_run)
    for path in ("model.safetensors", "config.json", "train.json", "checkpoints/step-000020.safetensors",
                 "checkpoints/step-000020.json", "checkpoints/step-000040.safetensors"):
        assert (artifacts / path).is_file()
        assert tags[tracking.TAG_DIGEST + path] == tracking.sha256_file(artifacts / path)
    state = json.loads((artifacts / "checkpoints/step-000020.json").read_text())
    assert state["step"] == 20 and state["rows_consumed"] == 20 * 32
    # Drawing all 64 confirmation rows a split reads the whole set: every draw is the final evaluation.
    assert metrics["final.draws.min_median"] == pytest.approx(metrics["final.acc.min"], abs=1e-12)
    assert metrics["final.draws.pass_rate"] == 0.0  # a 40-step seed is far from 99.99%
    summary = json.loads((artifacts / "train.json").read_text())
    assert summary["final_draws"]["min_p05"] == metrics["final.draws.min_p05"] and "quick_crossing" in summary
    # The error table counts the confirmation sets' positions and the final evaluation's errors.
    errors = pd.read_csv(artifacts / "errors.csv")
    depth = errors[(errors["feature"] == "depth") & (errors["split"] == "long") & (errors["head"] == "valid")]
    wrong = depth["errors"].sum() / depth["positions"].sum()
    assert abs(wrong - (1 - metrics["final.acc.long.valid"])) < 1e-9 and tags[tracking.TAG_DIGEST + "errors.csv"]
    # The violation table holds every confirmation row that breaks the grammar, once.
    violations = pd.read_csv(artifacts / "violations.csv")
    confirm = confirm_sets(TrainConfig.from_profile("cpu", **TINY_TRAIN))
    for split, batch in confirm.batches.items():
        assert violations[violations["split"] == split]["rows"].sum() == int(batch.valid.any(1).sum())
    assert tags[tracking.TAG_DIGEST + "violations.csv"]


def test_cohort_a_keeps_the_shared_io_bit_identical(seed_run):
    run_id = STAGES["train_seed"](seed=1, shared_io_from=seed_run, experiment="tests", **TINY_TRAIN)
    run = MlflowClient().get_run(run_id)
    assert run.data.tags[tracking.TAG_UPSTREAM + "shared_io"] == seed_run
    assert run.data.tags["polyrot.shared_io_identical"] == "true" and run.data.tags["polyrot.cohort"] == "A"
    source = load_file(tracking.artifact_dir(seed_run) / "model.safetensors")
    trained = load_file(tracking.artifact_dir(run_id) / "model.safetensors")
    for key in SHARED_IO:
        assert torch.equal(source[key], trained[key]), key
    assert not torch.equal(source["blocks.0.mlp.W_in"], trained["blocks.0.mlp.W_in"])


def test_each_milestone_checkpoint_has_its_error_table(store, monkeypatch):
    # A 40-step seed confirms no real milestone; a level of 0 is confirmed at the first evaluation.
    monkeypatch.setattr(train_module, "MILESTONES", (0.0,))
    run_id = STAGES["train_seed"](seed=8, experiment="tests", **TINY_TRAIN)
    artifacts = tracking.artifact_dir(run_id)
    assert MlflowClient().get_run(run_id).data.tags[tracking.TAG_MILESTONE + "0.0"] == "20"
    errors = pd.read_csv(artifacts / "checkpoints/first-0.0.errors.csv")
    assert set(errors["split"]) == {"train", "compositional", "long"} and errors["errors"].sum() > 0
    # It scores the milestone's model, not the kept one: the step-20 weights give the same table.
    model = load_seed(run_id, "first-0.0")
    confirm = confirm_sets(TrainConfig.from_profile("cpu", **TINY_TRAIN))
    pd.testing.assert_frame_equal(errors, error_table(model, confirm.batches), check_dtype=False)
    violations = pd.read_csv(artifacts / "checkpoints/first-0.0.violations.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(violations, violation_table(model, confirm.batches), check_dtype=False)


def test_killed_run_resumes_to_the_uninterrupted_weights(store):
    flags = tiny_flags(seed=5, max_steps=400, checkpoint_every=100, eval_every=100, experiment="tests")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    exp = tracking.experiment_id("tests")  # made before the training process starts, not raced with it
    proc = subprocess.Popen([str(BIN / "polyrot"), "train-seed", *flags], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    client = MlflowClient()
    deadline, killed = time.time() + 120, None
    while time.time() < deadline and killed is None:
        time.sleep(0.2)
        for r in client.search_runs([exp], "params.seed = '5' and attributes.status = 'RUNNING'"):
            if any(k.endswith("step-000100.json") for k in r.data.tags):
                proc.send_signal(signal.SIGKILL)
                killed = r.info.run_id
    proc.wait()
    assert killed, "the training run never reached its first checkpoint"
    assert client.get_run(killed).info.status == "RUNNING"  # SIGKILL leaves no chance to clean up
    one_line_error(cli("train-seed", "--resume", killed, "--lr", "0.01", "--experiment", "tests"), "conflicts")
    assert client.get_run(killed).info.status == "RUNNING"  # refused input leaves the killed run as it was

    resumed = cli("train-seed", "--resume", killed, "--threads", "1", "--experiment", "tests")
    assert resumed.exit_code == 0, resumed.output
    resumed_id = resumed.stdout.strip()
    full = STAGES["train_seed"](**{**TINY_TRAIN, "seed": 5, "max_steps": 400, "checkpoint_every": 100,
                                   "eval_every": 100, "experiment": "tests"})
    a = load_file(tracking.artifact_dir(full) / "model.safetensors")
    b = load_file(tracking.artifact_dir(resumed_id) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert MlflowClient().get_run(resumed_id).data.tags[tracking.TAG_UPSTREAM + "resume"] == killed
    assert client.get_run(killed).info.status == "FAILED"  # continued, the killed run no longer shows as training


def test_a_run_whose_process_still_trains_is_not_resumed(seed_run):
    client = MlflowClient()
    assert client.get_run(seed_run).data.tags[tracking.TAG_PID] == str(os.getpid())  # trained in this process
    client.update_run(seed_run, status="RUNNING")  # as if this process were still training it
    try:
        one_line_error(cli("train-seed", "--resume", seed_run, "--max-steps", "60", "--threads", "1"),
                       f"run {seed_run} is still running (pid {os.getpid()} on this host); stop it before continuing it")
        assert client.get_run(seed_run).info.status == "RUNNING"
    finally:
        client.update_run(seed_run, status="FINISHED")


def test_a_resumed_run_holds_the_milestone_checkpoints_of_the_run_it_continues(store, monkeypatch):
    monkeypatch.setattr(train_module, "MILESTONES", (0.0,))  # confirmed at the first evaluation, step 20
    first = STAGES["train_seed"](seed=9, experiment="tests", **TINY_TRAIN)
    resumed = STAGES["train_seed"](resume=first, max_steps=60, experiment="tests-budget", threads=1)
    tags = MlflowClient().get_run(resumed).data.tags
    assert tags[tracking.TAG_MILESTONE + "0.0"] == "20"
    for suffix in ("safetensors", "json", "errors.csv", "violations.csv"):
        path = f"checkpoints/first-0.0.{suffix}"
        assert tags[tracking.TAG_DIGEST + path] == MlflowClient().get_run(first).data.tags[tracking.TAG_DIGEST + path]
    original, carried = load_seed(first, "first-0.0"), load_seed(resumed, "first-0.0")
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), carried.state_dict().values()))


def test_a_run_resumed_with_a_larger_budget_continues_where_it_stopped(seed_run):
    resumed = cli("train-seed", "--resume", seed_run, "--max-steps", "60", "--threads", "1",
                  "--experiment", "tests-budget")
    assert resumed.exit_code == 0, resumed.output
    run = MlflowClient().get_run(resumed.stdout.strip())
    assert run.data.params["recipe.max_steps"] == "60" and run.data.params["recipe.lr"] == "0.002"
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "acc.min")] == [60]
    # The same as continuing the finished run's last checkpoint under the new budget by hand.
    stem = tracking.artifact_dir(seed_run) / "checkpoints/step-000040"
    state, cfg = train_module.restore_checkpoint(load_file(f"{stem}.safetensors"),
                                                 json.loads(stem.with_suffix(".json").read_text()))
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    by_hand = train_module.train(state, TrainConfig.from_dict({**cfg.to_dict(), "max_steps": 60}), progress=False)
    assert by_hand.step == 60 and by_hand.rows_consumed == 60 * 32
    last = load_file(tracking.artifact_dir(run.info.run_id) / "checkpoints/step-000060.safetensors")
    weights = by_hand.model.state_dict()
    assert all(torch.equal(last[f"model.{k}"], weights[k]) for k in weights)
    assert not all(torch.equal(before[k], weights[k]) for k in weights)  # 20 more steps moved them


@pytest.mark.parametrize("flags,message", [
    (("--lr", "0.01"), "--lr 0.01 conflicts with the resumed run's 0.002; only --max-steps, --extra-steps may change"),
    (("--max-steps", "40"), "--max-steps 40 must exceed the step of"),
])
def test_a_resumed_run_keeps_its_recipe_but_for_the_budget(seed_run, flags, message):
    before = len(MlflowClient().search_runs([tracking.experiment_id("tests")]))
    one_line_error(cli("train-seed", "--resume", seed_run, *flags, "--experiment", "tests"), message)
    assert len(MlflowClient().search_runs([tracking.experiment_id("tests")])) == before


@pytest.mark.parametrize("option", ["--shared-io-from", "--resume"])
def test_unknown_run_id(store, option):
    one_line_error(cli("train-seed", option, "0123456789abcdef0123456789abcdef"), "not found")


def test_unfinished_run(store):
    client = MlflowClient()
    exp = tracking.experiment_id("tests")
    run = client.create_run(exp, tags={tracking.TAG_STAGE: "train_seed"})
    one_line_error(cli("train-seed", "--shared-io-from", run.info.run_id), "RUNNING, not FINISHED")


def test_run_of_another_stage(store):
    with tracking.stage_run("other_stage", {}, code_version="1", experiment="tests") as run:
        pass
    one_line_error(cli("train-seed", "--shared-io-from", run.run_id), "expected a train_seed run")


def test_tampered_artifact(seed_run, tmp_path):
    weights = tracking.artifact_dir(seed_run) / "model.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-8] + b"\x00" * 8)
        one_line_error(cli("train-seed", "--shared-io-from", seed_run), "corrupt")
    finally:
        weights.write_bytes(original)
    assert load_seed(seed_run) is not None


@pytest.mark.parametrize("flag,value,message", [
    ("--max-steps", "0", "--max-steps must be positive"),
    ("--batch-size", "-4", "--batch-size must be positive"),
    ("--lr", "0", "--lr must be positive"),
    ("--lr", "fast", "--lr expects float"),
    ("--min-lr-ratio", "1.5", "--min-lr-ratio must lie in [0, 1]"),
    ("--late-batch-from", "1.5", "--late-batch-from must lie in [0, 1]"),
    ("--profile", "gpu", "--profile must be one of cpu, paper"),
    ("--device", "gpu", "unknown device 'gpu'; use auto, cpu, cuda or cuda:N"),
    pytest.param("--device", "cuda", "device 'cuda' asked for, but torch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_parameters(store, flag, value, message):
    client = MlflowClient()
    before = len(client.search_runs([tracking.experiment_id("tests")]))
    one_line_error(cli("train-seed", flag, value, "--experiment", "tests"), message)
    assert len(client.search_runs([tracking.experiment_id("tests")])) == before  # nothing was started


def test_a_failure_inside_a_run_marks_it_failed(store):
    with pytest.raises(RuntimeError):
        with tracking.stage_run("train_seed", {"x": 1}, code_version="1", experiment="tests") as run:
            raise RuntimeError("boom")
    assert MlflowClient().get_run(run.run_id).info.status == "FAILED"


def test_mlflow_run_entry_point_matches_the_cli(store):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": tracking.tracking_uri(), "MLFLOW_REGISTRY_URI": tracking.registry_uri()}
    cmd = [str(BIN / "mlflow"), "run", str(repo), "-e", "train_seed", "--env-manager", "local",
           "--experiment-name", "tests"] + [x for k, v in {**TINY_TRAIN, "seed": 2}.items() for x in ("-P", f"{k}={v}")]
    tracking.experiment_id("tests")  # made by polyrot, not by `mlflow run` with MLflow's ./mlruns default
    done = subprocess.run(cmd, env=env, cwd=store, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient()
    [run] = client.search_runs([tracking.experiment_id("tests")], "params.seed = '2'")
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_STAGE] == "train_seed"
    assert run.data.params["recipe.max_steps"] == "40"
    assert (tracking.artifact_dir(run.info.run_id) / "model.safetensors").is_file()
    via_cli = STAGES["train_seed"](seed=2, experiment="tests-cli", **TINY_TRAIN)
    a = load_file(tracking.artifact_dir(run.info.run_id) / "model.safetensors")
    b = load_file(tracking.artifact_dir(via_cli) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mlproject_is_generated_from_the_stage_definitions():
    assert cli("mlproject", "--check").exit_code == 0


def test_a_process_that_fetched_artifacts_leaves_no_download_folder(seed_run, tmp_path):
    code = ("import glob, sys; from polyrot.stages.train_seed import load_seed; load_seed(sys.argv[1]); "
            "print(len(glob.glob(sys.argv[2] + '/polyrot-fetch-*')))")
    done = subprocess.run([sys.executable, "-c", code, seed_run, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["1"], done.stderr[-2000:]  # there while it ran
    assert not list(tmp_path.glob("polyrot-fetch-*"))


def test_each_recipe_option_names_the_profiles_values_and_overrides_one_recipe_field():
    help_text = " ".join(cli("train-seed", "--help").output.split())
    assert "--min-lr-ratio FLOAT the cosine's floor as a fraction of the peak (cpu: 0.25; paper: 0.02)" in help_text
    assert "--eval-every INT steps between held-out evaluations (default 500)" in help_text
    for option in RECIPE:
        assert option.default is None  # unset, the profile's value wins
        values = {getattr(TrainConfig.from_profile(p), option.name) for p in PROFILES}
        assert option.help.endswith(")") and ("default" in option.help) == (len(values) == 1), option.help
    assert set(RECIPE_OPTIONS) <= set(TrainConfig.from_profile("cpu").to_dict())
    # What TrainConfig accepts, the CLI accepts: a late batch from step 0 is the whole run at that batch.
    assert TRAIN_SEED.parse({"late_batch_from": "0"})["late_batch_from"] == 0.0

"""The activations stage against a temporary store: what a run stores, stored vs on-the-fly, bad input."""

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from polyrot import tracking
from polyrot.errors import ArtifactCorruptError
from polyrot.stages import STAGES
from polyrot.stages.activations import load_activations, load_rows, site_activations
from polyrot.toy.activations import condition_rows
from polyrot.toy.dyck import make_batch
from polyrot.toy.task import BatchSpec
from tests.conftest import cli, one_line_error

EXPERIMENT = "tests-activations"
SPEC = BatchSpec(n_sequences=200)
# The TransformerLens spelling of resid_post_1 checks that aliases are stored under the paper's name.
SITES = "resid_mid_0,resid_mid_1,blocks.1.hook_resid_post"
CANONICAL = ["resid_mid_0", "resid_mid_1", "resid_post_1"]


@pytest.fixture(scope="module")
def acts_run(seed_run) -> str:
    return STAGES["activations"](model_run=seed_run, sites=SITES, batch_sequences=SPEC.n_sequences,
                                 experiment=EXPERIMENT, threads=1)


def run_count() -> int:
    return len(MlflowClient().search_runs([tracking.experiment_id(EXPERIMENT)]))


def test_a_run_records_the_spec_the_tensors_and_the_row_labels(acts_run, seed_run):
    run = MlflowClient().get_run(acts_run)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags[tracking.TAG_STAGE] == "activations" and tags[tracking.TAG_UPSTREAM + "model"] == seed_run
    assert BatchSpec.from_params(params) == SPEC
    assert params["batch_seed"] == "12345" and params["batch_sequences"] == "200" and params["dtype"] == "float32"
    assert all(params[f"d.{site}"] == "64" for site in CANONICAL)

    artifacts = tracking.artifact_dir(acts_run)
    for path in ("activations.safetensors", "rows.safetensors"):
        assert tags[tracking.TAG_DIGEST + path] == tracking.sha256_file(artifacts / path)
    stored = load_file(artifacts / "activations.safetensors")
    assert sorted(stored) == sorted(CANONICAL)
    batch = make_batch(SPEC)
    n_rows = int(batch.mask.sum())
    assert metrics["n_rows"] == n_rows and metrics["n_sequences"] == 200
    assert all(t.shape == (n_rows, 64) and t.dtype == torch.float32 for t in stored.values())

    rows = load_rows(acts_run)
    expected = condition_rows(batch)
    assert sorted(rows) == ["depth", "position", "token", "valid"]
    assert all(torch.equal(rows[k], expected[k]) for k in expected)
    assert rows["position"][0] == 0 and rows["token"][0] == 1  # row 0 is sequence 0's BOS


def test_stored_and_recomputed_activations_are_identical(acts_run, seed_run):
    stored, spec, model_run = load_activations(acts_run)
    assert spec == SPEC and model_run == seed_run
    recomputed = site_activations(seed_run, spec, SITES.split(","))
    assert list(recomputed) == CANONICAL
    for site in CANONICAL:
        assert torch.equal(stored[site], recomputed[site]), site


def test_float16_storage_halves_the_file_and_comes_back_as_float32(seed_run):
    result = cli("activations", "--model-run", seed_run, "--sites", "resid_mid_1", "--batch-sequences", "200",
                 "--float16", "true", "--threads", "1", "--experiment", EXPERIMENT)
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip()
    assert MlflowClient().get_run(run_id).data.params["dtype"] == "float16"
    assert load_file(tracking.artifact_dir(run_id) / "activations.safetensors")["resid_mid_1"].dtype == torch.float16
    stored, _, _ = load_activations(run_id)
    exact = site_activations(seed_run, SPEC, ["resid_mid_1"])["resid_mid_1"]
    assert stored["resid_mid_1"].dtype == torch.float32
    assert torch.allclose(stored["resid_mid_1"], exact, rtol=1e-3, atol=1e-4)


def test_a_corrupt_artifact_is_refused(acts_run):
    path = tracking.artifact_dir(acts_run) / "activations.safetensors"
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-8] + b"\x00" * 8)
        with pytest.raises(ArtifactCorruptError, match="corrupt"):
            load_activations(acts_run)
    finally:
        path.write_bytes(original)
    assert load_activations(acts_run)[1] == SPEC


@pytest.mark.parametrize("args,message", [
    (["--sites", "resid_mid_1,resid_mid_9"], "unknown site 'resid_mid_9'; valid sites: resid_pre_0, ln1_out_0"),
    (["--sites", " , "], "no site given"),
    (["--sites", "resid_mid_1", "--batch-sequences", "0"], "--batch-sequences must be positive"),
    (["--sites", "resid_mid_1", "--batch-min-len", "30", "--batch-max-len", "20"], "1 <= min_len <= max_len"),
    (["--sites", "resid_mid_1", "--batch-split", "test"], "--batch-split must be one of train, compositional, long"),
])
def test_bad_input(seed_run, args, message):
    before = run_count()
    one_line_error(cli("activations", "--model-run", seed_run, *args, "--experiment", EXPERIMENT), message)
    assert run_count() == before


def test_a_model_run_of_another_stage_is_refused(acts_run):
    before = run_count()
    one_line_error(cli("activations", "--model-run", acts_run, "--sites", "resid_mid_1", "--experiment", EXPERIMENT),
                   "is a activations run; expected a train_seed run")
    assert run_count() == before


def test_the_model_run_is_required(store):
    one_line_error(cli("activations", "--sites", "resid_mid_1"), "--model-run is required")

"""Steering vectors: diff of means, the intervention, exact transfer through a rotated copy, the stage."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from polyrot import tracking
from polyrot.core.rotation import haar_rotation
from polyrot.stages import STAGES
from polyrot.stages.train_seed import load_seed
from polyrot.toy.activations import condition_rows, extract
from polyrot.toy.dyck import make_batch
from polyrot.toy.model import fold_rmsnorm, rotate_residual
from polyrot.toy.steering import (
    NEGLIGIBLE,
    diff_of_means,
    dose_multiple,
    effect,
    random_controls,
    regime,
    steer,
    toy_vectors,
    transfer_ratio,
)
from polyrot.toy.task import BatchSpec
from tests.conftest import TINY_TRAIN, cli, one_line_error
from tests.test_fit_rotation_stage import log_model_run, rotated_copy_runs

torch.set_num_threads(1)

EXPERIMENT = "tests-steering"
SITE = "resid_mid_1"
SMALL_BATCH = {"batch_sequences": 256}


def test_diff_of_means_recovers_a_planted_direction():
    gen = torch.Generator().manual_seed(0)
    planted = torch.randn(64, generator=gen)
    planted /= planted.norm()
    acts = torch.randn(4000, 64, generator=gen)
    labels = torch.rand(4000, generator=gen) < 0.5
    acts[labels] += 3 * planted
    found = diff_of_means(acts, labels, ~labels)
    assert torch.nn.functional.cosine_similarity(found, planted, dim=0) > 0.99
    with pytest.raises(ValueError, match="mask_b selects no row"):
        diff_of_means(acts, labels, torch.zeros_like(labels))


def test_random_controls_have_the_vectors_norm_and_are_seeded():
    v = torch.randn(64)
    controls = random_controls(v, seed=3, n=4)
    assert all(torch.isclose(c.norm(), v.norm()) for c in controls)
    assert all(torch.equal(a, b) for a, b in zip(controls, random_controls(v, seed=3, n=4)))
    # Drawn in turn: fewer draws are a prefix, and the draws differ from each other and across seeds.
    assert torch.equal(random_controls(v, seed=3)[0], controls[0])
    assert abs(float(torch.nn.functional.cosine_similarity(controls[0], controls[1], dim=0))) < 0.5
    assert not torch.equal(controls[0], random_controls(v, seed=4)[0])
    with pytest.raises(ValueError, match="at least one"):
        random_controls(v, seed=3, n=0)


def test_dose_multiple_reads_the_alpha_grid_in_log_alpha():
    alphas, cross = [4, 0.5, 2, 1], [0.9, 0.0, 0.5, 0.1]  # any order
    assert dose_multiple(alphas, cross, within=0.5, alpha=1) == pytest.approx(2.0)
    assert dose_multiple(alphas, cross, within=0.7, alpha=1) == pytest.approx(2 ** 1.5)  # halfway from 2 to 4
    assert dose_multiple(alphas, cross, within=0.7, alpha=2) == pytest.approx(2 ** 0.5)
    assert dose_multiple(alphas, [0.6, 0.6, 0.6, 0.6], within=0.5, alpha=1) == 0.5  # an upper bound
    assert math.isnan(dose_multiple(alphas, cross, within=0.95, alpha=1))           # never reached
    assert math.isnan(dose_multiple(alphas, cross, within=NEGLIGIBLE / 2, alpha=1))
    assert math.isnan(dose_multiple(alphas, cross, within=-0.3, alpha=1))  # steering helped: no dose to match


def test_ratio_guard_and_regime_rule():
    assert transfer_ratio(0.2, 0.1) == pytest.approx(2.0)
    assert transfer_ratio(0.2, NEGLIGIBLE / 2) != transfer_ratio(0.2, NEGLIGIBLE / 2)  # NaN
    assert regime(0.1, 0.1) == "clean" and regime(0.19, 0.1) == "clean"
    assert regime(0.3, 0.1) == "partial" and regime(0.02, 0.1) == "partial" and regime(0.0, 0.1) == "partial"
    assert regime(0.5, 0.1) == "inverted" and regime(-0.1, 0.1) == "inverted" and regime(0.18, 0.0) == "inverted"
    assert regime(0.001, 0.0) == "none"


@pytest.fixture(scope="module")
def folded_pair(seed_run):
    folded = fold_rmsnorm(load_seed(seed_run))
    Q = haar_rotation(folded.cfg.d_model, seed=5).float()
    return folded, rotate_residual(folded, Q.double()), Q


@pytest.fixture(scope="module")
def small_batch():
    return make_batch(BatchSpec(n_sequences=64))


def test_alpha_zero_leaves_logits_unchanged(folded_pair, small_batch):
    model = folded_pair[0]
    with torch.no_grad():
        clean = model(small_batch.tokens)
    steered = steer(model, small_batch.tokens, SITE, torch.randn(64), 0.0)
    assert all(torch.equal(clean[h], steered[h]) for h in clean)


def test_positions_restrict_where_the_vector_is_added(folded_pair, small_batch):
    model, tokens = folded_pair[0], small_batch.tokens
    late = torch.zeros_like(tokens, dtype=torch.bool)
    late[:, 10:] = True
    with torch.no_grad():
        clean = model(tokens)
    steered = steer(model, tokens, SITE, torch.randn(64), 3.0, positions=late)
    # The model is causal: positions before the first steered one cannot see the change.
    assert torch.equal(clean["depth"][:, :10], steered["depth"][:, :10])
    assert not torch.allclose(clean["depth"][:, 10:], steered["depth"][:, 10:])


def test_a_rotated_vector_steers_the_rotated_copy_exactly_as_the_source(folded_pair, small_batch):
    model, copy, Q = folded_pair
    acts = extract(model, small_batch, [SITE])[SITE]
    vectors = toy_vectors(acts, condition_rows(small_batch))
    for vector in vectors.values():
        for alpha in (1.0, 4.0):
            steered = steer(model, small_batch.tokens, SITE, vector.direction, alpha)
            turned = steer(copy, small_batch.tokens, SITE, vector.direction @ Q, alpha)
            for head in steered:
                assert torch.allclose(steered[head], turned[head], atol=1e-4), (vector.name, head)
            assert effect(model, small_batch, SITE, vector.direction, alpha, vector.head, vector.targets) == \
                effect(copy, small_batch, SITE, vector.direction @ Q, alpha, vector.head, vector.targets)


@pytest.fixture(scope="module")
def cohort_a_run(seed_run):
    return STAGES["train_seed"](seed=1, shared_io_from=seed_run, experiment="tests", **TINY_TRAIN)


def test_stage_logs_the_table_vectors_and_figure(seed_run, cohort_a_run):
    run_id = STAGES["steering"](source=seed_run, targets=f"{cohort_a_run},{seed_run}", alphas="1,4",
                                experiment=EXPERIMENT, threads=1, **SMALL_BATCH)
    run = MlflowClient().get_run(run_id)
    artifacts = tracking.artifact_dir(run_id)
    table = pd.read_csv(artifacts / "steering.csv")
    assert len(table) == 3 * 2 * 2
    assert set(table["vector"]) == {"depth", "sticky", "closer"} and set(table["target"]) == {"s0", "s1"}
    assert set(table["raw_regime"]) <= {"clean", "partial", "inverted", "none"}
    # The source as its own target: raw and rotated transfer reproduce the within-seed effect.
    self_rows = table[table["target"] == "s0"]
    assert (self_rows["raw_effect"] == self_rows["within_effect"]).all()
    # ... and the control on the target is the source's control.
    assert (self_rows["target_control_effect"] == self_rows["control_effect"]).all()
    assert (self_rows["rotated_effect"] - self_rows["within_effect"]).abs().max() < 0.02
    assert np.allclose(table["raw_gap"], (table["raw_effect"] - table["within_effect"]).abs())
    assert np.allclose(table["rotated_gap"], (table["rotated_effect"] - table["within_effect"]).abs())
    # The within-seed curve reaches its own effect at alpha at the latest.
    assert (self_rows["raw_dose"].dropna() <= 1 + 1e-9).all() and self_rows["raw_dose"].notna().any()
    with safe_open(str(artifacts / "vectors.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"depth", "sticky", "closer"} and f.get_tensor("depth").shape == (64,)
        assert f.metadata()["site"] == SITE and f.metadata()["sticky.head"] == "valid"
    assert (artifacts / "fig4_steering.png").stat().st_size > 0
    assert "depth.alpha4.within_effect" in run.data.metrics and "closer.alpha1.s1.rotated_effect" in run.data.metrics
    assert "sticky.alpha4.s1.target_control_effect" in run.data.metrics
    assert run.data.tags[tracking.TAG_UPSTREAM + "target.s1"] == cohort_a_run


def test_registered_rotation_carries_the_vector_to_an_exactly_rotated_copy(seed_run):
    source, copy, _ = rotated_copy_runs(seed_run, haar_seed=13, experiment=EXPERIMENT)
    STAGES["fit_rotation"](source=source, target=copy, sites=SITE, experiment=EXPERIMENT, **SMALL_BATCH)
    run_id = STAGES["steering"](source=source, targets=copy, alphas="2", use_registry=True,
                                experiment=EXPERIMENT, threads=1, **SMALL_BATCH)
    table = pd.read_csv(tracking.artifact_dir(run_id) / "steering.csv")
    assert (table["rotated_effect"] - table["within_effect"]).abs().max() < 1e-9
    assert (table["raw_effect"] != table["within_effect"]).any()


def test_use_registry_without_a_registered_pair_is_one_line(seed_run):
    # A copy logged here and now: no other test in the session can have registered a rotation to it.
    unpaired = log_model_run(load_seed(seed_run), 0, EXPERIMENT)
    one_line_error(cli("steering", "--source", seed_run, "--targets", unpaired, "--use-registry", "true",
                       "--experiment", EXPERIMENT), "no registered rotation at resid_mid_1")


@pytest.mark.parametrize("args,message", [
    (["--site", "resid_mid_7"], "unknown site 'resid_mid_7'; valid sites: resid_pre_0"),
    (["--site", "mlp_pre_1"], "site mlp_pre_1 is not a residual site; residual sites: resid_pre_0"),
    (["--alphas", ","], "--alphas names no value"),
    (["--alphas", "1,-2"], "--alphas must all be positive"),
    (["--controls", "0"], "--controls must be positive, got 0"),
    (["--targets", "{other}"], "expected a train_seed run"),
    # Four brackets never reach depth 5.
    (["--batch-max-len", "4"], "depth vector +(mean(depth=5) - mean(depth=4)): mask_a selects no row"),
])
def test_bad_input_is_one_line_and_starts_no_run(seed_run, args, message):
    with tracking.stage_run("train_sae", {}, code_version="1", experiment=EXPERIMENT) as other:
        pass
    client = MlflowClient()
    before = len(client.search_runs([tracking.experiment_id(EXPERIMENT)]))
    given = {"--targets": seed_run, **dict(zip(args[::2], args[1::2]))}
    flags = [x for k, v in given.items() for x in (k, v.format(other=other.run_id))]
    result = cli("steering", "--source", seed_run, "--experiment", EXPERIMENT, *flags)
    one_line_error(result, message)
    assert len(client.search_runs([tracking.experiment_id(EXPERIMENT)])) == before

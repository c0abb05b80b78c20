"""The audit stage: ground truth on an exactly rotated copy, the null pair, its artifacts, bad input."""

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from polyrot import tracking
from polyrot.stages import STAGES
from polyrot.stages.audit import seed_labels, unique_labels
from polyrot.toy.model import DyckTransformer, ModelConfig
from tests.conftest import cli, one_line_error
from tests.test_fit_rotation_stage import log_model_run, rotated_copy_runs

torch.set_num_threads(1)

EXPERIMENT = "tests-audit"
SITES = ("resid_pre_0", "resid_mid_1")
TINY_SAE = dict(expansion=2, steps=200, batch_size=256, eval_every=200, batch_sequences=512, heldout_sequences=64,
                threads=1, experiment=EXPERIMENT)
SMALL_BATCH = {"batch_sequences": 256}


@pytest.fixture(scope="module")
def audited(seed_run):
    """An audit of a folded seed against its exactly rotated copy, beside an untrained pair: (ids, table, run)."""
    source, target, _ = rotated_copy_runs(seed_run, haar_seed=31, experiment=EXPERIMENT)
    saes = STAGES["train_sae"](model_run=source, sites=",".join(SITES), **TINY_SAE)
    # Another SAE seed: two SAEs from one initialisation share decoder directions before any training.
    target_sae = STAGES["train_sae"](model_run=target, site="resid_mid_1", sae_seed=1, **TINY_SAE)
    run_id = STAGES["audit"](source=source, saes=saes, targets=target, target_saes=target_sae, null="1000,1001",
                             null_sae_steps=100, power_draws=3, experiment=EXPERIMENT, **SMALL_BATCH)
    table = pd.read_csv(tracking.artifact_dir(run_id) / "audit.csv")
    ids = {"source": source, "target": target, "saes": saes, "target_sae": target_sae}
    return ids, table.set_index(["kind", "site"]), MlflowClient().get_run(run_id)


def test_rotated_transfer_matches_self_on_an_exact_rotated_copy(audited):
    _, table, _ = audited
    for site in SITES:
        row = table.loc[("trained", site)]
        assert abs(row["sae_rotated_ev"] - row["sae_self_ev"]) < 1e-4, site
        assert row["sae_raw_ev"] < 0 and row["firing_rotated_mean"] > row["firing_raw_mean"], site
        # Every live latent fires identically; dead ones have no correlation and count as 0.
        assert row["firing_rotated_frac_above"] > 0.9, site
        assert row["rotation_ev"] > 1 - 1e-6 and row["sae_self_ev"] > 0.5
    assert table.loc[("trained", "resid_mid_1"), "frob_ratio"] > 0.8


def test_decoder_cosine_is_reported_both_ways_only_where_a_target_sae_exists(audited):
    _, table, _ = audited
    mid = table.loc[("trained", "resid_mid_1")]
    for way in ("raw", "rotated"):
        for match in ("max", "hungarian"):
            assert -1 <= mid[f"decoder_{way}_{match}_mean"] <= 1
            assert 0 <= mid[f"decoder_{way}_{match}_frac_above"] <= 1
        assert mid[f"decoder_{way}_hungarian_mean"] <= mid[f"decoder_{way}_max_mean"]
    assert mid["decoder_rotated_max_mean"] > mid["decoder_raw_max_mean"]
    assert pd.isna(table.loc[("trained", "resid_pre_0"), "decoder_raw_max_mean"])
    assert table.loc["untrained", "decoder_raw_max_mean"].isna().all()


def test_untrained_pair_sits_beside_the_trained_pair(audited):
    ids, table, run = audited
    untrained = table.loc[("untrained", "resid_mid_1")]
    assert untrained["target"] == "untrained"
    assert str(untrained["source_seed"]) == "1000" and str(untrained["target_seed"]) == "1001"
    assert untrained["rotation_ev"] < table.loc[("trained", "resid_mid_1"), "rotation_ev"]
    summary = pd.read_csv(tracking.artifact_dir(run.info.run_id) / "summary.csv").set_index("quantity")
    assert list(summary.columns) == ["trained_min", "trained_max", "untrained_min", "untrained_max", "separates",
                                     "direction"]
    assert bool(summary.loc["rotation_ev", "separates"]) and summary.loc["rotation_ev", "direction"] == "trained above"
    assert run.data.metrics["separates.rotation_ev"] == 1.0
    assert run.data.metrics["separates_direction.rotation_ev"] == 1.0


def test_determinacy_maps_and_planted_nulls(audited):
    """The exactly rotated copy is determined where the data have variance; the planted nulls come
    out as planted; the map ladder and the decoder's drift from its initialisation are reported."""
    _, table, run = audited
    mid = table.loc[("trained", "resid_mid_1")]
    assert mid["split_det_frob"] < 1e-3 and mid["det_k"] <= mid["src_dims_99"] + 1
    assert 1 <= mid["src_participation_ratio"] <= 64
    assert mid["map_orthogonal_ev"] > 1 - 1e-6 and mid["map_affine_ev"] > 1 - 1e-6
    assert mid["map_identity_ev"] < mid["map_orthogonal_ev"]
    assert mid["map_orthogonal_sae_ev"] == pytest.approx(mid["sae_self_ev"], abs=0.05)
    assert mid["cka"] == pytest.approx(1.0, abs=1e-9)  # CKA is blind to rotations
    same = table.loc[("planted_same_model", "resid_mid_1")]
    assert same["det_frob_ratio"] < 0.05 and same["target"] == "planted_same_model"
    assert table.loc[("planted_angle", "resid_mid_1"), "det_frob_ratio"] < 0.5
    assert table.loc[("planted_haar", "resid_mid_1"), "det_frob_ratio"] > 0.7
    # Two SAEs of different seeds: each moved some way from its own start, and they did not share one.
    assert mid["decoder_shared_init"] == 0.0 and -1 <= mid["decoder_target_init_cos"] <= 1
    artifacts = tracking.artifact_dir(run.info.run_id)
    power = pd.read_csv(artifacts / "power.csv")
    assert set(power["site"]) == {"resid_mid_1"} and set(power["kind"]) == {"haar", "angle", "fixed"}
    assert "power.resid_mid_1.angle.det_frob" in run.data.metrics
    assert "power.resid_mid_1.uniformity_p.ks" in run.data.metrics
    for figure in ("fig_power.png", "fig_which_map.png", "fig2_determined_angles.png"):
        assert (artifacts / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_artifacts_metrics_and_lineage(audited):
    ids, table, run = audited
    artifacts = tracking.artifact_dir(run.info.run_id)
    for figure in ("fig1_ev_by_site.png", "fig2_eigen_angles.png"):
        assert (artifacts / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert run.data.tags[tracking.TAG_DIGEST + figure] == tracking.sha256_file(artifacts / figure)
    assert len(table) == 5 * len(SITES)  # trained, untrained and the three planted nulls
    for column in ("target", "source_run", "target_run", "sae_run", "sae_self_ev", "sae_raw_ev", "sae_rotated_ev",
                   "sae_rotated_gap", "sae_gaussian_ev", "sae_gaussian_target_ev", "firing_raw_mean",
                   "firing_raw_frac_above", "firing_rotated_frac_above", "identity_ev", "raw_ev", "frob_ratio",
                   "ks_statistic", "ks_pvalue", "mean_cos_angle", "signed_perm_distance", "det"):
        assert column in table.columns, column
    assert table.loc[("trained", "resid_mid_1"), "target_sae_run"] == ids["target_sae"]
    metrics = run.data.metrics
    assert metrics["resid_mid_1.s0.sae_rotated_ev"] == table.loc[("trained", "resid_mid_1"), "sae_rotated_ev"]
    assert "resid_mid_1.untrained.firing_rotated_mean" in metrics
    for kind in ("trained", "untrained"):
        assert 0 <= metrics[f"pooled.{kind}.ks_pvalue"] <= 1 and metrics[f"pooled.{kind}.n_rotations"] == 1
    assert run.data.tags[tracking.TAG_UPSTREAM + "source"] == ids["source"]
    assert run.data.tags[tracking.TAG_UPSTREAM + "target.s0"] == ids["target"]


def test_cross_checkpoint_audit_of_one_run(seed_run):
    """A run's final SAEs on its own checkpoints: the final weights transfer perfectly without any
    rotation, an earlier checkpoint does not until it is rotated into the final frame."""
    saes = STAGES["train_sae"](model_run=seed_run, site="resid_mid_1", **TINY_SAE)
    run_id = STAGES["audit"](source=seed_run, saes=saes, targets=seed_run, target_checkpoints="step-000020,final",
                             experiment=EXPERIMENT, **SMALL_BATCH)
    table = pd.read_csv(tracking.artifact_dir(run_id) / "audit.csv")
    table = table[table["kind"] == "trained"].set_index("target_checkpoint")
    assert list(table["target"]) == ["s0-step-000020", "s0-final"]
    final, early = table.loc["final"], table.loc["step-000020"]
    assert final["sae_raw_ev"] == pytest.approx(final["sae_self_ev"], abs=1e-6)
    assert final["frob_from_identity"] < 1e-3 < early["frob_from_identity"]
    assert early["sae_raw_ev"] < early["sae_rotated_ev"]
    artifacts = tracking.artifact_dir(run_id)
    assert (artifacts / "fig_cross_checkpoint.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "resid_mid_1.s0-step-000020.frob_from_identity" in MlflowClient().get_run(run_id).data.metrics


@pytest.mark.parametrize("args,message", [
    (["--saes", "{target_sae}"], "was trained on model run {target}, not on {source}"),
    (["--saes", "{target}"], "expected a train_sae run"),
    (["--target-saes", "{saes}"], "--target-saes: SAE run "),
    (["--null", "5"], "--null takes two different integer seeds"),
    (["--null", "4,4"], "--null takes two different integer seeds"),
    (["--targets", "{narrow}"], "has d_model 64 but target run {narrow} has 32"),
    (["--targets", " , "], "--targets names no run"),
    (["--saes", ""], "--saes is required"),
    (["--checkpoint", "latest"], "--checkpoint names a checkpoint like first-0.99"),
    (["--checkpoint", "step-000020"], "has no artifact 'checkpoints/step-000020.safetensors'"),
    (["--target-checkpoints", ","], "--target-checkpoints names no checkpoint"),
    (["--target-checkpoints", "final", "--target-saes", "{target_sae}"], "cannot go with --target-checkpoints"),
])
def test_bad_input_is_one_line_and_starts_no_run(audited, args, message):
    ids, _, _ = audited
    ids = {**ids, "narrow": log_model_run(DyckTransformer(ModelConfig(d_model=32, d_head=8), seed=3), 3, EXPERIMENT)}
    given = {"--source": ids["source"], "--saes": ids["saes"], "--targets": ids["target"],
             **dict(zip(args[::2], (a.format(**ids) for a in args[1::2])))}
    client = MlflowClient()
    before = len(client.search_runs([tracking.experiment_id(EXPERIMENT)], "tags.`polyrot.stage` = 'audit'"))
    result = cli("audit", "--experiment", EXPERIMENT, *[x for item in given.items() for x in item])
    one_line_error(result, message.format(**ids))
    assert len(client.search_runs([tracking.experiment_id(EXPERIMENT)], "tags.`polyrot.stage` = 'audit'")) == before


def test_labels_take_the_run_ids_start_only_where_they_repeat():
    assert seed_labels({"aaaaaaaaXX": "1", "bbbbbbbbXX": "2"}) == {"aaaaaaaaXX": "s1", "bbbbbbbbXX": "s2"}
    assert unique_labels({"aaaaaaaaXX": "pythia", "bbbbbbbbXX": "pythia", "cccc": "neox"}) == \
        {"aaaaaaaaXX": "pythia-aaaaaaaa", "bbbbbbbbXX": "pythia-bbbbbbbb", "cccc": "neox"}

"""The fit_rotation stage: a known rotation recovered from an exactly rotated model copy, bad input."""

import pytest
import torch
from mlflow.tracking import MlflowClient

from polyrot import tracking
from polyrot.core.rotation import Rotation, haar_rotation
from polyrot.stages import STAGES
from polyrot.stages.fit_rotation import TAG_REGISTERED, TAG_SELF_PAIR
from polyrot.stages.train_seed import NAME as TRAIN_SEED
from polyrot.stages.train_seed import load_seed
from polyrot.toy.activations import extract
from polyrot.toy.model import (
    DyckTransformer,
    ModelConfig,
    fold_rmsnorm,
    rotate_residual,
    save_model,
)
from polyrot.toy.task import BatchSpec
from polyrot.tracking import registry
from tests.conftest import cli, one_line_error

torch.set_num_threads(1)

EXPERIMENT = "tests-rotation"
SITES = "resid_pre_0,resid_mid_0,resid_post_0,resid_mid_1,resid_pre_2"
SMALL_BATCH = {"batch_sequences": 256}


def log_model_run(model: DyckTransformer, seed: int, experiment: str = EXPERIMENT, **tags) -> str:
    """A finished train_seed run holding `model` in that stage's layout (model.safetensors + config.json),
    for models made without training: folded, exactly rotated or untrained copies."""
    with tracking.stage_run(TRAIN_SEED, {"seed": seed}, code_version=STAGES[TRAIN_SEED].code_version,
                            experiment=experiment, run_name=f"seed-{seed}-copy",
                            tags={"polyrot.seed": seed, **tags}) as run:
        save_model(model, run.staging)
        run.log_artifact("model.safetensors")
        run.log_artifact("config.json")
        return run.run_id


def rotated_copy_runs(seed_run: str, haar_seed: int, experiment: str = EXPERIMENT) -> tuple[str, str, torch.Tensor]:
    """(folded seed run, exactly rotated copy run, Q): the copy's residual activations are x @ Q."""
    folded = fold_rmsnorm(load_seed(seed_run))
    Q = haar_rotation(folded.cfg.d_model, seed=haar_seed)
    return (log_model_run(folded, 0, experiment, **{"polyrot.copy_of": seed_run}),
            log_model_run(rotate_residual(folded, Q), 0, experiment, **{"polyrot.rotated_copy_of": seed_run}), Q)


@pytest.fixture(scope="module")
def exact_pair(seed_run):
    return rotated_copy_runs(seed_run, haar_seed=11)


def test_recovers_the_known_rotation_and_registers_each_site(exact_pair):
    source, target, Q = exact_pair
    run_id = STAGES["fit_rotation"](source=source, target=target, sites=SITES, alias="exact",
                                    experiment=EXPERIMENT, **SMALL_BATCH)
    run = MlflowClient().get_run(run_id)
    artifacts = tracking.artifact_dir(run_id)
    assert run.data.tags[TAG_SELF_PAIR] == "false"
    assert run.data.tags[tracking.TAG_UPSTREAM + "source"] == source
    acts = extract(load_seed(target), BatchSpec(n_sequences=SMALL_BATCH["batch_sequences"]), SITES.split(","))
    for site in SITES.split(","):
        rotation = Rotation.load(artifacts / f"rotations/{site}.safetensors")
        assert rotation.metadata["site"] == site and rotation.metadata["source_run"] == source
        # x_t = x_s Q, so the map back into the source frame is Q^T: exactly so on the activations' span,
        centred = acts[site].double() - acts[site].double().mean(dim=0)
        assert torch.allclose(centred @ rotation.R, centred @ Q.T, atol=1e-4), site
        # and on all of R^64 once an MLP has filled the space: the embedding spans ~12 directions and
        # attention only mixes them, so before the first MLP Procrustes leaves R free off that span.
        if site not in ("resid_pre_0", "resid_mid_0"):
            assert torch.allclose(rotation.R, Q.T, atol=1e-4), site
        assert run.data.metrics[f"{site}.rotation_ev"] > 1 - 1e-6
        assert run.data.metrics[f"{site}.identity_ev"] < 0.5
        name = registry.model_name(EXPERIMENT, site)
        assert run.data.tags[TAG_REGISTERED + site].startswith(f"models:/{name}/")
        assert torch.equal(registry.load_rotation(name, alias="exact").R, rotation.R)
    assert torch.linalg.matrix_rank(acts["resid_pre_0"] - acts["resid_pre_0"].mean(dim=0)) < 20
    assert "pooled.ks_pvalue" in run.data.metrics and "resid_mid_1.frob_ratio" in run.data.metrics


def test_self_pair_is_allowed_flagged_and_gives_the_identity(exact_pair):
    source = exact_pair[0]
    with pytest.warns(UserWarning, match="same run"):
        run_id = STAGES["fit_rotation"](source=source, target=source, sites="resid_mid_0,resid_mid_1",
                                        experiment=EXPERIMENT, **SMALL_BATCH)
    run = MlflowClient().get_run(run_id)
    assert run.data.tags[TAG_SELF_PAIR] == "true"
    R = Rotation.load(tracking.artifact_dir(run_id) / "rotations/resid_mid_1.safetensors").R
    assert torch.allclose(R, torch.eye(len(R), dtype=R.dtype), atol=1e-6)
    assert registry.list_rotations(source_run=source, target_run=source)["aliases"].tolist() == ["s0-to-s0"] * 2


def test_default_sites_are_the_residual_sites(exact_pair):
    source, target, _ = exact_pair
    run_id = STAGES["fit_rotation"](source=source, target=target, experiment=EXPERIMENT, **SMALL_BATCH)
    stored = {a.path for a in MlflowClient().list_artifacts(run_id, "rotations")}
    assert stored == {f"rotations/{s}.safetensors" for s in
                      ("resid_pre_0", "resid_mid_0", "resid_post_0", "resid_pre_1", "resid_mid_1", "resid_post_1",
                       "resid_pre_2")}


@pytest.fixture(scope="module")
def odd_models(store):
    """Untrained runs with another d_model and with one layer (it lacks resid_mid_1)."""
    narrow = log_model_run(DyckTransformer(ModelConfig(d_model=32, d_head=8), seed=3), 3)
    shallow = log_model_run(DyckTransformer(ModelConfig(n_layers=1), seed=4), 4)
    return narrow, shallow


@pytest.mark.parametrize("case,args,message", [
    ("d_model", ["--target", "{narrow}"], "has d_model 64 but target run"),
    ("missing site", ["--target", "{shallow}", "--sites", "resid_mid_0,resid_mid_1"],
     "target model: unknown site 'resid_mid_1'; valid sites: resid_pre_0, ln1_out_0"),
    ("unknown site", ["--target", "{shallow}", "--sites", "resid_mid_7"], "source model: unknown site 'resid_mid_7'"),
    ("narrow site", ["--target", "{shallow}", "--sites", "mlp_pre_0"], "site mlp_pre_0 is 256 wide, not d_model=64"),
    ("not a model", ["--target", "{sae_like}"], "expected a train_seed run"),
    ("no target", [], "--target is required"),
    ("bad alias", ["--target", "{shallow}", "--sites", "resid_mid_0", "--alias", "v3"], "alias 'v3' is not usable"),
])
def test_bad_input_is_one_line_and_starts_no_run(exact_pair, odd_models, case, args, message):
    narrow, shallow = odd_models
    with tracking.stage_run("train_sae", {}, code_version="1", experiment=EXPERIMENT) as other:
        pass
    ids = {"narrow": narrow, "shallow": shallow, "sae_like": other.run_id}
    client = MlflowClient()
    before = len(client.search_runs([tracking.experiment_id(EXPERIMENT)]))
    result = cli("fit-rotation", "--source", exact_pair[0], "--experiment", EXPERIMENT,
                 *[a.format(**ids) for a in args])
    one_line_error(result, message)
    assert len(client.search_runs([tracking.experiment_id(EXPERIMENT)])) == before

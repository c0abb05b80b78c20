"""import_seed: a checkpoint in the reference implementation's format becomes a seed run that the
downstream stages accept; anything else is refused in one line before a run starts."""

import copy
import dataclasses

import pytest
import torch
from mlflow.tracking import MlflowClient

from polyrot import tracking
from polyrot.stages import STAGES
from polyrot.stages.train_seed import load_seed
from polyrot.toy.dyck import make_batch
from polyrot.toy.task import BatchSpec
from tests.conftest import cli, model_with_gains, one_line_error

EXPERIMENT = "tests-import"
CHECK = ("--batch-sequences", "64")
# The reference code's parameter names for the 2-layer model, as its model.py declares them: the
# tensors of polyrot's architecture, with RMSNorm gains called `gain`.
REFERENCE_KEYS = ["W_E", "W_pos", *[f"blocks.{layer}.{name}" for layer in range(2) for name in (
    "ln1.gain", "attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "ln2.gain", "mlp.W_in", "mlp.W_out")],
    "ln_f.gain", "W_U_tok", "W_U_depth", "W_U_valid"]
REFERENCE_CFG = {"vocab_size": 40, "d_model": 64, "n_heads": 4, "d_head": 16, "d_mlp": 256, "n_layers": 2,
                 "n_ctx": 64, "n_depth": 9, "n_valid": 2, "init_scale": 0.02, "rmsnorm_eps": 1e-5,
                 "use_rmsnorm": True, "pos_encoding": "structured"}


def reference_checkpoint(model: torch.nn.Module, step: int = 58_000) -> dict:
    """What the reference's train.py saves for `model`: its state under the reference's names."""
    tensors = dict(model.state_dict())
    state = {name: tensors[name.replace(".gain", ".w")].clone() for name in REFERENCE_KEYS}
    # A real optimizer state to carry along (taken on a copy: the checkpoint holds `model` itself).
    trained = copy.deepcopy(model)
    optim = torch.optim.AdamW(trained.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=1e-4)
    trained(make_batch(BatchSpec(n_sequences=4)).tokens)["tok"].sum().backward()
    optim.step()
    return {"step": step, "model_state": state, "optim_state": optim.state_dict(), "cfg": dict(REFERENCE_CFG),
            "metrics": {"loss": 0.0123, "acc_tok": 1.0, "acc_depth": 0.9999}}


def save(tmp_path, checkpoint, name="ckpt_0058000.pt", seed=7):
    folder = tmp_path / "seeds" / str(seed) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, folder / name)
    return folder / name


@pytest.fixture(scope="module")
def imported(store, tmp_path_factory):
    model = model_with_gains()
    path = save(tmp_path_factory.mktemp("reference"), reference_checkpoint(model))
    result = cli("import-seed", str(path), "--experiment", EXPERIMENT, *CHECK)
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1], model, path


def test_the_imported_seed_computes_the_reference_models_function(imported):
    run_id, model, path = imported
    run = MlflowClient().get_run(run_id)
    assert run.info.run_name == "seed-7-imported" and run.data.tags["polyrot.seed"] == "7"
    assert run.data.tags[tracking.TAG_PROVIDES] == "train_seed"
    assert run.data.tags["polyrot.source_sha256"] == tracking.sha256_file(path)
    assert run.data.tags["polyrot.mapping"].count(".gain -> ") == 5
    assert run.data.metrics["logits_max_abs_diff"] < 1e-5 and run.data.metrics["source.loss"] == 0.0123
    tokens = make_batch(BatchSpec(n_sequences=32, seed=5)).tokens
    with torch.no_grad():
        ours, theirs = load_seed(run_id)(tokens), model(tokens)
    assert all(torch.equal(ours[h], theirs[h]) for h in ours)


def test_downstream_stages_accept_the_imported_seed(imported, seed_run):
    run_id = imported[0]
    small = {"steps": 20, "eval_every": 10, "batch_size": 256, "batch_sequences": 64, "heldout_sequences": 32,
             "experiment": EXPERIMENT}
    saes = STAGES["train_sae"](model_run=run_id, sites="resid_mid_0,resid_mid_1", **small)
    audit = STAGES["audit"](source=run_id, saes=saes, targets=seed_run, batch_sequences=64, experiment=EXPERIMENT)
    run = MlflowClient().get_run(audit)
    assert run.info.status == "FINISHED" and run.info.run_name == "audit-s7-vs-s0"
    assert "resid_mid_1.s0.sae_rotated_ev" in run.data.metrics


def test_resuming_or_checkpoints_of_an_imported_seed_say_why_not(imported):
    one_line_error(cli("train-seed", "--resume", imported[0], "--experiment", EXPERIMENT),
                   "has no checkpoint to resume from")


class NotATensor:
    pass


@pytest.mark.parametrize("change,message", [
    (lambda c: {**c, "cfg": NotATensor()}, "needs code to unpickle"),
    (lambda c: {**c, "model_state": {k: v for k, v in c["model_state"].items() if k != "blocks.1.ln2.gain"}},
     "lacks 1 tensor(s) of the architecture, e.g. 'blocks.1.ln2.gain'"),
    (lambda c: {k: v for k, v in c.items() if k != "cfg"}, "is not a reference checkpoint: it has no 'cfg'"),
    (lambda c: {**c, "cfg": {**c["cfg"], "d_mlp": 128}}, "has shape (256, 64), its cfg implies (128, 64)"),
    (lambda c: {**c, "model_state": {**c["model_state"], "blocks.0.attn.b_Q": torch.zeros(4, 16)}},
     "has 'blocks.0.attn.b_Q', which polyrot's architecture does not"),
    (lambda c: {**c, "cfg": {**c["cfg"], "use_rmsnorm": False}}, "without RMSNorm"),
    (lambda c: {**c, "model_state": {**c["model_state"], "ln_f.gain": c["model_state"]["ln_f.gain"] * float("nan")}},
     "logits differ from the reference forward's"),
])
def test_bad_checkpoints_are_refused_in_one_line_and_start_no_run(store, tmp_path, change, message):
    path = save(tmp_path, change(reference_checkpoint(model_with_gains())))
    client = MlflowClient()
    before = len(client.search_runs([tracking.experiment_id(EXPERIMENT)]))
    one_line_error(cli("import-seed", str(path), "--experiment", EXPERIMENT, *CHECK), message)
    assert len(client.search_runs([tracking.experiment_id(EXPERIMENT)])) == before


def test_files_that_are_no_checkpoint_and_unknown_seeds_are_refused(store, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    one_line_error(cli("import-seed", str(tmp_path / "junk.pt"), "--seed", "1"), "is not a torch.save checkpoint")
    one_line_error(cli("import-seed", str(tmp_path / "absent.pt"), "--seed", "1"), "no checkpoint file")
    torch.save(reference_checkpoint(model_with_gains()), tmp_path / "loose.pt")
    one_line_error(cli("import-seed", str(tmp_path / "loose.pt")), "give --seed")


def test_the_reference_config_names_map_onto_polyrots():
    from polyrot.toy.model import ModelConfig
    from polyrot.toy.reference import model_config

    assert model_config(REFERENCE_CFG, "x") == ModelConfig()
    assert dataclasses.asdict(model_config({**REFERENCE_CFG, "rmsnorm_eps": 1e-6}, "x"))["eps"] == 1e-6

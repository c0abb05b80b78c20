"""Lenses 1 and 4 against direct computations, and the lenses stage."""

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from polyrot import tracking
from polyrot.stages import STAGES
from polyrot.toy import lenses
from polyrot.toy.dyck import make_batch
from polyrot.toy.model import DyckTransformer
from polyrot.toy.task import BatchSpec
from tests.conftest import cli, one_line_error

torch.set_num_threads(1)

EXPERIMENT = "tests-lenses"


@pytest.fixture(scope="module")
def model():
    """An untrained model with non-unit RMSNorm gains, so that folding matters."""
    m = DyckTransformer(seed=2)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in m.blocks:
            block.ln1.w.copy_(0.5 + torch.rand(64, generator=gen))
    return m


def test_head_norms_are_the_frobenius_norms_of_the_folded_circuits(model):
    table = lenses.head_norms(model)
    assert list(zip(table["layer"], table["head"])) == [(layer, h) for layer in range(2) for h in range(4)]
    for row in table.to_dict("records"):
        attn = model.blocks[row["layer"]].attn
        gain = model.blocks[row["layer"]].ln1.w.detach().numpy()
        h = row["head"]
        W_Q, W_K = attn.W_Q[h].detach().numpy() * gain, attn.W_K[h].detach().numpy() * gain
        W_V, W_O = attn.W_V[h].detach().numpy() * gain, attn.W_O[h].detach().numpy()
        assert row["qk"] == pytest.approx(np.linalg.norm(W_Q.T @ W_K), rel=1e-5)
        assert row["ov"] == pytest.approx(np.linalg.norm(W_O @ W_V), rel=1e-5)


def test_activation_patterns_count_distinct_firing_sets_and_alive_neurons(model):
    silenced = DyckTransformer(model.cfg)
    silenced.load_state_dict(model.state_dict())
    with torch.no_grad():
        silenced.blocks[1].mlp.W_in[:10].zero_()  # ten neurons of layer 1 can never fire
    batch = make_batch(BatchSpec("lens4", seed=1, n_sequences=40, max_len=12))
    table = lenses.activation_patterns(silenced, batch, chunk=16)
    _, cache = silenced.run(batch.tokens, sites=["mlp_pre_0", "mlp_pre_1"])
    for layer in range(2):
        on = (cache[f"mlp_pre_{layer}"][batch.mask] > 0).numpy()
        row = table.iloc[layer]
        assert row["positions"] == int(batch.mask.sum())
        assert row["unique_patterns"] == len({tuple(r) for r in on})
        assert row["alive_neurons"] == int(on.any(0).sum())
    assert table.iloc[1]["alive_neurons"] <= 246


def test_stage_logs_norms_acdc_and_patterns(seed_run):
    run_id = STAGES["lenses"](models=seed_run, lens4_sequences=64, experiment=EXPERIMENT, threads=1)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    artifacts = tracking.artifact_dir(run_id)
    heads = pd.read_csv(artifacts / "lens1.csv")
    assert len(heads) == 8 and set(heads.columns) >= {"layer", "head", "qk", "ov", "effect", "kept"}
    kept = run.data.tags["polyrot.acdc.s0.kept"].split(",")
    assert run.data.metrics["s0.acdc.kept"] == heads["kept"].sum() == len([k for k in kept if k != "-"])
    assert (heads.loc[heads["kept"], "effect"] > 1e-3).all() and (heads.loc[~heads["kept"], "effect"] <= 1e-3).all()
    assert run.data.metrics["s0.L0H2.qk"] == pytest.approx(heads.iloc[2]["qk"])
    patterns = pd.read_csv(artifacts / "lens4.csv")
    assert list(patterns["layer"]) == [0, 1] and (patterns["unique_patterns"] <= patterns["positions"]).all()
    assert run.data.metrics["s0.lens4.L1.alive_neurons"] == patterns.iloc[1]["alive_neurons"]
    assert len(pd.read_csv(artifacts / "effects.csv")) == 10


@pytest.mark.parametrize("args,message", [
    (["--models", "{other}"], "expected a train_seed run"),
    (["--models", ","], "--models names no run"),
    (["--models", "{seed}", "--lens4-sequences", "0"], "--lens4-sequences must be positive"),
])
def test_bad_input_is_one_line_and_starts_no_run(seed_run, args, message):
    with tracking.stage_run("train_sae", {}, code_version="1", experiment=EXPERIMENT) as other:
        pass
    client = MlflowClient()
    before = len(client.search_runs([tracking.experiment_id(EXPERIMENT)]))
    result = cli("lenses", "--experiment", EXPERIMENT, *[a.format(other=other.run_id, seed=seed_run) for a in args])
    one_line_error(result, message)
    assert len(client.search_runs([tracking.experiment_id(EXPERIMENT)])) == before

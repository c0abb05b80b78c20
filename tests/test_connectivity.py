"""Linear mode connectivity against ground truth: a model with itself, and with a copy hidden behind
a known random symmetry (permuted heads and neurons, rotated heads and residual stream)."""

import pandas as pd
import pytest
import torch

from polyrot.errors import ParameterError
from polyrot.toy import dyck
from polyrot.toy.connectivity import (
    ALIGNED,
    PERMUTED,
    UNALIGNED,
    barrier,
    barriers,
    connectivity,
    curve,
    interpolate,
)
from polyrot.toy.model import DyckTransformer, ModelConfig
from polyrot.toy.symmetry import random_symmetry
from polyrot.toy.train import EvalSets, loss_fn


@pytest.fixture(scope="module")
def trained() -> DyckTransformer:
    """A small model trained for a few hundred steps: far enough from its initialisation that
    averaging it with a scrambled copy of itself hurts."""
    torch.manual_seed(0)
    model = DyckTransformer(ModelConfig(d_model=32, n_heads=2, d_head=16, d_mlp=64), seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = dyck.generate("train", 64, seed=[5, step]).trimmed()
        loss = loss_fn(model(batch.tokens), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def sets() -> EvalSets:
    return EvalSets.build(48, seed=3)


def test_interpolating_a_model_with_itself_is_flat(trained, sets):
    table = curve(trained, trained, sets)
    assert len(table) == 11 and table["loss"].nunique() == 1
    assert barrier(table) == 0.0


def test_a_symmetry_transformed_copy_is_connected_once_aligned(trained, sets):
    copy = random_symmetry(trained, seed=2)
    table = connectivity(trained, copy, sets, starts=2, outer_iters=3, cayley_iters=20)
    found = barriers(table)
    assert set(found) == {UNALIGNED, PERMUTED, ALIGNED}
    assert abs(found[ALIGNED]) < 1e-4
    assert found[UNALIGNED] > 0.1
    # The ends are the same function on every path.
    for _, rows in table.groupby("path"):
        assert rows["loss"].iloc[0] == pytest.approx(table["loss"].iloc[0], abs=1e-4)
        assert rows["loss"].iloc[-1] == pytest.approx(table["loss"].iloc[0], abs=1e-4)


def test_bad_input(trained, sets):
    with pytest.raises(ParameterError, match="at least 11 points"):
        curve(trained, trained, sets, points=5)
    with pytest.raises(ParameterError, match="different configurations"):
        interpolate(trained, DyckTransformer(seed=0), 0.5)
    with pytest.raises(ParameterError, match="unknown path"):
        connectivity(trained, trained, sets, paths=("sideways",))


def test_connectivity_stage_logs_curves_barriers_and_refuses_bad_input(seed_run):
    from mlflow.tracking import MlflowClient

    from polyrot import tracking
    from polyrot.stages import STAGES
    from tests.conftest import TINY_TRAIN, cli, one_line_error

    other = STAGES["train_seed"](seed=1, experiment="tests-connectivity", **TINY_TRAIN)
    run_id = STAGES["connectivity"](reference=seed_run, models=f"{seed_run},{other}", eval_sequences=16, starts=1,
                                    outer_iters=1, cayley_iters=0, experiment="tests-connectivity")
    run = MlflowClient().get_run(run_id)
    table = pd.read_csv(tracking.artifact_dir(run_id) / "connectivity.csv")
    assert set(table["path"]) == {UNALIGNED, PERMUTED, ALIGNED} and set(table["model"]) == {"s1"}
    assert len(table) == 3 * 11
    for path in (UNALIGNED, PERMUTED, ALIGNED):
        assert run.data.metrics[f"s1.barrier.{path}"] == pytest.approx(barrier(table[table["path"] == path]))
    assert (tracking.artifact_dir(run_id) / "fig_connectivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_line_error(cli("connectivity", "--reference", seed_run, "--models", other, "--points", "5"),
                   "--points must be at least 11")
    one_line_error(cli("connectivity", "--reference", seed_run, "--models", seed_run), "names no run other than")

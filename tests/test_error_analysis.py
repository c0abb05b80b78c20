"""The error table against a slow per-position reference, and against evaluation's accuracies."""

import pandas as pd
import pytest
import torch

from polyrot.toy.error_analysis import (
    POSITION_BIN,
    SINCE_CAP,
    error_table,
    since_first_violation,
    worst_cells,
)
from polyrot.toy.model import DyckTransformer
from polyrot.toy.task import HEADS, SPLITS
from polyrot.toy.train import EvalSets, evaluate


@pytest.fixture(scope="module")
def sets():
    return EvalSets.build(96, seed=5)


@pytest.fixture(scope="module")
def model():
    return DyckTransformer(seed=3)


def test_since_first_violation_counts_from_the_first_true():
    valid = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert since_first_violation(valid).tolist() == [[-1, -1, 0, 1, 2], [-1] * 5, [0, 1, 2, 3, 4]]
    long = torch.ones(1, SINCE_CAP + 5, dtype=torch.bool)
    assert since_first_violation(long).max() == SINCE_CAP


def reference_table(model, batches) -> pd.DataFrame:
    """Position by position, padded and unsorted: the slow path the table must equal."""
    counts = {}
    with torch.no_grad():
        for split, batch in batches.items():
            logits = model.eval()(batch.tokens)
            for b in range(len(batch)):
                first = None
                for t in range(batch.tokens.shape[1]):
                    if not batch.mask[b, t]:
                        continue
                    if first is None and batch.valid[b, t]:
                        first = t
                    since = -1 if first is None else min(t - first, SINCE_CAP)
                    values = {"depth": int(batch.depth[b, t]), "since_violation": since,
                              "position": t // POSITION_BIN * POSITION_BIN}
                    for h in HEADS:
                        wrong = int(logits[h][b, t].argmax() != getattr(batch, h)[b, t])
                        for f, v in values.items():
                            n, e = counts.get((split, h, f, v), (0, 0))
                            counts[split, h, f, v] = (n + 1, e + wrong)
    return pd.DataFrame([(*k, n, e) for k, (n, e) in counts.items()],
                        columns=["split", "head", "feature", "value", "positions", "errors"])


def test_the_table_equals_the_slow_reference(model, sets):
    small = {s: b.select(slice(0, 24)) for s, b in sets.batches.items()}
    key = ["split", "head", "feature", "value"]
    fast = error_table(model, small, chunk=7).sort_values(key).reset_index(drop=True)
    slow = reference_table(model, small).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(fast[key + ["positions", "errors"]], slow, check_dtype=False)
    assert fast["errors"].sum() > 0  # an untrained model is wrong somewhere: the comparison is not vacuous


def test_each_feature_partitions_the_errors_evaluation_counts(model, sets):
    table = error_table(model, sets.batches)
    accuracy = evaluate(model, sets)
    for split in SPLITS:
        n = int(sets.batches[split].mask.sum())
        for h in HEADS:
            cells = table[(table["split"] == split) & (table["head"] == h)]
            per_feature = cells.groupby("feature")[["positions", "errors"]].sum()
            assert (per_feature["positions"] == n).all()
            assert (per_feature["errors"] == round((1 - accuracy[f"acc.{split}.{h}"]) * n)).all()


def test_worst_cells_are_sorted_and_their_shares_are_fractions(model, sets):
    worst = worst_cells(error_table(model, sets.batches), n=5)
    assert len(worst) == 5 and worst["errors"].is_monotonic_decreasing
    assert ((worst["share"] > 0) & (worst["share"] <= 1)).all()


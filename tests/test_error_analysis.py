"""The error table against a slow per-position reference, and against evaluation's accuracies."""

import numpy as np
import pandas as pd
import pytest
import torch

from polyrot.toy.error_analysis import (
    MATCHES,
    PAIRS_CAP,
    POSITION_BIN,
    SINCE_CAP,
    VIOLATION_KINDS,
    draw_readings,
    error_table,
    first_violations,
    row_errors,
    since_first_violation,
    violation_table,
    worst_cells,
)
from polyrot.toy.model import DyckTransformer
from polyrot.toy.dyck import label_tokens
from polyrot.toy.task import CLOSERS, HEADS, MAX_DEPTH, OPENERS, SPLITS
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


def test_row_errors_count_each_rows_wrong_positions_and_sum_to_the_evaluation(model, sets):
    rows = row_errors(model, sets.batches)
    accuracy = evaluate(model, sets)
    with torch.no_grad():
        logits = model.eval()(sets.batches["long"].tokens)
    batch = sets.batches["long"]
    for i, h in enumerate(HEADS):
        # Row by row on the padded, unsorted batch: the slow path.
        per_row = ((logits[h].argmax(-1) != getattr(batch, h)) & batch.mask).sum(1)
        assert rows["long"][0][:, i].tolist() == per_row.tolist()
    for split in SPLITS:
        wrong, positions = rows[split]
        assert positions.sum() == int(sets.batches[split].mask.sum())
        for i, h in enumerate(HEADS):
            assert 1 - wrong[:, i].sum() / positions.sum() == pytest.approx(accuracy[f"acc.{split}.{h}"], abs=1e-12)


def test_draws_of_every_row_read_the_whole_set_and_smaller_draws_spread():
    # Two splits of 100 rows of 10 positions; split b has 3 bad rows of 5 wrong positions each.
    wrong_a, wrong_b = np.zeros((100, 3), dtype=int), np.zeros((100, 3), dtype=int)
    wrong_b[:3, 1] = 5
    rows = {"a": (wrong_a, np.full(100, 10)), "b": (wrong_b, np.full(100, 10))}
    whole = draw_readings(rows, 100, target=0.98, draws=20)
    assert whole["min_median"] == whole["min_p05"] == pytest.approx(1 - 15 / 1000)
    assert whole["pass_rate"] == 1.0 and draw_readings(rows, 100, target=0.99, draws=20)["pass_rate"] == 0.0
    # Ten rows at a time: a draw misses all three bad rows with probability C(97,10)/C(100,10).
    small = draw_readings(rows, 10, target=1.0, draws=4000, seed=1)
    assert small["pass_rate"] == pytest.approx(0.7265, abs=0.03)
    assert small["min_p05"] <= 0.95 and small["min_median"] == 1.0
    with pytest.raises(ValueError, match="cannot draw 101 rows from 100"):
        draw_readings(rows, 101, target=0.99)


def reference_violation(row: list[int]) -> tuple[int, int, int, int]:
    """One row's first violation with a list for a stack: (at, kind, pairs_between, matches)."""
    stack = []  # positions of the open brackets
    for t, tok in enumerate(row):
        if tok in OPENERS:
            if len(stack) == MAX_DEPTH:
                return t, VIOLATION_KINDS.index("opener past max depth"), -1, -1
            stack.append(t)
        elif tok in CLOSERS:
            if not stack:
                return t, VIOLATION_KINDS.index("empty-stack closer"), -1, -1
            opener = OPENERS[CLOSERS.index(tok)]
            if row[stack[-1]] != opener:
                pairs = min((t - stack[-1] - 1) // 2, PAIRS_CAP)
                if len(stack) > 1 and row[stack[-2]] == opener:
                    return t, 1, pairs, MATCHES.index("beneath")
                closed = opener in row[stack[-1] + 1:t]
                return t, 1, pairs, MATCHES.index("closed pair" if closed else "neither")
            stack.pop()
    return -1, -1, -1, -1


def test_first_violations_read_off_the_labels_equal_a_list_stack(sets):
    rows = [[1, 3, 5, 6, 7, 8, 6, 2],  # ( [] {} ]   closes a pair already closed
            [1, 5, 3, 7, 8, 5, 6, 6],  # [ ( {} [] ]  matches the opener beneath
            [1, 3, 7, 8, 6, 2],        # ( {} ]       neither
            [1, 4, 2],                 # )            on an empty stack
            [1] + [3] * (MAX_DEPTH + 1)]  # one opener too many
    hand = torch.tensor([row + [0] * (MAX_DEPTH + 2 - len(row)) for row in rows])
    expected = [(6, 1, 2, 1), (7, 1, 2, 0), (4, 1, 1, 2), (1, 0, -1, -1), (MAX_DEPTH + 1, 2, -1, -1)]
    got = first_violations(label_tokens(hand))
    assert list(zip(*(got[k].tolist() for k in ("at", "kind", "pairs_between", "matches")))) == expected
    for batch in [*sets.batches.values(), label_tokens(hand)]:
        got = first_violations(batch)
        slow = [reference_violation(row) for row in batch.tokens.tolist()]
        assert list(zip(*(got[k].tolist() for k in ("at", "kind", "pairs_between", "matches")))) == slow


def test_the_violation_table_counts_each_rows_misread_as_the_padded_model_does(model, sets):
    table = violation_table(model, sets.batches, chunk=7)
    for split, batch in sets.batches.items():
        first = first_violations(batch)
        with torch.no_grad():
            logits = model.eval()(batch.tokens)
        rows = torch.from_numpy(first["at"] >= 0)
        at = torch.from_numpy(first["at"])[rows]
        ours = table[table["split"] == split]
        assert ours["rows"].sum() == int(batch.valid.any(1).sum())
        for h in ("depth", "valid"):
            wrong = logits[h][rows, at].argmax(-1) != getattr(batch, h)[rows, at]
            assert ours[f"{h}_missed"].sum() == int(wrong.sum())
    family = table[table["kind"] == "wrong-family closer"]
    assert set(family["matches"]) <= set(MATCHES) and family["pairs_between"].between(0, PAIRS_CAP).all()
    assert (table[table["kind"] != "wrong-family closer"]["matches"] == "").all()
    assert table["depth_missed"].sum() > 0  # an untrained model misreads some: the count is not vacuous

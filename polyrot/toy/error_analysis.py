"""Where a Dyck model is still wrong: the error rate of each head on each held-out split, broken
down by what describes a position. A seed that misses the 99.99% bar is explained by this table
(which split, head, depth and distance from the first violation hold the last errors), and a
training mix can be aimed at those cells.

Errors cluster in rows: a depth misread at a row's first violation stays wrong for the rest of
the row. So an evaluation of a few thousand rows, as the paper's early stop reads once, varies far
more than its token count suggests; `draw_readings` measures that spread on a larger set.

Each row of the table is one (split, head, feature, value) cell: `positions` non-PAD positions of
the held-out set have that value, `errors` of them are predicted wrongly. The features:

  depth            the position's true stack depth (its depth label, 0..MAX_DEPTH)
  since_violation  positions since the row's first grammar violation: -1 before it (the row is
                   still valid there), 0 at it, capped at SINCE_CAP
  position         the position in the sequence, in bins of POSITION_BIN (BOS is position 0)

A misread at the first violation is what freezes a row's depth wrong, so `violation_table` sorts
the rows by what their first violation is (a closer on an empty stack, a closer of the wrong
family, an opener past MAX_DEPTH) and, for a wrong family, by the closed pairs between the closer
and the opener it fails to match and by which opener its family does match. That is the measured
shape of the last errors: see docs/findings.md.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from polyrot.toy.dyck import Batch
from polyrot.toy.model import DyckTransformer
from polyrot.toy.task import HEADS, N_CTX, N_DEPTH_CLASSES, OPENERS

SINCE_CAP = 16
PAIRS_CAP = 3  # closed pairs between a wrong-family closer and the top opener: 0, 1, 2, 3 or more
POSITION_BIN = 8
FEATURES = ("depth", "since_violation", "position")


def since_first_violation(valid: torch.Tensor) -> torch.Tensor:
    """[B, T] positions since the first True of each row of the `valid` (is-invalid) labels, -1
    before it, capped at SINCE_CAP. The labels stay True from the first violation on."""
    started = valid.long().cumsum(1)  # 1 at the violation, 2 one position later, ...
    return torch.where(started > 0, (started - 1).clamp(max=SINCE_CAP), -1)


def _features(part: Batch) -> dict[str, torch.Tensor]:
    positions = torch.arange(part.tokens.shape[1]).expand_as(part.tokens)
    return {"depth": part.depth, "since_violation": since_first_violation(part.valid),
            "position": positions // POSITION_BIN * POSITION_BIN}


# Each feature's values shifted to 0.. for bincount, and the number of them.
_OFFSET = {"depth": 0, "since_violation": 1, "position": 0}
_SIZE = {"depth": N_DEPTH_CLASSES, "since_violation": SINCE_CAP + 2, "position": N_CTX}


@torch.no_grad()
def error_table(model: DyckTransformer, batches: dict[str, Batch], chunk: int = 128) -> pd.DataFrame:
    """The error cells of `model` on held-out `batches` ({split: Batch}), rows in length order and
    trimmed as in evaluation. Columns: split, head, feature, value, positions, errors, error_rate;
    only cells with positions are kept."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for split, batch in batches.items():
        positions = {f: torch.zeros(_SIZE[f], dtype=torch.long) for f in FEATURES}
        errors = {(h, f): torch.zeros(_SIZE[f], dtype=torch.long) for h in HEADS for f in FEATURES}
        for _, part in batch.by_length(chunk):
            logits = model(part.tokens.to(device))
            keys = {f: (v + _OFFSET[f])[part.mask] for f, v in _features(part).items()}
            for f in FEATURES:
                positions[f] += torch.bincount(keys[f], minlength=_SIZE[f])
            for h in HEADS:
                wrong = (logits[h].argmax(-1).cpu() != getattr(part, h))[part.mask]
                for f in FEATURES:
                    errors[h, f] += torch.bincount(keys[f][wrong], minlength=_SIZE[f])
        for h in HEADS:
            for f in FEATURES:
                for i in positions[f].nonzero().flatten().tolist():
                    n, e = int(positions[f][i]), int(errors[h, f][i])
                    rows.append((split, h, f, i - _OFFSET[f], n, e, e / n))
    model.train(was_training)
    return pd.DataFrame(rows, columns=["split", "head", "feature", "value", "positions", "errors", "error_rate"])


def worst_cells(table: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The n cells holding the most errors, each with its share of its (split, head)'s errors: the
    cells a training mix would aim at."""
    cells = table[table["errors"] > 0].copy()
    # Every feature partitions the same positions, so one feature's sum is the (split, head) total.
    totals = cells[cells["feature"] == FEATURES[0]].groupby(["split", "head"])["errors"].sum()
    cells["share"] = cells["errors"] / cells.set_index(["split", "head"]).index.map(totals)
    return cells.sort_values(["errors", "error_rate"], ascending=False).head(n).reset_index(drop=True)


@torch.no_grad()
def row_errors(model: DyckTransformer, batches: dict[str, Batch],
               chunk: int = 128) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split: each row's wrong positions per head, [rows, len(HEADS)], and its non-PAD
    positions, [rows], in the batch's own row order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for split, batch in batches.items():
        wrong = torch.zeros(len(batch), len(HEADS), dtype=torch.long)
        for rows, part in batch.by_length(chunk):
            logits = model(part.tokens.to(device))
            for i, h in enumerate(HEADS):
                wrong[rows, i] = ((logits[h].argmax(-1).cpu() != getattr(part, h)) & part.mask).sum(1)
        out[split] = (wrong.numpy(), batch.lengths.numpy())
    model.train(was_training)
    return out


def draw_readings(rows: dict[str, tuple[np.ndarray, np.ndarray]], n_rows: int, target: float,
                  draws: int = 1000, seed: int = 0) -> dict[str, float]:
    """How one evaluation of n_rows sequences a split would read the model, over `draws` such
    evaluations drawn without replacement from `rows` (row_errors' output): the fraction whose
    min accuracy over split x head reaches `target`, and the median and 5th percentile of that min."""
    rng = np.random.default_rng(seed)
    mins = np.ones(draws)
    for wrong, positions in rows.values():
        if n_rows > len(positions):
            raise ValueError(f"cannot draw {n_rows} rows from {len(positions)}")
        picks = np.argsort(rng.random((draws, len(positions))), axis=1)[:, :n_rows]  # [draws, n_rows]
        accuracy = 1 - wrong[picks].sum(1) / positions[picks].sum(1)[:, None]      # [draws, heads]
        mins = np.minimum(mins, accuracy.min(1))
    return {"pass_rate": float((mins >= target).mean()), "min_median": float(np.median(mins)),
            "min_p05": float(np.quantile(mins, 0.05))}


# A first violation's kind, and (for a wrong-family closer) the opener its family matches: the one
# beneath the top of the stack, one of a pair already closed since the top opened, or neither.
VIOLATION_KINDS = ("empty-stack closer", "wrong-family closer", "opener past max depth")
MATCHES = ("beneath", "closed pair", "neither")


def first_violations(batch: Batch) -> dict[str, np.ndarray]:
    """Each row's first violation, read off its labels, as [B] arrays: `at` its position (-1 in a
    valid row), `kind` an index into VIOLATION_KINDS, and for a wrong-family closer `pairs_between`
    (the closed pairs between it and the top opener, capped at PAIRS_CAP) and `matches` (an index
    into MATCHES); -1 where they do not apply."""
    tokens, depth = batch.tokens.numpy(), batch.depth.numpy()
    n, length = tokens.shape
    rows, positions = np.arange(n), np.arange(length)[None, :]
    out = {key: np.full(n, -1, dtype=np.int64) for key in ("kind", "pairs_between", "matches")}
    broken = batch.valid.numpy().astype(bool)
    at = np.where(broken.any(1), broken.argmax(1), -1)
    out["at"] = at
    hit = at >= 0
    tok = tokens[rows, at]
    before = np.where(at > 0, depth[rows, at - 1], 0)  # the depth of the valid prefix
    out["kind"][hit] = np.where(np.isin(tok, OPENERS), 2, np.where(before == 0, 0, 1))[hit]
    # Before the violation the prefix is valid, so the opener on top of a stack of depth d is the
    # last position whose depth rose to d, and the one beneath it the last rise to d - 1 before that.
    rises = np.diff(depth, prepend=0, axis=1) == 1
    earlier = positions < at[:, None]
    top = np.where(rises & earlier & (depth == before[:, None]), positions, -1).max(1)
    beneath = np.where(rises & (positions < top[:, None]) & (depth == before[:, None] - 1), positions, -1).max(1)
    wrong = out["kind"] == 1
    opener = tok - 1  # the opener of the closer's own family
    between = (positions > top[:, None]) & earlier & (tokens == opener[:, None])
    matches = np.where((beneath >= 0) & (tokens[rows, beneath] == opener), 0, np.where(between.any(1), 1, 2))
    out["pairs_between"][wrong] = np.minimum((at - top - 1) // 2, PAIRS_CAP)[wrong]
    out["matches"][wrong] = matches[wrong]
    return out


@torch.no_grad()
def violation_table(model: DyckTransformer, batches: dict[str, Batch], chunk: int = 128) -> pd.DataFrame:
    """How `model` reads each held-out row's first violation, counted by its configuration
    (first_violations). Columns: split, kind, pairs_between, matches, rows, depth_missed and
    valid_missed (rows whose depth or valid head is wrong at the violating token itself)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counts = []
    for split, batch in batches.items():
        first = first_violations(batch)
        missed = np.zeros((len(batch), 2), dtype=bool)
        for rows, part in batch.by_length(chunk):
            at = torch.from_numpy(first["at"][rows.numpy()])
            hit = at >= 0
            if not hit.any():
                continue
            logits = model(part.tokens.to(device))
            where = (torch.arange(len(part))[hit], at[hit])
            for i, h in enumerate(("depth", "valid")):
                wrong = logits[h].argmax(-1).cpu()[where] != getattr(part, h)[where]
                missed[rows[hit].numpy(), i] = wrong.numpy()
        frame = pd.DataFrame({"kind": first["kind"], "pairs_between": first["pairs_between"],
                              "matches": first["matches"], "depth_missed": missed[:, 0],
                              "valid_missed": missed[:, 1]})[first["at"] >= 0]
        cells = frame.groupby(["kind", "pairs_between", "matches"], as_index=False).agg(
            rows=("depth_missed", "size"), depth_missed=("depth_missed", "sum"), valid_missed=("valid_missed", "sum"))
        counts.append(cells.assign(split=split))
    table = pd.concat(counts, ignore_index=True)
    table["kind"] = table["kind"].map(dict(enumerate(VIOLATION_KINDS)))
    table["matches"] = table["matches"].map(dict(enumerate(MATCHES))).fillna("")
    model.train(was_training)
    return table[["split", "kind", "pairs_between", "matches", "rows", "depth_missed", "valid_missed"]]

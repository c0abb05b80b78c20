"""Activations at named sites, flattened to rows that align across models.

Row order (the contract every consumer relies on): for a batch of sequences, rows are the non-PAD
positions in sequence-major order — all positions of sequence 0 in order, then sequence 1, and so
on. Two models run on the same BatchSpec therefore produce row-aligned matrices: row i of one
model's activations and row i of another's describe the same token in the same context.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from polyrot.toy.dyck import Batch, make_batch
from polyrot.toy.model import DyckTransformer, resolve_site
from polyrot.toy.task import BatchSpec


@torch.no_grad()
def extract(
    model: DyckTransformer,
    batch: Batch | BatchSpec,
    sites: Iterable[str],
    *,
    chunk: int = 1024,
) -> dict[str, torch.Tensor]:
    """{site: float32 [n_rows, d]} at the non-PAD positions of `batch`, in the documented row order."""
    if isinstance(batch, BatchSpec):
        batch = make_batch(batch)
    names = [resolve_site(s, model.cfg) for s in sites]
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    model.eval()
    for lo in range(0, len(batch), chunk):
        part = batch.select(slice(lo, lo + chunk))
        _, cache = model.run(part.tokens, sites=names)
        for n in names:
            parts[n].append(cache[n][part.mask])
    return {n: torch.cat(p).float() for n, p in parts.items()}


def condition_rows(batch: Batch) -> dict[str, torch.Tensor]:
    """Per-row labels (same order as `extract`): tokens, depth, valid flag and position."""
    positions = torch.arange(batch.tokens.shape[1]).expand_as(batch.tokens)
    return {
        "token": batch.tokens[batch.mask], "depth": batch.depth[batch.mask],
        "valid": batch.valid[batch.mask], "position": positions[batch.mask],
    }

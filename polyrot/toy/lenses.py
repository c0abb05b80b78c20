"""Lenses 1 and 4 of the paper (§3): per-head circuit norms from the weights, and the ReLU
activation patterns the MLPs occupy on data. Lens 3's causal numbers live in polyrot.toy.causal.

Lens 1, on RMSNorm-folded weights (the gains would otherwise scale Q, K and V arbitrarily):
    |QK| = ||W_Q[h]ᵀ W_K[h]||_F   (d_model x d_model: which residual directions attend to which)
    |OV| = ||W_O[h] W_V[h]||_F    (d_model x d_model: what a head copies into the stream)

Lens 4: a bias-free ReLU MLP is affine on each cell of a polyhedral partition, the cell named by
the binary pattern of which neurons fire. On the non-PAD positions of a batch we count the
distinct patterns per layer and the neurons that fire on at least one position (alive).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from polyrot.toy.dyck import Batch
from polyrot.toy.model import DyckTransformer, fold_rmsnorm

# The paper counts patterns on 220,738 positions; 8192 sequences of lengths 2–48 give about as many.


@torch.no_grad()
def head_norms(model: DyckTransformer) -> pd.DataFrame:
    """One row per head: layer, head, qk = |QK|, ov = |OV| on the folded weights."""
    folded = fold_rmsnorm(model)
    rows = []
    for layer, block in enumerate(folded.blocks):
        attn = block.attn
        qk = torch.linalg.matrix_norm(attn.W_Q.transpose(1, 2).double() @ attn.W_K.double())
        ov = torch.linalg.matrix_norm(attn.W_O.double() @ attn.W_V.double())
        rows += [{"layer": layer, "head": h, "qk": float(qk[h]), "ov": float(ov[h])}
                 for h in range(model.cfg.n_heads)]
    return pd.DataFrame(rows)


@torch.no_grad()
def activation_patterns(model: DyckTransformer, batch: Batch, chunk: int = 1024) -> pd.DataFrame:
    """One row per MLP layer: positions seen, unique firing patterns, alive neurons (of d_mlp)."""
    sites = [f"mlp_pre_{layer}" for layer in range(model.cfg.n_layers)]
    packed: dict[str, list[np.ndarray]] = {s: [] for s in sites}
    fired = {s: torch.zeros(model.cfg.d_mlp, dtype=torch.bool) for s in sites}
    model.eval()
    for lo in range(0, len(batch), chunk):
        part = batch.select(slice(lo, lo + chunk))
        _, cache = model.run(part.tokens, sites=sites)
        for s in sites:
            on = cache[s][part.mask] > 0
            fired[s] |= on.any(0)
            # 256 booleans -> 32 bytes per row, so np.unique compares short rows.
            packed[s].append(np.packbits(on.numpy(), axis=1))
    rows = []
    for layer, s in enumerate(sites):
        patterns = np.concatenate(packed[s])
        rows.append({"layer": layer, "positions": len(patterns),
                     "unique_patterns": len(np.unique(patterns, axis=0)),
                     "alive_neurons": int(fired[s].sum()), "d_mlp": model.cfg.d_mlp})
    return pd.DataFrame(rows)

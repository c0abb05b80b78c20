"""Causal bars C and Pr: mean ablation of the 10 components, and what predicts its effect.

Components (paper §7): each attention head's contribution to the residual stream and each MLP's
output, in forward order: attn_0_h0..h3, mlp_0, attn_1_h0..h3, mlp_1. They are the model's
`head_out_L_H` and `mlp_out_L` sites.

Measured effect of a component: replace its contribution at every position with its dataset mean
(over the non-PAD positions of a separate means batch) and take the change of the training loss,
the sum over the three heads of the masked mean cross-entropy (train.loss_fn).

Every loss here runs over the batch in chunks of rows of similar length (Batch.by_length), each
trimmed to its longest row, with each chunk's cross-entropy sum divided by the whole batch's token
count. The loss is a sum over tokens, so the chunks' losses, effects and attributions add up to the
batch's, while a random training-split batch is about half PAD and a length-sorted chunk almost none.

Predicted effect: attribution patching and integrated gradients (polyrot.core.attribution) at
the clean run. IG tracks mean ablation while AP, a first-order guess near a converged minimum,
need not (§3.3).

Bars: C is the Pearson r of predicted against measured effects on one means / evaluation batch
pair (task.C_MEANS, task.C_EVAL), Pr the same r on another (task.PR_MEANS, task.PR_EVAL); cross-seed,
the reference's IG predicts the effects measured on an aligned replication (task.CROSS_MEANS,
task.CROSS_EVAL).
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
import torch
from tqdm.auto import tqdm

from polyrot.core.attribution import (
    LossOf,
    attribution_patching,
    check_steps,
    integrated_gradients,
)
from polyrot.toy.activations import extract
from polyrot.toy.dyck import Batch
from polyrot.toy.model import DyckTransformer, ModelConfig
from polyrot.toy.train import loss_fn


def components(cfg: ModelConfig) -> list[str]:
    """The paper's component names in forward order."""
    names = []
    for layer in range(cfg.n_layers):
        names += [f"attn_{layer}_h{h}" for h in range(cfg.n_heads)] + [f"mlp_{layer}"]
    return names


def component_site(name: str) -> str:
    """The model site holding a component's contribution to the residual stream."""
    kind, layer, *head = name.split("_")
    return f"head_out_{layer}_{head[0][1:]}" if kind == "attn" else f"mlp_out_{layer}"


def is_head(name: str) -> bool:
    return name.startswith("attn_")


@torch.no_grad()
def component_means(model: DyckTransformer, batch: Batch, chunk: int = 512) -> dict[str, torch.Tensor]:
    """Each component's mean contribution [d_model] over the non-PAD positions of `batch`."""
    names = components(model.cfg)
    rows = extract(model, batch, [component_site(n) for n in names], chunk=chunk)
    return {n: rows[component_site(n)].double().mean(0).float() for n in names}


def clean_activations(model: DyckTransformer, batch: Batch) -> dict[str, torch.Tensor]:
    """Each component's clean contribution [B, T, d_model] on `batch`."""
    names = components(model.cfg)
    with torch.no_grad():
        _, cache = model.run(batch.tokens, sites=[component_site(n) for n in names])
    return {n: cache[component_site(n)] for n in names}


# Rows per length-sorted chunk: small enough that a chunk's rows have near-equal lengths, large
# enough that each pass is still a sizeable matmul.
CHUNK_ROWS = 32


def component_loss_of(model: DyckTransformer, batch: Batch, component: str, tokens: float) -> LossOf:
    """loss_of(a): the training loss on `batch` with `component`'s contribution set to a, every
    other component recomputed downstream of it, normalised by `tokens` (train.loss_fn)."""
    site = component_site(component)

    def loss_of(activation: torch.Tensor) -> torch.Tensor:
        return loss_fn(model.run(batch.tokens, patches={site: lambda _: activation})[0], batch, tokens)

    return loss_of


def _length_chunks(batch: Batch, chunk: int) -> tuple[list[Batch], float]:
    """`batch`'s rows in length-sorted, trimmed chunks, and the token count every chunk's loss is
    normalised by (the whole batch's), so that the chunks' losses sum to the batch's."""
    return [part for _, part in batch.by_length(chunk)], float(batch.mask.sum())


def ablation_effects(model: DyckTransformer, batch: Batch, means: Mapping[str, torch.Tensor],
                     chunk: int = CHUNK_ROWS) -> tuple[float, dict[str, float]]:
    """(clean loss, {component: loss with the component mean-ablated - clean loss})."""
    model.eval()
    return _ablation_effects(model, *_length_chunks(batch, chunk), means)


@torch.no_grad()
def _ablation_effects(model: DyckTransformer, parts: list[Batch], tokens: float,
                      means: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    clean, effects = 0.0, dict.fromkeys(components(model.cfg), 0.0)
    for part in parts:
        part_clean = float(loss_fn(model(part.tokens), part, tokens))
        clean += part_clean
        for name in effects:
            patch = {component_site(name): lambda x, m=means[name]: m.expand_as(x)}
            effects[name] += float(loss_fn(model.run(part.tokens, patches=patch)[0], part, tokens)) - part_clean
    return clean, effects


def effect_table(model: DyckTransformer, batch: Batch, means: Mapping[str, torch.Tensor], *,
                 ig_steps: int, ap: bool = True, progress: bool = False, chunk: int = CHUNK_ROWS) -> pd.DataFrame:
    """One row per component: measured mean-ablation effect, its IG prediction and (with `ap`)
    its AP prediction; the clean loss is in `table.attrs["clean_loss"]`."""
    check_steps(ig_steps)
    model.eval()
    parts, tokens = _length_chunks(batch, chunk)
    clean_loss, measured = _ablation_effects(model, parts, tokens, means)
    cleans = [clean_activations(model, part) for part in parts]
    rows = []
    for name in tqdm(components(model.cfg), desc="IG per component", disable=not progress, leave=False):
        losses = [component_loss_of(model, part, name, tokens) for part in parts]
        row = {"component": name, "measured": measured[name],
               "ig": sum(integrated_gradients(loss_of, clean[name], means[name], ig_steps)
                         for loss_of, clean in zip(losses, cleans))}
        if ap:
            row["ap"] = sum(attribution_patching(loss_of, clean[name], means[name])
                            for loss_of, clean in zip(losses, cleans))
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["clean_loss"] = clean_loss
    return table


def acdc_heads(effects: Mapping[str, float], threshold: float) -> tuple[list[str], list[str]]:
    """(kept, dropped) attention heads: a head is kept when its effective ablation loss (the
    mean-ablation effect) exceeds `threshold`, as the paper's ACDC-style pruning does."""
    heads = [name for name in effects if is_head(name)]
    kept = [name for name in heads if effects[name] > threshold]
    return kept, [name for name in heads if name not in kept]

"""Predicted effect of replacing an activation by a baseline, from gradients alone.

For a scalar loss L of one activation a with baseline b (a component with the rest of the model
downstream recomputed):

    AP  attribution patching   <dL/da (a), b - a>
    IG  integrated gradients   <b - a, (1/n) sum_{k=1..n} dL/da (a_k)>,  a_k = (k/n) a + (1 - k/n) b

IG with n = 1 is AP. By completeness IG tends to L(b) - L(a), the measured effect, as n grows.
Both take any `loss_of(activation) -> scalar`, so the toy components (polyrot.toy.causal) and
Hugging Face blocks (polyrot.hf.lm) use them as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.stats
import torch

from polyrot.errors import ParameterError

LossOf = Callable[[torch.Tensor], torch.Tensor]


def check_steps(n_steps: int) -> None:
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps <= 0:
        raise ParameterError(f"integrated gradients needs a positive number of steps, got {n_steps!r}")


def integrated_gradients(loss_of: LossOf, clean: torch.Tensor, baseline: torch.Tensor,
                         n_steps: int) -> float:
    """Predicted L(baseline) - L(clean): the right Riemann sum (alpha = k/n, k = 1..n) of the
    gradient along alpha * clean + (1 - alpha) * baseline, dotted with baseline - clean.

    `baseline` broadcasts against `clean` (a [d] mean against [B, T, d] activations).
    """
    check_steps(n_steps)
    clean = clean.detach()
    baseline = baseline.detach().to(clean.dtype).expand_as(clean)
    grad_sum = torch.zeros_like(clean, dtype=torch.float64)
    for k in range(1, n_steps + 1):
        alpha = k / n_steps
        point = (alpha * clean + (1 - alpha) * baseline).requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of(point), point)
        grad_sum += grad.to(torch.float64)
    return float(((baseline - clean).to(torch.float64) * grad_sum).sum() / n_steps)


def attribution_patching(loss_of: LossOf, clean: torch.Tensor, baseline: torch.Tensor) -> float:
    """Predicted L(baseline) - L(clean) to first order: <dL/da at clean, baseline - clean>."""
    return integrated_gradients(loss_of, clean, baseline, n_steps=1)


def pearson(predicted, measured) -> float:
    """Pearson r; NaN when either side is constant (no linear relation to speak of)."""
    x, y = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(scipy.stats.pearsonr(x, y).statistic)

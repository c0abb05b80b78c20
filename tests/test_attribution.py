"""Attribution patching and integrated gradients against closed forms; Pearson r."""

import numpy as np
import pytest
import torch

from polyrot.core import attribution
from polyrot.errors import ParameterError


def quadratic(a: torch.Tensor) -> torch.Tensor:
    return (a ** 2).sum()


@pytest.mark.parametrize("n", [1, 4, 32, 256])
def test_ig_of_a_quadratic_is_the_exact_difference_minus_the_right_riemann_bias(n):
    gen = torch.Generator().manual_seed(0)
    clean, baseline = torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen,
                                                                                         dtype=torch.float64)
    exact = float(quadratic(baseline.expand(3, 5)) - quadratic(clean))
    # The gradient 2a is linear along the path and the right sum's alphas average (n + 1) / 2n, not 1/2:
    # the sum falls short of the exact difference by |baseline - clean|^2 / n.
    gap = float(((baseline - clean) ** 2).sum())
    assert attribution.integrated_gradients(quadratic, clean, baseline, n) == pytest.approx(exact - gap / n, abs=1e-9)


def test_ap_is_ig_with_one_step_and_the_gradient_at_clean():
    gen = torch.Generator().manual_seed(1)
    clean, baseline = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    ap = attribution.attribution_patching(quadratic, clean, baseline)
    assert ap == attribution.integrated_gradients(quadratic, clean, baseline, 1)
    assert ap == pytest.approx(float((2 * clean * (baseline - clean)).sum()), rel=1e-6)


@pytest.mark.parametrize("steps", [0, -3])
def test_non_positive_steps_are_refused(steps):
    with pytest.raises(ParameterError, match="positive number of steps"):
        attribution.integrated_gradients(quadratic, torch.ones(2), torch.zeros(2), steps)


def test_pearson():
    assert attribution.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.9933992677987828)
    assert np.isnan(attribution.pearson([1, 1, 1], [1, 2, 3]))

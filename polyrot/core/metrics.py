"""Reconstruction, sparsity and dictionary-comparison metrics.

Every metric used by more than one stage lives here, once, so that a number
logged during training means the same thing as the number in a figure.
"""

import torch
from scipy.optimize import linear_sum_assignment


def _float64(a) -> torch.Tensor:
    # Sums of squares over millions of float32 elements lose several digits;
    # float64 keeps EV = 0 for the mean predictor exact rather than ~1e-7.
    return torch.as_tensor(a).detach().to(torch.float64)


def _check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")


def explained_variance(x, x_hat) -> float:
    """1 - SSE / SST over all rows and dims; SST is taken about the per-dimension mean.

    Predicting the mean row gives 0.0, perfect reconstruction 1.0. Constant x
    (SST = 0) has no variance to explain and returns NaN.
    """
    x, x_hat = _float64(x), _float64(x_hat)
    _check_same_shape(x, x_hat)
    sse = (x - x_hat).square().sum()
    sst = (x - x.mean(dim=0)).square().sum()
    return float("nan") if sst == 0 else (1.0 - sse / sst).item()


def mse(x, x_hat) -> float:
    """Mean squared error over all elements."""
    x, x_hat = _float64(x), _float64(x_hat)
    _check_same_shape(x, x_hat)
    return (x - x_hat).square().mean().item()


def l0(f) -> float:
    """Mean number of non-zero features per row of f [N, n_features]."""
    f = torch.as_tensor(f)
    return (f != 0).sum(dim=1, dtype=torch.float64).mean().item()


def dead_fraction(f) -> float:
    """Fraction of features (columns of f) that are zero on every row."""
    f = torch.as_tensor(f)
    return 1.0 - (f != 0).any(dim=0).double().mean().item()


def decoder_cosine(W_a, W_b, threshold: float = 0.5) -> dict:
    """Compare two dictionaries whose features are the columns of [d, n] matrices.

    For each feature of b two similarities to a are reported:
      "max": the best cosine against any feature of a. Several features of b
        may claim the same feature of a, so this can overstate agreement. It is
        what the paper's code computes.
      "hungarian": the cosine under a one-to-one matching of features that
        maximises the total cosine. It is what the paper's text describes.
    Cosines are signed: a feature and its negation are different features.
    When b has more features than a, the unmatched ones score 0.

    Returns means and fractions above `threshold` (floats, over the features
    of b), the per-feature cosines, and `hungarian_match`: for each feature of
    b, the index of its partner in a (-1 if unmatched).
    """
    A, B = _float64(W_a), _float64(W_b)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[0]:
        raise ValueError(f"need [d, n] matrices with equal d, got {tuple(A.shape)} and {tuple(B.shape)}")
    # clamp so that an all-zero column gets cosine 0 with everything instead of NaN
    A = A / A.norm(dim=0, keepdim=True).clamp_min(1e-12)
    B = B / B.norm(dim=0, keepdim=True).clamp_min(1e-12)
    cos = A.T @ B  # [n_a, n_b]

    max_cos = cos.max(dim=0).values
    rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
    match = torch.full((B.shape[1],), -1, dtype=torch.long)
    match[cols] = torch.from_numpy(rows)
    hungarian_cos = torch.zeros(B.shape[1], dtype=torch.float64)
    hungarian_cos[cols] = cos[rows, cols]

    return {
        "max_mean": max_cos.mean().item(),
        "max_frac_above": (max_cos > threshold).double().mean().item(),
        "hungarian_mean": hungarian_cos.mean().item(),
        "hungarian_frac_above": (hungarian_cos > threshold).double().mean().item(),
        "max_cos": max_cos,
        "hungarian_cos": hungarian_cos,
        "hungarian_match": match,
    }


def firing_correlation(f_a, f_b) -> torch.Tensor:
    """Per-feature Pearson r between activations f_a, f_b [N, n_features].

    Features are aligned by index (permute one side first if needed). A feature
    that is constant in either matrix, e.g. dead, has no defined correlation;
    it is reported as 0 so that averages stay finite and count it as
    "not shared". Returns a float64 tensor [n_features].
    """
    a, b = _float64(f_a), _float64(f_b)
    _check_same_shape(a, b)
    a = a - a.mean(dim=0)
    b = b - b.mean(dim=0)
    cov = (a * b).sum(dim=0)
    scale = (a.square().sum(dim=0) * b.square().sum(dim=0)).sqrt()
    r = torch.zeros_like(cov)
    nonconstant = scale > 0
    r[nonconstant] = cov[nonconstant] / scale[nonconstant]
    return r


def firing_summary(r, threshold: float = 0.5) -> dict:
    """Mean of per-feature correlations r and the fraction above `threshold`."""
    r = _float64(r)
    return {"mean": r.mean().item(), "frac_above": (r > threshold).double().mean().item()}

"""Time fitting one rotation and computing all its statistics at the Pythia size: 65,536 x 512.

The activations are synthetic (float32, as extracted): a source matrix with a decaying spectrum and
a target that is the source turned by a Haar-random R plus a little noise, so the fit has a real
answer and its quality is checked before anything is reported. The table breaks
`rotation_statistics` into its parts; the Haar reference (10 draws of O(512)) dominates it and is
what `pooled_statistics` pays once for many rotations.

BLAS and torch are held to --threads, so figures from a shared machine stay comparable.

    .venv/bin/python benchmarks/rotation_fit.py [--threads 1] [--repeats 3] [--rows 65536] [--dim 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from polyrot.core.rotation import (
    determinant,
    eigen_angles,
    fit_rotation,
    frobenius_from_identity,
    haar_angles,
    haar_rotation,
    ks_vs_haar,
    operator_norm,
    orthogonality_error,
    rotation_statistics,
    signed_permutation_distance,
)


def synthetic_pair(rows: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, dim)
    source = torch.randn(rows, dim, generator=gen) * scales + torch.randn(dim, generator=gen)
    R0 = haar_rotation(dim, seed=seed + 1).float()
    target = source @ R0.T + 1e-3 * torch.randn(rows, dim, generator=gen)
    return source, target


def timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], object]:
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return seconds, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="BLAS and torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="timings per step (the table shows their median)")
    parser.add_argument("--rows", type=int, default=65_536)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        source, target = synthetic_pair(args.rows, args.dim, seed=13)
        fit_seconds, rotation = timed(lambda: fit_rotation(source, target), args.repeats)
        if rotation.metadata["rotation_ev"] < 0.99:
            raise SystemExit(f"the fit missed the planted rotation: rotation_ev {rotation.metadata['rotation_ev']:.4f}")
        R = rotation.R.numpy()
        angles, haar = eigen_angles(R), haar_angles(args.dim)
        parts = [
            ("  ||R - I||_F, ||R^T R - I||_F, det, operator norm",
             lambda: (frobenius_from_identity(R), orthogonality_error(R), determinant(R), operator_norm(R))),
            ("  signed-permutation distance (Hungarian on |R|)", lambda: signed_permutation_distance(R)),
            ("  eigen-angles of R", lambda: eigen_angles(R)),
            ("  Haar reference: angles of 10 O(d) draws", lambda: haar_angles(args.dim)),
            ("  KS test against the Haar angles", lambda: ks_vs_haar(angles, haar)),
            ("rotation_statistics (all of the above)", lambda: rotation_statistics(rotation)),
        ]
        results = [("fit_rotation (float64 Procrustes + fit quality)", fit_seconds)]
        results += [(name, timed(fn, args.repeats)[0]) for name, fn in parts]

    print(f"rotation fit + statistics: {args.rows:,} x {args.dim} float32 activations, {args.threads} thread(s), "
          f"median of {args.repeats}; load average {os.getloadavg()[0]:.2f}")
    width = max(len(name) for name, _ in results)
    header = f"{'step':<{width}}  {'median s':>9}  {'min s':>7}"
    print(header + "\n" + "-" * len(header))
    for name, seconds in results:
        print(f"{name:<{width}}  {statistics.median(seconds):>9.3f}  {min(seconds):>7.3f}")
    total = statistics.median(fit_seconds) + statistics.median(results[-1][1])
    print("-" * len(header) + f"\n{'fit_rotation + rotation_statistics':<{width}}  {total:>9.3f}")
    print(f"\nfit quality: rotation_ev {rotation.metadata['rotation_ev']:.6f}; "
          f"||R - I||_F / sqrt(2d) = {frobenius_from_identity(R) / np.sqrt(2 * args.dim):.4f}")


if __name__ == "__main__":
    main()

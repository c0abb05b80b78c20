"""Bar C's effect table (mean ablation, IG and AP of the 10 components) over length-sorted chunks,
against the same table computed on the whole padded batch in one pass.

Both compute the same sums (every loss is a sum over tokens divided by the batch's token count), so
the benchmark also prints their largest relative difference. They take turns, round by round, on the
paper's Bar C batches (task.C_MEANS, task.C_EVAL) and a fresh model of the given seed, or a trained
one from the store with --model-run.

    .venv/bin/python benchmarks/causal_bars.py --threads 1 --rounds 3 [--model-run RUN_ID]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from polyrot.toy import causal, task
from polyrot.toy.dyck import make_batch
from polyrot.toy.model import DyckTransformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ig-steps", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=causal.CHUNK_ROWS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-run", help="a train_seed run ID in the configured store (default: a fresh model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model_run:
        from polyrot.stages.train_seed import load_seed
        model = load_seed(args.model_run)
    else:
        model = DyckTransformer(seed=args.seed)
    batch = make_batch(task.C_EVAL)
    means = causal.component_means(model, make_batch(task.C_MEANS))
    print(f"load average at start: {os.getloadavg()}; {len(batch)} rows, {int(batch.mask.sum())} tokens, "
          f"{1 - float(batch.mask.float().mean()):.0%} PAD when padded")
    chunks = {"chunked": args.chunk, "one padded pass": len(batch)}
    seconds: dict[str, list[float]] = {name: [] for name in chunks}
    tables = {}
    for r in range(args.rounds):
        for name in (list(chunks) if r % 2 == 0 else list(chunks)[::-1]):
            start = time.perf_counter()
            tables[name] = causal.effect_table(model, batch, means, ig_steps=args.ig_steps, chunk=chunks[name])
            seconds[name].append(time.perf_counter() - start)
    ratios = [slow / fast for slow, fast in zip(seconds["one padded pass"], seconds["chunked"])]
    fast, slow = tables["chunked"], tables["one padded pass"]
    diff = max(float(np.max(np.abs(fast[c] - slow[c]) / np.maximum(np.abs(slow[c]), 1e-12))) for c in ("measured", "ig", "ap"))
    for name, values in seconds.items():
        print(f"{name:>16}: median {statistics.median(values):.1f} s over {args.rounds} rounds")
    print(f"speed-up: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}); "
          f"largest relative difference {diff:.1e}; load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()

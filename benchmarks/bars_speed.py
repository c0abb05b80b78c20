"""The two costliest measurements of a `bars` run, over length-sorted chunks, against the same
measurement on padded batches.

  Bar C's effect table  mean ablation, 32-point IG and AP of the 10 components on the paper's Bar C
                        batches (task.C_MEANS, task.C_EVAL): chunks of causal.CHUNK_ROWS rows
                        against the whole 256-row batch in one padded pass
  Bar B                 KL to the spec on --samples sequences: chunks of behavioural.FORWARD_ROWS
                        rows against each 2,048-sequence draw in one padded pass

Every loss and KL is a sum over tokens, so both sides compute the same numbers; the benchmark prints
their largest relative difference. The two take turns, round by round, on a fresh model of the given
seed, or a trained one from the store with --model-run.

    .venv/bin/python benchmarks/bars_speed.py --threads 1 --rounds 3 [--model-run RUN_ID]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from polyrot.toy import behavioural, causal, task
from polyrot.toy.dyck import make_batch
from polyrot.toy.model import DyckTransformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ig-steps", type=int, default=32)
    parser.add_argument("--samples", type=int, default=32768, help="Bar B sequences")
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
    print(f"load average at start: {os.getloadavg()}; Bar C batch: {len(batch)} rows, {int(batch.mask.sum())} "
          f"tokens, {1 - float(batch.mask.float().mean()):.0%} PAD when padded")

    def effect_table(chunk: int) -> list[float]:
        table = causal.effect_table(model, batch, means, ig_steps=args.ig_steps, chunk=chunk)
        return [*table["measured"], *table["ig"], *table["ap"]]

    def bar_b(chunk: int) -> list[float]:
        result = behavioural.bar_b(model, args.samples, chunk=chunk)
        return [result.mean, *result.per_head.values()]

    contenders = {"Bar C effect table": (effect_table, causal.CHUNK_ROWS, len(batch)),
                  "Bar B": (bar_b, behavioural.FORWARD_ROWS, behavioural.BATCH_SEQUENCES)}
    for name, (measure, chunked, padded) in contenders.items():
        seconds: dict[int, list[float]] = {chunked: [], padded: []}
        values: dict[int, list[float]] = {}
        for r in range(args.rounds):
            for chunk in ((chunked, padded) if r % 2 == 0 else (padded, chunked)):
                start = time.perf_counter()
                values[chunk] = measure(chunk)
                seconds[chunk].append(time.perf_counter() - start)
        ratios = [slow / fast for slow, fast in zip(seconds[padded], seconds[chunked])]
        fast, slow = np.array(values[chunked]), np.array(values[padded])
        diff = float(np.max(np.abs(fast - slow) / np.maximum(np.abs(slow), 1e-12)))
        print(f"{name}: chunks of {chunked} rows {statistics.median(seconds[chunked]):.1f} s, padded "
              f"{statistics.median(seconds[padded]):.1f} s (medians of {args.rounds}); speed-up "
              f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}); largest "
              f"relative difference {diff:.1e}; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()

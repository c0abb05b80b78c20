"""Training-step throughput of polyrot's DyckTransformer against a straightforward reference.

The reference is the same model written the obvious way: an einsum per head, an explicit
masked softmax and the RMSNorm formula spelled out. It starts from polyrot's initial weights and
is checked to compute the same training trajectory before anything is timed, so the ratio
polyrot/reference measures implementation speed only.

Both are timed on the same batches from polyrot's TrainingStream, taking turns step by step:
on a shared machine the absolute tokens/s drift with the load, while the per-round ratio of two
interleaved measurements mostly cancels it. Every measurement covers the same number of sequences
whatever the batch size, so small batches are not timed over a fraction of a second. Tokens are
non-PAD tokens, the ones the loss sees.

The data share is the fraction of a training run's time that TrainingStream spends generating its
chunks, at polyrot's measured step time.

    .venv/bin/python benchmarks/train_throughput.py [--threads 2 1] [--rounds 3] [--steps 1]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from torch import nn

from polyrot.toy.dyck import Batch
from polyrot.toy.model import HEADS, DyckTransformer, ModelConfig
from polyrot.toy.recipe import TrainConfig
from polyrot.toy.train import CHUNK_ROWS, TrainingStream, loss_fn, make_optimizer


class ReferenceRMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w


class ReferenceAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
        self.W_Q = nn.Parameter(torch.empty(H, dh, d))
        self.W_K = nn.Parameter(torch.empty(H, dh, d))
        self.W_V = nn.Parameter(torch.empty(H, dh, d))
        self.W_O = nn.Parameter(torch.empty(H, d, dh))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        out = torch.zeros_like(x)
        for h in range(self.W_Q.shape[0]):
            q = torch.einsum("btd,ed->bte", x, self.W_Q[h])
            k = torch.einsum("btd,ed->bte", x, self.W_K[h])
            v = torch.einsum("btd,ed->bte", x, self.W_V[h])
            scores = torch.einsum("bqe,bke->bqk", q, k) / math.sqrt(q.shape[-1])
            pattern = scores.masked_fill(future, float("-inf")).softmax(-1)
            z = torch.einsum("bqk,bke->bqe", pattern, v)
            out = out + torch.einsum("bte,de->btd", z, self.W_O[h])
        return out


class ReferenceMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.W_out = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(torch.einsum("btd,md->btm", x, self.W_in))
        return torch.einsum("btm,dm->btd", hidden, self.W_out)


class ReferenceBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = ReferenceRMSNorm(cfg.d_model, cfg.eps)
        self.attn = ReferenceAttention(cfg)
        self.ln2 = ReferenceRMSNorm(cfg.d_model, cfg.eps)
        self.mlp = ReferenceMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ReferenceTransformer(nn.Module):
    """polyrot's architecture under polyrot's parameter names, so a strict state-dict load copies it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        self.register_buffer("W_pos", torch.empty(cfg.n_ctx, cfg.d_model))
        self.blocks = nn.ModuleList(ReferenceBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = ReferenceRMSNorm(cfg.d_model, cfg.eps)
        self.W_U_tok = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        self.W_U_depth = nn.Parameter(torch.empty(cfg.n_depth, cfg.d_model))
        self.W_U_valid = nn.Parameter(torch.empty(cfg.n_valid, cfg.d_model))

    @classmethod
    def copy_of(cls, model: DyckTransformer) -> ReferenceTransformer:
        ref = cls(model.cfg)
        ref.load_state_dict(model.state_dict())
        return ref

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.W_E[tokens] + self.W_pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return {h: torch.einsum("btd,cd->btc", x, getattr(self, f"W_U_{h}")) for h in HEADS}


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch, grad_clip: float) -> float:
    """polyrot.toy.train.train's step, minus the learning-rate schedule (a few float operations)."""
    loss = loss_fn(model(batch.tokens), batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()


CHECK_STEPS = 3


def check_same_training(seed: int, cfg: TrainConfig, batches: list[Batch], tolerance: float = 1e-4) -> float:
    """Largest loss gap over a few identical training steps; fails if it exceeds `tolerance`.

    Comparing several steps, not just the first loss, also covers backward, clipping and AdamW,
    which are all part of what is timed.
    """
    model = DyckTransformer(seed=seed)
    ref = ReferenceTransformer.copy_of(model)
    opt_model, opt_ref = make_optimizer(model, cfg), make_optimizer(ref, cfg)
    gap = max(abs(train_step(model, opt_model, b, cfg.grad_clip) - train_step(ref, opt_ref, b, cfg.grad_clip))
              for b in batches)
    if gap > tolerance:
        raise SystemExit(f"reference and polyrot losses differ by {gap:.2e} (> {tolerance:.0e}): not the same model")
    return gap


def chunk_generation_seconds(seed: int, p_corrupt: float, repeats: int = 3) -> float:
    """Median time for TrainingStream to generate one fresh chunk of CHUNK_ROWS sequences."""
    times = []
    for i in range(repeats):
        # A stream positioned at the start of chunk i has not generated it yet: next() must.
        stream = TrainingStream(seed, p_corrupt, rows_consumed=i * CHUNK_ROWS)
        start = time.perf_counter()
        stream.next(1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(seed: int, cfg: TrainConfig, batches: list[Batch], rounds: int) -> dict[str, list[float]]:
    """Seconds per round for each implementation, both running every batch of the round."""
    model = DyckTransformer(seed=seed)
    contenders = {"polyrot": model, "reference": ReferenceTransformer.copy_of(model)}
    optimizers = {name: make_optimizer(m, cfg) for name, m in contenders.items()}
    # One untimed step each pays for AdamW's state and other first-call costs; a single sequence
    # suffices for that, and keeps the warm-up from costing as much as a timed round.
    for name, m in contenders.items():
        train_step(m, optimizers[name], batches[0].select(slice(0, 1)), cfg.grad_clip)
    seconds = {name: [0.0] * rounds for name in contenders}
    turn = 0
    for r in range(rounds):
        for batch in batches:
            # Who goes first alternates (ABBA...), so neither always runs right after the other.
            order = list(contenders) if turn % 2 == 0 else list(reversed(contenders))
            turn += 1
            for name in order:
                start = time.perf_counter()
                train_step(contenders[name], optimizers[name], batch, cfg.grad_clip)
                seconds[name][r] += time.perf_counter() - start
    return seconds


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch thread counts to run")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 512])
    parser.add_argument("--rounds", type=int, default=3, help="measurements per implementation and configuration")
    parser.add_argument("--steps", type=int, default=1,
                        help="training steps per round at the largest batch size; smaller batch sizes take "
                             "proportionally more, so that every round covers the same sequences")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = TrainConfig.from_profile("cpu", seed=args.seed)

    print(f"torch {torch.__version__}; load average at start: {load_average()}")
    stream = TrainingStream(args.seed, cfg.p_corrupt)
    gap = check_same_training(args.seed, cfg, [stream.next(64)[0] for _ in range(CHECK_STEPS)])
    print(f"same function: {CHECK_STEPS} training steps from the same weights, largest loss gap {gap:.1e}")
    # Generation is numpy, which torch's thread count does not touch: one measurement serves all.
    generation_s = chunk_generation_seconds(args.seed, cfg.p_corrupt)
    print(f"data generation: {generation_s:.3f} s per {CHUNK_ROWS}-sequence TrainingStream chunk")

    header = (f"{'threads':>7} {'batch':>5} {'polyrot tok/s':>14} {'reference tok/s':>16} "
              f"{'polyrot/ref (min-max)':>22} {'data share':>10}")
    print("\n" + header + "\n" + "-" * len(header))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch_size in args.batch_sizes:
            stream = TrainingStream(args.seed, cfg.p_corrupt)
            steps = max(1, args.steps * max(args.batch_sizes) // batch_size)
            batches = [stream.next(batch_size)[0] for _ in range(steps)]
            tokens = sum(int(b.mask.sum()) for b in batches)
            seconds = measure(args.seed, cfg, batches, args.rounds)
            # Same tokens on both sides, so the throughput ratio is the inverse ratio of times.
            ratios = [r / p for p, r in zip(seconds["polyrot"], seconds["reference"])]
            step_s = statistics.median(seconds["polyrot"]) / steps
            share = generation_s / (generation_s + step_s * (CHUNK_ROWS // batch_size))
            print(f"{threads:>7} {batch_size:>5} {tokens / statistics.median(seconds['polyrot']):>14,.0f} "
                  f"{tokens / statistics.median(seconds['reference']):>16,.0f} "
                  f"{statistics.median(ratios):>11.2f} ({min(ratios):.2f}-{max(ratios):.2f}) {share:>10.1%}")
    print(f"\nload average at end: {load_average()}")


if __name__ == "__main__":
    main()

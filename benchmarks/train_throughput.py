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
chunks, at polyrot's measured step time. The eval share is the fraction its evaluations take, every
eval_every steps: two reads of the quick set (the weights and their EMA), and from the first
confirmed 99% on also one read of the confirmation set.

    .venv/bin/python benchmarks/train_throughput.py [--threads 2 1] [--rounds 3] [--steps 1]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from polyrot.toy.dyck import Batch
from polyrot.toy.model import HEADS, DyckTransformer, ModelConfig
from polyrot.toy.recipe import TrainConfig
from polyrot.toy.train import (
    CHUNK_ROWS,
    TrainingStream,
    confirm_sets,
    evaluate,
    loss_fn,
    make_optimizer,
    quick_sets,
)


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


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch, grad_clip: float,
               tokens: float | None = None, autocast: bool = False) -> float:
    """polyrot.toy.train.train's step, minus the learning-rate schedule (a few float operations)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(model(batch.tokens), batch, tokens)
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


def chunk_generation_seconds(seed: int, mix: dict[str, float], repeats: int = 3) -> float:
    """Median time for TrainingStream to generate one fresh chunk of CHUNK_ROWS sequences."""
    times = []
    for i in range(repeats):
        # A stream positioned at the start of chunk i has not generated it yet: next() must.
        stream = TrainingStream(seed, rows_consumed=i * CHUNK_ROWS, **mix)
        start = time.perf_counter()
        stream.next(1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Contender:
    """One way of running the same number of training sequences: a model, its optimizer's flavour,
    its batches (with the count each batch's loss is normalised by) and whether bf16 autocast is on."""

    model: nn.Module
    batches: list[tuple[Batch, float | None]]
    optimizer: str = "foreach"  # AdamW's implementation: "for-loop", "foreach" (torch's CPU default) or "fused"
    autocast: bool = False

    @property
    def tokens(self) -> int:
        return sum(int(b.mask.sum()) for b, _ in self.batches)


def adamw(model: nn.Module, cfg: TrainConfig, flavour: str) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    kind = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[flavour]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, **kind)


def measure(cfg: TrainConfig, contenders: dict[str, Contender], rounds: int) -> dict[str, list[float]]:
    """Seconds per round for each contender, each running all its batches every round."""
    optimizers = {name: adamw(c.model, cfg, c.optimizer) for name, c in contenders.items()}
    # One untimed step each pays for AdamW's state and other first-call costs; a single sequence
    # suffices for that, and keeps the warm-up from costing as much as a timed round.
    for name, c in contenders.items():
        batch, _ = c.batches[0]
        train_step(c.model, optimizers[name], batch.select(slice(0, 1)), cfg.grad_clip, autocast=c.autocast)
    seconds = {name: [0.0] * rounds for name in contenders}
    steps = len(next(iter(contenders.values())).batches)
    for r in range(rounds):
        for i in range(steps):
            # Who goes first rotates, so no contender always runs right after the same other one.
            names = list(contenders)
            k = (r * steps + i) % len(names)
            for name in names[k:] + names[:k]:
                c = contenders[name]
                batch, tokens = c.batches[i]
                start = time.perf_counter()
                train_step(c.model, optimizers[name], batch, cfg.grad_clip, tokens, c.autocast)
                seconds[name][r] += time.perf_counter() - start
    return seconds


def evaluation_seconds(model: nn.Module, sets, repeats: int = 3) -> float:
    """Median wall seconds of polyrot.toy.train.evaluate on `sets`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate(model, sets)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    parser.add_argument("--compile", action="store_true",
                        help="also time the bucketed step under torch.compile (inductor, dynamic shapes); its "
                             "first round pays the compilation, which the median over rounds leaves out")
    args = parser.parse_args()
    cfg = TrainConfig.from_profile("cpu", seed=args.seed)

    print(f"torch {torch.__version__}; load average at start: {load_average()}")
    stream = TrainingStream(args.seed, **cfg.mix())
    gap = check_same_training(args.seed, cfg, [stream.next(64)[0] for _ in range(CHECK_STEPS)])
    print(f"same function: {CHECK_STEPS} training steps from the same weights, largest loss gap {gap:.1e}")
    # Generation is numpy, which torch's thread count does not touch: one measurement serves all.
    generation_s = chunk_generation_seconds(args.seed, cfg.mix())
    print(f"data generation: {generation_s:.3f} s per {CHUNK_ROWS}-sequence TrainingStream chunk")

    quick, confirm = quick_sets(cfg), confirm_sets(cfg)
    print(f"\ntokens/s are non-PAD tokens; x ref: the median over rounds of the throughput ratio to the "
          f"reference in the same round; eval share: the time of one evaluation against {cfg.eval_every} steps "
          f"of the bucketed step and it. Until a seed first confirms 99% an evaluation reads the quick set "
          f"({cfg.eval_sequences} sequences a split) twice, for the weights and their EMA; from then on it "
          f"also confirms the better of the two on the confirmation set ({cfg.confirm_sequences} a split).")
    header = f"{'threads':>7} {'batch':>5} {'contender':<28} {'tok/s':>9} {'x ref (min-max)':>17}"
    for threads in args.threads:
        torch.set_num_threads(threads)
        model = DyckTransformer(seed=args.seed)
        quick_s, confirm_s = (evaluation_seconds(model, sets) for sets in (quick, confirm))
        print(f"\n{threads} thread(s): one evaluation of the quick set {quick_s:.2f} s, of the confirmation set "
              f"{confirm_s:.2f} s")
        for batch_size in args.batch_sizes:
            print("\n" + header + "\n" + "-" * len(header))
            steps = max(1, args.steps * max(args.batch_sizes) // batch_size)
            padded_stream = TrainingStream(args.seed, **cfg.mix())
            bucketed_stream = TrainingStream(args.seed, bucketed=True, **cfg.mix())
            padded = [padded_stream.next(batch_size) for _ in range(steps)]
            bucketed = [bucketed_stream.next(batch_size) for _ in range(steps)]
            model = DyckTransformer(seed=args.seed)
            contenders = {
                "reference, padded": Contender(ReferenceTransformer.copy_of(model), padded),
                "polyrot, padded": Contender(copy.deepcopy(model), padded),
                "polyrot, bucketed": Contender(copy.deepcopy(model), bucketed),
                "polyrot, bucketed, fused AdamW": Contender(copy.deepcopy(model), bucketed, optimizer="fused"),
                "polyrot, bucketed, for-loop AdamW": Contender(copy.deepcopy(model), bucketed, optimizer="for-loop"),
                "polyrot, bucketed, bf16 autocast": Contender(copy.deepcopy(model), bucketed, autocast=True),
            }
            if args.compile:
                contenders["polyrot, bucketed, torch.compile"] = Contender(
                    torch.compile(copy.deepcopy(model), dynamic=True), bucketed)
            seconds = measure(cfg, contenders, args.rounds)
            ref = contenders["reference, padded"]
            for name, c in contenders.items():
                ratios = [(c.tokens / s) / (ref.tokens / r) for s, r in zip(seconds[name], seconds["reference, padded"])]
                print(f"{threads:>7} {batch_size:>5} {name:<28} {c.tokens / statistics.median(seconds[name]):>9,.0f} "
                      f"{statistics.median(ratios):>7.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
            step_s = statistics.median(seconds["polyrot, bucketed"]) / steps
            early, late = 2 * quick_s, 2 * quick_s + confirm_s
            print(f"data share {generation_s / (generation_s + step_s * (CHUNK_ROWS // batch_size)):.1%}; "
                  f"eval share {early / (early + cfg.eval_every * step_s):.1%} before the first 99%, "
                  f"{late / (late + cfg.eval_every * step_s):.1%} after it")
    print(f"\nload average at end: {load_average()}")


if __name__ == "__main__":
    main()

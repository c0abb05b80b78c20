"""SAE training throughput of polyrot's `train_sae` against a straightforward reference, and SAELens.

All peers train a ×expansion ReLU SAE on the same activation rows: by default a randomly
initialised DyckTransformer's resid_mid_1 on a BatchSpec of Dyck-3 sequences, or a trained seed's
with --model-run (read from the polyrot store). Rows/s counts the rows the optimiser sees
(steps × batch size); each timed run includes the final evaluation on every row, which is part of
what `train_sae` does.

  polyrot    polyrot.core.sae.train_sae, as the train_sae stage calls it (bf16 autocast)
  fp32       the same in fp32, the reference's precision
  reference  the same recipe written the obvious way: every formula as separate tensor ops,
             the decoder gradient's parallel part removed and the columns renormalised one
             column at a time, torch's non-foreach Adam. It starts from polyrot's initial
             weights and draws the same batches, and is checked to follow the same training
             trajectory before anything is timed, so the polyrot/reference ratio measures
             implementation speed only.
  sae-lens   SAELens' standard SAE under its SAETrainer with its own defaults (zero b_dec,
             decoder init norm 0.1, gradient clipping, L1 weighted by decoder norms, no
             unit-norm constraint), when the package is importable. Its loss sums the squared
             error over dimensions where polyrot averages, so its L1 coefficient is l1 × d_in
             for the same balance of the two terms.

Runs take turns, in alternating order, round by round: on a shared machine the absolute rows/s
drift with the load, while the per-round ratio of neighbouring runs mostly cancels it.

    .venv/bin/python benchmarks/sae_throughput.py [--steps 100] [--rounds 2] [--model-run RUN_ID]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time

import torch

from polyrot.core import metrics
from polyrot.core.sae import SAEConfig, SparseAutoencoder, train_sae
from polyrot.toy.activations import extract
from polyrot.toy.model import DyckTransformer
from polyrot.toy.task import BatchSpec

CHECK_STEPS = 5
SAELENS_INSTALL = ("`pip install --dry-run sae-lens` (6.54.12) adds it next to torch 2.13.0 without replacing torch; "
                   "install it to include this peer")


def reference_train(x: torch.Tensor, cfg: SAEConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """The paper's recipe, spelled out op by op, from polyrot's initial weights and batch draws."""
    start = SparseAutoencoder(cfg).to(x.device)
    W_enc = start.W_enc.detach().clone().requires_grad_()
    b_enc = start.b_enc.detach().clone().requires_grad_()
    W_dec = start.W_dec.detach().clone().requires_grad_()
    b_pre = x.mean(dim=0).requires_grad_()
    params = [W_enc, b_enc, W_dec, b_pre]
    opt = torch.optim.Adam(params, lr=cfg.lr, foreach=False)
    g = torch.Generator(device=x.device).manual_seed(cfg.seed)
    for _ in range(cfg.steps):
        xb = x[torch.randint(len(x), (cfg.batch_size,), generator=g, device=x.device)]
        centred = xb - b_pre
        f = torch.relu(torch.matmul(centred, W_enc.t()) + b_enc)
        x_hat = torch.matmul(f, W_dec.t()) + b_pre
        loss = torch.mean((x_hat - xb) ** 2) + cfg.l1 * torch.mean(torch.sum(torch.abs(f), dim=1))
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for j in range(W_dec.shape[1]):
                column = W_dec[:, j]
                W_dec.grad[:, j] -= torch.dot(W_dec.grad[:, j], column) * column
        opt.step()
        with torch.no_grad():
            for j in range(W_dec.shape[1]):
                W_dec[:, j] /= torch.sqrt(torch.sum(W_dec[:, j] ** 2))
    with torch.no_grad():
        f = torch.relu(torch.matmul(x - b_pre, W_enc.t()) + b_enc)
        x_hat = torch.matmul(f, W_dec.t()) + b_pre
    weights = {"W_enc": W_enc.detach(), "b_enc": b_enc.detach(), "W_dec": W_dec.detach(), "b_pre": b_pre.detach()}
    return weights, {"ev": metrics.explained_variance(x, x_hat), "l0": metrics.l0(f)}


def polyrot_train(x: torch.Tensor, cfg: SAEConfig) -> tuple[dict[str, torch.Tensor], dict]:
    sae, history = train_sae(x, cfg, progress=False)
    return {k: p.detach() for k, p in sae.named_parameters()}, history[-1]


def saelens_peer():
    """A trainer function for SAELens, or the reason there is none."""
    try:
        import sae_lens
        from sae_lens import (
            LoggingConfig,
            StandardTrainingSAE,
            StandardTrainingSAEConfig,
        )
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer
    except ImportError as exc:
        return None, f"sae_lens is not importable here ({exc}); {SAELENS_INSTALL}"

    def train(x: torch.Tensor, cfg: SAEConfig) -> tuple[dict[str, torch.Tensor], dict]:
        torch.manual_seed(cfg.seed)
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(
            d_in=cfg.d_in, d_sae=cfg.d_sae, l1_coefficient=cfg.l1 * cfg.d_in, device=str(x.device)))
        trainer_cfg = SAETrainerConfig(
            total_training_samples=cfg.steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
            lr=cfg.lr, lr_end=cfg.lr, device=str(x.device), logger=LoggingConfig(log_to_wandb=False))
        g = torch.Generator(device=x.device).manual_seed(cfg.seed)

        def batches():
            while True:
                yield x[torch.randint(len(x), (cfg.batch_size,), generator=g, device=x.device)]

        # SAETrainer always draws a progress bar; it would break up the table.
        with contextlib.redirect_stderr(io.StringIO()):
            SAETrainer(trainer_cfg, sae, batches()).fit()
        with torch.no_grad():
            f = sae.encode(x)
            x_hat = sae.decode(f)
        return {}, {"ev": metrics.explained_variance(x, x_hat), "l0": metrics.l0(f)}

    return train, f"sae_lens {sae_lens.__version__}"


def fp32(cfg: SAEConfig) -> SAEConfig:
    return SAEConfig(**{**cfg.to_dict(), "precision": "fp32"})


def check_same_training(x: torch.Tensor, cfg: SAEConfig, tolerance: float = 1e-4) -> float:
    """Largest weight gap after a few identical fp32 steps; fails if it exceeds `tolerance`."""
    short = SAEConfig(**{**fp32(cfg).to_dict(), "steps": CHECK_STEPS, "eval_every": CHECK_STEPS})
    ours, _ = polyrot_train(x, short)
    ref, _ = reference_train(x, short)
    gap = max((ours[k] - ref[k]).abs().max().item() for k in ref)
    assert gap <= tolerance, f"reference and polyrot weights differ by {gap:.2e} (> {tolerance:.0e})"
    return gap


def activations(args) -> tuple[torch.Tensor, str]:
    spec = BatchSpec(name="bench", seed=2026, n_sequences=args.sequences)
    if args.model_run:
        from polyrot.stages.train_seed import load_seed

        model, source = load_seed(args.model_run), f"train_seed run {args.model_run}"
    else:
        model, source = DyckTransformer(seed=0), "a randomly initialised DyckTransformer (seed 0)"
    x = extract(model, spec, [args.site])[args.site]
    return x, f"{args.site} of {source}, {args.sequences} sequences: {len(x)} rows × {x.shape[1]}"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps per timed run")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--l1", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per peer")
    parser.add_argument("--sequences", type=int, default=1024, help="Dyck-3 sequences whose activations are used")
    parser.add_argument("--site", default="resid_mid_1")
    parser.add_argument("--model-run", help="train_seed run ID (default: a randomly initialised model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-saelens", action="store_true", help="leave SAELens out even if it is installed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} thread(s); "
          f"load average at start: {load_average()}")
    x, described = activations(args)
    print(f"data: {described}")
    cfg = SAEConfig(d_in=x.shape[1], expansion=args.expansion, l1=args.l1, batch_size=args.batch_size,
                    steps=args.steps, eval_every=args.steps)
    gap = check_same_training(x, cfg)
    print(f"same function: {CHECK_STEPS} steps from the same weights, largest weight gap {gap:.1e}")

    peers = {"polyrot": polyrot_train, "fp32": lambda x, cfg: polyrot_train(x, fp32(cfg)),
             "reference": reference_train}
    saelens_train, why = (None, "left out (--no-saelens)") if args.no_saelens else saelens_peer()
    if saelens_train is not None:
        peers["sae-lens"] = saelens_train
    print(f"peers: {', '.join(peers)}; SAELens: {why}")

    seconds = {name: [] for name in peers}
    results = {}
    for r in range(args.rounds):
        order = list(peers) if r % 2 == 0 else list(reversed(peers))
        for name in order:
            start = time.perf_counter()
            _, results[name] = peers[name](x, cfg)
            seconds[name].append(time.perf_counter() - start)

    rows = args.steps * args.batch_size
    header = (f"{'peer':<10} {'rows/s':>10} {'polyrot/peer (min-max)':>23} "
              f"{f'EV @ {args.steps} steps':>16} {'L0':>7}")
    print("\n" + header + "\n" + "-" * len(header))
    for name in peers:
        ratios = [p / q for p, q in zip(seconds[name], seconds["polyrot"])]
        print(f"{name:<10} {rows / statistics.median(seconds[name]):>10,.0f} "
              f"{statistics.median(ratios):>12.2f} ({min(ratios):.2f}-{max(ratios):.2f}) "
              f"{results[name]['ev']:>16.4f} {results[name]['l0']:>7.1f}")
    print(f"\nload average at end: {load_average()}")


if __name__ == "__main__":
    main()

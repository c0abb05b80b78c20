"""Wall time and steps for one seed to reach 99%, 99.9% and 99.99% min held-out accuracy.

Trains with polyrot.toy.train directly (no MLflow). The accuracy is the minimum over every split and
output head, and a milestone counts once it is confirmed on ~10^6 tokens per split (the training
loop's own confirmation); the wall time includes the loop's evaluations, as a real run's does.
The eval history goes to benchmarks/results/ as JSON for plotting. A full run takes 20-60 min.
With --from-checkpoint it continues a train_seed checkpoint under the recipe options given here
(a changed tail on identical weights, data position and optimizer state: a paired comparison
with the run that wrote the checkpoint).

    .venv/bin/python benchmarks/time_to_accuracy.py [--profile cpu] [--seed 0] [--threads 1] ...
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from polyrot.core.precision import PRECISIONS
from polyrot.toy.recipe import PROFILES, TrainConfig
from polyrot.toy.task import HEADS, SPLITS
from polyrot.toy.train import MILESTONES, new_state, restore_checkpoint, train

RESULTS = Path(__file__).resolve().parent / "results"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def shown(load: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in load) + " (1/5/15 min)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--seed", type=int, help="model seed (default 0)")
    parser.add_argument("--threads", type=int, help="torch threads (the profile's default otherwise)")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--min-lr-ratio", type=float, help="the cosine's floor as a fraction of --lr")
    parser.add_argument("--weight-decay", type=float, help="AdamW's decoupled weight decay (the profile's otherwise)")
    parser.add_argument("--p-corrupt", type=float)
    parser.add_argument("--p-noise-tail", type=float, help="fraction of walks that continue as noise (the profile's otherwise)")
    parser.add_argument("--p-open-spread", type=float, help="spread of the walks' opening probability around 0.55")
    parser.add_argument("--paper-mix-from", type=float,
                        help="fraction of --max-steps from which batches are the paper's mix (1: never)")
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--bucketed", choices=("true", "false"), help="length-bucketed batches (the profile's otherwise)")
    parser.add_argument("--precision", choices=PRECISIONS, help="bf16: the training step under bf16 autocast "
                        "(the profile's otherwise)")
    parser.add_argument("--ema-decay", type=float, help="decay of the weights' moving average; 0 for none")
    parser.add_argument("--late-batch-size", type=int, help="sequences per step late in training (0: none)")
    parser.add_argument("--late-batch-from", type=float, help="fraction of --max-steps where the late batch starts")
    # The profile's extra steps after reaching the target only matter to a trained model's quality.
    parser.add_argument("--extra-steps", type=int, default=0,
                        help="steps to keep training after 99.99%% is confirmed (default 0: stop there)")
    parser.add_argument("--from-checkpoint", type=Path,
                        help="train_seed checkpoint .safetensors (its .json beside it) to continue from")
    parser.add_argument("--out", type=Path, help="JSON path (default: a new file in benchmarks/results/)")
    parser.add_argument("--save-kept", type=Path, help="write the kept model's weights to this .safetensors file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    options = dict(
        threads=args.threads, max_steps=args.max_steps,
        batch_size=args.batch_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay, p_corrupt=args.p_corrupt,
        p_noise_tail=args.p_noise_tail,
        p_open_spread=args.p_open_spread, paper_mix_from=args.paper_mix_from, eval_every=args.eval_every,
        extra_steps=args.extra_steps, bucketed=args.bucketed and args.bucketed == "true", ema_decay=args.ema_decay,
        late_batch_size=args.late_batch_size, late_batch_from=args.late_batch_from, precision=args.precision,
    )
    if args.from_checkpoint:
        state, saved = restore_checkpoint(load_file(args.from_checkpoint),
                                          json.loads(args.from_checkpoint.with_suffix(".json").read_text()))
        # The seed draws the data stream and the EMA's decay is built into the state: both stay.
        if args.seed not in (None, saved.seed) or args.ema_decay not in (None, saved.ema_decay):
            raise SystemExit("--seed and --ema-decay cannot change for a run continued from a checkpoint")
        cfg = TrainConfig.from_dict({**saved.to_dict(), **{k: v for k, v in options.items() if v is not None}})
    else:
        cfg = TrainConfig.from_profile(args.profile, seed=args.seed or 0, **options)
        state = new_state(cfg)
    out = args.out or RESULTS / f"time_to_accuracy-{cfg.profile}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    load_start = load_average()
    print(f"torch {torch.__version__}; load average at start {shown(load_start)} on {os.cpu_count()} CPUs")
    print(f"profile {cfg.profile}, seed {cfg.seed}, batch {cfg.batch_size}, lr {cfg.lr} (floor {cfg.min_lr_ratio:g}×), "
          f"weight decay {cfg.weight_decay:g}, mix {cfg.mix()} (the paper's from {cfg.paper_mix_from:.0%}), "
          f"bucketed {cfg.bucketed}, {cfg.precision}, ema {cfg.ema_decay}, max {cfg.max_steps} steps, "
          f"late batch {cfg.late_batch_size or '-'} from {cfg.late_batch_from:.0%}, "
          f"threads {cfg.threads or 'default'}")

    history: list[dict] = []

    def on_eval(step: int, metrics: dict[str, float]) -> None:
        # The load beside each evaluation tells which stretch of a long run was slowed by others.
        history.append({"step": step, "load1": load_average()[0], **metrics})
        confirmed = f"{metrics['confirm.acc.min']:.5f}" if "confirm.acc.min" in metrics else "-"
        own = {k: v for k, v in metrics.items() if k.startswith("acc.") and k.split(".")[1] in SPLITS}
        binding = min(own, key=own.get)[len("acc."):]
        ema = f"  ema {metrics['ema.acc.min']:.5f}" if "ema.acc.min" in metrics else ""
        print(f"step {step:>6}  {metrics['wall_s']:>7.0f} s  {metrics['sequences'] / 1e6:.3f}M seq  loss {metrics['train.loss']:.4f}  "
              f"min acc {metrics['acc.min']:.5f} ({binding}){ema}  confirmed {confirmed}", flush=True)

    if args.from_checkpoint:
        print(f"continued from {args.from_checkpoint} at step {state.step}")
    state = train(state, cfg, on_eval=on_eval, progress=False)
    load_end = load_average()

    wall_at = {record["step"]: record["wall_s"] for record in history}
    # A milestone passed before --from-checkpoint has no wall time in this run.
    milestones = {str(m): {"step": state.milestones[str(m)], "wall_s": wall_at.get(state.milestones[str(m)])}
                  for m in MILESTONES if str(m) in state.milestones}
    print(f"\nfinished at step {state.step}; min held-out accuracy confirmed on ~10^6 tokens per split:")
    for m in MILESTONES:
        reached = milestones.get(str(m))
        when = "not reached" if not reached else f"step {reached['step']:>6}, " + (
            f"{reached['wall_s']:>7.0f} s" if reached["wall_s"] is not None else "before the checkpoint")
        print(f"  {m:.2%}: {when}")
    # The paper's early stop reads one evaluation of 2,048 sequences a split (our quick set) and confirms nothing.
    print(f"  the quick set first read {cfg.target_acc:.2%} (the paper's early stop, unconfirmed): "
          + (f"step {state.quick_crossing}" if state.quick_crossing is not None else "never"))

    last = history[-1]
    # The confirmation set only exists once the quick accuracy reached 99%; before that, the quick one.
    prefix = "confirm." if "confirm.acc.min" in last else ""
    print(f"\naccuracy at step {last['step']} ({'confirmation' if prefix else 'quick'} set):")
    print(f"  {'split':<14}" + "".join(f"{h:>10}" for h in HEADS))
    for split in SPLITS:
        print(f"  {split:<14}" + "".join(f"{last[f'{prefix}acc.{split}.{h}']:>10.5f}" for h in HEADS))
    best = state.best and {"step": state.best.step, "source": state.best.source, "confirmed_min": state.best.key[0]}
    if best:
        confirmed = (f"confirmed min {best['confirmed_min']:.5f}" if best["confirmed_min"] >= 0
                     else "not confirmed (its quick-set min stayed below 99%)")
        print(f"\nkept model (highest min accuracy, the paper's choice): step {best['step']} ({best['source']}), "
              f"{confirmed}")
    print(f"\nload average at start {shown(load_start)}, at end {shown(load_end)}")

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": cfg.to_dict(), "from_checkpoint": args.from_checkpoint and str(args.from_checkpoint),
        "torch": torch.__version__, "cpus": os.cpu_count(),
        "load_average": {"start": load_start, "end": load_end}, "final_step": state.step,
        "kept": best, "milestones": milestones, "quick_crossing": state.quick_crossing, "history": history,
    }, indent=1))
    print(f"eval history: {out}")
    if args.save_kept and state.best:
        save_file(state.best.weights, str(args.save_kept))
        print(f"kept weights: {args.save_kept}")


if __name__ == "__main__":
    main()

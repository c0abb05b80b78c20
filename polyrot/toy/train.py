"""Training loop and resumable training state for the Dyck-3 model (the recipes: polyrot.toy.recipe).

Everything here is plain torch: the loop reports evaluations and checkpoints through callbacks,
so the tracking layer (or a notebook) decides where they go.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from polyrot.core.device import autocast, resolve_device
from polyrot.toy import dyck, task
from polyrot.toy.model import HEADS, DyckTransformer, ModelConfig
from polyrot.toy.recipe import TrainConfig

CHUNK_ROWS = 8192  # sequences generated at once: <1% of step time, against ~15% for one batch at a time


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then one cosine from the peak down to min_lr_ratio × peak at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_size(cfg: TrainConfig, step: int) -> int:
    """Sequences in the batch of `step`: cfg.batch_size, then late_batch_size once the step reaches
    late_batch_from × max_steps."""
    if cfg.late_batch_size and step >= cfg.late_batch_from * cfg.max_steps:
        return cfg.late_batch_size
    return cfg.batch_size


def loss_fn(logits: dict[str, torch.Tensor], batch: dyck.Batch, tokens: float | None = None) -> torch.Tensor:
    """Sum over the three heads of the masked cross-entropy (PAD positions excluded): the mean over
    the batch's own tokens, or with `tokens` the sum over them divided by that fixed count."""
    mask = batch.mask
    if tokens is None:
        return sum(F.cross_entropy(logits[h][mask], getattr(batch, h)[mask]) for h in HEADS)
    return sum(F.cross_entropy(logits[h][mask], getattr(batch, h)[mask], reduction="sum") for h in HEADS) / tokens


class TrainingStream:
    """An endless, deterministic stream of training batches: chunk i is generated from (seed, i).

    The stream position (rows consumed) is the whole of the data RNG state, so a resumed run
    draws exactly the batches an uninterrupted run would have. `next` returns a batch and the
    token count its loss is normalised by: None (its own mean) for plain batches; for bucketed
    ones (dyck.length_buckets, shuffled from (seed, i) too) the chunk's mean tokens per batch.
    Rows a batch cannot use (a chunk's tail, or a bucketed chunk's rest when the batch size
    changes mid-chunk) are skipped rather than stitched, so the position stays the whole state.
    """

    def __init__(self, seed: int, rows_consumed: int = 0, bucketed: bool = False, **mix: float):
        # mix: dyck.generate's training-mix levers (TrainConfig.mix())
        self.seed, self.rows, self.bucketed, self.mix = seed, rows_consumed, bucketed, mix
        self._key, self._chunk, self._buckets, self._tokens = None, None, None, None

    def _load(self, index: int, batch_size: int) -> None:
        if self._key != (index, batch_size):
            self._chunk = dyck.generate("train", CHUNK_ROWS, seed=[self.seed, index], **self.mix)
            if self.bucketed:
                self._buckets = dyck.length_buckets(self._chunk, batch_size, np.random.default_rng([self.seed, index]))
                self._tokens = sum(int(b.mask.sum()) for b in self._buckets) / len(self._buckets)
            self._key = (index, batch_size)

    def next(self, batch_size: int) -> tuple[dyck.Batch, float | None]:
        start = self.rows % CHUNK_ROWS
        if start + batch_size > CHUNK_ROWS or (self.bucketed and start % batch_size):
            self.rows += CHUNK_ROWS - start
            return self.next(batch_size)
        self._load(self.rows // CHUNK_ROWS, batch_size)
        self.rows += batch_size
        if self.bucketed:
            return self._buckets[start // batch_size], self._tokens
        return self._chunk.select(slice(start, start + batch_size)), None


@dataclass
class EvalSets:
    """Held-out batches per split, fixed across seeds so every seed is judged on the same data."""

    batches: dict[str, dyck.Batch]

    @classmethod
    def build(cls, n_sequences: int, seed: int = 777) -> EvalSets:
        return cls({s: dyck.generate(s, n_sequences, seed=[seed, i]) for i, s in enumerate(task.SPLITS)})


def quick_sets(cfg: TrainConfig) -> EvalSets:
    """What every evaluation reads: eval_sequences a split (by default the paper's 8 x 256)."""
    return EvalSets.build(cfg.eval_sequences)


def confirm_sets(cfg: TrainConfig) -> EvalSets:
    """What confirms a milestone and scores the kept model: confirm_sequences a split (~10^6 tokens)."""
    return EvalSets.build(cfg.confirm_sequences, seed=778)


@torch.no_grad()
def evaluate(model: DyckTransformer, sets: EvalSets, chunk: int = 128) -> dict[str, float]:
    """Per-split, per-head accuracy and loss over non-PAD positions, and their minimum accuracy.

    Rows run in order of length (`Batch.by_length`): the sums are those of the padded batch."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, float] = {}
    for split, batch in sets.batches.items():
        correct = {h: 0 for h in HEADS}
        loss_sum = {h: 0.0 for h in HEADS}
        n = int(batch.mask.sum())
        for _, part in batch.by_length(chunk):
            part = part.to(device)
            logits = model(part.tokens)
            m = part.mask
            for h in HEADS:
                lg, y = logits[h][m], getattr(part, h)[m]
                correct[h] += int((lg.argmax(-1) == y).sum())
                loss_sum[h] += float(F.cross_entropy(lg, y, reduction="sum"))
        for h in HEADS:
            out[f"acc.{split}.{h}"] = correct[h] / n
            out[f"loss.{split}.{h}"] = loss_sum[h] / n
    out["acc.min"] = min(v for k, v in out.items() if k.startswith("acc."))
    model.train()
    return out


@dataclass
class Best:
    """The best evaluated model so far: the paper's checkpoint choice, highest min accuracy (the
    confirmed one once there is one), ties to the lowest total loss."""

    step: int
    source: str                      # "raw" or "ema": which weights were evaluated
    key: tuple[float, float, float]  # (confirmed min acc or -1, quick min acc, -quick total loss)
    weights: dict[str, torch.Tensor]


@dataclass
class TrainState:
    """Everything needed to continue training bit-identically."""

    model: DyckTransformer
    optimizer: torch.optim.Optimizer
    step: int = 0
    rows_consumed: int = 0
    first_crossing: int | None = None           # step at which target_acc was first confirmed
    # Step at which the quick set first read target_acc: the paper's early stop, which reads one
    # evaluation of 8 x 256 sequences a split (our quick set's default size) and confirms nothing.
    quick_crossing: int | None = None
    milestones: dict[str, int] = field(default_factory=dict)  # "0.99" -> first step reaching it
    ema: AveragedModel | None = None            # exponential moving average of the weights
    chosen: str = "raw"                          # the weights the latest evaluation picked
    best: Best | None = None

    def evaluated_model(self) -> DyckTransformer:
        """The weights the latest evaluation picked: the EMA's when it scored better."""
        return self.ema.module if self.chosen == "ema" else self.model

    def best_model(self) -> DyckTransformer:
        """The best evaluated model (a copy), or the current one before any evaluation."""
        if self.best is None:
            return self.model
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.best.weights)
        return model


def new_ema(model: DyckTransformer, decay: float) -> AveragedModel | None:
    """An EMA of `model`'s weights (torch's lerp: a frozen tensor stays bit-identical), or None."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def total_loss(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("loss."))


def make_optimizer(model: DyckTransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as flat tensors plus JSON metadata (safetensors holds no pickles)."""
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


# Accuracy levels whose first confirmed checkpoint is kept (first-0.99, ...): claims along convergence.
MILESTONES = (0.99, 0.995, 0.999, 0.9999)

EvalCallback = Callable[[int, dict[str, float]], None]
CheckpointCallback = Callable[[TrainState, str], None]


def train(
    state: TrainState,
    cfg: TrainConfig,
    *,
    on_eval: EvalCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    progress: bool = True,
) -> TrainState:
    """Run the recipe from state.step until max_steps, or extra_steps after the first crossing.

    Every evaluation scores the weights and, with cfg.ema_decay, their moving average; the better
    of the two on the quick set is the one confirmed, credited with milestones and considered for
    state.best (the model a run keeps). on_eval(step, metrics) receives every evaluation;
    on_checkpoint(state, tag) receives the state every checkpoint_every steps (tag "step-NNNNNN")
    and at each accuracy milestone (tag "first-0.99", ...), so a caller can persist them.
    """
    loop = SeedLoop(state, cfg, on_eval=on_eval, on_checkpoint=on_checkpoint, progress=progress)
    model, opt = state.model, state.optimizer
    while not loop.done:
        loop.set_learning_rate()
        batch, tokens = loop.next_batch()
        with loop.autocast:
            loss = loss_fn(model(batch.tokens), batch, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loop.clip_and_step()
        loop.after_step(loss.item())
    return loop.close()


class SeedLoop:
    """One seed's training loop around its gradient step: the learning rate, the data stream, and
    after each step the EMA, evaluations, milestones, the best model and checkpoints. `train`
    drives one; polyrot.toy.stacked drives several with one vmapped gradient step."""

    def __init__(self, state: TrainState, cfg: TrainConfig, *, on_eval: EvalCallback | None = None,
                 on_checkpoint: CheckpointCallback | None = None, progress: bool = True):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.state, self.cfg, self.on_eval, self.on_checkpoint = state, cfg, on_eval, on_checkpoint
        self.device = torch.device(resolve_device(cfg.device))
        move_state(state, self.device)
        self.autocast = autocast(self.device, cfg.precision)
        state.model.train()
        self.stream = TrainingStream(cfg.seed, state.rows_consumed, cfg.bucketed, **cfg.mix(state.step))
        self.quick, self.confirm = quick_sets(cfg), None
        self.trainable = [p for p in state.model.parameters() if p.requires_grad]
        self.started = time.perf_counter()
        self.bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not progress, desc=f"seed {cfg.seed}",
                        dynamic_ncols=True)
        self.running_loss: float | None = None

    @property
    def done(self) -> bool:
        state, cfg = self.state, self.cfg
        return state.step >= cfg.max_steps or (
            state.first_crossing is not None and state.step >= state.first_crossing + cfg.extra_steps)

    def set_learning_rate(self) -> None:
        for group in self.state.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.state.step)

    def next_batch(self) -> tuple[dyck.Batch, float | None]:
        mix = self.cfg.mix(self.state.step)
        if mix != self.stream.mix:  # the switch to the paper's mix: the same position, new chunks
            self.stream = TrainingStream(self.cfg.seed, self.stream.rows, self.cfg.bucketed, **mix)
        batch, tokens = self.stream.next(batch_size(self.cfg, self.state.step))
        return batch.to(self.device), tokens

    def clip_and_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
        self.state.optimizer.step()

    def after_step(self, loss: float) -> None:
        state, cfg = self.state, self.cfg
        state.step += 1
        state.rows_consumed = self.stream.rows
        self.running_loss = loss if self.running_loss is None else 0.98 * self.running_loss + 0.02 * loss
        self.bar.update(1)
        if state.ema is not None:
            state.ema.update_parameters(state.model)
        if state.step % cfg.eval_every == 0 or state.step == cfg.max_steps:
            self._evaluate()
        if self.on_checkpoint and state.step % cfg.checkpoint_every == 0:
            self.on_checkpoint(state, f"step-{state.step:06d}")

    def _evaluate(self) -> None:
        state, cfg = self.state, self.cfg
        metrics = evaluate(state.model, self.quick)
        state.chosen = "raw"
        if state.ema is not None:
            ema_metrics = evaluate(state.ema.module, self.quick)
            metrics.update({f"ema.{k}": v for k, v in ema_metrics.items()})
            if (ema_metrics["acc.min"], -total_loss(ema_metrics)) > (metrics["acc.min"], -total_loss(metrics)):
                state.chosen = "ema"
            metrics["ema.chosen"] = float(state.chosen == "ema")
        chosen = ema_metrics if state.chosen == "ema" else metrics
        candidate = state.evaluated_model()
        if chosen["acc.min"] >= min(MILESTONES[0], cfg.target_acc):
            # The quick set cannot resolve 99.99%: confirm milestones on ~10^6 tokens per split.
            self.confirm = self.confirm or confirm_sets(cfg)
            metrics.update({f"confirm.{k}": v for k, v in evaluate(candidate, self.confirm).items()})
        metrics["train.loss"] = self.running_loss
        metrics["lr"] = learning_rate(cfg, state.step - 1)
        metrics["batch_size"] = batch_size(cfg, state.step - 1)
        metrics["sequences"] = state.rows_consumed  # rows drawn from the stream, skipped ones included
        metrics["wall_s"] = time.perf_counter() - self.started
        confirmed = metrics.get("confirm.acc.min", 0.0)
        key = (metrics.get("confirm.acc.min", -1.0), chosen["acc.min"], -total_loss(chosen))
        if state.best is None or key > state.best.key:
            state.best = Best(state.step, state.chosen, key,
                              {k: v.detach().to("cpu", copy=True) for k, v in candidate.state_dict().items()})
        metrics["best.step"] = state.best.step
        for m in MILESTONES:
            if confirmed >= m and str(m) not in state.milestones:
                state.milestones[str(m)] = state.step
                if self.on_checkpoint:
                    self.on_checkpoint(state, f"first-{m}")
        if state.first_crossing is None and confirmed >= cfg.target_acc:
            state.first_crossing = state.step
        if state.quick_crossing is None and chosen["acc.min"] >= cfg.target_acc:
            state.quick_crossing = state.step
        metrics["acc.min.confirmed"] = confirmed
        if self.on_eval:
            self.on_eval(state.step, metrics)
        self.bar.set_postfix(loss=f"{self.running_loss:.4f}", min_acc=f"{chosen['acc.min']:.5f}")

    def close(self) -> TrainState:
        self.bar.close()
        move_state(self.state, torch.device("cpu"))  # callers compare, save and evaluate on the CPU
        return self.state


def move_state(state: TrainState, device: torch.device) -> None:
    """Move the model and the optimizer's moment tensors to `device`, in place. Adam's step counts
    stay on the CPU, where torch keeps them unless the optimizer is capturable."""
    state.model.to(device)
    if state.ema is not None:
        state.ema.to(device)
    for moments in state.optimizer.state.values():
        for name, value in moments.items():
            if torch.is_tensor(value) and name != "step":
                moments[name] = value.to(device)


def new_state(cfg: TrainConfig, shared_io: dict[str, torch.Tensor] | None = None) -> TrainState:
    """A fresh model for cfg.seed; with `shared_io`, those tensors are copied in and frozen (Cohort A)."""
    model = DyckTransformer(seed=cfg.seed)
    for name, tensor in (shared_io or {}).items():
        param = getattr(model, name)
        if param.shape != tensor.shape:
            raise ValueError(f"shared {name} has shape {tuple(tensor.shape)}, this model needs {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
        param.requires_grad_(False)
    return TrainState(model, make_optimizer(model, cfg), ema=new_ema(model, cfg.ema_decay))


def checkpoint_payload(state: TrainState, cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) that `restore_checkpoint` turns back into an identical TrainState."""
    tensors = {f"model.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in state.model.state_dict().items()}
    opt_tensors, opt_meta = optimizer_tensors(state.optimizer)
    tensors.update({k: v.detach().to("cpu", copy=True).contiguous() for k, v in opt_tensors.items()})
    if state.ema is not None:
        tensors.update({f"ema.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in state.ema.state_dict().items()})
    if state.best is not None:
        tensors.update({f"best.{k}": v.contiguous() for k, v in state.best.weights.items()})
    best = state.best and {"step": state.best.step, "source": state.best.source, "key": list(state.best.key)}
    meta = {
        "step": state.step, "rows_consumed": state.rows_consumed, "first_crossing": state.first_crossing,
        "quick_crossing": state.quick_crossing, "milestones": state.milestones, "chosen": state.chosen, "best": best,
        "train_config": cfg.to_dict(), "optimizer": opt_meta,
        "model_config": state.model.cfg.to_dict(),
        "frozen": [n for n, p in state.model.named_parameters() if not p.requires_grad],
    }
    return tensors, meta


def restore_checkpoint(tensors: dict[str, torch.Tensor], meta: dict) -> tuple[TrainState, TrainConfig]:
    cfg = TrainConfig.from_dict(meta["train_config"])
    model = DyckTransformer(ModelConfig.from_dict(meta["model_config"]))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    for name in meta["frozen"]:
        model.get_parameter(name).requires_grad_(False)
    opt = make_optimizer(model, cfg)
    load_optimizer_tensors(opt, tensors, meta["optimizer"])
    ema = new_ema(model, cfg.ema_decay)
    if ema is not None:
        ema.load_state_dict({k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")})
    best = meta.get("best")
    if best:
        best = Best(best["step"], best["source"], tuple(best["key"]),
                    {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")})
    state = TrainState(model, opt, step=meta["step"], rows_consumed=meta["rows_consumed"],
                       first_crossing=meta["first_crossing"], quick_crossing=meta.get("quick_crossing"),
                       milestones=dict(meta["milestones"]), ema=ema,
                       chosen=meta.get("chosen", "raw"), best=best)
    return state, cfg

"""Several seeds trained in one process, one vmapped gradient step for all of them.

A 104k-parameter model cannot fill a GPU one seed at a time: each step is a few dozen small
kernels. Here the seeds' weights are stacked on a leading seed axis and one forward and backward
pass (torch.func.functional_call under vmap) computes every seed's gradient at once. Everything
else stays each seed's own: its data stream, optimizer, EMA, evaluations, milestones, best model
and checkpoints run through train.SeedLoop, as in train.train, so a stacked seed follows the
single-seed recipe step for step and equals a separate run up to float rounding (a test checks
1e-5 on the CPU).

Seeds in one stack share the architecture and the batch size; their batches are padded to the
longest of the step (attention is causal and PAD is masked out of the loss, so padding changes no
real position). A seed that stops early (extra_steps after its crossing) leaves the stack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from polyrot.toy import dyck
from polyrot.toy.model import HEADS, DyckTransformer
from polyrot.toy.recipe import TrainConfig
from polyrot.toy.task import PAD
from polyrot.toy.train import CheckpointCallback, EvalCallback, SeedLoop, TrainState


def masked_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], mask: torch.Tensor,
                tokens: torch.Tensor) -> torch.Tensor:
    """train.loss_fn with fixed shapes, so that vmap can batch it: the three heads' cross-entropy
    summed over the non-PAD positions and divided by `tokens` (the batch's own count for a plain
    batch, the chunk's mean for a bucketed one)."""
    total = 0.0
    for h in HEADS:
        per_position = F.cross_entropy(logits[h].flatten(0, 1), labels[h].flatten(), reduction="none")
        total = total + (per_position * mask.flatten()).sum()
    return total / tokens


def _padded(batch: dyck.Batch, length: int) -> dyck.Batch:
    extra = length - batch.tokens.shape[1]
    if not extra:
        return batch
    return dyck.Batch(tokens=F.pad(batch.tokens, (0, extra), value=PAD),
                      **{h: F.pad(getattr(batch, h), (0, extra)) for h in HEADS},
                      mask=F.pad(batch.mask, (0, extra), value=False))


def stacked_gradients(models: list[DyckTransformer], batches: list[tuple[dyck.Batch, float | None]],
                      autocast) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """Each model's gradients (trainable parameters, by name) and loss on its own batch, from one
    vmapped forward and backward pass over the stacked weights."""
    # A tensor trainable in any seed gets a gradient for all (Cohort A stacks seed 0, which learns its
    # embedding, with seeds that keep it frozen); each seed keeps those of its own trainable ones.
    trainable = {name for m in models for name, p in m.named_parameters() if p.requires_grad}
    params = {name: torch.stack([m.get_parameter(name).detach() for m in models])
              for name, _ in models[0].named_parameters()}
    buffers = {name: torch.stack([m.get_buffer(name) for m in models]) for name, _ in models[0].named_buffers()}
    frozen = {name: value for name, value in params.items() if name not in trainable}
    learned = {name: value for name, value in params.items() if name in trainable}
    length = max(b.tokens.shape[1] for b, _ in batches)
    padded = [_padded(b, length) for b, _ in batches]
    tokens = torch.stack([b.tokens for b in padded])
    labels = {h: torch.stack([getattr(b, h) for b in padded]) for h in HEADS}
    mask = torch.stack([b.mask for b in padded])
    counts = torch.tensor([float(b.mask.sum()) if t is None else float(t) for b, t in batches], device=tokens.device)
    base = models[0]

    def loss(learned_i, frozen_i, buffers_i, tokens_i, labels_i, mask_i, count_i):
        logits = functional_call(base, {**learned_i, **frozen_i, **buffers_i}, (tokens_i,))
        return masked_loss(logits, labels_i, mask_i, count_i)

    with autocast:
        grads, losses = vmap(grad_and_value(loss))(learned, frozen, buffers, tokens, labels, mask, counts)
    per_seed = [{name: grads[name][i] for name, p in m.named_parameters() if p.requires_grad}
                for i, m in enumerate(models)]
    return per_seed, losses.tolist()


def train_stacked(
    states: list[TrainState],
    cfgs: list[TrainConfig],
    *,
    on_eval: list[EvalCallback | None] | None = None,
    on_checkpoint: list[CheckpointCallback | None] | None = None,
    progress: bool = True,
) -> list[TrainState]:
    """train.train for several seeds at once; the callbacks are per seed, in the seeds' order."""
    if len(states) != len(cfgs) or not states:
        raise ValueError("train_stacked takes one TrainConfig per TrainState, and at least one")
    # One vmapped step runs every seed under the same autocast, so the precision is shared too.
    if len({(c.batch_size, c.late_batch_size, c.late_batch_from, c.max_steps, c.precision) for c in cfgs}) != 1 \
            or len({s.model.cfg for s in states}) != 1:
        raise ValueError("stacked seeds need one architecture, one batch-size schedule and one precision")
    loops = [SeedLoop(s, c, on_eval=(on_eval or [None] * len(states))[i],
                      on_checkpoint=(on_checkpoint or [None] * len(states))[i], progress=progress)
             for i, (s, c) in enumerate(zip(states, cfgs))]
    while active := [loop for loop in loops if not loop.done]:
        batches = []
        for loop in active:
            loop.set_learning_rate()
            batches.append(loop.next_batch())
        grads, losses = stacked_gradients([loop.state.model for loop in active], batches, active[0].autocast)
        for loop, grad, loss in zip(active, grads, losses):
            for name, g in grad.items():
                p = loop.state.model.get_parameter(name)
                p.grad = g.to(p.dtype)
            loop.clip_and_step()
            loop.after_step(loss)
    return [loop.close() for loop in loops]

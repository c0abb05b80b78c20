"""Bounded-depth Dyck-3: the token stream, its per-position labels, and the named batches.

A sequence is BOS + content + EOS + PAD up to N_CTX, where the content is drawn from the
three bracket families () [] {}. Each position carries three labels, one per output head:

    tok    the token itself (a copy task that every model solves; the control head)
    depth  unmatched openers after this token, frozen once the prefix turns invalid
    valid  the sticky flag of the paper: 0 while the prefix is valid, 1 from its first error on

A prefix turns invalid at the first closer on an empty stack, closer of the wrong family, or
opener beyond MAX_DEPTH. Labelling and generation are vectorised across the batch: the only
Python loops run over the N_CTX positions, each step an array operation on every row at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch

from polyrot.toy.task import (
    BOS,
    CLOSERS,
    DEFAULT_LENGTHS,
    EOS,
    MAX_CONTENT,
    MAX_DEPTH,
    N_CTX,
    NEST_DEPTHS,
    OPENERS,
    PAD,
    SPLITS,
    BatchSpec,
)


@dataclass(frozen=True)
class Batch:
    """Token ids and one label tensor per head, all [B, T]; mask marks the non-PAD positions."""

    tokens: torch.Tensor
    tok: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, idx: torch.Tensor | slice) -> Batch:
        return Batch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @property
    def lengths(self) -> torch.Tensor:
        """Non-PAD positions per row, [B]."""
        return self.mask.sum(1)

    def trimmed(self) -> Batch:
        """This batch without the columns that are PAD in every row. Attention is causal and PAD
        positions are masked out of every loss and metric, so nothing computed on the kept
        positions changes, and every pass gets cheaper."""
        length = int(self.mask.any(0).nonzero().max()) + 1
        return Batch(**{f.name: getattr(self, f.name)[:, :length] for f in fields(self)})

    def by_length(self, chunk: int) -> Iterator[tuple[torch.Tensor, Batch]]:
        """The rows in order of length, `chunk` at a time, each chunk trimmed to its longest row:
        (its row indices, the chunk). Every sum over the chunks is the padded batch's, at a
        fraction of the cost, since a chunk of near-equal lengths keeps few PAD columns."""
        order = torch.argsort(self.lengths, stable=True)
        for lo in range(0, len(self), chunk):
            rows = order[lo:lo + chunk]
            yield rows, self.select(rows).trimmed()


def label_tokens(tokens: torch.Tensor) -> Batch:
    """Label a [B, T] batch of token ids. Only bracket ids move the stack; all others are inert."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
    ids = tokens.detach().cpu().numpy().astype(np.int64)
    n, length = ids.shape
    rows = np.arange(n)
    stack = np.zeros((n, MAX_DEPTH), dtype=np.int64)  # family of each open bracket
    depth = np.zeros(n, dtype=np.int64)
    invalid = np.zeros(n, dtype=bool)
    # Filled time-major so each step writes one contiguous row; transposed once at the end.
    depth_labels = np.empty((length, n), dtype=np.int64)
    valid_labels = np.empty((length, n), dtype=np.int64)
    for t in range(length):
        tok = ids[:, t]
        is_bracket = (tok >= OPENERS[0]) & (tok <= CLOSERS[-1])
        is_open = is_bracket & (tok % 2 == 1)
        is_close = is_bracket & (tok % 2 == 0)
        family = (tok - OPENERS[0]) // 2
        top = stack[rows, np.maximum(depth - 1, 0)]  # garbage at depth 0, where it is never used
        fails = (is_close & ((depth == 0) | (top != family))) | (is_open & (depth == MAX_DEPTH))
        invalid |= fails
        push = is_open & ~invalid
        pop = is_close & ~invalid
        stack[rows[push], depth[push]] = family[push]
        depth += push.astype(np.int64) - pop.astype(np.int64)
        depth_labels[t] = depth
        valid_labels[t] = invalid
    return Batch(
        tokens=torch.from_numpy(ids),
        tok=torch.from_numpy(ids.copy()),
        depth=torch.from_numpy(np.ascontiguousarray(depth_labels.T)),
        valid=torch.from_numpy(np.ascontiguousarray(valid_labels.T)),
        mask=torch.from_numpy(ids != PAD),
    )


def _valid_walk(rng: np.random.Generator, n: int, length: int, p_open: float | np.ndarray) -> np.ndarray:
    """[n, length] bracket ids that never break the grammar: open with p_open (one value, or one per
    row), else close the top."""
    u = rng.random((n, length))
    new_family = rng.integers(0, 3, size=(n, length))
    rows = np.arange(n)
    stack = np.zeros((n, MAX_DEPTH), dtype=np.int64)
    depth = np.zeros(n, dtype=np.int64)
    out = np.empty((n, length), dtype=np.int64)
    for t in range(length):
        opening = (depth < MAX_DEPTH) & ((depth == 0) | (u[:, t] < p_open))
        top = stack[rows, np.maximum(depth - 1, 0)]
        family = np.where(opening, new_family[:, t], top)
        out[:, t] = np.where(opening, OPENERS[0], CLOSERS[0]) + 2 * family
        stack[rows[opening], depth[opening]] = family[opening]
        depth += np.where(opening, 1, -1)
    return out


def _mixture(rng: np.random.Generator, n: int, lo: int, hi: int, p_valid: float, p_open: float,
             p_corrupt: float = 0.0, p_noise_tail: float = 0.0, p_open_spread: float = 0.0):
    """Content and lengths for train/long: each row independently a valid walk or uniform noise.

    Independent per-row draws already interleave the two kinds, so no separate shuffle is needed.
    With p_corrupt > 0, that fraction of the walks gets one closer swapped for a closer of another
    family: a first violation inside a deep stack, which uniform noise almost never produces.
    With p_noise_tail > 0, that fraction of the (other) walks continues as uniform noise from a
    uniformly drawn position on: the row usually breaks the grammar there, at whatever depth the
    walk had reached, and the depth label must then hold that depth through a long noise tail.
    Uniform noise rows break it within a few tokens, at depth 0-2.
    With p_open_spread > 0, each walk draws its own opening probability uniformly from
    p_open ± p_open_spread: shallow walks that keep returning to depth 0 late in a long row, and
    deep ones that stay near MAX_DEPTH, both rare at the paper's single p_open of 0.55.
    """
    lengths = rng.integers(lo, hi + 1, size=n)
    is_walk = rng.random(n) < p_valid
    content = rng.integers(OPENERS[0], CLOSERS[-1] + 1, size=(n, MAX_CONTENT))
    noise = content.copy() if p_noise_tail > 0 else None
    n_walks = int(is_walk.sum())
    if p_open_spread > 0:  # no draw otherwise, so that the default mix stays bit-identical
        p_open = rng.uniform(p_open - p_open_spread, p_open + p_open_spread, size=n_walks)
    content[is_walk, :hi] = _valid_walk(rng, n_walks, hi, p_open)
    if p_corrupt > 0:
        in_length = np.arange(MAX_CONTENT)[None, :] < lengths[:, None]
        closers = np.isin(content, CLOSERS) & in_length
        corrupt = is_walk & (rng.random(n) < p_corrupt) & closers.any(1)
        # A uniformly random closer per row: argmax of random keys restricted to closer slots.
        where = np.argmax(np.where(closers, rng.random(content.shape), -1.0), axis=1)
        rows = np.flatnonzero(corrupt)
        shift = 2 * rng.integers(1, 3, size=rows.size)  # +1 or +2 families, mod 3
        old = content[rows, where[rows]]
        content[rows, where[rows]] = CLOSERS[0] + (old - CLOSERS[0] + shift) % 6
    else:
        corrupt = np.zeros(n, dtype=bool)
    if p_noise_tail > 0:
        tail = is_walk & ~corrupt & (rng.random(n) < p_noise_tail) & (lengths > 1)
        start = rng.integers(1, np.maximum(lengths, 2))  # the tail's first position, inside the row
        in_tail = tail[:, None] & (np.arange(MAX_CONTENT)[None, :] >= start[:, None])
        content[in_tail] = noise[in_tail]
    return content, lengths


def _compositional(rng: np.random.Generator, n: int):
    """One k-deep single-family nest, with depth-1 pairs of random family filling the rest.

    The pairs are split binomially between before and after the nest, so the nest sits anywhere.
    """
    k = rng.integers(NEST_DEPTHS[0], NEST_DEPTHS[1] + 1, size=n)
    nest_family = rng.integers(0, 3, size=n)
    n_pairs = (MAX_CONTENT - 2 * k) // 2
    n_before = rng.binomial(n_pairs, 0.5)
    pair_family = rng.integers(0, 3, size=(n, MAX_CONTENT // 2))

    j = np.arange(MAX_CONTENT)[None, :]
    k, nest_family, nest_start = k[:, None], nest_family[:, None], 2 * n_before[:, None]
    in_nest = (j >= nest_start) & (j < nest_start + 2 * k)
    # Pair slot j//2 before the nest; after it, skip the 2k nest tokens to continue the pair index.
    pair_index = np.where(j < nest_start, j // 2, (j - 2 * k) // 2).clip(0, MAX_CONTENT // 2 - 1)
    family = np.take_along_axis(pair_family, pair_index, axis=1)
    pair_tok = np.where(j % 2 == 0, OPENERS[0], CLOSERS[0]) + 2 * family
    nest_tok = np.where(j < nest_start + k, OPENERS[0], CLOSERS[0]) + 2 * nest_family
    content = np.where(in_nest, nest_tok, pair_tok)
    return content, np.full(n, MAX_CONTENT)


def _frame(content: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """Wrap each row's first `lengths` content tokens as BOS + content + EOS + PAD..."""
    n = content.shape[0]
    tokens = np.full((n, N_CTX), PAD, dtype=np.int64)
    tokens[:, 0] = BOS
    keep = np.arange(MAX_CONTENT)[None, :] < lengths[:, None]
    tokens[:, 1 : 1 + MAX_CONTENT] = np.where(keep, content, PAD)
    has_eos = 1 + lengths < N_CTX
    tokens[np.flatnonzero(has_eos), 1 + lengths[has_eos]] = EOS
    return torch.from_numpy(tokens)


def generate(
    split: str,
    n: int,
    seed: int | np.random.Generator,
    *,
    length_range: tuple[int, int] | None = None,
    p_valid: float = 0.5,
    p_open: float = 0.55,
    p_corrupt: float = 0.0,
    p_noise_tail: float = 0.0,
    p_open_spread: float = 0.0,
) -> Batch:
    """n labelled sequences of a split, determined entirely by seed.

    length_range overrides the content-length range of train/long; the compositional split always
    fills the context, so it takes no length_range, and ignores p_valid, p_open and the training
    mix's levers (p_corrupt, p_noise_tail, p_open_spread: see _mixture).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not all(0.0 <= p <= 1.0 for p in (p_valid, p_open, p_corrupt, p_noise_tail)):
        raise ValueError(f"p_valid, p_open, p_corrupt and p_noise_tail must lie in [0, 1], got {p_valid}, {p_open}, "
                         f"{p_corrupt}, {p_noise_tail}")
    if not 0.0 <= p_open_spread <= min(p_open, 1.0 - p_open):
        raise ValueError(f"p_open_spread must keep p_open ± p_open_spread in [0, 1], got {p_open_spread}")
    if split == "compositional" and length_range is not None:
        raise ValueError("the compositional split has a fixed length; length_range must be None")
    rng = np.random.default_rng(seed)
    if split == "compositional":
        content, lengths = _compositional(rng, n)
    else:
        lo, hi = length_range if length_range is not None else DEFAULT_LENGTHS[split]
        if not 1 <= lo <= hi <= MAX_CONTENT:
            raise ValueError(f"length_range must satisfy 1 <= lo <= hi <= {MAX_CONTENT}, got ({lo}, {hi})")
        content, lengths = _mixture(rng, n, lo, hi, p_valid, p_open, p_corrupt, p_noise_tail, p_open_spread)
    return label_tokens(_frame(content, lengths))


def make_batch(spec: BatchSpec) -> Batch:
    """The labelled batch a spec names, bit-identical wherever it is made."""
    lengths = None if spec.split == "compositional" else (spec.min_len, spec.max_len)
    return generate(spec.split, spec.n_sequences, spec.seed, length_range=lengths)


def length_buckets(batch: Batch, batch_size: int, rng: np.random.Generator) -> list[Batch]:
    """`batch` cut into len(batch) // batch_size batches of rows of similar length, each trimmed to
    its longest row, in a shuffled order.

    Trimming an unsorted batch gains nothing: the longest of 128 random lengths is almost always
    the full context. A random permutation picks the rows (the leftover ones are dropped at
    random, not the longest) and breaks ties in length; a stable sort then groups similar lengths,
    and the batch order is shuffled so that a run does not see short sequences first.
    """
    if not 0 < batch_size <= len(batch):
        raise ValueError(f"batch_size must lie in [1, {len(batch)}], got {batch_size}")
    n_batches = len(batch) // batch_size
    picked = torch.from_numpy(rng.permutation(len(batch))[: n_batches * batch_size])
    by_length = picked[torch.argsort(batch.lengths[picked], stable=True)].view(n_batches, batch_size)
    return [batch.select(rows).trimmed() for rows in by_length[torch.from_numpy(rng.permutation(n_batches))]]

"""The Dyck-3 labeller against an obviously-correct per-sequence stack, and the generator's promises."""

import numpy as np
import pytest
import torch

from polyrot.toy import dyck, task
from polyrot.toy.dyck import Batch, make_batch
from polyrot.toy.task import BOS, EOS, PAD, BatchSpec

OPEN = {"(": 3, "[": 5, "{": 7}
CLOSE = {")": 4, "]": 6, "}": 8}
CHAR = {**OPEN, **CLOSE}


def reference_labels(tokens: list[int]) -> tuple[list[int], list[int]]:
    """Depth and sticky-invalid labels of one sequence, one token at a time with a Python list stack."""
    stack, invalid = [], False
    depths, flags = [], []
    for tok in tokens:
        if not invalid and tok in OPEN.values():
            if len(stack) == task.MAX_DEPTH:
                invalid = True
            else:
                stack.append(tok)
        elif not invalid and tok in CLOSE.values():
            if not stack or stack[-1] != tok - 1:
                invalid = True
            else:
                stack.pop()
        depths.append(len(stack))
        flags.append(int(invalid))
    return depths, flags


def framed(text: str) -> list[int]:
    """BOS + brackets + EOS, padded to N_CTX."""
    ids = [BOS] + [CHAR[c] for c in text] + [EOS]
    return ids + [PAD] * (task.N_CTX - len(ids))


def assert_matches_reference(batch: Batch):
    assert batch.tokens.dtype == torch.long and batch.mask.dtype == torch.bool
    assert torch.equal(batch.tok, batch.tokens)
    assert torch.equal(batch.mask, batch.tokens != PAD)
    for row, depth, valid in zip(batch.tokens.tolist(), batch.depth.tolist(), batch.valid.tolist()):
        assert (depth, valid) == reference_labels(row), row


def content_lengths(batch: Batch) -> torch.Tensor:
    return ((batch.tokens >= task.OPENERS[0]) & (batch.tokens <= task.CLOSERS[-1])).sum(1)


def ends_valid(batch: Batch) -> torch.Tensor:
    return batch.valid[:, -1] == 0


@pytest.mark.parametrize(
    "split, kwargs",
    [
        ("train", {}),
        ("train", {"p_valid": 1.0}),
        ("train", {"p_valid": 0.0}),
        ("long", {}),
        ("compositional", {}),
    ],
)
def test_labels_match_reference_on_generated_sequences(split, kwargs):
    assert_matches_reference(dyck.generate(split, 800, seed=1, **kwargs))


def test_labels_match_reference_on_arbitrary_token_soup():
    # PAD/BOS/EOS and unused ids mid-sequence must leave the stack alone, wherever they fall.
    gen = torch.Generator().manual_seed(0)
    soup = torch.randint(0, task.VOCAB_SIZE, (300, task.N_CTX), generator=gen)
    brackets = torch.randint(task.OPENERS[0], task.CLOSERS[-1] + 1, (300, task.N_CTX), generator=gen)
    tokens = torch.where(torch.rand(300, task.N_CTX, generator=gen) < 0.7, brackets, soup)
    assert_matches_reference(dyck.label_tokens(tokens))


@pytest.mark.parametrize(
    "text, depth, valid",
    [
        # Columns: BOS, the brackets, EOS. Depth freezes at the value before the failing token.
        (")(", [0, 0, 0, 0], [0, 1, 1, 1]),
        ("(]()", [0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]),
        ("([)]", [0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 1, 1]),
        ("{[]}", [0, 1, 2, 1, 0, 0], [0, 0, 0, 0, 0, 0]),
        ("(()", [0, 1, 2, 1, 1], [0, 0, 0, 0, 0]),
        ("())(", [0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1]),
        ("(" * 9 + ")", list(range(9)) + [8, 8, 8], [0] * 9 + [1, 1, 1]),
        ("[" * 8 + "]" * 8, list(range(9)) + list(range(7, -1, -1)) + [0], [0] * 18),
    ],
)
def test_hand_made_edge_cases(text, depth, valid):
    batch = dyck.label_tokens(torch.tensor([framed(text)]))
    n = len(text) + 2
    assert batch.depth[0, :n].tolist() == depth
    assert batch.valid[0, :n].tolist() == valid
    assert batch.mask[0].tolist() == [True] * n + [False] * (task.N_CTX - n)
    # PAD positions carry the final labels forward; they are masked out of every loss.
    assert (batch.depth[0, n:] == depth[-1]).all() and (batch.valid[0, n:] == valid[-1]).all()


def test_label_tokens_rejects_non_2d_input():
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        dyck.label_tokens(torch.tensor(framed("()")))


def test_batch_len_select_and_to():
    batch = dyck.generate("train", 10, seed=3)
    assert len(batch) == 10
    picked = batch.select(torch.tensor([7, 2]))
    assert len(picked) == 2 and torch.equal(picked.depth[1], batch.depth[2])
    assert torch.equal(batch.select(slice(0, 4)).valid, batch.valid[:4])
    moved = batch.to("cpu")
    assert all(torch.equal(getattr(moved, h), getattr(batch, h)) for h in task.HEADS)


def test_by_length_visits_every_row_once_in_length_order_and_trims_each_chunk():
    batch = dyck.generate("train", 50, seed=3)
    chunks = list(batch.by_length(16))
    assert [len(part) for _, part in chunks] == [16, 16, 16, 2]
    rows = torch.cat([r for r, _ in chunks])
    assert sorted(rows.tolist()) == list(range(50))
    assert torch.all(batch.lengths[rows].diff() >= 0)
    for r, part in chunks:
        assert torch.equal(part.tokens, batch.select(r).tokens[:, :part.tokens.shape[1]])
        assert part.tokens.shape[1] == int(part.lengths.max())  # trimmed to its longest row


@pytest.mark.parametrize("split", task.SPLITS)
def test_same_seed_is_bit_identical_and_different_seed_differs(split):
    a, b, c = (dyck.generate(split, 200, seed=s) for s in (5, 5, 6))
    for name in ("tokens", *task.HEADS, "mask"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.tokens, c.tokens)
    from_generator = dyck.generate(split, 200, seed=np.random.default_rng(5))
    assert torch.equal(from_generator.tokens, a.tokens)


def test_valid_walks_and_noise_are_interleaved():
    first = ends_valid(dyck.generate("train", 1000, seed=0).select(slice(0, 50)))
    assert first.any() and not first.all()


def test_mix_is_half_valid_walks():
    # Uniform noise of 50+ brackets stays valid with probability < (2/3)^50, so on the long split
    # "still valid at the end" counts exactly the valid walks; 4000 rows put sigma near 0.008.
    batch = dyck.generate("long", 4000, seed=11)
    assert abs(ends_valid(batch).float().mean().item() - 0.5) < 0.04
    assert ends_valid(dyck.generate("long", 300, seed=11, p_valid=1.0)).all()


@pytest.mark.parametrize(
    "split, length_range, expected",
    [("train", None, (2, 62)), ("long", None, (50, 60)), ("train", (5, 7), (5, 7)), ("long", (1, 1), (1, 1))],
)
def test_length_ranges_are_respected(split, length_range, expected):
    batch = dyck.generate(split, 3000, seed=2, length_range=length_range)
    lengths = content_lengths(batch)
    assert lengths.min().item() == expected[0] and lengths.max().item() == expected[1]
    rows = torch.arange(len(batch))
    assert (batch.tokens[:, 0] == BOS).all() and (batch.tokens[rows, lengths + 1] == EOS).all()
    assert torch.equal(batch.mask.sum(1), lengths + 2)


def test_compositional_is_one_single_family_nest_among_shallow_pairs():
    batch = dyck.generate("compositional", 1000, seed=4)
    assert (content_lengths(batch) == task.MAX_CONTENT).all()
    assert (batch.valid == 0).all() and (batch.depth[:, -1] == 0).all()
    nest_depth = batch.depth.max(1).values
    assert set(nest_depth.tolist()) == set(range(3, task.MAX_DEPTH + 1))
    for row, depth in zip(batch.tokens.tolist(), batch.depth.tolist()):
        # Everything above depth 1 belongs to the nest, which must use a single family.
        assert len({(tok - 3) // 2 for tok, d in zip(row, depth) if d >= 2}) == 1


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (("valid", 10, 0), {}, "compositional, long"),
        (("train", 0, 0), {}, "positive"),
        (("train", 10, 0), {"length_range": (0, 5)}, "1 <= lo"),
        (("train", 10, 0), {"length_range": (6, 5)}, "1 <= lo"),
        (("long", 10, 0), {"length_range": (50, 63)}, "1 <= lo"),
        (("compositional", 10, 0), {"length_range": (2, 5)}, "fixed length"),
        (("train", 10, 0), {"p_valid": 1.5}, r"\[0, 1\]"),
    ],
)
def test_generate_rejects_bad_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        dyck.generate(*args, **kwargs)


def test_named_specs_are_the_papers_batches():
    assert task.EVAL_SPEC == BatchSpec("eval", 12345, 1024, 2, 48, "train")
    assert (task.SAE_SPEC.name, task.SAE_SPEC.seed, task.SAE_SPEC.n_sequences) == ("sae", 2026, 4096)
    batch = make_batch(task.EVAL_SPEC)
    lengths = content_lengths(batch)
    assert len(batch) == 1024 and lengths.min() >= 2 and lengths.max() <= 48
    assert torch.equal(batch.tokens, make_batch(task.EVAL_SPEC).tokens)


def test_compositional_spec_ignores_lengths():
    spec = BatchSpec(name="comp", n_sequences=20, min_len=0, max_len=99, split="compositional")
    assert torch.equal(make_batch(spec).tokens, dyck.generate("compositional", 20, spec.seed).tokens)


@pytest.mark.parametrize("spec", [task.EVAL_SPEC, task.SAE_SPEC, BatchSpec("c", 1, 5, split="compositional")])
def test_batch_spec_round_trips_through_params(spec):
    params = spec.as_params()
    assert params["batch_name"] == spec.name and params["batch_seed"] == spec.seed
    assert params["batch_sequences"] == spec.n_sequences  # the stage option's name, not a second form
    assert BatchSpec.from_params(params) == spec
    logged = {f"run.{k}": str(v) for k, v in params.items()} | {"lr": "0.001"}
    assert BatchSpec.from_params(logged, prefix="run.batch") == spec


@pytest.mark.parametrize(
    "params, message",
    [
        ({"batch_seed": "x"}, "bad BatchSpec params"),
        ({}, "missing"),
    ],
)
def test_from_params_rejects_bad_params(params, message):
    full = task.EVAL_SPEC.as_params() | params
    if not params:
        del full["batch_split"]
    with pytest.raises(ValueError, match=message):
        BatchSpec.from_params(full)


def test_from_params_ignores_other_params_that_share_the_prefix():
    # A train_sae run has batch_size (SAE rows per step) beside its batch_* spec.
    assert BatchSpec.from_params(task.SAE_SPEC.as_params() | {"batch_size": "4096"}) == task.SAE_SPEC


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": "dev"},
        {"n_sequences": 0},
        {"min_len": 0},
        {"min_len": 10, "max_len": 9},
        {"max_len": 63},
        {"seed": "1"},
        {"name": ""},
    ],
)
def test_batch_spec_rejects_bad_fields(kwargs):
    with pytest.raises(ValueError):
        BatchSpec(**kwargs)



def depth_at_first_violation(batch: Batch) -> torch.Tensor:
    """[rows that break the grammar] their depth label where they first do (it stays so after)."""
    broken = batch.valid.any(1)
    first = batch.valid[broken].float().argmax(1, keepdim=True)
    return batch.depth[broken].gather(1, first).flatten().float()


def test_a_noise_tail_breaks_walks_deeper_than_uniform_noise_and_leaves_the_rest_alone():
    plain = dyck.generate("train", 4096, seed=3)
    assert torch.equal(dyck.generate("train", 4096, seed=3, p_noise_tail=0.0).tokens, plain.tokens)
    tailed = dyck.generate("train", 4096, seed=3, p_noise_tail=0.5)
    differs = plain.tokens != tailed.tokens
    changed = differs.any(1)
    # About half of the walks (half of the rows) change, each after a kept prefix; lengths stay.
    assert 0.2 < changed.float().mean() < 0.3 and torch.equal(plain.mask, tailed.mask)
    assert not plain.valid[changed].any() and (differs[changed].float().argmax(1) >= 2).all()
    # Uniform noise (the invalid rows of the plain mix) breaks the grammar near depth 0; a walk with
    # a noise tail breaks it where the walk was.
    noise, tails = depth_at_first_violation(plain), depth_at_first_violation(tailed.select(changed))
    assert noise.mean() < 1.5 and tails.mean() > noise.mean() + 2  # measured: 0.93 and 3.96
    assert tailed.valid[changed].any(1).float().mean() > 0.8


def test_a_spread_of_the_opening_probability_draws_shallow_long_walks_and_leaves_the_default_alone():
    plain = dyck.generate("train", 8192, seed=3)
    assert torch.equal(dyck.generate("train", 8192, seed=3, p_open_spread=0.0).tokens, plain.tokens)
    spread = dyck.generate("train", 8192, seed=3, p_open_spread=0.25)
    assert torch.equal(plain.mask, spread.mask)  # the same lengths and the same walk / noise rows
    walks = ~plain.valid.any(1)
    assert torch.equal(walks, ~spread.valid.any(1))  # every walk stays valid
    late_depth_0 = lambda b: int((b.mask & walks[:, None] & (b.depth == 0))[:, 56:].sum())
    # The compositional split's last pairs sit at depth 0 at the end of the context: rare at 0.55.
    assert late_depth_0(spread) > 2 * late_depth_0(plain)  # measured: 188 against 83
    with pytest.raises(ValueError, match="p_open_spread"):
        dyck.generate("train", 8, seed=0, p_open_spread=0.5)

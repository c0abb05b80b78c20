from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polyrot.core.device import resolve_device
from polyrot.errors import ParameterError
from polyrot.toy import dyck
from polyrot.toy.model import DyckTransformer
from polyrot.toy.recipe import PAPER, TrainConfig
from polyrot.toy.train import (
    CHUNK_ROWS,
    EvalSets,
    TrainingStream,
    batch_size,
    checkpoint_payload,
    evaluate,
    learning_rate,
    loss_fn,
    new_state,
    quick_sets,
    restore_checkpoint,
    total_loss,
    train,
)

TINY = dict(max_steps=60, eval_every=30, checkpoint_every=30, batch_size=32, eval_sequences=128,
            confirm_sequences=128, threads=1)


def weights(state) -> dict:
    return {k: v.clone() for k, v in state.model.state_dict().items()}


def test_paper_profile_is_the_papers_recipe():
    cfg = TrainConfig.from_profile("paper")
    assert (cfg.batch_size, cfg.max_steps, cfg.lr, cfg.warmup_steps) == (512, 60_000, 3e-3, 500)
    assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.95, 1e-4, 1.0)
    assert (cfg.min_lr_ratio, cfg.target_acc, cfg.extra_steps, cfg.eval_every) == (0.02, 0.9999, 10_000, 500)
    assert cfg.precision == "bf16"  # autocast with fp32 master weights
    assert PAPER["p_corrupt"] == PAPER["p_noise_tail"] == PAPER["p_open_spread"] == 0.0


def test_the_cpu_profile_stops_its_cosine_at_a_quarter_of_the_peak():
    cfg = TrainConfig.from_profile("cpu")
    assert learning_rate(cfg, cfg.max_steps) == pytest.approx(0.25 * 2e-3)


def test_schedule_warms_up_then_decays_to_two_percent():
    cfg = TrainConfig.from_profile("paper")
    assert learning_rate(cfg, 0) == pytest.approx(3e-3 / 500)
    assert learning_rate(cfg, 499) == pytest.approx(3e-3)
    assert learning_rate(cfg, 60_000) == pytest.approx(6e-5)
    assert learning_rate(cfg, 30_250) == pytest.approx((3e-3 + 6e-5) / 2)


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("max_steps", -1), ("lr", 0.0),
                                         ("target_acc", 1.5), ("profile", "gpu")])
def test_bad_recipe_values_are_refused(field, value):
    with pytest.raises(ParameterError, match=field if field != "profile" else "unknown profile"):
        TrainConfig.from_profile("cpu", **{field: value}) if field != "profile" else TrainConfig.from_profile(value)


def test_short_training_lowers_the_loss():
    cfg = TrainConfig.from_profile("cpu", **{**TINY, "max_steps": 150, "eval_every": 150})
    state = new_state(cfg)
    sets = EvalSets.build(128)
    before = evaluate(state.model, sets)
    train(state, cfg, progress=False)
    after = evaluate(state.model, sets)
    loss = lambda m: sum(v for k, v in m.items() if k.startswith("loss."))
    assert loss(after) < 0.7 * loss(before)
    assert after["acc.train.tok"] > 0.9  # the copy head is learned first


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_from_a_checkpoint_reaches_identical_weights(precision):
    cfg = TrainConfig.from_profile("cpu", **TINY, precision=precision)
    saved = {}
    full = train(new_state(cfg), cfg, progress=False,
                 on_checkpoint=lambda st, tag: saved.setdefault(tag, checkpoint_payload(st, cfg)))
    resumed, resumed_cfg = restore_checkpoint(*saved["step-000030"])
    assert resumed.step == 30 and resumed_cfg == cfg
    train(resumed, resumed_cfg, progress=False)
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The moving average and the best model so far are part of the state, so they resume too.
    assert cfg.ema_decay > 0
    ema_a, ema_b = full.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert (resumed.best.step, resumed.best.source, resumed.best.key) == (full.best.step, full.best.source, full.best.key)
    assert all(torch.equal(full.best.weights[k], resumed.best.weights[k]) for k in full.best.weights)


def test_two_threads_train_bit_identically_run_to_run():
    """A node that runs alone trains on every core (pipeline.execute), so two threads must be as
    reproducible as one. W_E's gradient is the one that was not: indexing accumulates it in an
    order that varies between runs on two threads; the embedding's backward does not."""
    cfg = TrainConfig.from_profile("cpu", **{**TINY, "threads": 2, "batch_size": 128, "max_steps": 20})
    first, second = (weights(train(new_state(cfg), cfg, progress=False)) for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_frozen_shared_io_stays_bit_identical():
    cfg = TrainConfig.from_profile("cpu", **TINY)
    source = new_state(TrainConfig.from_profile("cpu", **{**TINY, "seed": 9})).model
    shared = {k: getattr(source, k).detach().clone() for k in ("W_E", "W_U_tok", "W_U_depth", "W_U_valid")}
    state = train(new_state(cfg, shared), cfg, progress=False)
    assert all(torch.equal(getattr(state.model, k), v) for k, v in shared.items())
    assert not torch.equal(state.model.blocks[0].mlp.W_in, source.blocks[0].mlp.W_in)


def test_device_resolution():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ParameterError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="torch sees no CUDA device"):
            resolve_device("cuda:0")


def test_training_returns_its_state_on_the_cpu():
    # Whatever device the loop ran on, callers compare, save and evaluate on the CPU.
    cfg = TrainConfig.from_profile("cpu", **{**TINY, "max_steps": 2, "eval_every": 2}, device="auto")
    state = train(new_state(cfg), cfg, progress=False)
    assert {p.device.type for p in state.model.parameters()} == {"cpu"}
    moments = [v for s in state.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    assert moments and {v.device.type for v in moments} == {"cpu"}


def padded_loss_and_grads(model, batch, tokens=None):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(batch.tokens), batch, tokens)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_a_trimmed_batch_gives_the_padded_batchs_loss_and_gradients():
    model = DyckTransformer(seed=0)
    batch = dyck.generate("train", 32, seed=5, length_range=(2, 20))
    assert batch.tokens.shape[1] == 64 and batch.trimmed().tokens.shape[1] == 22  # BOS + 20 + EOS
    for tokens in (None, 123.0):
        loss, grads = padded_loss_and_grads(model, batch, tokens)
        trimmed_loss, trimmed_grads = padded_loss_and_grads(model, batch.trimmed(), tokens)
        assert trimmed_loss == pytest.approx(loss, rel=1e-6)
        assert all(torch.allclose(trimmed_grads[n], grads[n], rtol=1e-5, atol=1e-7) for n in grads)


def test_length_buckets_partition_the_chunk_into_trimmed_batches_of_like_length():
    chunk = dyck.generate("train", 1000, seed=3)
    buckets = dyck.length_buckets(chunk, 64, np.random.default_rng(0))
    assert len(buckets) == 15 and all(len(b) == 64 for b in buckets)
    # Each bucket is trimmed to its longest row and spans a narrow band of lengths.
    assert all(b.tokens.shape[1] == int(b.lengths.max()) for b in buckets)
    assert np.median([int(b.lengths.max() - b.lengths.min()) for b in buckets]) <= 6
    # The buckets hold 960 of the chunk's rows, each at most once (as a multiset of whole rows), and
    # come in shuffled order, not by length.
    as_rows = lambda b: Counter(tuple(r[r != 0].tolist()) for r in b.tokens)
    held = sum((as_rows(b) for b in buckets), Counter())
    assert held.total() == 960 and not held - as_rows(chunk)
    maxima = [int(b.lengths.max()) for b in buckets]
    assert maxima != sorted(maxima)
    again = dyck.length_buckets(chunk, 64, np.random.default_rng(0))
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(buckets, again))


def test_a_bucketed_chunk_weighs_every_token_alike():
    """Summed over a chunk's batches, the bucketed objective is the chunk's token-mean loss times the
    number of batches: each token weighs 1 / (mean tokens per batch), whatever its batch's length.
    A batch's own mean would weigh a token of a short-sequence batch far above a long one's."""
    torch.manual_seed(0)
    model = DyckTransformer(seed=1)
    stream = TrainingStream(seed=4, bucketed=True)
    batches = [stream.next(128) for _ in range(CHUNK_ROWS // 128)]
    tokens = {t for _, t in batches}
    assert len(tokens) == 1  # one normalising count per chunk
    (count,) = tokens
    picked = [b for b, _ in batches]
    assert count == pytest.approx(sum(int(b.mask.sum()) for b in picked) / len(picked))
    with torch.no_grad():
        total = sum(float(loss_fn(model(b.tokens), b, count)) for b in picked)
        per_token = sum(float(loss_fn(model(b.tokens), b, 1.0)) for b in picked)  # every token's loss, summed
        own_means = sum(float(loss_fn(model(b.tokens), b)) for b in picked)
    assert total == pytest.approx(per_token / count, rel=1e-6)
    assert abs(own_means - total) / total > 1e-3  # the per-batch mean is another objective
    # The next chunk starts a new set of buckets from its own seed.
    assert stream.rows == CHUNK_ROWS and stream.next(128)[1] != count


def test_evaluation_in_length_order_equals_the_padded_reference():
    model = DyckTransformer(seed=2)
    sets = EvalSets.build(300, seed=9)
    fast = evaluate(model, sets, chunk=128)
    with torch.no_grad():
        for split, batch in sets.batches.items():
            logits, m = model(batch.tokens), batch.mask
            for h in ("tok", "depth", "valid"):
                lg, y = logits[h][m], getattr(batch, h)[m]
                assert fast[f"acc.{split}.{h}"] == int((lg.argmax(-1) == y).sum()) / int(m.sum())
                assert fast[f"loss.{split}.{h}"] == pytest.approx(float(F.cross_entropy(lg, y)), rel=1e-5)


def test_a_bucketed_stream_moves_to_the_next_chunk_when_the_batch_size_changes_mid_chunk():
    stream = TrainingStream(seed=0, bucketed=True)
    stream.next(96)
    batch, tokens = stream.next(64)
    assert stream.rows == CHUNK_ROWS + 64
    # The batch is the next chunk's first bucket of 64, as a stream that starts there serves it.
    fresh, fresh_tokens = TrainingStream(seed=0, bucketed=True, rows_consumed=CHUNK_ROWS).next(64)
    assert torch.equal(batch.tokens, fresh.tokens) and tokens == fresh_tokens


def test_the_late_batch_starts_at_its_fraction_of_the_budget():
    cfg = TrainConfig.from_profile("cpu", max_steps=1000, batch_size=128, late_batch_size=512, late_batch_from=0.75)
    assert [batch_size(cfg, s) for s in (0, 749, 750, 999)] == [128, 128, 512, 512]
    assert batch_size(TrainConfig.from_profile("cpu"), 11_999) == 128  # off by default
    with pytest.raises(ParameterError, match="late_batch_from"):
        TrainConfig.from_profile("cpu", late_batch_from=1.5)


def test_resume_across_the_batch_switch_reaches_identical_weights():
    cfg = TrainConfig.from_profile("cpu", **{**TINY, "late_batch_size": 64, "late_batch_from": 0.25})
    saved, history = {}, []
    full = train(new_state(cfg), cfg, progress=False, on_eval=lambda step, m: history.append(m),
                 on_checkpoint=lambda st, tag: saved.setdefault(tag, checkpoint_payload(st, cfg)))
    assert [m["batch_size"] for m in history] == [64, 64]
    # 15 steps of 32 rows, then a new chunk for the batches of 64 (8192 is no multiple of 32 + 64k).
    assert history[-1]["sequences"] == CHUNK_ROWS + 45 * 64
    resumed, resumed_cfg = restore_checkpoint(*saved["step-000030"])
    train(resumed, resumed_cfg, progress=False)
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_paper_mix_starts_at_its_fraction_of_the_budget():
    cfg = TrainConfig.from_profile("cpu", max_steps=1000)
    assert cfg.mix(799) == {"p_corrupt": 0.25, "p_noise_tail": 0.25, "p_open_spread": 0.25}
    assert cfg.mix(800) == dict.fromkeys(cfg.mix(), 0.0) == TrainConfig.from_profile("paper").mix(0)
    # A recipe saved before the field existed keeps its own mix to the end, as it trained.
    saved = {k: v for k, v in cfg.to_dict().items() if k != "paper_mix_from"}
    assert TrainConfig.from_dict(saved).mix(999) == cfg.mix(0)
    with pytest.raises(ParameterError, match="paper_mix_from must lie in"):
        TrainConfig.from_profile("cpu", paper_mix_from=1.5)


def test_a_switch_to_the_paper_mix_trains_on_the_papers_batches_and_resumes_across_it():
    paper_mix = dict.fromkeys(("p_corrupt", "p_noise_tail", "p_open_spread"), 0.0)
    from_the_start = TrainConfig.from_profile("cpu", **{**TINY, "paper_mix_from": 0.0})
    never = TrainConfig.from_profile("cpu", **{**TINY, **paper_mix, "paper_mix_from": 1.0})
    a, b = weights(train(new_state(from_the_start), from_the_start, progress=False)), \
        weights(train(new_state(never), never, progress=False))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Switched at step 15, killed at 30, resumed: the uninterrupted run's weights.
    cfg = TrainConfig.from_profile("cpu", **{**TINY, "paper_mix_from": 0.25})
    saved = {}
    full = weights(train(new_state(cfg), cfg, progress=False,
                         on_checkpoint=lambda st, tag: saved.setdefault(tag, checkpoint_payload(st, cfg))))
    resumed, resumed_cfg = restore_checkpoint(*saved["step-000030"])
    again = weights(train(resumed, resumed_cfg, progress=False))
    assert all(torch.equal(full[k], again[k]) for k in full)
    assert not all(torch.equal(full[k], a[k]) for k in full)  # 15 steps of the cpu mix made a difference


def test_the_kept_model_is_the_best_evaluated_one_and_the_ema_can_win():
    cfg = TrainConfig.from_profile("cpu", **{**TINY, "max_steps": 90, "eval_every": 30, "ema_decay": 0.9})
    history = []
    state = train(new_state(cfg), cfg, progress=False, on_eval=lambda step, m: history.append((step, m)))
    assert [s for s, _ in history] == [30, 60, 90]
    assert all("ema.acc.min" in m for _, m in history)
    scored = {s: (m["ema.acc.min"], -total_loss({k[4:]: v for k, v in m.items() if k.startswith("ema.")}))
              if m["ema.chosen"] else (m["acc.min"], -total_loss(m)) for s, m in history}
    best_step = max(scored, key=lambda s: scored[s])
    assert state.best.step == best_step and state.best.key[1:] == scored[best_step]
    kept = evaluate(state.best_model(), quick_sets(cfg))
    assert kept["acc.min"] == state.best.key[1]


def test_the_quick_crossing_is_the_first_unconfirmed_reading_of_the_target_and_resumes():
    cfg = TrainConfig.from_profile("cpu", **{**TINY, "max_steps": 90})
    history = []
    train(new_state(cfg), cfg, progress=False, on_eval=lambda step, m: history.append((step, m)))
    chosen = {s: m["ema.acc.min"] if m["ema.chosen"] else m["acc.min"] for s, m in history}
    # A target the quick set first reads at the second or third evaluation, never at the first.
    target = max(chosen[60], chosen[90])
    assert chosen[30] < target < 1
    cfg = TrainConfig.from_profile("cpu", **{**TINY, "max_steps": 90, "target_acc": target})
    saved = {}
    state = train(new_state(cfg), cfg, progress=False,
                  on_checkpoint=lambda st, tag: saved.setdefault(tag, checkpoint_payload(st, cfg)))
    assert state.quick_crossing == min(s for s in (60, 90) if chosen[s] >= target)
    assert restore_checkpoint(*saved["step-000090"])[0].quick_crossing == state.quick_crossing


def test_the_ema_leaves_frozen_tensors_bit_identical():
    cfg = TrainConfig.from_profile("cpu", **{**TINY, "max_steps": 30}, ema_decay=0.99)
    source = new_state(TrainConfig.from_profile("cpu", **{**TINY, "seed": 9})).model
    shared = {k: getattr(source, k).detach().clone() for k in ("W_E", "W_U_tok", "W_U_depth", "W_U_valid")}
    state = train(new_state(cfg, shared), cfg, progress=False)
    assert all(torch.equal(getattr(state.ema.module, k), v) for k, v in shared.items())
    assert not torch.equal(state.ema.module.blocks[0].mlp.W_in, state.model.blocks[0].mlp.W_in)


def test_the_paper_profile_has_no_ema_and_padded_batches():
    cfg = TrainConfig.from_profile("paper")
    assert cfg.ema_decay == 0 and not cfg.bucketed and new_state(cfg).ema is None


def test_the_paper_profile_trains_in_bf16_and_old_recipes_in_fp32():
    assert TrainConfig.from_profile("paper").precision == "bf16"
    # A recipe saved before the field existed trained in fp32 on the CPU, the only device any did.
    saved = {k: v for k, v in TrainConfig.from_profile("paper").to_dict().items() if k != "precision"}
    assert TrainConfig.from_dict(saved).precision == "fp32"
    with pytest.raises(ParameterError, match="precision must be one of fp32, bf16"):
        TrainConfig.from_profile("cpu", precision="fp16")


def test_a_bf16_step_follows_the_fp32_step():
    """The bf16 step (autocast, attention and loss in fp32) against the fp32 step it stands in for:
    the same loss to bf16's precision, gradients pointing the same way, and fp32 master weights."""
    model = DyckTransformer(seed=0)
    trained = TrainConfig.from_profile("cpu", **{**TINY, "max_steps": 100, "eval_every": 100})
    model.load_state_dict(train(new_state(trained), trained, progress=False).model.state_dict())
    batch = dyck.generate("train", 64, seed=5)
    loss32, grads32 = padded_loss_and_grads(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, grads16 = padded_loss_and_grads(model, batch)
    assert loss16 == pytest.approx(loss32, rel=1e-3) and loss16 != loss32
    for name, g in grads32.items():
        assert grads16[name].dtype == torch.float32
        assert F.cosine_similarity(grads16[name].flatten(), g.flatten(), dim=0) > 0.999, name

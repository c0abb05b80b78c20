import pytest
import torch

from polyrot.core.device import resolve_device
from polyrot.errors import ParameterError
from polyrot.toy.recipe import PAPER, TrainConfig
from polyrot.toy.train import (
    EvalSets,
    checkpoint_payload,
    evaluate,
    learning_rate,
    new_state,
    restore_checkpoint,
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
    assert PAPER["p_corrupt"] == 0.0


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


def test_resume_from_a_checkpoint_reaches_identical_weights():
    cfg = TrainConfig.from_profile("cpu", **TINY)
    saved = {}
    full = train(new_state(cfg), cfg, progress=False,
                 on_checkpoint=lambda st, tag: saved.setdefault(tag, checkpoint_payload(st, cfg)))
    resumed, resumed_cfg = restore_checkpoint(*saved["step-000030"])
    assert resumed.step == 30 and resumed_cfg == cfg
    train(resumed, resumed_cfg, progress=False)
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


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

"""Bar B against closed forms (a spec-exact oracle, uniform logits), its averaging, model-vs-model KL, the decoy."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from polyrot.core.rotation import haar_rotation
from polyrot.errors import ParameterError
from polyrot.stages.train_seed import load_seed
from polyrot.toy import behavioural
from polyrot.toy.dyck import label_tokens, make_batch
from polyrot.toy.model import DyckTransformer, fold_rmsnorm, rotate_residual
from polyrot.toy.task import BatchSpec

torch.set_num_threads(1)

EPS = behavioural.EPS
SIZES = {"tok": 40, "depth": 9, "valid": 2}


def spec_entropy_term(K: int) -> float:
    return (1 - EPS) * math.log(1 - EPS) + EPS * math.log(EPS / (K - 1))


class Oracle(torch.nn.Module):
    """A 'model' whose logits are the true labels' one-hot times `scale` (0: uniform logits)."""

    def __init__(self, scale: float | None):
        super().__init__()
        self.scale = scale

    def forward(self, tokens):
        batch = label_tokens(tokens)
        out = {}
        for head, K in SIZES.items():
            # The scale at which softmax(scale * one-hot) is exactly the spec: 1 - eps on the label.
            scale = math.log((1 - EPS) * (K - 1) / EPS) if self.scale is None else self.scale
            out[head] = scale * torch.nn.functional.one_hot(getattr(batch, head), K).float()
        return out


def test_kl_to_spec_matches_scipy_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    for K in (2, 9, 40):
        logits = 3 * torch.randn(50, K, generator=gen)
        labels = torch.randint(0, K, (50,), generator=gen)
        spec = np.full((50, K), EPS / (K - 1))
        spec[np.arange(50), labels.numpy()] = 1 - EPS
        expected = scipy.stats.entropy(spec, torch.softmax(logits.double(), -1).numpy(), axis=1)
        assert np.allclose(behavioural.kl_to_spec(logits, labels).numpy(), expected, rtol=1e-9, atol=1e-12)


def test_a_spec_exact_oracle_scores_zero():
    result = behavioural.bar_b(Oracle(None), 300, batch_sequences=100)
    assert abs(result.mean) < 1e-12 and all(abs(v) < 1e-12 for v in result.per_head.values())


def test_uniform_logits_score_the_closed_form_per_head_and_split():
    result = behavioural.bar_b(Oracle(0.0), 600, batch_sequences=100, seed=3)
    closed = {h: spec_entropy_term(K) + math.log(K) for h, K in SIZES.items()}
    for head, value in closed.items():
        assert result.per_head[head] == pytest.approx(value, rel=1e-10)
    overall = sum(closed.values()) / 3
    assert result.mean == pytest.approx(overall, rel=1e-10)
    # Every position costs the same, so every split and the batch-to-batch spread agree with it.
    assert all(v == pytest.approx(overall, rel=1e-10) for v in result.per_split.values())
    assert result.relative_error < 1e-10
    assert result.batches == 6 and result.samples == 600


def test_overall_is_the_mean_of_head_means_and_the_weighted_mean_of_splits(seed_run):
    model = load_seed(seed_run)
    result = behavioural.bar_b(model, 1500, batch_sequences=256)
    assert result.batches == 6
    assert result.mean == pytest.approx(sum(result.per_head.values()) / 3, rel=1e-12)
    assert min(result.per_split.values()) <= result.mean <= max(result.per_split.values())
    assert 0 < result.relative_error < 1
    table = result.table()
    assert list(table["scope"]) == ["overall"] + ["head"] * 3 + ["split"] * len(result.per_split)


def test_length_chunks_give_the_padded_batches_bar_b(seed_run):
    """The fast path (length-sorted, trimmed chunks of 32 rows) against one padded pass per batch."""
    model = load_seed(seed_run)
    fast = behavioural.bar_b(model, 768, batch_sequences=256, chunk=32)
    slow = behavioural.bar_b(model, 768, batch_sequences=256, chunk=256)
    assert fast.positions == slow.positions and fast.mean > 0
    assert fast.mean == pytest.approx(slow.mean, rel=1e-5)
    for head in fast.per_head:
        assert fast.per_head[head] == pytest.approx(slow.per_head[head], rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("samples", [0, -5])
def test_non_positive_samples_are_refused(samples):
    with pytest.raises(ParameterError, match="positive number of samples"):
        behavioural.bar_b(Oracle(0.0), samples)


def test_model_kl_is_zero_on_itself_and_on_an_exactly_rotated_copy(seed_run):
    folded = fold_rmsnorm(load_seed(seed_run))
    batch = make_batch(BatchSpec("kl", seed=1, n_sequences=64))
    assert behavioural.model_kl(folded, folded, batch) == (0.0, {"tok": 0.0, "depth": 0.0, "valid": 0.0})
    mean, _ = behavioural.model_kl(folded, rotate_residual(folded, haar_rotation(64, seed=2)), batch)
    assert 0 <= mean < 1e-10
    other, per_head = behavioural.model_kl(folded, DyckTransformer(seed=9), batch)
    assert other > 1e-3 and other == pytest.approx(sum(per_head.values()) / 3)


def test_the_decoy_averages_depth_rows_in_pairs_and_changes_only_the_depth_head(seed_run):
    # A seed trained within a test's budget has not learnt depth yet, so "the decoy scores far worse"
    # is measured on the real seeds (the bars stage's decoy.* metrics); here: what the decoy changes.
    model = load_seed(seed_run)
    decoy = behavioural.decoy(model)
    W, D = model.W_U_depth.detach(), decoy.W_U_depth.detach()
    for row in range(0, 8, 2):
        assert torch.allclose(D[row], (W[row] + W[row + 1]) / 2) and torch.equal(D[row], D[row + 1])
    assert torch.equal(D[8], W[8])  # the ninth class has no partner
    assert torch.equal(decoy.W_U_tok, model.W_U_tok) and torch.equal(model.W_U_depth, W)
    _, per_head = behavioural.model_kl(model, decoy, make_batch(BatchSpec("kl", seed=1, n_sequences=64)))
    assert per_head["tok"] == 0.0 and per_head["valid"] == 0.0 and per_head["depth"] > 1e-4
    real, fake = behavioural.bar_b(model, 256), behavioural.bar_b(decoy, 256)
    assert fake.per_head["tok"] == real.per_head["tok"] and fake.per_head["depth"] != real.per_head["depth"]

"""Bar P: the symmetry group of the folded Dyck transformer, and the search that aligns one model's
weights to another's under it.

The group (each element leaves the model's function unchanged):
  - head permutation within a layer (W_Q, W_K, W_V, W_O of a head move together);
  - per-head rotation of the Q-K pair, W_Q[h], W_K[h] -> R W_Q[h], R W_K[h] (cancels in q.k), and of
    the V-O pair, W_V[h] -> R W_V[h], W_O[h] -> W_O[h] Rᵀ;
  - MLP neuron permutation (W_in rows and W_out columns together);
  - per-neuron positive scaling, W_in row × a, W_out column ÷ a (ReLU(a z) = a ReLU(z) for a > 0);
  - residual-basis rotation Q ∈ O(d_model): `polyrot.toy.model.rotate_residual`, folded norms only.

During the search a model is a dict of float64 tensors, its whole state dict: the parameters, the
folded gains (all 1, so they never differ) and the W_pos buffer. W_pos is fixed and identical
across seeds, but a residual rotation turns it like W_E (the aligned model needs W_pos Q to compute
the same function), so it sits in the residual Procrustes stack, where it anchors the basis, and in
the per-tensor MSE, where a rotation cannot hide error in it. That is also the paper's treatment.

The search (`align`) is the paper's: multi-start coordinate descent (residual Procrustes, head
matching, per-head Procrustes, neuron matching and scaling), then a Cayley refinement of the
residual rotation alone. One change by default: heads are matched on their distance after the
best per-head rotation ("procrustes"), not as they stand ("frobenius", the paper's cost), which
cannot undo heads that are both permuted and rotated; see _match_heads.

Row-vector convention as in rotate_residual: under Q the residual stream becomes x Q, tensors that
read the stream (W_E, W_pos, W_Q/K/V, W_in, unembeddings) become W Q, tensors that write it (W_O,
W_out) become Qᵀ W.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.optimize
import scipy.stats
import torch
from tqdm.auto import tqdm, trange

from polyrot.errors import ParameterError
from polyrot.toy.model import (
    DyckTransformer,
    ModelConfig,
    fold_rmsnorm,
    rotate_residual,
)
from polyrot.toy.task import PAD

Weights = dict[str, torch.Tensor]

# The fields that fix every weight shape: two models that differ in any of them cannot be aligned.
ARCHITECTURE = ("vocab_size", "d_model", "n_layers", "n_heads", "d_head", "d_mlp", "n_ctx", "n_depth", "n_valid")
SCALE_CLAMP = (1e-4, 1e4)
HEAD_COSTS = ("procrustes", "frobenius")
CAYLEY_EVAL_EVERY = 20
# Far above float32 rounding of a true rotation, far below anything that would change the logits visibly.
ORTHOGONALITY_TOLERANCE = 1e-4


def activation_sites(cfg: ModelConfig) -> list[str]:
    """The joint loss's sites: every layer's resid_post and the final resid_pre (the paper's
    resid_post_0, resid_post_1, resid_pre_2; the last two are one tensor, so it counts twice, as
    in the paper)."""
    return [f"resid_post_{layer}" for layer in range(cfg.n_layers)] + [f"resid_pre_{cfg.n_layers}"]


# ---------------------------------------------------------------- the group, on weight dicts

def _weights(model: DyckTransformer) -> Weights:
    return {k: v.detach().to(torch.float64).clone() for k, v in model.state_dict().items()}


def _model(cfg: ModelConfig, W: Weights) -> DyckTransformer:
    model = DyckTransformer(cfg)
    model.load_state_dict({k: v.detach().to(torch.float32) for k, v in W.items()})
    return model


def _attn(layer: int, name: str) -> str:
    return f"blocks.{layer}.attn.{name}"


def _mlp(layer: int, name: str) -> str:
    return f"blocks.{layer}.mlp.{name}"


def _permute_heads(W: Weights, layer: int, perm: torch.Tensor) -> Weights:
    """Head slot i of the result holds head perm[i] of W."""
    return W | {_attn(layer, n): W[_attn(layer, n)][perm] for n in ("W_Q", "W_K", "W_V", "W_O")}


def _rotate_qk(W: Weights, layer: int, R: torch.Tensor) -> Weights:
    return W | {_attn(layer, n): R @ W[_attn(layer, n)] for n in ("W_Q", "W_K")}


def _rotate_vo(W: Weights, layer: int, R: torch.Tensor) -> Weights:
    return W | {_attn(layer, "W_V"): R @ W[_attn(layer, "W_V")],
                _attn(layer, "W_O"): W[_attn(layer, "W_O")] @ R.transpose(1, 2)}


def _permute_neurons(W: Weights, layer: int, perm: torch.Tensor) -> Weights:
    return W | {_mlp(layer, "W_in"): W[_mlp(layer, "W_in")][perm], _mlp(layer, "W_out"): W[_mlp(layer, "W_out")][:, perm]}


def _scale_neurons(W: Weights, layer: int, scales: torch.Tensor) -> Weights:
    return W | {_mlp(layer, "W_in"): W[_mlp(layer, "W_in")] * scales[:, None],
                _mlp(layer, "W_out"): W[_mlp(layer, "W_out")] / scales[None, :]}


def _writes_residual(name: str) -> bool:
    return name.endswith(("attn.W_O", "mlp.W_out"))


def _is_gain(name: str) -> bool:
    return name.endswith(".w")


def _turn(W: Weights, Q: torch.Tensor) -> Weights:
    """The residual rotation on a weight dict; differentiable in Q (the Cayley step needs that)."""
    return {k: v if _is_gain(k) else (Q.T @ v if _writes_residual(k) else v @ Q) for k, v in W.items()}


def _rows(W: Weights) -> Weights:
    """Every residual-touching tensor as rows in the residual basis, so that a residual rotation
    turns each into rows @ Q. The reshape keeps each tensor's elements, hence its MSE."""
    rows = {}
    for name, t in W.items():
        if _is_gain(name):
            continue
        if name.endswith("attn.W_O"):
            rows[name] = t.transpose(1, 2).reshape(-1, t.shape[1])
        elif name.endswith("mlp.W_out"):
            rows[name] = t.T
        else:
            rows[name] = t.reshape(-1, t.shape[-1])
    return rows


# ---------------------------------------------------------------- public group actions

def _check_layer(model: DyckTransformer, layer: int) -> None:
    if not 0 <= layer < model.cfg.n_layers:
        raise ParameterError(f"layer must lie in 0..{model.cfg.n_layers - 1}, got {layer}")


def _check_perm(perm, n: int, what: str) -> torch.Tensor:
    perm = torch.as_tensor(perm, dtype=torch.long)
    if perm.shape != (n,) or not torch.equal(perm.sort().values, torch.arange(n)):
        raise ParameterError(f"{what} permutation must hold each of 0..{n - 1} once, got {perm.tolist()}")
    return perm


def _check_rotations(rotations, model: DyckTransformer) -> torch.Tensor:
    H, dh = model.cfg.n_heads, model.cfg.d_head
    R = torch.as_tensor(rotations, dtype=torch.float64)
    if R.shape != (H, dh, dh):
        raise ParameterError(f"head rotations must have shape ({H}, {dh}, {dh}), got {tuple(R.shape)}")
    gap = float((R @ R.transpose(1, 2) - torch.eye(dh, dtype=torch.float64)).abs().max())
    if gap > ORTHOGONALITY_TOLERANCE:
        raise ParameterError(f"head rotations must be orthogonal; |R Rᵀ - I| reaches {gap:.3g}")
    return R


def permute_heads(model: DyckTransformer, layer: int, perm: Sequence[int]) -> DyckTransformer:
    """A copy of `model` whose head slot i in `layer` holds the model's head perm[i]."""
    _check_layer(model, layer)
    perm = _check_perm(perm, model.cfg.n_heads, "head")
    return _model(model.cfg, _permute_heads(_weights(model), layer, perm))


def rotate_heads_qk(model: DyckTransformer, layer: int, rotations) -> DyckTransformer:
    """A copy with W_Q[h], W_K[h] -> R_h W_Q[h], R_h W_K[h] for every head h (rotations [H, dh, dh])."""
    _check_layer(model, layer)
    return _model(model.cfg, _rotate_qk(_weights(model), layer, _check_rotations(rotations, model)))


def rotate_heads_vo(model: DyckTransformer, layer: int, rotations) -> DyckTransformer:
    """A copy with W_V[h] -> R_h W_V[h] and W_O[h] -> W_O[h] R_hᵀ for every head h."""
    _check_layer(model, layer)
    return _model(model.cfg, _rotate_vo(_weights(model), layer, _check_rotations(rotations, model)))


def permute_neurons(model: DyckTransformer, layer: int, perm: Sequence[int]) -> DyckTransformer:
    """A copy whose MLP neuron i in `layer` is the model's neuron perm[i]."""
    _check_layer(model, layer)
    perm = _check_perm(perm, model.cfg.d_mlp, "neuron")
    return _model(model.cfg, _permute_neurons(_weights(model), layer, perm))


def scale_neurons(model: DyckTransformer, layer: int, scales) -> DyckTransformer:
    """A copy with W_in row i × scales[i] and W_out column i ÷ scales[i]; scales must be positive."""
    _check_layer(model, layer)
    scales = torch.as_tensor(scales, dtype=torch.float64)
    if scales.shape != (model.cfg.d_mlp,) or not bool((scales > 0).all()) or not bool(scales.isfinite().all()):
        raise ParameterError(f"neuron scales must be {model.cfg.d_mlp} finite positive numbers")
    return _model(model.cfg, _scale_neurons(_weights(model), layer, scales))


def random_symmetry(model: DyckTransformer, seed: int = 0, scale_range: tuple[float, float] = (0.5, 2.0)) -> DyckTransformer:
    """The folded model behind a random group element: random head permutations and Haar per-head
    Q-K and V-O rotations in every layer, a random neuron permutation with log-uniform positive
    scales, and a Haar residual rotation. It computes the same function as `model`."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    W = _weights(fold_rmsnorm(model))

    def haar(d: int, n: int) -> torch.Tensor:
        return torch.as_tensor(scipy.stats.ortho_group.rvs(d, size=n, random_state=rng)).reshape(n, d, d)

    for layer in range(cfg.n_layers):
        W = _permute_heads(W, layer, torch.as_tensor(rng.permutation(cfg.n_heads)))
        W = _rotate_qk(W, layer, haar(cfg.d_head, cfg.n_heads))
        W = _rotate_vo(W, layer, haar(cfg.d_head, cfg.n_heads))
        W = _permute_neurons(W, layer, torch.as_tensor(rng.permutation(cfg.d_mlp)))
        lo, hi = np.log(scale_range)
        W = _scale_neurons(W, layer, torch.as_tensor(np.exp(rng.uniform(lo, hi, cfg.d_mlp))))
    return rotate_residual(_model(cfg, W), haar(cfg.d_model, 1)[0])


# ---------------------------------------------------------------- scores

def _per_tensor(W: Weights, ref: Weights) -> dict[str, float]:
    return {k: float(((W[k] - ref[k]) ** 2).mean()) for k in ref}


def _score(W: Weights, ref: Weights) -> tuple[float, float]:
    """(max per-tensor MSE, element-weighted global MSE): the order every 'best' below uses."""
    sq = {k: float(((W[k] - ref[k]) ** 2).sum()) for k in ref}
    n = {k: ref[k].numel() for k in ref}
    return max(sq[k] / n[k] for k in ref), sum(sq.values()) / sum(n.values())


def _check_pair(model: DyckTransformer, reference: DyckTransformer) -> None:
    diffs = [f"{f} {getattr(model.cfg, f)} vs {getattr(reference.cfg, f)}"
             for f in ARCHITECTURE if getattr(model.cfg, f) != getattr(reference.cfg, f)]
    if diffs:
        raise ParameterError(f"cannot align models of different architecture: {', '.join(diffs)}")


def per_tensor_mse(model: DyckTransformer, reference: DyckTransformer) -> dict[str, float]:
    """mean((model - reference)²) per state-dict tensor of the two models as they stand (no
    folding, no alignment); Bar P of the pair is the max of these."""
    _check_pair(model, reference)
    return _per_tensor(_weights(model), _weights(reference))


# ---------------------------------------------------------------- coordinate descent

def _head_pairs(W: Weights, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's Q-K and V-O pairs as [H, d_head, 2 d_model] stacks (W_Q|W_K and W_V|W_Oᵀ): a
    per-head rotation R acts on both as R @ stack."""
    return (torch.cat([W[_attn(layer, "W_Q")], W[_attn(layer, "W_K")]], dim=2),
            torch.cat([W[_attn(layer, "W_V")], W[_attn(layer, "W_O")].transpose(1, 2)], dim=2))


def _match_heads(W: Weights, ref: Weights, layer: int, head_cost: str) -> torch.Tensor:
    """Hungarian on the summed squared Frobenius distance over Q, K, V and O of each head pair.

    "frobenius" is the paper's cost on the heads as they stand. "procrustes" takes each candidate
    pair's distance after its best Q-K and V-O rotations, ‖S‖² + ‖T‖² - 2‖T Sᵀ‖_* per stack: the
    same cost, evaluated after the step that follows it. Raw distances between heads that differ
    by a per-head rotation carry no signal, so the paper's cost locks in a wrong pairing whenever
    heads are both permuted and rotated (the ground-truth test); the invariant cost does not.
    """
    if head_cost == "frobenius":
        def flat(w):
            return torch.cat([w[_attn(layer, n)].flatten(1) for n in ("W_Q", "W_K", "W_V", "W_O")], dim=1)

        cost = torch.cdist(flat(ref), flat(W)) ** 2  # [reference slot, candidate head]
    else:
        cost = 0
        for S, T in zip(_head_pairs(W, layer), _head_pairs(ref, layer)):
            nuclear = torch.linalg.matrix_norm(T[:, None] @ S[None].transpose(2, 3), ord="nuc")
            cost = cost + (T ** 2).sum((1, 2))[:, None] + (S ** 2).sum((1, 2))[None] - 2 * nuclear
    return torch.as_tensor(scipy.optimize.linear_sum_assignment(cost.numpy())[1])


def _head_rotations(W: Weights, ref: Weights, layer: int, pair: int) -> torch.Tensor:
    """Per-head Procrustes in d_head space: R_h = argmin ‖R S_h - T_h‖ over O(d_head) for the
    Q-K (pair 0) or V-O (pair 1) stacks."""
    S, T = _head_pairs(W, layer)[pair], _head_pairs(ref, layer)[pair]
    # orthogonal_procrustes solves ‖A X - B‖ with A = S_hᵀ, B = T_hᵀ; the left-acting R_h is Xᵀ.
    return torch.stack([torch.as_tensor(scipy.linalg.orthogonal_procrustes(s.T.numpy(), t.T.numpy())[0]).T
                        for s, t in zip(S, T)])


def _neuron_signatures(W: Weights, layer: int) -> torch.Tensor:
    sig = torch.cat([W[_mlp(layer, "W_in")], W[_mlp(layer, "W_out")].T], dim=1)
    return sig / sig.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _match_neurons(W: Weights, ref: Weights, layer: int) -> torch.Tensor:
    """Hungarian on 1 - cosine of the [W_in row | W_out column] signatures (cosine: blind to the
    positive scaling, which is fitted next)."""
    cost = 1 - _neuron_signatures(ref, layer) @ _neuron_signatures(W, layer).T
    return torch.as_tensor(scipy.optimize.linear_sum_assignment(cost.numpy())[1])


def _neuron_scales(W: Weights, ref: Weights, layer: int) -> torch.Tensor:
    """a = sqrt(‖w_in,ref‖ ‖w_out‖ / (‖w_in‖ ‖w_out,ref‖)): the paper's closed form, exact when the
    neuron is a rescaled copy of the reference's; clamped so a dead neuron cannot blow up."""
    n_in, n_out = W[_mlp(layer, "W_in")].norm(dim=1), W[_mlp(layer, "W_out")].norm(dim=0)
    r_in, r_out = ref[_mlp(layer, "W_in")].norm(dim=1), ref[_mlp(layer, "W_out")].norm(dim=0)
    ratio = (r_in * n_out).clamp_min(1e-12) / (n_in * r_out).clamp_min(1e-12)
    return ratio.sqrt().clamp(*SCALE_CLAMP)


def _residual_rotation(W: Weights, ref: Weights) -> torch.Tensor:
    """Q = argmin ‖M Q - M_ref‖ over O(d_model), M stacking every residual-touching tensor's rows."""
    rows, ref_rows = _rows(W), _rows(ref)
    M, M_ref = torch.cat(list(rows.values())), torch.cat([ref_rows[k] for k in rows])
    return torch.as_tensor(scipy.linalg.orthogonal_procrustes(M.numpy(), M_ref.numpy())[0])


@dataclass(eq=False)
class _Descent:
    """One coordinate-descent state: the aligned weights and the group element that made them."""

    W: Weights
    rotation: torch.Tensor  # accumulated residual rotation Q
    heads: list[torch.Tensor]  # per layer: which original head each slot holds
    neurons: list[torch.Tensor]  # per layer: which original neuron each slot holds
    score: tuple[float, float]


def _descend(W: Weights, ref: Weights, cfg: ModelConfig, start: list[torch.Tensor], outer_iters: int,
             residual_step: bool, head_cost: str) -> _Descent:
    """The paper's coordinate descent from one start; steps are not monotone in the score (a
    residual rotation that helps one tensor may hurt another), so the best state seen is kept."""
    for layer, perm in enumerate(start):
        W = _permute_heads(W, layer, perm)
    state = _Descent(W, torch.eye(cfg.d_model, dtype=torch.float64), list(start),
                     [torch.arange(cfg.d_mlp)] * cfg.n_layers, _score(W, ref))
    best = _Descent(W, state.rotation, list(state.heads), list(state.neurons), state.score)

    def keep(W: Weights) -> None:
        nonlocal best
        state.W, state.score = W, _score(W, ref)
        if state.score < best.score:
            best = _Descent(W, state.rotation, list(state.heads), list(state.neurons), state.score)

    for _ in range(outer_iters):
        if residual_step:
            Q = _residual_rotation(state.W, ref)
            state.rotation = state.rotation @ Q
            keep(_turn(state.W, Q))
        for layer in range(cfg.n_layers):
            perm = _match_heads(state.W, ref, layer, head_cost)
            state.heads[layer] = state.heads[layer][perm]
            keep(_permute_heads(state.W, layer, perm))
            W = _rotate_qk(state.W, layer, _head_rotations(state.W, ref, layer, 0))
            keep(_rotate_vo(W, layer, _head_rotations(W, ref, layer, 1)))
            perm = _match_neurons(state.W, ref, layer)
            state.neurons[layer] = state.neurons[layer][perm]
            W = _permute_neurons(state.W, layer, perm)
            keep(_scale_neurons(W, layer, _neuron_scales(W, ref, layer)))
    return best


@dataclass(eq=False)
class _Baseline:
    cfg: ModelConfig
    ref: Weights
    best: _Descent
    start: int
    residual_step: bool
    configurations: pd.DataFrame


def _check_options(starts: int, outer_iters: int, cayley_iters: int, cayley_lr: float, head_cost: str) -> None:
    if starts <= 0:
        raise ParameterError(f"starts must be positive, got {starts}")
    if outer_iters < 0:
        raise ParameterError(f"outer_iters must be >= 0, got {outer_iters}")
    if cayley_iters < 0:
        raise ParameterError(f"cayley_iters must be >= 0, got {cayley_iters}")
    if not cayley_lr > 0:
        raise ParameterError(f"cayley_lr must be positive, got {cayley_lr}")
    if head_cost not in HEAD_COSTS:
        raise ParameterError(f"head_cost must be one of {', '.join(HEAD_COSTS)}, got {head_cost!r}")


def _baseline(model: DyckTransformer, reference: DyckTransformer, starts: int, outer_iters: int, seed: int,
              head_cost: str, progress: bool) -> _Baseline:
    """Multi-start search: `starts` head-permutation starts per layer (the identity, then random
    ones from `seed`) × {with, without} the residual-rotation step; best by (max, global) MSE."""
    cfg = model.cfg
    W, ref = _weights(fold_rmsnorm(model)), _weights(fold_rmsnorm(reference))
    gen = torch.Generator().manual_seed(seed)
    start_perms = [[torch.arange(cfg.n_heads)] * cfg.n_layers]
    start_perms += [[torch.randperm(cfg.n_heads, generator=gen) for _ in range(cfg.n_layers)] for _ in range(starts - 1)]
    rows, best, winner = [], None, None
    with tqdm(total=2 * starts, desc="alignment starts", disable=not progress) as bar:
        for residual_step in (True, False):
            for index, start in enumerate(start_perms):
                found = _descend(W, ref, cfg, start, outer_iters, residual_step, head_cost)
                rows.append({"start": index, "residual_step": residual_step,
                             "max_mse": found.score[0], "global_mse": found.score[1]})
                if best is None or found.score < best.score:
                    best, winner = found, (index, residual_step)
                bar.update()
    return _Baseline(cfg, ref, best, winner[0], winner[1], pd.DataFrame(rows))


# ---------------------------------------------------------------- Cayley refinement

def cayley(A: torch.Tensor) -> torch.Tensor:
    """R = (I - S)(I + S)⁻¹ with S the skew part of A: orthogonal (det +1) for every A, the
    identity at A = 0. Owned rather than torch.nn.utils.parametrizations.orthogonal because that
    wraps a module weight and starts from it, while the paper optimises a bare A from 0 with Adam."""
    S = (A - A.T) / 2
    I = torch.eye(A.shape[0], dtype=A.dtype)
    return torch.linalg.solve(I + S, I - S)  # (I + S)⁻¹ commutes with (I - S)


def _residuals(model: DyckTransformer, tokens: torch.Tensor, sites: list[str]) -> list[torch.Tensor]:
    """Non-PAD rows of each site, float64 [n_rows, d_model]."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, sites)
    mask = tokens != PAD
    return [cache[s][mask].to(torch.float64) for s in sites]


class _RotatedMSE:
    """mean((X R - Y)²) as a function of R from d × d summaries alone:
    ‖X R - Y‖² = Σ (XᵀX R) ⊙ R - 2 Σ (XᵀY) ⊙ R + ‖Y‖². A Cayley step then costs no pass over the
    tens of thousands of activation rows."""

    def __init__(self, X: torch.Tensor, Y: torch.Tensor):
        self.XX, self.XY, self.YY, self.n = X.T @ X, X.T @ Y, float((Y ** 2).sum()), Y.numel()

    def __call__(self, R: torch.Tensor) -> torch.Tensor:
        return (((self.XX @ R) * R).sum() - 2 * (self.XY * R).sum() + self.YY) / self.n


def _check_tokens(tokens: torch.Tensor, cfg: ModelConfig) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype.is_floating_point:
        raise ParameterError("tokens must be an integer tensor [batch, positions]")
    if not 1 <= tokens.shape[1] <= cfg.n_ctx:
        raise ParameterError(f"tokens must have 1..{cfg.n_ctx} positions, got {tokens.shape[1]}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size:
        raise ParameterError(f"token ids must lie in 0..{cfg.vocab_size - 1}")
    if not bool((tokens != PAD).any()):
        raise ParameterError("tokens hold no non-PAD position to measure activations on")


@dataclass(eq=False)
class _Refined:
    R: torch.Tensor
    step: int
    max_mse: float
    weight_mse: float
    activation_mse: float | None


def _refine(base: _Baseline, acts: list[_RotatedMSE] | None, *, iters: int, lr: float, lam: float,
            progress: bool) -> tuple[_Refined, _Refined]:
    """Residual rotation only (perms and head rotations frozen): R = cayley(A), A from 0, plain Adam
    on (1 - λ) weight MSE + λ activation MSE. Returns (best, last). best: R = I (the baseline) and
    every 20th step compete by (max MSE, weight MSE), so it is never worse than the baseline (the
    paper's code leaves R = I out of that race). last: where the λ-loss itself led, after the
    final step; only it shows the weight/activation trade-off, since the race ignores λ."""
    rows, ref_rows = _rows(base.best.W), _rows(base.ref)
    names = list(rows)
    M, M_ref = torch.cat([rows[k] for k in names]), torch.cat([ref_rows[k] for k in names])
    sizes = [rows[k].shape[0] for k in names]
    numel = {k: t.numel() for k, t in base.ref.items()}
    # Tensors outside the stack (the gains) are untouched by R: their error is a constant.
    fixed = sum(float(((base.best.W[k] - base.ref[k]) ** 2).sum()) for k in base.ref if k not in rows)
    total = sum(numel.values())

    def weight_mse(R: torch.Tensor) -> torch.Tensor:
        return (((M @ R - M_ref) ** 2).sum() + fixed) / total

    def activation_mse(R: torch.Tensor) -> torch.Tensor:
        return sum(site(R) for site in acts) / len(acts)

    def evaluate(R: torch.Tensor, step: int) -> _Refined:
        with torch.no_grad():
            sq = [float(s.sum()) for s in torch.split((M @ R - M_ref) ** 2, sizes)]
            per = [s / numel[k] for s, k in zip(sq, names)]
            per += [float(((base.best.W[k] - base.ref[k]) ** 2).mean()) for k in base.ref if k not in rows]
            act = float(activation_mse(R)) if acts is not None else None
            return _Refined(R.detach().clone(), step, max(per), float(weight_mse(R)), act)

    A = torch.zeros(base.cfg.d_model, base.cfg.d_model, dtype=torch.float64, requires_grad=True)
    best = last = evaluate(torch.eye(base.cfg.d_model, dtype=torch.float64), 0)
    optimiser = torch.optim.Adam([A], lr=lr)
    for step in trange(1, iters + 1, desc=f"Cayley λ={lam:g}", disable=not progress):
        R = cayley(A)
        loss = weight_mse(R) * (1 - lam) + (activation_mse(R) * lam if lam else 0)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % CAYLEY_EVAL_EVERY == 0 or step == iters:
            last = evaluate(cayley(A.detach()), step)
            if (last.max_mse, last.weight_mse) < (best.max_mse, best.weight_mse):
                best = last
    return best, last


def _activation_losses(base: _Baseline, tokens: torch.Tensor) -> list[_RotatedMSE]:
    """Per activation site, the MSE between the baseline-aligned model's activations turned by R
    and the reference's, on the non-PAD positions of `tokens`."""
    sites = activation_sites(base.cfg)
    ours = _residuals(_model(base.cfg, base.best.W), tokens, sites)
    theirs = _residuals(_model(base.cfg, base.ref), tokens, sites)
    return [_RotatedMSE(x, y) for x, y in zip(ours, theirs)]


# ---------------------------------------------------------------- public search

@dataclass(eq=False)
class Alignment:
    """The result of `align`.

    model: the aligned, folded model (same function as the input model).
    max_mse: Bar P, max over state-dict tensors of mean((aligned - reference)²), reference folded,
    measured on the float32 model returned (the search runs in float64).
    global_mse: element-weighted mean of the squared error over all tensors.
    per_tensor: tensor name -> MSE. baseline_*: the best coordinate-descent state, before Cayley.
    start / residual_step: the winning configuration (start 0 is the identity head permutation;
    residual_step says whether its descent ran the residual Procrustes step).
    rotation: float64 [d_model, d_model]; the aligned model's residual stream is the input model's
    times `rotation` (row vectors). head_perms / neuron_perms: per layer, the input model's head
    (neuron) each slot of the aligned model holds.
    cayley_step: the Cayley iteration whose R was kept (0: the baseline's own, R = I).
    activation_mse: at the activation sites on `tokens` (None without tokens).
    configurations: one row per start configuration (start, residual_step, max_mse, global_mse).
    head_cost: the head-matching cost the search used.
    """

    model: DyckTransformer
    max_mse: float
    global_mse: float
    per_tensor: dict[str, float]
    baseline_max_mse: float
    baseline_global_mse: float
    start: int
    residual_step: bool
    rotation: torch.Tensor
    head_perms: list[list[int]]
    neuron_perms: list[list[int]]
    cayley_step: int
    lam: float
    activation_mse: float | None
    configurations: pd.DataFrame
    head_cost: str


def align(
    model: DyckTransformer,
    reference: DyckTransformer,
    *,
    starts: int = 16,
    outer_iters: int = 6,
    cayley_iters: int = 400,
    cayley_lr: float = 5e-2,
    lam: float = 0.0,
    tokens: torch.Tensor | None = None,
    seed: int = 0,
    head_cost: str = "procrustes",
    progress: bool = False,
) -> Alignment:
    """Align `model` to `reference` under the symmetry group (both folded first, inputs untouched):
    the paper's multi-start coordinate descent, then the Cayley refinement of the residual rotation.
    `tokens` feed the activation term and are required when lam != 0. head_cost "frobenius" is
    the paper's literal head-matching cost, "procrustes" the rotation-invariant one (see
    _match_heads)."""
    _check_options(starts, outer_iters, cayley_iters, cayley_lr, head_cost)
    _check_pair(model, reference)
    if lam != 0 and tokens is None:
        raise ParameterError(f"lam = {lam:g} weighs an activation loss: pass tokens to measure it on")
    if tokens is not None:
        _check_tokens(tokens, model.cfg)
    base = _baseline(model, reference, starts, outer_iters, seed, head_cost, progress)
    acts = _activation_losses(base, tokens) if tokens is not None else None
    refined, _ = _refine(base, acts, iters=cayley_iters, lr=cayley_lr, lam=lam, progress=progress)
    aligned = _model(base.cfg, _turn(base.best.W, refined.R))
    per_tensor = per_tensor_mse(aligned, _model(base.cfg, base.ref))
    n = {k: t.numel() for k, t in base.ref.items()}
    return Alignment(
        model=aligned,
        max_mse=max(per_tensor.values()),
        global_mse=sum(per_tensor[k] * n[k] for k in n) / sum(n.values()),
        per_tensor=per_tensor,
        baseline_max_mse=base.best.score[0],
        baseline_global_mse=base.best.score[1],
        start=base.start,
        residual_step=base.residual_step,
        rotation=base.best.rotation @ refined.R,
        head_perms=[p.tolist() for p in base.best.heads],
        neuron_perms=[p.tolist() for p in base.best.neurons],
        cayley_step=refined.step,
        lam=lam,
        activation_mse=refined.activation_mse,
        configurations=base.configurations,
        head_cost=head_cost,
    )


def joint_sweep(
    model: DyckTransformer,
    reference: DyckTransformer,
    tokens: torch.Tensor,
    lambdas: Sequence[float] = (0.0, 0.1, 1.0, 10.0, 100.0),
    *,
    starts: int = 16,
    outer_iters: int = 6,
    cayley_iters: int = 400,
    cayley_lr: float = 5e-2,
    seed: int = 0,
    head_cost: str = "procrustes",
    progress: bool = False,
) -> pd.DataFrame:
    """The joint-loss trade-off: the Cayley refinement from one best baseline for each λ.

    Columns: lambda, weight_mse (global), activation_mse, max_mse (Bar P) and cayley_step of the R
    kept by the (max MSE, weight MSE) race, then final_weight_mse, final_activation_mse and
    final_max_mse of the R the λ-loss reached after its last step (the trade-off curve)."""
    _check_options(starts, outer_iters, cayley_iters, cayley_lr, head_cost)
    _check_pair(model, reference)
    _check_tokens(tokens, model.cfg)
    if not lambdas:
        raise ParameterError("lambdas must name at least one value")
    base = _baseline(model, reference, starts, outer_iters, seed, head_cost, progress)
    acts = _activation_losses(base, tokens)
    rows = []
    for lam in lambdas:
        best, last = _refine(base, acts, iters=cayley_iters, lr=cayley_lr, lam=float(lam), progress=progress)
        rows.append({"lambda": float(lam), "weight_mse": best.weight_mse, "activation_mse": best.activation_mse,
                     "max_mse": best.max_mse, "cayley_step": best.step, "final_weight_mse": last.weight_mse,
                     "final_activation_mse": last.activation_mse, "final_max_mse": last.max_mse})
    return pd.DataFrame(rows)

"""The paper's 104,448-parameter Dyck-3 transformer, its named activation sites, and RMSNorm folding.

Two pre-norm blocks (4 heads of 16 dims, a 256-wide ReLU MLP), no biases anywhere, RMSNorm gains
at ln1 / ln2 / ln_f, untied embedding and three unembeddings (tok, depth, valid), and a fixed
6-dimensional positional buffer added to the token embedding.

Weight layouts follow the paper's code so that folded weights read the same way:
W_Q, W_K, W_V [H, d_head, d_model]; W_O [H, d_model, d_head]; W_in [d_mlp, d_model];
W_out [d_model, d_mlp]; unembeddings [n_classes, d_model].
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from polyrot.errors import UnknownSiteError

HEADS = ("tok", "depth", "valid")
SHARED_IO = ("W_E", "W_U_tok", "W_U_depth", "W_U_valid")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 40
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_head: int = 16
    d_mlp: int = 256
    n_ctx: int = 64
    n_depth: int = 9
    n_valid: int = 2
    eps: float = 1e-5
    init_scale: float = 0.02

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def site_names(cfg: ModelConfig) -> list[str]:
    """Every named activation site, in forward order."""
    names = ["resid_pre_0"]
    for layer in range(cfg.n_layers):
        names += [f"ln1_out_{layer}"]
        names += [f"head_out_{layer}_{h}" for h in range(cfg.n_heads)]
        names += [f"attn_out_{layer}", f"resid_mid_{layer}", f"ln2_out_{layer}",
                  f"mlp_pre_{layer}", f"mlp_post_{layer}", f"mlp_out_{layer}",
                  f"resid_post_{layer}", f"resid_pre_{layer + 1}"]
    names += ["ln_f_out"]
    return names


def residual_sites(cfg: ModelConfig) -> list[str]:
    """The paper's residual sites: resid_pre/mid/post per layer plus the final resid_pre."""
    names = []
    for layer in range(cfg.n_layers):
        names += [f"resid_pre_{layer}", f"resid_mid_{layer}", f"resid_post_{layer}"]
    return names + [f"resid_pre_{cfg.n_layers}"]


# TransformerLens hook-point spellings accepted as aliases of the paper's names.
_TL_ALIASES = {
    "hook_resid_pre": "resid_pre_{l}", "hook_resid_mid": "resid_mid_{l}",
    "hook_resid_post": "resid_post_{l}", "hook_attn_out": "attn_out_{l}",
    "hook_mlp_out": "mlp_out_{l}", "ln1.hook_normalized": "ln1_out_{l}",
    "ln2.hook_normalized": "ln2_out_{l}", "mlp.hook_pre": "mlp_pre_{l}",
    "mlp.hook_post": "mlp_post_{l}",
}


def resolve_site(name: str, cfg: ModelConfig) -> str:
    """Canonical site name for `name` (paper spelling or TransformerLens alias), else a clear error."""
    if name.startswith("blocks."):
        _, layer, hook = name.split(".", 2)
        if hook in _TL_ALIASES and layer.isdigit():
            name = _TL_ALIASES[hook].format(l=layer)
    elif name == "ln_final.hook_normalized":
        name = "ln_f_out"
    valid = site_names(cfg)
    if name not in valid:
        raise UnknownSiteError(f"unknown site {name!r}; valid sites: {', '.join(valid)}")
    return name


def positional_buffer(n_ctx: int, d_model: int) -> torch.Tensor:
    """The paper's fixed positional code: only dims 0–5 are non-zero."""
    t = torch.arange(n_ctx, dtype=torch.float32)
    pos = torch.zeros(n_ctx, d_model)
    pos[:, 0] = t / n_ctx
    pos[:, 1] = 1.0 / (t + 1)
    pos[:, 2] = torch.log(t + 1) / math.log(n_ctx)
    pos[:, 3] = (t == 0).float()
    pos[:, 4] = torch.cos(2 * math.pi * t / n_ctx)
    pos[:, 5] = torch.sin(2 * math.pi * t / n_ctx)
    return pos


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.w, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
        self.W_Q = nn.Parameter(torch.empty(H, dh, d))
        self.W_K = nn.Parameter(torch.empty(H, dh, d))
        self.W_V = nn.Parameter(torch.empty(H, dh, d))
        self.W_O = nn.Parameter(torch.empty(H, d, dh))

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head attention-weighted values z: [B, H, T, d_head]."""
        B, T, d = x.shape
        H, dh = self.W_Q.shape[:2]
        # One matmul for Q, K and V of all heads instead of an einsum per head (the whole training
        # step is 1.2-1.4x faster for it: benchmarks/train_throughput.py).
        qkv = x @ torch.cat([self.W_Q, self.W_K, self.W_V]).reshape(3 * H * dh, d).T
        # Attention itself in the weights' precision under bf16 autocast: on the CPU the bf16
        # kernel's backward is 9x slower than the fp32 one at these shapes (benchmarks/README.md).
        # A no-op without autocast, in fp32 or float64 alike.
        q, k, v = qkv.to(self.W_Q.dtype).view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)
        with torch.autocast(x.device.type, enabled=False):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def output(self, z: torch.Tensor) -> torch.Tensor:
        B, H, T, dh = z.shape
        W_O = self.W_O.permute(1, 0, 2).reshape(self.W_O.shape[1], H * dh)
        return z.transpose(1, 2).reshape(B, T, H * dh) @ W_O.T

    def head_outputs(self, z: torch.Tensor) -> torch.Tensor:
        """Each head's contribution to the residual stream: [B, T, H, d_model]."""
        return torch.einsum("bhte,hde->bthd", z, self.W_O)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.W_out = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg)
        self.ln2 = RMSNorm(cfg.d_model, cfg.eps)
        self.mlp = MLP(cfg)


Patch = Callable[[torch.Tensor], torch.Tensor]


class DyckTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig = ModelConfig(), seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        # A buffer, not a parameter: it is part of the saved state so that an exactly rotated
        # copy of a model (whose positional code is rotated too) round-trips through safetensors.
        self.register_buffer("W_pos", positional_buffer(cfg.n_ctx, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.eps)
        self.W_U_tok = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        self.W_U_depth = nn.Parameter(torch.empty(cfg.n_depth, cfg.d_model))
        self.W_U_valid = nn.Parameter(torch.empty(cfg.n_valid, cfg.d_model))
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith(".w"):
                nn.init.ones_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * self.cfg.init_scale)

    def unembed(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tok": x @ self.W_U_tok.T, "depth": x @ self.W_U_depth.T, "valid": x @ self.W_U_valid.T}

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.run(tokens)[0]

    def run_with_cache(self, tokens: torch.Tensor, sites: Iterable[str]):
        """(logits, {site: activation [B, T, ...]}) for the requested sites."""
        return self.run(tokens, sites=sites)

    def run(
        self,
        tokens: torch.Tensor,
        sites: Iterable[str] = (),
        patches: Mapping[str, Patch] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Forward pass that records `sites` and lets `patches` replace any site's value.

        A patch is a function of the clean activation returning its replacement; patching a site
        changes everything downstream of it (used for ablations, steering and path integrals).
        """
        cfg = self.cfg
        wanted = {resolve_site(s, cfg) for s in sites}
        patches = {resolve_site(s, cfg): fn for s, fn in (patches or {}).items()}
        cache: dict[str, torch.Tensor] = {}

        def at(names: tuple[str, ...], value: torch.Tensor) -> torch.Tensor:
            for n in names:
                if n in patches:
                    value = patches[n](value)
            for n in names:
                if n in wanted:
                    cache[n] = value
            return value

        T = tokens.shape[1]
        # F.embedding, not W_E[tokens]: indexing's backward accumulates W_E's gradient in an order
        # that varies from run to run on two or more threads, and is 6x slower on one.
        x = at(("resid_pre_0",), F.embedding(tokens, self.W_E) + self.W_pos[:T])
        for layer, block in enumerate(self.blocks):
            h = at((f"ln1_out_{layer}",), block.ln1(x))
            z = block.attn.mix(h)
            head_names = [f"head_out_{layer}_{i}" for i in range(cfg.n_heads)]
            if any(n in wanted or n in patches for n in head_names):
                per_head = block.attn.head_outputs(z)
                heads = [at((n,), per_head[:, :, i]) for i, n in enumerate(head_names)]
                attn_out = torch.stack(heads).sum(0)
            else:
                attn_out = block.attn.output(z)
            x = at((f"resid_mid_{layer}",), x + at((f"attn_out_{layer}",), attn_out))
            h = at((f"ln2_out_{layer}",), block.ln2(x))
            pre = at((f"mlp_pre_{layer}",), h @ block.mlp.W_in.T)
            post = at((f"mlp_post_{layer}",), F.relu(pre))
            mlp_out = at((f"mlp_out_{layer}",), post @ block.mlp.W_out.T)
            # resid_post_L and resid_pre_{L+1} are one tensor under two names.
            x = at((f"resid_post_{layer}", f"resid_pre_{layer + 1}"), x + mlp_out)
        return self.unembed(at(("ln_f_out",), self.ln_f(x))), cache


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def fold_rmsnorm(model: DyckTransformer) -> DyckTransformer:
    """An equivalent model with every RMSNorm gain folded into the weights that read its output.

    The gains become 1, which makes the residual stream's basis free: RMSNorm without a gain
    commutes with any rotation, so folded models are the ones the symmetry group acts on.
    """
    folded = DyckTransformer(model.cfg)
    folded.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block in folded.blocks:
            g1 = block.ln1.w.clone()
            for W in (block.attn.W_Q, block.attn.W_K, block.attn.W_V):
                W.mul_(g1)
            block.mlp.W_in.mul_(block.ln2.w)
            block.ln1.w.fill_(1.0)
            block.ln2.w.fill_(1.0)
        for W in (folded.W_U_tok, folded.W_U_depth, folded.W_U_valid):
            W.mul_(folded.ln_f.w)
        folded.ln_f.w.fill_(1.0)
    return folded


def is_folded(model: DyckTransformer) -> bool:
    return all(bool((p == 1).all()) for n, p in model.named_parameters() if n.endswith(".w"))


def rotate_residual(model: DyckTransformer, Q: torch.Tensor) -> DyckTransformer:
    """An exact copy of a folded model whose residual basis is turned by the orthogonal Q.

    Residual activations of the copy are x @ Q (row vectors): every weight that writes the stream
    is multiplied by Qᵀ on the output side and every weight that reads it by Q on the input side,
    so logits are unchanged.
    """
    if not is_folded(model):
        raise ValueError("rotate_residual needs a folded model (RMSNorm gains must be 1): call fold_rmsnorm first")
    d = model.cfg.d_model
    if Q.shape != (d, d):
        raise ValueError(f"rotation has shape {tuple(Q.shape)}, model residual width is {d}")
    Q = Q.to(torch.float64)
    rotated = DyckTransformer(model.cfg)
    rotated.load_state_dict(model.state_dict())

    def turn(t: torch.Tensor, fn) -> torch.Tensor:
        return fn(t.to(torch.float64)).to(t.dtype)

    with torch.no_grad():
        rotated.W_E.copy_(turn(model.W_E, lambda W: W @ Q))
        rotated.W_pos.copy_(turn(model.W_pos, lambda W: W @ Q))
        for src, dst in zip(model.blocks, rotated.blocks):
            for name in ("W_Q", "W_K", "W_V"):
                getattr(dst.attn, name).copy_(turn(getattr(src.attn, name), lambda W: W @ Q))
            dst.attn.W_O.copy_(turn(src.attn.W_O, lambda W: Q.T @ W))
            dst.mlp.W_in.copy_(turn(src.mlp.W_in, lambda W: W @ Q))
            dst.mlp.W_out.copy_(turn(src.mlp.W_out, lambda W: Q.T @ W))
        for name in ("W_U_tok", "W_U_depth", "W_U_valid"):
            getattr(rotated, name).copy_(turn(getattr(model, name), lambda W: W @ Q))
    return rotated


def save_model(model: DyckTransformer, directory: str | Path) -> tuple[Path, Path]:
    """`model.safetensors` (every parameter and the positional buffer) + `config.json`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, config = directory / "model.safetensors", directory / "config.json"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, weights)
    config.write_text(json.dumps(model.cfg.to_dict(), indent=2, sort_keys=True))
    return weights, config


def load_model(weights: str | Path, config: str | Path | dict | None = None) -> DyckTransformer:
    """Rebuild a model from safetensors weights (config.json beside them unless given)."""
    weights = Path(weights)
    if config is None:
        config = weights.with_name("config.json")
    cfg_dict = config if isinstance(config, dict) else json.loads(Path(config).read_text())
    model = DyckTransformer(ModelConfig.from_dict(cfg_dict))
    try:
        state = load_file(weights)
    except Exception as exc:  # safetensors raises its own error types for truncated or alien files
        raise ValueError(f"{weights} is not a readable safetensors file ({exc})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{weights} lacks {len(missing)} tensors of this architecture, e.g. {missing[0]!r}")
    for name, tensor in state.items():
        if name in expected and tensor.shape != expected[name].shape:
            raise ValueError(f"{weights}: {name} has shape {tuple(tensor.shape)}, the config expects "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)
    return model

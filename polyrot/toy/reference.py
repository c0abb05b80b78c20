"""Checkpoints of the paper's reference implementation, read as polyrot models.

The reference code (github.com/JordanMcCann/polymorphism-is-rotation) saves each checkpoint with
`torch.save` as a dict {step, model_state, optim_state, cfg, metrics}: `cfg` is its model
configuration as a plain dict, `model_state` a state dict of the same architecture as
polyrot's DyckTransformer under the same tensor names and layouts, except that its RMSNorm
gains are called `.gain` where polyrot says `.w`. Such a file is read with
`torch.load(weights_only=True)` only, which unpickles tensors and plain containers and refuses
anything that would run code.

`forward` computes the logits directly on the reference's tensors, under its names, written
from the architecture's description (an einsum per head, an explicit causal softmax, RMSNorm as
x / rms(x) * gain), so that an imported model can be checked against it rather than against
itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from polyrot.errors import ParameterError
from polyrot.toy.model import HEADS, DyckTransformer, ModelConfig

KEYS = ("step", "model_state", "optim_state", "cfg", "metrics")
GAIN, POLYROT_GAIN = ".gain", ".w"
# The reference's config names for polyrot's ModelConfig fields, where they differ.
CONFIG_NAMES = {"eps": "rmsnorm_eps"}
_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
POSITIONAL = ("structured", "learned")  # a learned W_pos is a tensor of the state like the fixed one


def read_checkpoint(path: Path) -> dict:
    """The checkpoint dict, loaded without running code; a one-line ParameterError for anything else."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails on foreign files in many types; each means one thing here
        # When weights_only refuses a file, torch names the class or function it would import.
        needs = _GLOBAL.search(str(exc))
        if needs:
            raise ParameterError(f"{path} needs code to unpickle ({needs.group(1)}); only tensors and plain "
                                 "containers are loaded (torch.load weights_only=True)") from None
        raise ParameterError(f"{path} is not a torch.save checkpoint") from None
    if not isinstance(checkpoint, dict):
        raise ParameterError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict with "
                             f"{', '.join(KEYS)}")
    missing = [key for key in ("model_state", "cfg") if key not in checkpoint]
    if missing:
        raise ParameterError(f"{path} is not a reference checkpoint: it has no {missing[0]!r} "
                             f"(it has {', '.join(map(str, checkpoint)) or 'nothing'})")
    return checkpoint


def model_config(cfg: Mapping, path: Path) -> ModelConfig:
    """polyrot's ModelConfig for the reference's cfg dict, refusing architectures polyrot lacks."""
    if not isinstance(cfg, Mapping):
        raise ParameterError(f"{path}: cfg is a {type(cfg).__name__}, not a dict")
    if not cfg.get("use_rmsnorm", True):
        raise ParameterError(f"{path}: a model without RMSNorm (use_rmsnorm false) is not polyrot's architecture")
    if cfg.get("pos_encoding", "structured") not in POSITIONAL:
        raise ParameterError(f"{path}: unknown pos_encoding {cfg['pos_encoding']!r}; polyrot reads "
                             f"{', '.join(POSITIONAL)}")
    values = {}
    for name in ModelConfig.__dataclass_fields__:
        key = CONFIG_NAMES.get(name, name)
        if key in cfg:
            values[name] = cfg[key]
    try:
        return ModelConfig(**values)
    except TypeError as exc:
        raise ParameterError(f"{path}: unusable cfg ({exc})") from None


def polyrot_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig, path: Path):
    """(polyrot state dict, [(reference name, polyrot name)] of the renamed tensors), after checking
    that the tensors are exactly those of polyrot's architecture with this config."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ParameterError(f"{path}: model_state is not a dict of tensors")
    renamed = [(name, name[: -len(GAIN)] + POLYROT_GAIN) for name in state if name.endswith(GAIN)]
    mapped = {dict(renamed).get(name, name): tensor.detach().to(torch.float32) for name, tensor in state.items()}
    expected = DyckTransformer(cfg).state_dict()
    missing = [name for name in expected if name not in mapped]
    if missing:
        # Named as the reference names it: a gain it lacks is a `.gain`.
        wanted = missing[0][: -len(POLYROT_GAIN)] + GAIN if missing[0].endswith(POLYROT_GAIN) else missing[0]
        raise ParameterError(f"{path}: model_state lacks {len(missing)} tensor(s) of the architecture, e.g. {wanted!r}")
    extra = [name for name in mapped if name not in expected]
    if extra:
        raise ParameterError(f"{path}: model_state has {extra[0]!r}, which polyrot's architecture does not: "
                             "a different model")
    for name, tensor in mapped.items():
        if tensor.shape != expected[name].shape:
            raise ParameterError(f"{path}: {name} has shape {tuple(tensor.shape)}, its cfg implies "
                                 f"{tuple(expected[name].shape)}: a different architecture")
    return mapped, renamed


def _rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def forward(state: Mapping[str, torch.Tensor], cfg: ModelConfig, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits {tok, depth, valid} of the reference model with tensors `state` (reference names)."""
    T = tokens.shape[1]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    x = state["W_E"][tokens] + state["W_pos"][:T]
    for layer in range(cfg.n_layers):
        block = f"blocks.{layer}."
        h = _rms_norm(x, state[block + "ln1" + GAIN], cfg.eps)
        for head in range(cfg.n_heads):
            q, k, v = (torch.einsum("btd,ed->bte", h, state[f"{block}attn.{w}"][head]) for w in ("W_Q", "W_K", "W_V"))
            scores = torch.einsum("bqe,bke->bqk", q, k) / math.sqrt(cfg.d_head)
            pattern = scores.masked_fill(future, float("-inf")).softmax(-1)
            x = x + torch.einsum("bqk,bke,de->bqd", pattern, v, state[block + "attn.W_O"][head])
        h = _rms_norm(x, state[block + "ln2" + GAIN], cfg.eps)
        hidden = torch.relu(torch.einsum("btd,md->btm", h, state[block + "mlp.W_in"]))
        x = x + torch.einsum("btm,dm->btd", hidden, state[block + "mlp.W_out"])
    x = _rms_norm(x, state["ln_f" + GAIN], cfg.eps)
    return {head: torch.einsum("btd,cd->btc", x, state[f"W_U_{head}"]) for head in HEADS}

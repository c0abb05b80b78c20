"""Sparse autoencoders and transcoders, trained with the paper's recipe.

    f     = ReLU(W_enc (x - b_pre) + b_enc)
    x_hat = W_dec f + b_pre          (kind="sae")
    y_hat = W_dec f + b_out          (kind="transcoder": x read at one site, y predicted at another)

loss = MSE(recon, target) + l1 * mean_rows ||f||_1, with the decoder columns
held at unit norm so that the L1 term cannot be dodged by shrinking f and
growing W_dec. Weights are stored as safetensors next to a cfg.json that is
enough to rebuild the module.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from polyrot.core import device, metrics
from polyrot.core.sae_config import SAEConfig

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
EVAL_CHUNK = 16384  # rows per forward pass in evaluation, bounding the [rows, d_sae] activations


class SparseAutoencoder(torch.nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(cfg.d_out, cfg.d_sae, generator=g)
        W_dec /= W_dec.norm(dim=0, keepdim=True)
        if cfg.kind == "sae":
            # Tied start: each latent begins by detecting the very direction
            # it writes, a common and robust init for ReLU SAEs.
            W_enc = W_dec.T.clone()
        else:
            # A transcoder reads one space and writes another, so the
            # transpose of the decoder means nothing there; give each latent
            # an independent random unit read direction instead, which keeps
            # the pre-activation scale the same as the SAE's tied start.
            W_enc = torch.randn(cfg.d_sae, cfg.d_in, generator=g)
            W_enc /= W_enc.norm(dim=1, keepdim=True)
        self.W_enc = torch.nn.Parameter(W_enc)
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = torch.nn.Parameter(W_dec)
        self.b_pre = torch.nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.kind == "transcoder":
            self.b_out = torch.nn.Parameter(torch.zeros(cfg.d_out))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.linear(x - self.b_pre, self.W_enc, self.b_enc))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        bias = self.b_pre if self.cfg.kind == "sae" else self.b_out
        return F.linear(f, self.W_dec, bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=0, keepdim=True)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        # The radial part of a column's gradient is undone by
        # normalize_decoder_ right after the step; leaving it in would only
        # pollute Adam's moment estimates. Assumes unit-norm columns.
        W, g = self.W_dec, self.W_dec.grad
        g -= (g * W).sum(dim=0, keepdim=True) * W


def _target_for(cfg: SAEConfig, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    if x.ndim != 2 or x.shape[1] != cfg.d_in:
        raise ValueError(f"x must be [N, {cfg.d_in}], got {tuple(x.shape)}")
    if cfg.kind == "sae":
        if target is not None:
            raise ValueError("target is only for transcoders; an SAE reconstructs x")
        return x
    if target is None:
        raise ValueError("a transcoder needs target [N, d_out]")
    if target.shape != (x.shape[0], cfg.d_out):
        raise ValueError(f"target must be [{x.shape[0]}, {cfg.d_out}], got {tuple(target.shape)}")
    return target


def evaluate_sae(sae: SparseAutoencoder, x: torch.Tensor, target: torch.Tensor | None = None,
                 chunk_size: int = EVAL_CHUNK) -> dict:
    """Metrics over all of x (target: a transcoder's [N, d_out] output to predict).

    Returns ev, mse, l0, dead_fraction and l1_norm (mean ||f||_1 per row).
    """
    return _evaluate(sae, x, _target_for(sae.cfg, x, target), chunk_size)


@torch.no_grad()
def _evaluate(sae: SparseAutoencoder, x: torch.Tensor, target: torch.Tensor, chunk_size: int) -> dict:
    param = sae.W_dec
    x, target = x.to(param), target.to(param)
    recon = torch.empty_like(target)
    f_max = torch.zeros(sae.cfg.d_sae, device=param.device)
    l0_sum = l1_sum = 0.0
    for start in range(0, len(x), chunk_size):
        recon_chunk, f = sae(x[start:start + chunk_size])
        recon[start:start + chunk_size] = recon_chunk
        f_max = torch.maximum(f_max, f.amax(dim=0))
        l0_sum += metrics.l0(f) * len(f)
        l1_sum += f.sum(dtype=torch.float64).item()
    return {
        "ev": metrics.explained_variance(target, recon),
        "mse": metrics.mse(target, recon),
        "l0": l0_sum / len(x),
        # f >= 0, so a feature's largest activation is non-zero exactly when
        # it fired at least once: one row of maxima has the same dead columns.
        "dead_fraction": metrics.dead_fraction(f_max[None]),
        "l1_norm": l1_sum / len(x),
    }


def train_sae(x: torch.Tensor, cfg: SAEConfig, target: torch.Tensor | None = None, *,
              eval_fn=None, progress: bool = True) -> tuple[SparseAutoencoder, list[dict]]:
    """Train on x [N, d_in] (and target [N, d_out] for a transcoder).

    Batches are drawn with replacement from a generator seeded by cfg.seed, so
    the same inputs and cfg give bitwise-identical weights. Every
    cfg.eval_every steps and at the end, the whole data set is evaluated, the
    result {step, loss, mse, ev, l0, dead_fraction} appended to the history
    and passed to eval_fn if given.
    """
    target = _target_for(cfg, x, target)
    x, target = x.float(), target.float()
    sae = SparseAutoencoder(cfg).to(x.device)
    with torch.no_grad():
        # Start the biases at the data means so the latents only have to
        # explain the variation around them.
        sae.b_pre.copy_(x.mean(dim=0))
        if cfg.kind == "transcoder":
            sae.b_out.copy_(target.mean(dim=0))
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    g = torch.Generator(device=x.device).manual_seed(cfg.seed)
    autocast = device.autocast(x.device, cfg.precision)

    history = []
    bar = tqdm(range(1, cfg.steps + 1), disable=not progress, desc=f"train {cfg.kind}", unit="step")
    for step in bar:
        idx = torch.randint(len(x), (cfg.batch_size,), generator=g, device=x.device)
        xb = x[idx]
        yb = xb if cfg.kind == "sae" else target[idx]
        with autocast:
            recon, f = sae(xb)
        # f >= 0 after the ReLU, so its L1 norm is a plain sum; both terms in fp32
        loss = F.mse_loss(recon.float(), yb) + cfg.l1 * f.float().sum(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()

        if step % cfg.eval_every == 0 or step == cfg.steps:
            m = _evaluate(sae, x, target, EVAL_CHUNK)
            record = {"step": step, "loss": m["mse"] + cfg.l1 * m["l1_norm"],
                      **{k: m[k] for k in ("mse", "ev", "l0", "dead_fraction")}}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4g}", ev=f"{record['ev']:.4f}")
            if eval_fn is not None:
                eval_fn(record)
    return sae, history


def initial_decoder(cfg: SAEConfig) -> torch.Tensor:
    """The decoder [d_out, d_sae] an SAE of `cfg` starts from: a function of cfg.seed and the shape
    alone (train_sae moves only the biases to the data before the first step)."""
    return SparseAutoencoder(cfg).W_dec.detach()


def decoder_drift(sae: SparseAutoencoder) -> dict[str, float]:
    """How far training moved the decoder from its initialisation: init_cos_mean, the mean cosine
    of each decoder column to its own starting column (1: it never moved), and init_max_mean, the
    mean best cosine of a trained column to any starting one. Two SAEs that share an
    initialisation and barely move from it agree with each other for that reason alone."""
    start = initial_decoder(sae.cfg).to(torch.float64)
    trained = sae.W_dec.detach().to(device="cpu", dtype=torch.float64)
    cosines = (start * trained).sum(0) / (start.norm(dim=0) * trained.norm(dim=0)).clamp_min(1e-12)
    return {"init_cos_mean": float(cosines.mean()), "init_max_mean": metrics.decoder_cosine(start, trained)["max_mean"]}


def save_sae(sae: SparseAutoencoder, directory) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().cpu().contiguous() for name, p in sae.named_parameters()}
    save_file(tensors, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(sae.cfg.to_dict(), indent=2) + "\n")
    return directory


def load_sae(directory) -> SparseAutoencoder:
    directory = Path(directory)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise ValueError(f"{directory}: missing {name}")
    try:
        cfg = SAEConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / CONFIG_FILE}: not valid JSON ({e})") from None
    try:
        tensors = load_file(directory / WEIGHTS_FILE)
    except SafetensorError as e:
        raise ValueError(f"{directory / WEIGHTS_FILE}: unreadable safetensors ({e})") from None

    sae = SparseAutoencoder(cfg)
    expected = dict(sae.named_parameters())
    if set(tensors) != set(expected):
        raise ValueError(f"{directory / WEIGHTS_FILE}: tensors {sorted(tensors)} do not match "
                         f"{cfg.kind} parameters {sorted(expected)}")
    for name, p in expected.items():
        t = tensors[name]
        if t.shape != p.shape or t.dtype != p.dtype:
            raise ValueError(f"{directory / WEIGHTS_FILE}: {name} is {t.dtype} {tuple(t.shape)}, "
                             f"cfg.json implies {p.dtype} {tuple(p.shape)}")
    sae.load_state_dict(tensors)
    return sae


def to_saelens(sae: SparseAutoencoder) -> tuple[dict, dict[str, torch.Tensor]]:
    """SAELens "standard" SAE: f = ReLU((x - b_dec) @ W_enc + b_enc), x_hat = f @ W_dec + b_dec.

    Its matrices are the transposes of ours and its b_dec is our b_pre.
    """
    cfg = sae.cfg
    if cfg.kind != "sae":
        raise ValueError(f"SAELens export supports kind='sae' only, got {cfg.kind!r}")
    saelens_cfg = {
        "architecture": "standard",
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "activation_fn_str": "relu",
        # older SAELens reads hook_name at the top level, newer from metadata
        "hook_name": cfg.site,
        "metadata": {"hook_name": cfg.site},
    }
    tensors = {
        "W_enc": sae.W_enc.detach().T.contiguous().cpu(),
        "b_enc": sae.b_enc.detach().clone().cpu(),
        "W_dec": sae.W_dec.detach().T.contiguous().cpu(),
        "b_dec": sae.b_pre.detach().clone().cpu(),
    }
    return saelens_cfg, tensors


def export_saelens(sae: SparseAutoencoder, directory) -> Path:
    saelens_cfg, tensors = to_saelens(sae)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / SAELENS_WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(saelens_cfg, indent=2) + "\n")
    return directory

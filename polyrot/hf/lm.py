"""Hugging Face causal LMs and corpora: loading by name, path or revision, and hidden states at named sites.

Sites follow the paper's Pythia names: `layer0_resid_pre` is the embedding output and
`layerL_resid_post` block L's output. transformers' `output_hidden_states` returns n_layers + 1
tensors, index 0 the embedding output and index L + 1 "after block L" — except the last one, which
transformers (GPT-NeoX, 5.x) returns after the final LayerNorm. So the last block's output is read
by a forward hook on that block instead; every other site is `hidden_states[L + 1]`.

A model is resolved the way `from_pretrained` resolves it: a local folder, or a hub name with a
revision (branch such as `step3000`, tag or commit) looked up in the hub cache (`cache_dir`, else
huggingface_hub's default). Under HF_HUB_OFFLINE=1 a name that is not in the cache is refused
with a message that says so before transformers prints a page of stack. Only safetensors weights
are ever loaded.

Corpus samples are packed: documents, in an order shuffled by `seed`, are tokenized, joined by the
tokenizer's end-of-text token and cut into `n_sequences` rows of `n_tokens`; the hub corpus is
streamed, a local text file is read through datasets' `text` builder (one document per line).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from huggingface_hub import constants, scan_cache_dir, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name
from tqdm.auto import tqdm

from polyrot.core.attribution import attribution_patching, integrated_gradients
from polyrot.core.device import resolve_device
from polyrot.errors import HubResolutionError, ParameterError, UnknownSiteError
from polyrot.hf.config import CORPUS_SEED, DTYPES

_SITE = re.compile(r"layer(\d+)_resid_(pre|post)")
# Documents read between shuffles of a streamed corpus: enough to mix, little enough to start fast.
SHUFFLE_BUFFER = 10_000


def site_names(n_layers: int) -> list[str]:
    """The residual sites of an n_layers model, in forward order: the paper's 7 for Pythia-70m."""
    return ["layer0_resid_pre"] + [f"layer{layer}_resid_post" for layer in range(n_layers)]


def resolve_site(name: str, n_layers: int) -> str:
    """Canonical name of a residual site; layerL_resid_pre (L >= 1) is block L-1's output."""
    match = _SITE.fullmatch(name.strip())
    valid = site_names(n_layers)
    if not match:
        raise UnknownSiteError(f"unknown site {name!r}; valid sites: {', '.join(valid)}")
    layer, where = int(match[1]), match[2]
    if where == "pre" and layer > 0:
        layer, where = layer - 1, "post"
    canonical = f"layer{layer}_resid_{where}"
    if canonical not in valid:
        raise UnknownSiteError(f"site {name!r} is beyond the model's depth: it has {n_layers} layers; "
                               f"valid sites: {', '.join(valid)}")
    return canonical


def hidden_state_index(site: str) -> int:
    """Index of `site` in transformers' hidden_states tuple (embedding output first)."""
    match = _SITE.fullmatch(site)
    return 0 if match[2] == "pre" else int(match[1]) + 1


def is_local(name_or_path: str) -> bool:
    return Path(name_or_path).is_dir()


def cached_revisions(repo_id: str, cache_dir: str | Path | None = None) -> list[str]:
    """The branch names (refs) of `repo_id` in the hub cache; [] if the repo is not cached."""
    root = Path(cache_dir or constants.HF_HUB_CACHE)
    if not (root / repo_folder_name(repo_id=repo_id, repo_type="model")).is_dir():
        return []
    for repo in scan_cache_dir(root).repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            return sorted(ref for revision in repo.revisions for ref in revision.refs)
    return []


def check_resolvable(name_or_path: str, revision: str | None = None, cache_dir: str | Path | None = None) -> bool:
    """True when the model is local or cached (load it without the network); False when only the hub
    can tell (online). Offline, a name or revision missing from the cache is a HubResolutionError."""
    if is_local(name_or_path):
        if revision is not None:
            raise ParameterError(f"{name_or_path} is a local folder, which holds one version and ignores a revision: "
                                 "pass the folder of the revision you want, or a hub name with --cache-dir")
        if not (Path(name_or_path) / "config.json").is_file():
            raise HubResolutionError(f"local folder {name_or_path} has no config.json: not a saved model")
        return True
    found = try_to_load_from_cache(name_or_path, "config.json", cache_dir=cache_dir, revision=revision or "main")
    if isinstance(found, str):
        return True
    if not constants.is_offline_mode():
        return False
    where = cache_dir or constants.HF_HUB_CACHE
    revisions = cached_revisions(name_or_path, cache_dir)
    if revisions:
        raise HubResolutionError(f"model {name_or_path} has no revision {revision or 'main'!r} in the cache {where} "
                                 f"(HF_HUB_OFFLINE=1); cached revisions: {', '.join(revisions)}")
    raise HubResolutionError(f"model {name_or_path!r} cannot be resolved offline (HF_HUB_OFFLINE=1): it is not in the "
                             f"cache {where}; download it where the hub is reachable (hf download {name_or_path}"
                             f"{' --revision ' + revision if revision else ''}) or pass a local path")


@contextlib.contextmanager
def _hub_errors(name_or_path: str, revision: str | None):
    """Turn the hub's 'no such repo / revision' into one-line errors (online lookups only)."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except (OSError, RevisionNotFoundError, RepositoryNotFoundError) as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, RevisionNotFoundError):
            raise HubResolutionError(f"model {name_or_path} has no revision {revision!r} on the hub") from None
        if isinstance(cause, RepositoryNotFoundError):
            raise HubResolutionError(f"model {name_or_path!r} is neither a local folder nor a hub repository") from None
        raise


@contextlib.contextmanager
def quiet_transformers():
    """No per-file progress bars from transformers while loading or saving: one-line errors and our own
    bars stay readable."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def load_causal_lm(name_or_path: str, revision: str | None = None, cache_dir: str | Path | None = None, *,
                   device: str = "cpu", dtype: str = "float32"):
    """(model in eval mode on `device`, tokenizer) of a causal LM: a hub name at `revision` or a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ParameterError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    local_only = check_resolvable(name_or_path, revision, cache_dir)
    where = {} if is_local(name_or_path) else {"revision": revision, "cache_dir": cache_dir,
                                                 "local_files_only": local_only}
    with _hub_errors(name_or_path, revision), quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=getattr(torch, dtype), use_safetensors=True,
                                                     **where)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **where)
    return model.to(resolve_device(device)).eval(), tokenizer


def n_layers(model) -> int:
    return model.config.num_hidden_layers


def parse_sites(names: Iterable[str], depth: int) -> list[str]:
    """Canonical names of `names`, each once, in forward order."""
    canonical = {resolve_site(s, depth) for s in names if s.strip()}
    if not canonical:
        raise ParameterError("no site given")
    return [s for s in site_names(depth) if s in canonical]


def _documents(corpus: str, split: str, text_field: str, seed: int):
    """The corpus' documents as a stream, shuffled by `seed`."""
    import datasets

    if Path(corpus).is_file():
        stream = datasets.load_dataset("text", data_files=str(corpus), split="train", streaming=True)
        text_field = "text"
    elif Path(corpus).exists():
        raise ParameterError(f"corpus {corpus} is not a text file")
    elif datasets.config.HF_DATASETS_OFFLINE or constants.is_offline_mode():
        raise HubResolutionError(f"corpus {corpus!r} cannot be streamed offline (HF_DATASETS_OFFLINE=1): "
                                 "pass a local text file, one document per line")
    else:
        stream = datasets.load_dataset(corpus, split=split, streaming=True)
    for example in stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER):
        text = example[text_field]
        if text and text.strip():
            yield text


def sample_corpus(corpus: str, tokenizer, n_sequences: int, n_tokens: int, *, seed: int = CORPUS_SEED,
                  split: str = "train", text_field: str = "text", chunk: int = 64) -> torch.Tensor:
    """[n_sequences, n_tokens] token ids packed from the corpus' documents in `seed`'s order."""
    if tokenizer.eos_token_id is None:
        raise ParameterError("the tokenizer has no end-of-text token to separate documents with")
    need = n_sequences * n_tokens
    ids: list[int] = []
    pending: list[str] = []

    def flush() -> None:
        for row in tokenizer(pending)["input_ids"]:
            ids.extend(row)
            ids.append(tokenizer.eos_token_id)
        pending.clear()

    for text in _documents(corpus, split, text_field, seed):
        pending.append(text)
        if len(pending) == chunk:
            flush()
            if len(ids) >= need:
                break
    if len(ids) < need:
        flush()
    if len(ids) < need:
        raise ParameterError(f"corpus {corpus} holds {len(ids)} tokens, fewer than {n_sequences} x {n_tokens}")
    return torch.tensor(ids[:need], dtype=torch.long).view(n_sequences, n_tokens)


@torch.no_grad()
def hidden_states(model, tokens: torch.Tensor, sites: Iterable[str], *, batch_size: int = 8,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """{site: float32 [n_sequences * n_tokens, d_model]} on the CPU, rows sequence-major."""
    depth = n_layers(model)
    sites = parse_sites(sites, depth)
    last = f"layer{depth - 1}_resid_post"
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    # transformers returns the last hidden state after the final LayerNorm: read the block itself.
    handle = model.base_model.layers[depth - 1].register_forward_hook(
        lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
    parts: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    try:
        for lo in tqdm(range(0, len(tokens), batch_size), desc="hidden states", unit="batch", disable=not progress):
            captured.clear()
            out = model(tokens[lo:lo + batch_size].to(device), output_hidden_states=True)
            for site in sites:
                h = captured[-1] if site == last else out.hidden_states[hidden_state_index(site)]
                parts[site].append(h.float().flatten(0, 1).cpu())
    finally:
        handle.remove()
    return {site: torch.cat(chunks) for site, chunks in parts.items()}


def _replace_output(block, value: torch.Tensor):
    """A forward hook on `block` that makes its output `value` (broadcast over [B, T, d]); returns the handle."""
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = value.to(hidden.dtype).expand_as(hidden)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return block.register_forward_hook(hook)


def block_loss_of(model, tokens: torch.Tensor, layer: int):
    """loss_of(a): the mean next-token cross-entropy on `tokens` with block `layer`'s output set to a,
    every later block recomputed (the form polyrot.toy.causal's predictors take)."""
    def loss_of(activation: torch.Tensor) -> torch.Tensor:
        handle = _replace_output(model.base_model.layers[layer], activation)
        try:
            return model(tokens, labels=tokens).loss
        finally:
            handle.remove()

    return loss_of


def block_attribution(model, tokens: torch.Tensor, *, ig_steps: int, progress: bool = True):
    """The paper's appendix D table: per block, the measured effect of replacing its output residual
    with its batch mean (Δ loss), and its AP and IG (ig_steps) predictions.

    Returns (clean loss, DataFrame with columns block, measured, ap, ig).
    """
    import pandas as pd


    device = next(model.parameters()).device
    tokens = tokens.to(device)
    depth = n_layers(model)
    outputs: dict[int, torch.Tensor] = {}
    handles = [block.register_forward_hook(
        lambda module, args, out, layer=layer: outputs.__setitem__(layer, out[0] if isinstance(out, tuple) else out))
        for layer, block in enumerate(model.base_model.layers)]
    try:
        with torch.no_grad():
            clean_loss = float(model(tokens, labels=tokens).loss)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for layer in tqdm(range(depth), desc="IG per block", unit="block", disable=not progress):
        clean = outputs[layer].detach()
        mean = clean.mean(dim=(0, 1))
        loss_of = block_loss_of(model, tokens, layer)
        with torch.no_grad():
            measured = float(loss_of(mean)) - clean_loss
        rows.append({"block": f"layer{layer}", "measured": measured,
                     "ap": attribution_patching(loss_of, clean, mean),
                     "ig": integrated_gradients(loss_of, clean, mean, ig_steps)})
    return clean_loss, pd.DataFrame(rows)


# --- steering ------------------------------------------------------------------------------------

REDUCTIONS = ("mean", "last")


def block_of(site: str) -> int:
    """The block whose output `site` is: steering adds to a block's output, so embeddings are out."""
    match = _SITE.fullmatch(site)
    if not match or match[2] != "post":
        raise ParameterError(f"steering adds to a block's output: give a layerL_resid_post site, got {site!r}")
    return int(match[1])


def load_sentence_sets(path: str | Path) -> dict[str, dict]:
    """{vector: {reduce, positive, negative}} from a YAML file of contrastive sentence sets."""
    import yaml

    if not Path(path).is_file():
        raise ParameterError(f"sentence sets {path} is not a file")
    sets = yaml.safe_load(Path(path).read_text())
    for name, spec in (sets or {}).items():
        if not isinstance(spec, dict) or spec.get("reduce") not in REDUCTIONS or \
                not spec.get("positive") or not spec.get("negative"):
            raise ParameterError(f"sentence set {name!r} in {path} needs reduce ({'/'.join(REDUCTIONS)}), "
                                 "positive and negative sentences")
    if not sets:
        raise ParameterError(f"{path} holds no sentence set")
    return sets


@torch.no_grad()
def sentence_activations(model, tokenizer, sentences: list[str], site: str, reduce: str) -> torch.Tensor:
    """[n_sentences, d]: each sentence's activation at `site`, averaged over its tokens or at its last."""
    device = next(model.parameters()).device
    rows = []
    for sentence in sentences:
        ids = torch.tensor([tokenizer(sentence)["input_ids"]], device=device)
        acts = hidden_states(model, ids, [site], progress=False)[site]
        rows.append(acts.mean(dim=0) if reduce == "mean" else acts[-1])
    return torch.stack(rows)


def steering_vector(model, tokenizer, spec: dict, site: str) -> torch.Tensor:
    """mean(positive) - mean(negative) of the sentences' activations at `site` (float32 [d])."""
    positive, negative = (sentence_activations(model, tokenizer, spec[side], site, spec["reduce"])
                          for side in ("positive", "negative"))
    return positive.mean(dim=0) - negative.mean(dim=0)


@torch.no_grad()
def steering_kl(model, tokens: torch.Tensor, site: str, vector: torch.Tensor, alpha: float, *,
                batch_size: int = 8) -> float:
    """Mean KL(clean || steered) of the next-token distributions over every position of `tokens`, with
    alpha * vector added to the output of `site`'s block at every position (the paper's Pythia metric)."""
    device = next(model.parameters()).device
    block = model.base_model.layers[block_of(site)]
    shift = (alpha * vector).to(device)
    total, count = 0.0, 0
    for part in tokens.to(device).split(batch_size):
        clean = torch.log_softmax(model(part).logits.float(), dim=-1)
        handle = block.register_forward_hook(
            lambda module, args, out: (out[0] + shift.to(out[0].dtype), *out[1:]) if isinstance(out, tuple)
            else out + shift.to(out.dtype))
        try:
            steered = torch.log_softmax(model(part).logits.float(), dim=-1)
        finally:
            handle.remove()
        total += float((clean.exp() * (clean - steered)).sum())
        count += part.shape[0] * part.shape[1]
    return total / count

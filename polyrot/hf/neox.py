"""Tiny GPT-NeoX seeds trained here, on English every Python installation carries, stored as the hub stores Pythia.

The corpus is the docstrings of the Python standard library (modules, classes and functions;
ASCII, at least 40 characters, whitespace collapsed, one per line, in a fixed file and AST
order): about 1.6 MB of English on CPython 3.11, with no download. Its sha256 is recorded by
the stage, since another Python version gives another corpus.

A byte-level BPE tokenizer is trained on it with `tokenizers` (deterministic for one corpus, so
every seed shares it, as Pythia's seeds share theirs); each seed is transformers'
`GPTNeoXForCausalLM` built from a `GPTNeoXConfig` under its own torch seed (initialisation and
data order: no shared I/O), trained with AdamW on random windows of the packed token stream.

Checkpoints are written as a Hugging Face hub cache: models--ORG--NAME/refs/<branch> holds a
commit id, snapshots/<commit>/ the `save_pretrained` files of model and tokenizer. So
`from_pretrained("ORG/NAME", revision="step300", cache_dir=...)` under HF_HUB_OFFLINE=1 resolves
them exactly as it resolves EleutherAI's `pythia-70m-seed1` at `step3000` (a plain folder would
ignore the revision). Files are plain copies, not blob symlinks, so the tree survives being
logged as artifacts.
"""

from __future__ import annotations

import ast
import hashlib
import math
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub.file_download import repo_folder_name
from tqdm.auto import tqdm

from polyrot.hf.config import NeoxRecipe
from polyrot.hf.lm import quiet_transformers

EOS = "<|endoftext|>"
MIN_DOCSTRING = 40
# Parts of the standard library that are test data, tooling or not prose.
_SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"}


def stdlib_docstrings() -> list[str]:
    """The standard library's docstrings, one string each, whitespace collapsed, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(p for p in root.rglob("*.py") if not _SKIP_PARTS & set(p.relative_to(root).parts)):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = " ".join((ast.get_docstring(node) or "").split())
                if len(text) >= MIN_DOCSTRING and text.isascii():
                    docs.append(text)
    return docs


def write_corpus(path: str | Path) -> str:
    """Write the docstring corpus to `path`, one document per line; returns its sha256."""
    text = "\n".join(stdlib_docstrings()) + "\n"
    Path(path).write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()


def train_tokenizer(corpus: str | Path, vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on the corpus file, EOS `<|endoftext|>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(corpus)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def token_stream(corpus: str | Path, tokenizer) -> torch.Tensor:
    """The whole corpus as one int64 stream, documents joined by EOS."""
    ids: list[int] = []
    lines = Path(corpus).read_text(encoding="utf-8").splitlines()
    for row in tokenizer(lines)["input_ids"]:
        ids.extend(row)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def neox_config(recipe: NeoxRecipe, tokenizer):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=recipe.d_model, num_hidden_layers=recipe.n_layers,
                         num_attention_heads=recipe.n_heads, intermediate_size=recipe.d_mlp,
                         max_position_embeddings=recipe.seq_len, rotary_pct=0.25, use_parallel_residual=True,
                         tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)


def _learning_rate(step: int, recipe: NeoxRecipe) -> float:
    """Linear warmup, then cosine to 10% of the peak (Pythia's schedule shape)."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _windows(stream: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(len(stream) - length, (n,), generator=generator)
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, recipe: NeoxRecipe, n_windows: int = 32) -> float:
    """Mean next-token cross-entropy on fixed windows of the held-out stream."""
    model.eval()
    batch = _windows(stream, n_windows, recipe.seq_len, torch.Generator().manual_seed(0))
    loss = float(model(batch, labels=batch).loss)
    model.train()
    return loss


def train_neox(stream: torch.Tensor, tokenizer, recipe: NeoxRecipe, seed: int, *,
               checkpoint_steps: tuple[int, ...] = (),
               on_checkpoint: Callable[[int, object, dict], None] | None = None,
               progress: bool = True) -> tuple[object, list[dict]]:
    """Train one seed on `stream` (int64 token ids); returns (model, history).

    `seed` fixes the initialisation and the order of training windows. The last
    `heldout_fraction` of the stream is never trained on; its loss is in every record. At each
    step in `checkpoint_steps` (0: the initialisation) and at the end, on_checkpoint(step, model,
    record) is called.
    """
    from transformers import GPTNeoXForCausalLM

    cut = int(len(stream) * (1 - recipe.heldout_fraction))
    train, heldout = stream[:cut], stream[cut:]
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(neox_config(recipe, tokenizer)).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    history: list[dict] = []

    def checkpoint(step: int, train_loss: float) -> None:
        record = {"step": step, "train_loss": train_loss, "heldout_loss": heldout_loss(model, heldout, recipe)}
        history.append(record)
        if on_checkpoint is not None:
            on_checkpoint(step, model, record)

    if 0 in checkpoint_steps:
        checkpoint(0, float("nan"))
    bar = tqdm(range(1, recipe.steps + 1), desc=f"train neox seed {seed}", unit="step", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _learning_rate(step - 1, recipe)
        batch = _windows(train, recipe.batch_size, recipe.seq_len, generator)
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step in checkpoint_steps or step == recipe.steps:
            checkpoint(step, loss.item())
    return model.eval(), history


def repo_dir(cache_dir: str | Path, repo_id: str) -> Path:
    """Where the hub cache keeps `repo_id`: <cache_dir>/models--ORG--NAME."""
    return Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")


def write_hub_revision(cache_dir: str | Path, repo_id: str, revision: str, model, tokenizer) -> str:
    """Save model and tokenizer as branch `revision` of `repo_id` in a hub-cache layout; returns the commit id.

    The commit id is the sha1 of the revision name and the files' contents, so identical inputs
    give an identical tree.
    """
    repo = repo_dir(cache_dir, repo_id)
    with tempfile.TemporaryDirectory(prefix="polyrot-neox-") as tmp, quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = sorted(p for p in Path(tmp).iterdir() if p.is_file())
        commit = hashlib.sha1(revision.encode())
        for path in files:
            commit.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
        commit_id = commit.hexdigest()
        snapshot = repo / "snapshots" / commit_id
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in files:
            (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit_id)
    return commit_id

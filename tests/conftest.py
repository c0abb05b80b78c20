"""Shared fixtures: a temporary polyrot store per test session, and tiny trained seeds."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

# Tests never touch the network: Hugging Face lookups must resolve locally or fail fast.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TINY_TRAIN = dict(max_steps=40, eval_every=20, checkpoint_every=20, batch_size=32, eval_sequences=64,
                  confirm_sequences=64, threads=1)
# The same recipe as an experiment file's profile entry: `train_seed: {TINY_TRAIN_YAML}`.
TINY_TRAIN_YAML = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_TRAIN.items()) + "}"


ROOT = Path(__file__).resolve().parents[1]


def tree_status() -> list[str] | None:
    """The untracked and ignored entries of `git status --porcelain --ignored`, byte-code caches
    aside (imports write them anywhere); None outside a git checkout. Tracked files are left out:
    tests do not edit them, and in a checkout shared with people at work they change under a run."""
    done = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--ignored"], capture_output=True,
                          text=True)
    if done.returncode:
        return None
    return sorted(line for line in done.stdout.splitlines() if line[:2] in ("??", "!!")
                  and "__pycache__" not in line and ".pytest_cache" not in line)


@pytest.fixture(scope="session", autouse=True)
def clean_tree():
    """The suite writes under temporary directories only: no file appears in the checkout, ignored
    ones included (a stray mlruns/<id>/ or screenshot fails here)."""
    before = tree_status()
    yield
    after = tree_status()
    assert after == before, f"the suite changed the working tree: {sorted(set(after) ^ set(before))}"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread for the whole suite: on a machine whose two cores are shared, a second
    OpenMP thread that gets descheduled stalls every op (runs up to 50x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    """One temporary tracking + registry store for the whole session (a new SQLite store costs
    seconds of migrations, so it is created once)."""
    root = tmp_path_factory.mktemp("polyrot-home")
    saved = {k: os.environ.get(k) for k in ("POLYROT_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    os.environ["POLYROT_HOME"] = str(root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    from polyrot import tracking

    tracking.configure()
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def own_store(store, tmp_path, monkeypatch) -> Path:
    """A store of this test's own, for a test whose reproductions must not become the newest in
    the session store (verify, report and `polyrot ui` default to the newest); the session store
    is back after it."""
    from polyrot import tracking

    home = tmp_path / "polyrot-home"
    home.mkdir()
    monkeypatch.setenv("POLYROT_HOME", str(home))
    # mlflow.set_tracking_uri exports the session store's URI for child processes: drop it too.
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    tracking.configure()
    assert tracking.tracking_uri() == f"sqlite:///{home.resolve() / tracking.MLFLOW_DEFAULT_DB}"
    yield home
    monkeypatch.undo()
    tracking.configure()


@pytest.fixture(scope="session")
def seed_run(store) -> str:
    """A tiny Cohort B train_seed run, shared by every test that needs a finished model run."""
    from polyrot.stages import STAGES

    return STAGES["train_seed"](seed=0, experiment="tests", **TINY_TRAIN)


@pytest.fixture(scope="session")
def smoke_reproduction(store) -> str:
    """The parent run of one `reproduce smoke` (every stage on tiny seeds, its claims verified and
    its report written), shared by the tests that read a whole reproduction."""
    from polyrot.stages import STAGES

    return STAGES["reproduce"](name="smoke")


def model_with_gains():
    """A small Dyck model whose RMSNorm gains are not 1, so that folding (and aligning, which folds)
    has something to fold."""
    import torch

    from polyrot.toy.model import DyckTransformer

    m = DyckTransformer(seed=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".w"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return m


def cli(*args: str):
    """The polyrot command in-process, as a user would call it."""
    from click.testing import CliRunner

    from polyrot.cli import main

    return CliRunner().invoke(main, list(args))


def one_line_error(result, pattern: str) -> None:
    """Bad input: exit code 2, one line on stderr containing `pattern`, no traceback, no stdout."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output and not result.stdout, result.output
    assert pattern in lines[0], lines[0]

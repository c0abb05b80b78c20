"""Plain MLflow meets polyrot's store: `mlflow run` with nothing exported, a notebook's `models:/` URI,
the hint on a wrong store, and stage runs by hand that join their inputs' experiment."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from polyrot import tracking
from polyrot.stages import STAGES
from polyrot.tracking import registry
from tests.conftest import TINY_TRAIN

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
# What a user's shell has: polyrot's test store stands in for the checkout (POLYROT_HOME), and
# nothing names a tracking or registry URI.
UNSET = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
         "MLFLOW_RUN_ID")


def nothing_exported(store: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    return {**env, "POLYROT_HOME": str(store), "PATH": f"{BIN}:{env['PATH']}"}


def test_mlflow_run_with_nothing_exported_lands_where_the_cli_would(store):
    params = {**TINY_TRAIN, "seed": 3, "max_steps": 20}
    cmd = [str(BIN / "mlflow"), "run", str(REPO), "-e", "train_seed", "--env-manager", "local",
           *[x for k, v in params.items() for x in ("-P", f"{k}={v}")]]
    # Started where the store lives, as from the checkout's root: MLflow's ./mlflow.db is polyrot's.
    done = subprocess.run(cmd, cwd=store, env=nothing_exported(store), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run_id = done.stdout.strip().splitlines()[-1]
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == tracking.DEFAULT_EXPERIMENT and run.info.run_name == "seed-3"
    assert experiment.tags[tracking.KIND_TAG] == tracking.KIND_TRAINING
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_STAGE] == "train_seed"
    assert not (store / "mlruns" / "0").exists() and sorted(p.name for p in store.glob("*.db")) == ["mlflow.db"]


def test_mlflow_run_of_a_stage_with_inputs_joins_their_experiment(store, seed_run):
    cmd = [str(BIN / "mlflow"), "run", str(REPO), "-e", "activations", "--env-manager", "local",
           "-P", f"model_run={seed_run}", "-P", "sites=resid_mid_1", "-P", "batch_sequences=16"]
    done = subprocess.run(cmd, cwd=store, env=nothing_exported(store), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(done.stdout.strip().splitlines()[-1])
    assert run.info.experiment_id == client.get_run(seed_run).info.experiment_id


def test_a_stage_run_by_hand_joins_its_inputs_experiment(seed_run):
    run_id = STAGES["fit_rotation"](source=seed_run, target=seed_run, sites="resid_mid_1", alias="by-hand",
                                    batch_sequences=64)
    client = MlflowClient()
    experiment = client.get_experiment(client.get_run(seed_run).info.experiment_id).name
    assert client.get_experiment(client.get_run(run_id).info.experiment_id).name == experiment
    assert registry.load_rotation(registry.model_name(experiment, "resid_mid_1"), alias="by-hand").d == 64


def python_in(folder: Path, code: str, store: Path) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-c", code], cwd=folder, env=nothing_exported(store),
                          capture_output=True, text=True, timeout=120)


DOWNLOAD = "import mlflow\nprint(mlflow.artifacts.download_artifacts('models:/polyrot.smoke.resid_mid_1@s0-to-s1'))"


def test_a_notebook_finds_the_registry_after_the_documented_line(smoke_reproduction, store):
    done = python_in(store / "docs", "import polyrot.tracking; polyrot.tracking.configure()\n" + DOWNLOAD, store)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (Path(done.stdout.strip().splitlines()[-1]) / registry.WEIGHTS_FILE).is_file()


def test_plain_mlflow_in_a_subfolder_gets_the_hint_and_no_new_store(smoke_reproduction, store):
    done = python_in(store / "notebooks", DOWNLOAD, store)
    assert done.returncode != 0
    assert tracking.wrong_store_hint(f"sqlite:///{store / 'notebooks' / 'mlflow.db'}") in done.stderr
    assert not (store / "notebooks" / "mlflow.db").exists()


@pytest.mark.parametrize("folder", [".", "docs"])
def test_the_default_store_is_plain_mlflows_default_at_the_root(store, folder):
    """From the root MLflow's own default is polyrot's store; elsewhere in the checkout it is refused."""
    code = "import mlflow\nprint(mlflow.get_tracking_uri())\nprint(len(mlflow.search_experiments()))"
    done = python_in(store / folder, code, store)
    if folder == ".":
        assert done.returncode == 0 and done.stdout.splitlines()[0] == tracking.default_tracking_uri()
    else:
        assert "is not polyrot's store" in done.stderr

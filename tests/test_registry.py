"""The rotation registry: fresh-process loads, plain-MLflow URIs, list / find, aliases, a tracking server."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from polyrot import tracking
from polyrot.core.rotation import Rotation
from polyrot.errors import ArtifactCorruptError, ParameterError
from polyrot.stages import STAGES
from polyrot.tracking import registry
from tests.test_fit_rotation_stage import rotated_copy_runs

torch.set_num_threads(1)

EXPERIMENT = "tests-registry"
SITE = "resid_mid_1"
NAME = registry.model_name(EXPERIMENT, SITE)
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def fits(seed_run):
    """The same pair fitted twice (two versions, one alias) and a second pair: {label: fit run ID}."""
    source, target, _ = rotated_copy_runs(seed_run, haar_seed=21, experiment=EXPERIMENT)
    fit = STAGES["fit_rotation"]
    first = fit(source=source, target=target, sites=f"resid_mid_0,{SITE}", experiment=EXPERIMENT,
                batch_sequences=128)
    again = fit(source=source, target=target, sites=SITE, experiment=EXPERIMENT, batch_sequences=192)
    reverse = fit(source=target, target=source, sites=SITE, alias="reverse", experiment=EXPERIMENT,
                  batch_sequences=128)
    return {"source": source, "target": target, "first": first, "again": again, "reverse": reverse}


def logged(run_id: str, site: str = SITE) -> dict[str, torch.Tensor]:
    return load_file(tracking.artifact_dir(run_id) / f"rotations/{site}.safetensors")


def python(code: str, **env: str) -> str:
    """Run `code` in a fresh interpreter whose environment is this one's plus `env`; its stdout."""
    clean = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_load_rotation_in_a_fresh_process_is_bitwise_the_logged_tensor(fits, store, tmp_path):
    out = tmp_path / "loaded.safetensors"
    python(f"from polyrot.tracking.registry import load_rotation\n"
           f"load_rotation({NAME!r}, alias='s0-to-s0').save({str(out)!r})", POLYROT_HOME=str(store))
    loaded, expected = load_file(out), logged(fits["again"])
    assert all(torch.equal(loaded[k], expected[k]) for k in ("R", "mu_src", "mu_tgt"))


def test_models_uri_resolves_through_plain_mlflow(fits, tmp_path):
    code = ("import mlflow\n"
            f"print(mlflow.artifacts.download_artifacts('models:/{NAME}@reverse', dst_path={str(tmp_path)!r}))")
    local = Path(python(code, MLFLOW_TRACKING_URI=tracking.tracking_uri(),
                        MLFLOW_REGISTRY_URI=tracking.registry_uri()).strip().splitlines()[-1])
    assert torch.equal(Rotation.load(local / registry.WEIGHTS_FILE).R, logged(fits["reverse"])["R"])
    described = json.loads((local / registry.METADATA_FILE).read_text())
    assert described["metadata"]["source_run"] == fits["target"] and "frob_ratio" in described["statistics"]


def test_registering_a_pair_again_moves_its_alias(fits):
    table = registry.list_rotations(experiment=EXPERIMENT, site=SITE)
    assert table["version"].tolist() == [1, 2, 3] and table["name"].unique().tolist() == [NAME]
    assert table["aliases"].tolist() == ["", "s0-to-s0", "reverse"]
    assert table["fit_run"].tolist() == [fits["first"], fits["again"], fits["reverse"]]
    assert torch.equal(registry.load_rotation(NAME, version=1).R, logged(fits["first"])["R"])
    assert torch.equal(registry.load_rotation(NAME).R, logged(fits["reverse"])["R"])  # newest version


def test_list_rotations_filters_and_carries_the_statistics(fits):
    table = registry.list_rotations(source_run=fits["source"], target_run=fits["target"])
    assert list(table.columns) == list(registry.COLUMNS)
    assert sorted(table["site"]) == ["resid_mid_0", SITE, SITE]
    assert (table["experiment"] == EXPERIMENT).all() and (table["source_seed"] == "0").all()
    run = MlflowClient().get_run(fits["again"])
    [row] = table[table["fit_run"] == fits["again"]].to_dict("records")
    assert row["frob_ratio"] == run.data.metrics[f"{SITE}.frob_ratio"]
    assert row["rotation_ev"] > 1 - 1e-6 and 0 < row["ks_pvalue"] <= 1
    assert registry.list_rotations(experiment="no-such-experiment").empty


def test_find_rotation_returns_the_newest_fit_of_the_pair(fits):
    found = registry.find_rotation(source_run=fits["source"], target_run=fits["target"], site=SITE)
    assert torch.equal(found.R, logged(fits["again"])["R"])
    other = registry.find_rotation(source_run=fits["source"], target_run=fits["target"], site="resid_mid_0")
    assert torch.equal(other.R, logged(fits["first"], "resid_mid_0")["R"])
    with pytest.raises(registry.RotationNotFoundError, match="no registered rotation at resid_post_1"):
        registry.find_rotation(source_run=fits["source"], target_run=fits["target"], site="resid_post_1")


@pytest.mark.parametrize("kwargs,message", [
    ({"alias": "s9-to-s9"}, f"model '{NAME}' has no alias 's9-to-s9'; its aliases: reverse, s0-to-s0"),
    ({"version": 42}, f"model '{NAME}' has no version 42; its versions: 1, 2, 3"),
    ({"name": "polyrot.nowhere.resid_mid_1"}, "no registered model 'polyrot.nowhere.resid_mid_1'; registered "
                                              "rotations: "),
])
def test_unknown_names_aliases_and_versions_list_what_exists(fits, kwargs, message):
    with pytest.raises(registry.RotationNotFoundError) as caught:
        registry.load_rotation(**{"name": NAME, **kwargs})
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    if "name" in kwargs:
        assert NAME in str(caught.value)


def test_alias_and_version_together_are_refused(fits):
    with pytest.raises(ParameterError, match="not both"):
        registry.load_rotation(NAME, alias="reverse", version=1)


def test_a_tampered_registered_file_is_refused(fits):
    model_id = registry.list_rotations(experiment=EXPERIMENT, site=SITE)["model_id"].iloc[0]
    uri = MlflowClient().get_logged_model(model_id).artifact_location
    weights = Path(url2pathname(urlparse(uri).path)) / registry.WEIGHTS_FILE
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-8] + b"\x00" * 8)
        with pytest.raises(ArtifactCorruptError, match="version 1 is corrupt"):
            registry.load_rotation(NAME, version=1)
    finally:
        weights.write_bytes(original)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def server(store):
    """An MLflow tracking server on the test stores, started first: it boots while the fits run."""
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", tracking.tracking_uri(), "--registry-store-uri", tracking.registry_uri()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    yield f"http://127.0.0.1:{port}", process
    # The server forks workers into its own session: end that whole group, and only it.
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def test_load_and_list_through_a_tracking_server(fits, server, tmp_path):
    url, process = server
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            assert time.time() < deadline and process.poll() is None, "the MLflow server did not come up"
            time.sleep(0.5)
    out = tmp_path / "served.safetensors"
    code = ("from polyrot.tracking.registry import list_rotations, load_rotation\n"
            f"load_rotation({NAME!r}, alias='reverse').save({str(out)!r})\n"
            f"print(len(list_rotations(experiment={EXPERIMENT!r})))")
    listed = python(code, MLFLOW_TRACKING_URI=url)
    assert int(listed.strip().splitlines()[-1]) == 4
    assert torch.equal(load_file(out)["R"], logged(fits["reverse"])["R"])

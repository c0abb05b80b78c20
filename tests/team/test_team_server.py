"""The team tracking server: auth through plain HTTP, plain MLflow and polyrot's own commands;
four stages writing at once; a restart between two stages."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.conftest import one_line_error as in_process_error
from tests.team.conftest import free_port, one_line_error, runs_of

pytestmark = pytest.mark.team

TINY = ["--max-steps", "40", "--eval-every", "20", "--checkpoint-every", "20", "--batch-size", "32",
        "--eval-sequences", "64", "--confirm-sequences", "64", "--threads", "1"]
# What a TINY seed run leaves: two checkpoints, the model, its recipe and training record, and its
# held-out error tables.
SEED_ARTIFACTS = sorted(["checkpoints/step-000020.json", "checkpoints/step-000020.safetensors",
                         "checkpoints/step-000040.json", "checkpoints/step-000040.safetensors",
                         "config.json", "errors.csv", "model.safetensors", "train.json", "violations.csv"])


def test_server_status_and_bad_setups(team, tmp_path, monkeypatch):
    assert "running, healthy" in team.ok("server", "status", "--dir", str(team.directory), user=None)
    pg = f"postgresql+psycopg2://polyrot@127.0.0.1:{free_port()}/nothing"
    in_process_error(cli("server", "init", "--dir", str(tmp_path / "a"), "--database",
                         "postgresql+psycopg2://polyrot:hunter2@127.0.0.1/x"), "--database holds a password")
    in_process_error(cli("server", "init", "--dir", str(tmp_path / "b"), "--database", pg),
                     "cannot connect to the database")
    in_process_error(cli("server", "init", "--dir", str(tmp_path / "c"), "--database", "sqlite:///x.db"),
                     "--database must be a PostgreSQL URI")
    in_process_error(cli("server", "init", "--dir", str(team.directory), "--database", pg), "already holds a team server")
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    in_process_error(cli("server", "start", "--dir", str(team.directory)), "set MLFLOW_AUTH_ADMIN_PASSWORD")
    assert not any((tmp_path / d).exists() for d in "abc"), "a refused init wrote its directory"


def _http(team, path: str, user: str | None = None, password: str | None = None, body: dict | None = None) -> int:
    """Status of one plain HTTP request to the server's REST API."""
    request = urllib.request.Request(team.url + path, data=json.dumps(body).encode() if body is not None else None,
                                     method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    if user:
        token = base64.b64encode(f"{user}:{password or team.passwords[user]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_auth_over_plain_http(team):
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert _http(team, search) == 401                                   # unauthenticated
    assert _http(team, search, "reader", "not-the-password") == 401     # wrong password
    assert _http(team, search, "reader") == 200
    assert _http(team, "/api/2.0/mlflow/experiments/create", "reader", body={"name": "http-r"}) == 403
    assert _http(team, "/api/2.0/mlflow/experiments/create", "writer", body={"name": "http-w"}) == 200
    with urllib.request.urlopen(urllib.request.Request(
            f"{team.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=http-w",
            headers={"Authorization": "Basic " + base64.b64encode(
                f"reader:{team.passwords['reader']}".encode()).decode()}), timeout=30) as resp:
        exp_id = json.load(resp)["experiment"]["experiment_id"]
    assert _http(team, "/api/2.0/mlflow/runs/create", "reader", body={"experiment_id": exp_id}) == 403
    assert _http(team, "/api/2.0/mlflow/runs/create", "writer", body={"experiment_id": exp_id}) == 200
    assert _http(team, "/api/2.0/mlflow/registered-models/create", "reader", body={"name": "http-model-r"}) == 403
    assert _http(team, "/api/2.0/mlflow/registered-models/create", "writer", body={"name": "http-model-w"}) == 200


def test_auth_through_a_plain_mlflow_client(team, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    def as_user(user, password=None):
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password or team.passwords[user])
        return MlflowClient(tracking_uri=team.url, registry_uri=team.url)

    def refused(call) -> int:
        with pytest.raises(MlflowException) as caught:
            call()
        return caught.value.get_http_status_code()

    writer = as_user("writer")
    exp_id = writer.create_experiment("plain-mlflow")
    assert writer.create_run(exp_id).info.status == "RUNNING"
    assert writer.create_registered_model("plain-mlflow-model").name == "plain-mlflow-model"
    reader = as_user("reader")
    assert [r.info.experiment_id for r in reader.search_runs([exp_id])] == [exp_id]
    assert refused(lambda: reader.create_run(exp_id)) == 403
    assert refused(lambda: reader.create_registered_model("plain-mlflow-model-r")) == 403
    assert refused(lambda: as_user("reader", "wrong-password").search_experiments()) == 401
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    assert refused(lambda: MlflowClient(tracking_uri=team.url).search_experiments()) == 401


def test_auth_through_polyrot_commands(team, admin):
    admin.create_experiment("auth")
    seed = ["train-seed", "--seed", "0", *TINY, "--experiment", "auth"]
    refused = one_line_error(team.run(*seed, user="reader"), "the tracking server refused ")
    assert refused.endswith("to user 'reader' (403: permission denied)"), refused
    one_line_error(team.run(*seed, user="writer", password="wrong-password"),
                   f"tracking server {team.url} refused the credentials of user 'writer' (401")
    one_line_error(team.run(*seed, user=None), f"tracking server {team.url} needs credentials")
    assert runs_of(admin, "auth") == []  # no run started
    run_id = team.ok(*seed).strip().splitlines()[-1]
    assert admin.get_run(run_id).info.status == "FINISHED"
    # The reader reads it back with polyrot's own lineage check (digests included).
    code = (f"from polyrot import tracking\nprint(tracking.fetch_artifact({run_id!r}, 'model.safetensors', "
            "stage='train_seed'))")
    assert team.ok("-c", code, user="reader").strip().endswith("model.safetensors")


def _seed_command(seed: int, experiment: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "polyrot", "train-seed", "--seed", str(seed), *TINY, "--experiment", experiment,
            *extra]


@pytest.fixture(scope="module")
def four_seeds(team) -> list[str]:
    """Four train_seed stages started at once, each writing metrics, checkpoints and tags to the server."""
    procs = [subprocess.Popen(_seed_command(seed, "concurrency"), env=team.env("writer"), cwd=team.home,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(4)]
    outputs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outputs]
    return [out.strip().splitlines()[-1] for out, _ in outputs]


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    files = []
    for item in client.list_artifacts(run_id, path):
        files += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return files


def _snapshot(client, experiment: str) -> dict:
    """Everything the server holds about an experiment's runs, metric histories and artifact lists included."""
    out = {}
    for run in runs_of(client, experiment):
        rid = run.info.run_id
        out[rid] = {"status": run.info.status, "params": run.data.params, "tags": run.data.tags,
                    "metrics": {k: [(m.step, m.value) for m in client.get_metric_history(rid, k)]
                                for k in run.data.metrics},
                    "artifacts": sorted(_artifacts(client, rid))}
    return out


def test_four_stages_writing_at_once_lose_nothing(team, four_seeds, admin):
    snap = _snapshot(admin, "concurrency")
    assert sorted(snap) == sorted(four_seeds) and {s["status"] for s in snap.values()} == {"FINISHED"}
    # Every run logged the same schedule: the same metric names with the same number of points, two
    # for each evaluated quantity (steps 20 and 40), one for the final scores.
    shapes = [{k: len(points) for k, points in s["metrics"].items()} for s in snap.values()]
    assert all(shape == shapes[0] for shape in shapes), shapes
    assert set(shapes[0].values()) == {1, 2} and sum(v == 2 for v in shapes[0].values()) > 10
    points = sum(sum(shape.values()) for shape in shapes)
    assert points == 4 * sum(shapes[0].values())
    # Every artifact a run recorded a digest for is there, byte for byte.
    files = 0
    for rid, s in snap.items():
        digests = {k[len("polyrot.sha256."):]: v for k, v in s["tags"].items() if k.startswith("polyrot.sha256.")}
        assert sorted(digests) == s["artifacts"] == SEED_ARTIFACTS, (rid, s["artifacts"])
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(admin.download_artifacts(rid, "", tmp))
            for path, digest in digests.items():
                assert hashlib.sha256((local / path).read_bytes()).hexdigest() == digest, (rid, path)
                files += 1
    assert files == 4 * len(SEED_ARTIFACTS)
    assert all(s["artifacts"] and s["tags"]["polyrot.stage"] == "train_seed" for s in snap.values())
    print(f"\n4 concurrent stages: 4 runs, {points} metric points, {files} artifacts", file=sys.stderr)


def test_restarting_the_server_between_two_stages_loses_nothing(team, four_seeds, admin):
    before = _snapshot(admin, "concurrency")
    stopped = time.perf_counter()
    assert team.ok("server", "stop", "--dir", str(team.directory), user=None).strip() == "stopped"
    team.ok("server", "start", "--dir", str(team.directory), user=None,
            env=team.env(None, MLFLOW_AUTH_ADMIN_PASSWORD=team.admin_password))
    print(f"\nserver restart: {time.perf_counter() - stopped:.1f} s", file=sys.stderr)
    assert _snapshot(admin, "concurrency") == before
    # The second stage reads the first's artifacts through the restarted server, digests checked.
    done = subprocess.run(_seed_command(5, "concurrency", "--shared-io-from", four_seeds[0]), env=team.env("writer"),
                          cwd=team.home, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    second = admin.get_run(done.stdout.strip().splitlines()[-1])
    assert second.info.status == "FINISHED"
    assert second.data.tags["polyrot.upstream.shared_io"] == four_seeds[0]

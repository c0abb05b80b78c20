"""The MLflow UI on polyrot's stores: the server, its readiness, and links into it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urlencode

from polyrot import tracking
from polyrot.errors import PolyrotError
from polyrot.tracking.remote import answers

# MLflow 3.17's UI shows an experiment as GenAI (traces, latency, tokens) or as model training
# (runs) by a switch it keeps per browser, GenAI by default, and not by the experiment's kind tag
# (which polyrot sets all the same); the URL parameter selects model training for one visit.
TRAINING_VIEW = {"workflowType": "machine_learning"}
# The runs table nests child runs under a collapsed parent unless it is sorted by something other
# than time: sorted by name, a reproduction's seeds, SAEs, rotations and audits all show.
RUNS_BY_NAME = {"orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true"}
# The stages whose runs the printed compare view puts side by side: the audit's metrics with the
# statistics of the registered rotations.
COMPARED = ("audit", "fit_rotation")


def server_command(host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """`mlflow server` on the tracking and registry stores polyrot uses (local files by default)."""
    tracking.configure()  # a UI on a store that does not exist yet would create it unlocked
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", host, "--port", str(port),
           "--backend-store-uri", tracking.tracking_uri(), "--registry-store-uri", tracking.registry_uri(),
           "--workers", "1"]
    if tracking.tracking_uri() == tracking.default_tracking_uri():
        cmd += ["--default-artifact-root", tracking.artifact_root().as_uri(), "--serve-artifacts"]
    return cmd


def wait_until_up(url: str, timeout: float = 60.0, server: subprocess.Popen | None = None) -> None:
    """Block until the server answers its health check; raise if `server` exits first or after
    `timeout` seconds."""
    deadline = time.time() + timeout
    while not answers(url):
        if server is not None and server.poll() is not None:
            raise PolyrotError(f"mlflow server exited with code {server.returncode} before answering at {url} "
                               "(is the port taken? --port picks another)")
        if time.time() > deadline:
            raise PolyrotError(f"MLflow UI at {url} did not answer within {timeout:.0f} s")
        time.sleep(0.5)


def page_url(base: str, route: str, query: dict[str, str] | None = None) -> str:
    """A page of the MLflow UI (a route after '#/'), in its model-training view (that parameter
    last: the compare view reads its runs only from a query that starts with them)."""
    return f"{base}/#/{route}?{urlencode({**(query or {}), **TRAINING_VIEW})}"


def compare_url(base: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The run-comparison view of the MLflow UI for these runs."""
    return page_url(base, "compare-runs", {"runs": json.dumps(run_ids, separators=(",", ":")),
                                           "experiments": json.dumps(experiment_ids, separators=(",", ":"))})


def runs_url(base: str, experiment_id: str) -> str:
    """An experiment's runs table, every run shown (sorted by name)."""
    return page_url(base, f"experiments/{experiment_id}/runs", RUNS_BY_NAME)


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return page_url(base, f"experiments/{experiment_id}/runs/{run_id}")


def model_url(base: str, name: str) -> str:
    """A registered model's page: its versions, aliases and their sources."""
    return page_url(base, f"models/{quote(name)}")


def links(base: str) -> dict[str, str]:
    """{what: URL} into the UI: the newest finished reproduction (its experiment's runs, its parent
    run, its audit and rotation runs compared) and the registered models."""
    client = tracking.configure()
    found = {"registered rotations": page_url(base, "models")}
    experiments = [e.experiment_id for e in client.search_experiments()]
    latest = client.search_runs(experiments, f"tags.`{tracking.TAG_STAGE}` = 'reproduce' and "
                                "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                                max_results=1) if experiments else []
    if not latest:
        return found
    parent = latest[0]
    exp_id = parent.info.experiment_id
    nodes = [rid for key, rid in parent.data.tags.items() if key.startswith(tracking.TAG_NODE)]
    compared = [rid for rid in nodes if client.get_run(rid).data.tags.get(tracking.TAG_STAGE) in COMPARED]
    found = {f"runs of {client.get_experiment(exp_id).name}": runs_url(base, exp_id),
             f"latest reproduction ({parent.info.run_name})": run_url(base, exp_id, parent.info.run_id)}
    if compared:
        found["its audit and rotation runs compared"] = compare_url(base, compared, [exp_id])
    return {**found, "registered rotations": page_url(base, "models")}


def environment() -> dict[str, str]:
    """Environment for the server process: no telemetry, nothing adopted from a parent run."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


class _Stopped(Exception):
    pass


def _stop(signum, frame) -> None:
    raise _Stopped


def serve(host: str = "127.0.0.1", port: int = 5000, echo: Callable[[str], None] = print) -> int:
    """Run the UI server until it exits or this process gets SIGTERM or SIGINT, which stop it too.

    The server runs in its own process group, so stopping it takes its workers along; the URL and
    the links are printed only once it answers.
    """
    # The server's access log goes to stderr, so that stdout holds the URL and links alone.
    server = subprocess.Popen(server_command(host, port), env=environment(), start_new_session=True,
                              stdout=sys.stderr)
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        base = f"http://{host}:{port}"
        wait_until_up(base, timeout=120, server=server)
        echo(f"MLflow UI on {page_url(base, 'experiments')}  (store {tracking.tracking_uri()}); Ctrl-C stops it")
        for what, url in links(base).items():
            echo(f"  {what}: {url}")
        return server.wait()
    except _Stopped:
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()

"""The MLflow UI on polyrot's stores, and links into it."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

from polyrot import tracking


def server_command(host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """`mlflow server` on the tracking and registry stores polyrot uses (local files by default)."""
    tracking.configure()  # a UI on a store that does not exist yet would create it unlocked
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", host, "--port", str(port),
           "--backend-store-uri", tracking.tracking_uri(), "--registry-store-uri", tracking.registry_uri(),
           "--workers", "1"]
    if tracking.tracking_uri() == tracking.default_tracking_uri():
        cmd += ["--default-artifact-root", tracking.artifact_root().as_uri(), "--serve-artifacts"]
    return cmd


def wait_until_up(url: str, timeout: float = 60.0) -> None:
    """Block until the server answers its health check, or raise after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.time() > deadline:
            raise TimeoutError(f"MLflow UI at {url} did not answer within {timeout:.0f} s")
        time.sleep(0.5)


def compare_url(base: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The run-comparison view of the MLflow UI for these runs."""
    runs = quote(json.dumps(run_ids, separators=(",", ":")))
    exps = quote(json.dumps(experiment_ids, separators=(",", ":")))
    return f"{base}/#/compare-runs?runs={runs}&experiments={exps}"


def environment() -> dict[str, str]:
    """Environment for the server process: no telemetry, nothing adopted from a parent run."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env

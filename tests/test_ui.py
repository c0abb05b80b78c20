"""End to end: the MLflow UI served by `polyrot ui` shows polyrot's runs, checked in headless Chromium."""

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from polyrot.tracking import ui

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(store):
    port = free_port()
    proc = subprocess.Popen(ui.server_command(port=port), env=ui.environment(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        ui.wait_until_up(url, timeout=120)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_compare_view_shows_the_audit_metrics_of_the_child_runs(server, smoke_reproduction):
    from playwright.sync_api import sync_playwright

    parent = smoke_reproduction
    client = MlflowClient()
    children = [v for k, v in client.get_run(parent).data.tags.items() if k.startswith("polyrot.node.")]
    exp_id = client.get_run(parent).info.experiment_id
    stage = {r: client.get_run(r).data.tags["polyrot.stage"] for r in children}
    compared = [r for r in children if stage[r] in ("audit", "fit_rotation")]
    metric = "pooled.trained.ks_pvalue"  # the audit's pooled KS test of the rotations against Haar
    assert metric in client.get_run(*[r for r in compared if stage[r] == "audit"]).data.metrics

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        page.goto(ui.compare_url(server, compared, [exp_id]))
        # The page never reaches network-idle: wait for the metric's name in the comparison grid.
        page.get_by_text(metric, exact=True).first.wait_for(timeout=90_000)
        for run_id in compared:
            assert page.get_by_text(client.get_run(run_id).info.run_name).count() > 0
        page.screenshot(path=str(SCREENSHOTS / "ui-compare-runs.png"), full_page=True)
        browser.close()
    assert (SCREENSHOTS / "ui-compare-runs.png").stat().st_size > 10_000

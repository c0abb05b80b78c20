"""End to end: the MLflow UI served by `polyrot ui` shows polyrot's runs, checked in headless Chromium."""

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from polyrot import tracking, ui
from polyrot.stages import STAGES

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Scroll every scrollable ancestor of the first metric cell: the grid renders only visible rows.
SCROLL_METRICS = """() => {
  const cell = [...document.querySelectorAll('a, span, div')].find(e => e.textContent.trim() === 'acc.min');
  for (let e = cell; e; e = e.parentElement) {
    if (e.scrollHeight > e.clientHeight + 4) { e.scrollTop += 120; }
  }
}"""


def scroll_grids_until(page, text: str, attempts: int = 80) -> bool:
    for _ in range(attempts):
        if page.get_by_text(text, exact=True).count():
            return True
        page.evaluate(SCROLL_METRICS)
        page.wait_for_timeout(250)
    return False


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
def test_compare_view_shows_the_child_runs_metrics(server):
    from playwright.sync_api import sync_playwright

    parent = STAGES["reproduce"](name="smoke", experiment="ui-smoke")
    client = MlflowClient()
    children = [v for k, v in client.get_run(parent).data.tags.items() if k.startswith("polyrot.node.")]
    exp_id = client.get_run(parent).info.experiment_id
    metric = "final.acc.min"
    assert all(metric in client.get_run(r).data.metrics for r in children)

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        page.goto(ui.compare_url(server, children, [exp_id]))
        # The page never reaches network-idle: wait for the metrics grid, then scroll its virtualised
        # rows until the metric's name is rendered.
        page.get_by_text("Metrics", exact=True).first.wait_for(timeout=90_000)
        assert scroll_grids_until(page, metric), f"{metric} never appeared in the comparison view"
        for run_id in children:
            assert page.get_by_text(client.get_run(run_id).info.run_name).count() > 0
        page.screenshot(path=str(SCREENSHOTS / "ui-compare-runs.png"), full_page=True)
        browser.close()
    assert (SCREENSHOTS / "ui-compare-runs.png").stat().st_size > 10_000

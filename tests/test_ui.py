"""End to end: `polyrot ui` serves the MLflow UI on polyrot's store, prints its links once it answers and
stops its server on SIGTERM or SIGINT; headless Chromium sees the runs table, a compare view with the
audit's metrics and a registered rotation's page.

Screenshots go to a temporary folder, or to $POLYROT_SCREENSHOTS when that names one."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from polyrot import tracking
from polyrot.tracking import registry, ui

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason="Debian's chromium is not installed (.ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UI:
    """`polyrot ui` as a user starts it, its printed lines read as they come."""

    def __init__(self):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "polyrot", "ui", "--port", str(self.port)],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []

    def links(self, timeout: float = 120) -> dict[str, str]:
        """{what: URL}, read up to the last link; checks the server answered before the first line."""
        deadline = time.time() + timeout
        while not self.lines or "registered rotations" not in self.lines[-1]:
            assert time.time() < deadline and self.process.poll() is None, self.lines
            line = self.process.stdout.readline()
            if line and not self.lines:
                assert ui.answers(self.base), "polyrot ui printed its URL before the server answered"
            self.lines += [line.rstrip("\n")] if line else []
        return {m.group(1): m.group(2) for line in self.lines if (m := re.match(r"  (.+?): (http\S+)$", line))}

    def stop(self, signum=signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def served(smoke_reproduction):
    server = UI()
    yield server, server.links()
    if server.process.poll() is None:
        server.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("POLYROT_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield chromium
        chromium.close()


def open_page(browser, url: str, height: int = 1000):
    page = browser.new_page(viewport={"width": 1600, "height": height})
    page.goto(url)
    return page


def close_assistant(page) -> None:
    """MLflow 3.17 opens an assistant panel over a third of the page; it is not what is shown here."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def test_ui_links_lead_to_the_latest_reproduction(served, smoke_reproduction):
    _, links = served
    client = MlflowClient()
    parent = client.get_run(smoke_reproduction)
    exp_id = parent.info.experiment_id
    assert links["runs of smoke"] == ui.runs_url(served[0].base, exp_id)
    assert links[f"latest reproduction ({parent.info.run_name})"].endswith(
        f"/#/experiments/{exp_id}/runs/{smoke_reproduction}?workflowType=machine_learning")
    assert "compare-runs?runs=" in links["its audit and rotation runs compared"]


def test_every_run_of_a_reproduction_has_its_own_name_with_its_seed(smoke_reproduction):
    client = MlflowClient()
    parent = client.get_run(smoke_reproduction)
    nodes = [rid for key, rid in parent.data.tags.items() if key.startswith(tracking.TAG_NODE)]
    children = [run for node in nodes for run in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{node}'")]
    names = [parent.info.run_name, *(client.get_run(rid).info.run_name for rid in nodes),
             *(run.info.run_name for run in children)]
    assert len(names) == len(set(names)) == 11
    assert {"seed-0", "seed-1", "sae-s0-x8 (2 sites)", "sae-s1-resid_mid_1-x8", "rotation-s0-to-s1",
            "audit-s0-vs-s1"} <= set(names)


@needs_chromium
def test_the_runs_table_shows_seeds_saes_and_rotations_by_name(served, browser, shots):
    _, links = served
    page = open_page(browser, links["runs of smoke"])
    page.get_by_text("rotation-s0-to-s1", exact=True).first.wait_for(timeout=90_000)
    for name in ("seed-0", "seed-1", "sae-s0-resid_mid_0-x8", "sae-s1-x8 (2 sites)", "audit-s0-vs-s1"):
        assert page.get_by_text(name, exact=True).count() > 0, name
    # The model-training view's runs table, not the GenAI overview (whose sidebar lists Sessions).
    assert page.get_by_text("Model training").count() > 0 and page.get_by_text("Sessions", exact=True).count() == 0
    close_assistant(page)
    page.screenshot(path=str(shots / "ui-runs.png"))
    page.close()


def scroll_metrics_to(page, metric: str) -> None:
    """Scroll the compare view's metric grid, as a user does with the wheel over its values, until
    `metric` heads it. The grid renders only the rows in its 300-pixel window (the audit logs
    hundreds of metrics), and its name column (the page's first virtualized grid) follows the
    values one scroll event late."""
    page.get_by_text("Metrics", exact=True).last.evaluate("el => el.scrollIntoView({block: 'start'})")
    x, y, width, _ = page.locator(".ReactVirtualized__Grid").first.evaluate(
        "el => { const r = el.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }")
    page.mouse.move(x + width + 60, y + 150)
    target = page.get_by_text(metric, exact=True)
    for _ in range(1000):
        if target.count() and y + 20 <= target.first.evaluate("el => el.getBoundingClientRect().top") <= y + 60:
            break
        page.mouse.wheel(0, 33)
        page.wait_for_timeout(60)
    for dy in (5, -5):
        page.mouse.wheel(0, dy)
        page.wait_for_timeout(300)


@needs_chromium
def test_the_compare_view_shows_the_audit_metrics(served, browser, shots, smoke_reproduction):
    _, links = served
    metric = "pooled.trained.ks_pvalue"  # the audit's pooled KS test of the rotations against Haar
    page = open_page(browser, links["its audit and rotation runs compared"], height=1400)
    # The page never reaches network-idle: wait for the comparison's metric grid.
    page.locator(".ReactVirtualized__Grid").first.wait_for(timeout=90_000)
    assert page.get_by_text("audit-s0-vs-s1").count() > 0 and page.get_by_text("rotation-s0-to-s1").count() > 0
    for section in ("Visualizations", "Parameters"):  # folded, so that the runs' names and metrics share a screen
        page.get_by_text(section, exact=True).first.click()
    scroll_metrics_to(page, metric)
    assert page.get_by_text(metric, exact=True).count() == 1
    close_assistant(page)
    page.get_by_text("Run details", exact=True).first.evaluate("el => el.scrollIntoView({block: 'start'})")
    page.screenshot(path=str(shots / "ui-compare-runs.png"))
    page.close()


@needs_chromium
def test_a_registered_rotations_page_shows_its_pair(served, browser, shots, smoke_reproduction):
    name = registry.model_name("smoke", "resid_mid_1")
    page = open_page(browser, ui.model_url(served[0].base, name))
    page.get_by_text("@ s0-to-s1").first.wait_for(timeout=90_000)
    assert page.get_by_text("polyrot.source_run").count() > 0 and page.get_by_text("rotation").count() > 0
    close_assistant(page)
    page.screenshot(path=str(shots / "ui-rotation.png"))
    page.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_the_server(store, signum):
    server = UI()
    server.links()
    assert server.stop(signum) == 0
    assert not ui.answers(server.base)

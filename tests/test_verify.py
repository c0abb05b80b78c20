"""verify and report on a whole (smoke) reproduction: verdicts on the parent run, exit codes, the report."""

import pandas as pd
from mlflow.tracking import MlflowClient

from polyrot import tracking
from polyrot.experiments.pipeline import PROJECTS
from tests.conftest import cli, one_line_error


def test_reproduce_records_verdicts_and_the_report_on_its_parent(smoke_reproduction):
    run = MlflowClient().get_run(smoke_reproduction)
    assert run.data.tags["polyrot.claim.rotation-operator-norm"] == "PASS"
    assert run.data.tags["polyrot.claim.rotation-beats-identity"] == "PASS"
    assert run.data.metrics["claims.pass"] == 2 and run.data.metrics["claims.required_failing"] == 0
    assert abs(run.data.metrics["claim.rotation-operator-norm.value"] - 1) < 5e-5
    report = tracking.artifact_dir(smoke_reproduction) / run.data.tags["polyrot.report"]
    text = report.read_text()
    assert "| rotation-operator-norm: R is orthogonal" in text and "![fig1_ev_by_site.png](fig1_ev_by_site.png)" in text
    for figure in ("fig1_ev_by_site.png", "fig2_eigen_angles.png"):
        assert (report.parent / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"`{run.data.tags['polyrot.node.audit']}`" in text
    # The smoke audit logs a power curve beside its maps: both charts are in the report.
    for figure in ("fig_which_map.png", "fig_power.png"):
        assert (report.parent / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({figure})" in text


def test_verify_prints_the_table_and_passes(smoke_reproduction):
    result = cli("verify", "smoke")
    assert result.exit_code == 0, result.output
    assert f"reproduction {smoke_reproduction}" in result.stdout
    assert "rotation-beats-identity" in result.stdout and "3 claims: 2 PASS" in result.stdout
    table = pd.read_csv(tracking.artifact_dir(smoke_reproduction) / "claims.csv")
    assert list(table["status"])[:2] == ["PASS", "PASS"]
    # Tiny seeds are as Haar-like as the untrained pair: the optional Haar claim has no power (or
    # fails the paper's 5%), and never passes; its row shows the null's range and why.
    haar = table.set_index("id").loc["rotation-haar-no-power"]
    assert haar["status"] in ("NO POWER", "FAIL") and "…" in haar["null"]
    assert haar["status"] != "NO POWER" or "overlaps the measured" in haar["why"]


def test_a_failing_required_claim_exits_1_and_an_optional_one_does_not(smoke_reproduction, tmp_path):
    failing = """
  - id: paper-decoder-cosine
    paper: ">= 98%"
    node: audit
    metrics: ["*.s*.operator_norm"]
    expect: {above: 2.0}
"""
    path = tmp_path / "smoke.yaml"
    path.write_text((PROJECTS / "smoke.yaml").read_text() + failing)
    result = cli("verify", str(path), "--run", smoke_reproduction)
    assert result.exit_code == 1 and "paper-decoder-cosine" in result.stdout and "FAIL" in result.stdout
    assert MlflowClient().get_run(smoke_reproduction).data.tags["polyrot.claim.paper-decoder-cosine"] == "FAIL"
    path.write_text((PROJECTS / "smoke.yaml").read_text() + failing + "    required: false\n")
    assert cli("verify", str(path), "--run", smoke_reproduction).exit_code == 0


def test_report_command_prints_the_report_path(smoke_reproduction):
    result = cli("report", "smoke")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("report/report.md")
    assert str(tracking.artifact_dir(smoke_reproduction)) in result.stdout


def test_bad_input(smoke_reproduction, store):
    one_line_error(cli("verify", "no-such-experiment"), "unknown experiment 'no-such-experiment'; available:")
    one_line_error(cli("verify", "dyck3-cohort-a"), "no finished reproduction of dyck3-cohort-a")
    audit = MlflowClient().get_run(smoke_reproduction).data.tags["polyrot.node.audit"]
    one_line_error(cli("verify", "smoke", "--run", audit), "expected a reproduce run")
    one_line_error(cli("report", "smoke", "--run", "0" * 32), "not found")

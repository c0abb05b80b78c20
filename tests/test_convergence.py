"""Claims along convergence: milestone twins of a node, skipped when a seed never reached the
milestone, and the table and figure of every claim at each milestone."""

import math
import textwrap

from mlflow.tracking import MlflowClient

from polyrot import tracking
from polyrot.experiments import convergence, pipeline, verify
from polyrot.experiments.claims import FAIL, MISSING, NO_POWER, PASS
from polyrot.figures.convergence import claims_along_convergence
from polyrot.stages import STAGES
from tests.conftest import TINY_TRAIN_YAML

# A seed of 40 steps confirms no milestone, so everything at first-0.99 has nothing to read.
MILESTONES = f"""\
name: tiny-milestones
profiles:
  cpu:
    train_seed: {TINY_TRAIN_YAML}
  paper: {{}}
nodes:
  - id: seed0
    stage: train_seed
    params: {{seed: 0}}
  - id: sae0
    stage: train_sae
    params: {{model_run: "@seed0", site: resid_mid_0, expansion: 2, steps: 20, batch_size: 64, eval_every: 20,
             batch_sequences: 64, heldout_sequences: 32, threads: 1}}
  - id: sae0-first-{{m}}
    stage: train_sae
    matrix: {{m: [0.99]}}
    params: {{model_run: "@seed0", checkpoint: "first-{{m}}", site: resid_mid_0, expansion: 2, steps: 20}}
  - id: audit-first-{{m}}
    stage: audit
    matrix: {{m: [0.99]}}
    params: {{source: "@seed0", saes: "@sae0-first-{{m}}", checkpoint: "first-{{m}}", targets: "@seed0"}}
claims:
  - id: sae-trains
    claim: the final SAE explains its own held-out activations
    paper: "(none)"
    node: sae0
    metrics: ["*heldout.ev*"]
    expect: {{above: -100.0}}
  - id: audit-at-99
    claim: read at the first-0.99 checkpoint
    paper: "(none)"
    node: audit-first-0.99
    metrics: ["*.sae_raw_ev"]
    expect: {{below: 0.0}}
"""


def test_a_milestone_a_seed_never_reached_is_skipped_down_the_graph_and_not_measured(own_store, tmp_path):
    path = tmp_path / "milestones.yaml"
    path.write_text(textwrap.dedent(MILESTONES))
    parent = STAGES["reproduce"](name=str(path), experiment="milestones")
    client = MlflowClient()
    nodes = verify.node_runs(client.get_run(parent))
    tags = {node: client.get_run(rid).data.tags for node, rid in nodes.items()}
    assert tracking.TAG_SKIPPED not in tags["seed0"] and tracking.TAG_SKIPPED not in tags["sae0"]
    why = tags["sae0-first-0.99"][tracking.TAG_SKIPPED]
    assert "never confirmed 99.00% min held-out accuracy: it has no checkpoint first-0.99" in why
    assert nodes["seed0"][:8] in why
    # The audit reads the skipped SAE run: skipped in turn, for the same reason, and FINISHED.
    assert tags["audit-first-0.99"][tracking.TAG_SKIPPED] == why
    assert client.get_run(nodes["audit-first-0.99"]).info.status == "FINISHED"
    assert not client.get_run(nodes["audit-first-0.99"]).data.metrics

    exp, run = verify.reproduction(str(path), parent)
    verdicts = {v.claim.id: v for v in verify.verify(exp, run)}
    assert verdicts["sae-trains"].status == PASS
    assert verdicts["audit-at-99"].status == MISSING
    assert verdicts["audit-at-99"].reason == f"audit-first-0.99 skipped: {why}"

    # A skipped run is reused like a finished one, and says so.
    again = STAGES["reproduce"](name=str(path), experiment="milestones")
    assert client.get_run(again).data.metrics["ran"] == 0
    assert verify.node_runs(client.get_run(again)) == nodes


ALONG = """\
name: tiny-along
profiles:
  cpu: {}
nodes:
  - id: seed0
    stage: train_seed
    params: {seed: 0}
  - id: audit
    stage: audit
    params: {source: "@seed0", saes: "@seed0", targets: "@seed0"}
  - id: audit-first-{m}
    stage: audit
    matrix: {m: [0.99, 0.999]}
    params: {source: "@seed0", saes: "@seed0", targets: "@seed0", checkpoint: "first-{m}"}
claims:
  - id: gap-small
    paper: "< 0.025"
    node: audit
    metrics: ["*.s*.gap"]
    expect: {below: 0.025}
    "null": ["*.untrained.gap"]
  - id: seed-only
    paper: "(none)"
    node: seed0
    metrics: ["acc"]
    expect: {above: 0.5}
  - id: premise-final
    paper: "1"
    node: audit
    metrics: ["*.s*.gap"]
    expect: {below: 1}
    final_only: true
"""


def test_each_claim_of_a_twinned_node_is_evaluated_at_every_milestone_and_final(tmp_path):
    path = tmp_path / "along.yaml"
    path.write_text(ALONG)
    exp = pipeline.load_experiment(str(path))
    assert convergence.twins(exp) == {"audit": [(0.99, "audit-first-0.99"), (0.999, "audit-first-0.999")]}
    metrics = {
        "seed0": {"acc": 0.9},
        # Final: the trained gaps pass, but the untrained null's range overlaps them.
        "audit": {"a.s1.gap": 0.01, "b.s1.gap": 0.02, "a.untrained.gap": 0.015},
        # At 99% the gaps are still wide; the null is read from the final audit, which alone has it.
        "audit-first-0.99": {"a.s1.gap": 0.3, "b.s1.gap": 0.1},
        # first-0.999 never ran (skipped): no metrics.
    }
    table = convergence.along(exp, metrics)
    # seed-only reads a node without twins; premise-final holds on the final weights only.
    assert list(table["claim"].unique()) == ["gap-small"]
    assert {c.id: c.final_only for c in exp.claims} == {"gap-small": False, "seed-only": False, "premise-final": True}
    rows = table.set_index("checkpoint")
    assert list(rows.index) == ["first-0.99", "first-0.999", "final"]
    assert rows.loc["first-0.99", "status"] == FAIL and rows.loc["first-0.99", "value"] == 0.3
    assert (rows.loc["first-0.99", "lo"], rows.loc["first-0.99", "hi"]) == (0.1, 0.3)
    assert rows.loc["first-0.999", "status"] == MISSING and math.isnan(rows.loc["first-0.999", "value"])
    assert rows.loc["final", "status"] == NO_POWER and rows.loc["final", "value"] == 0.02
    assert convergence.trend(table["value"]) == "falls"

    text = convergence.render_markdown(table, exp)
    assert "| gap-small | < 0.025 | every value < 0.025 | 0.3 FAIL | not measured | 0.02 NO POWER | falls |" in text
    fig = claims_along_convergence(table, {c.id: c.bounds for c in exp.claims})
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == "gap-small"

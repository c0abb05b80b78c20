"""Claims as data: parsing, verdicts on metrics, pairing, and errors in experiment files."""

import math
import textwrap

import pytest

from polyrot.experiments import pipeline
from polyrot.experiments.claims import (
    FAIL,
    MISSING,
    NO_POWER,
    PASS,
    VERDICTS,
    ClaimError,
    evaluate,
    failed_required,
    parse_claim,
    render_markdown,
    render_text,
)

METRICS = {
    "audit": {"resid_mid_0.s1.sae_raw_ev": -3.0, "resid_mid_0.s2.sae_raw_ev": -1.0, "resid_post_1.s1.sae_raw_ev": 0.2,
              "resid_mid_0.s1.firing_rotated_mean": 0.7, "resid_mid_0.s1.firing_raw_mean": 0.3,
              "resid_mid_0.s2.firing_rotated_mean": 0.5, "resid_mid_0.s2.firing_raw_mean": 0.6},
    "seed0": {"final.acc.min": 0.995},
    "seed1": {"final.acc.min": 0.9999},
}


def claim(**fields):
    return parse_claim({"id": "c", "paper": "p", "node": "audit", **fields}, "test.yaml:1")


def test_every_value_must_pass_and_the_worst_is_reported():
    v = evaluate(claim(metrics="resid_*.s*.sae_raw_ev", expect={"below": 0}), METRICS)
    assert v.status == FAIL and v.measured == 0.2 and v.n == 3 and v.spread == (-3.0, 0.2)
    v = evaluate(claim(metrics="resid_mid_*.s*.sae_raw_ev", expect={"below": 0}), METRICS)
    assert v.status == PASS and v.measured == -1.0  # the value nearest the bound


def test_reductions_tolerance_and_near():
    assert evaluate(claim(metrics="*.sae_raw_ev", reduce="mean", expect={"below": 0}), METRICS).measured == \
        pytest.approx(-1.2667, abs=1e-4)
    assert evaluate(claim(metrics="*.sae_raw_ev", reduce="max", expect={"below": 0.1}, tol=0.1), METRICS).status == PASS
    assert evaluate(claim(metrics="*.sae_raw_ev", reduce="min", expect={"near": -3.05}, tol=0.1), METRICS).status == PASS
    assert evaluate(claim(metrics="*.sae_raw_ev", reduce="median", expect={"between": [-2, 0]}), METRICS).measured == -1.0


def test_node_globs_gather_several_runs():
    v = evaluate(parse_claim({"id": "acc", "paper": "99.99%", "node": "seed*", "metrics": "final.acc.min",
                              "expect": {"above": 0.9999}}, "x"), METRICS)
    assert v.status == FAIL and v.n == 2 and set(v.values) == {"seed0/final.acc.min", "seed1/final.acc.min"}


def test_compare_to_pairs_metrics_by_prefix():
    c = claim(metrics="*.firing_rotated_mean", compare_to="*.firing_raw_mean", expect={"above": 0})
    v = evaluate(c, METRICS)
    assert v.status == FAIL and v.values == pytest.approx({"audit/resid_mid_0.s1.firing_rotated_mean": 0.4,
                                                           "audit/resid_mid_0.s2.firing_rotated_mean": -0.1})
    ratio = claim(metrics="*.firing_rotated_mean", compare_to="*.firing_raw_mean", op="ratio", reduce="max",
                  expect={"above": 2})
    assert evaluate(ratio, METRICS).measured == pytest.approx(0.7 / 0.3)
    with pytest.raises(ClaimError, match="has no partner"):
        evaluate(claim(metrics="*.firing_rotated_mean", compare_to="resid_post_1.*", expect={"above": 0}), METRICS)


def test_dotless_metrics_pair_within_their_node():
    metrics = {"attribution1": {"r_ig": 0.99, "r_ap": 0.2}, "attribution2": {"r_ig": 0.98, "r_ap": 0.9}}
    c = parse_claim({"id": "ig", "paper": "0.98 vs 0.05", "node": "attribution*", "metrics": "r_ig",
                     "compare_to": "r_ap", "expect": {"above": 0.5}}, "x")
    v = evaluate(c, metrics)
    assert v.status == FAIL and v.values == pytest.approx({"attribution1/r_ig": 0.79, "attribution2/r_ig": 0.08})


def test_missing_metrics_fail_only_required_claims():
    required = evaluate(claim(metrics="nothing.*", expect={"above": 0}), METRICS)
    optional = evaluate(claim(metrics="nothing.*", expect={"above": 0}, required=False), METRICS)
    assert required.status == optional.status == MISSING and required.measured is None
    assert failed_required([required, optional]) == [required]
    text = render_text([required, optional])
    assert "NOT MEASURED" in text and "2 claims: 0 PASS, 0 FAIL, 0 NO POWER, 2 NOT MEASURED; 1 required" in text


def test_nan_values_are_not_measurements():
    assert evaluate(claim(metrics="x", expect={"above": 0}), {"audit": {"x": math.nan}}).status == MISSING


NULLED = {"audit": {"resid_mid_0.s1.frob_ratio": 0.97, "resid_mid_0.s2.frob_ratio": 0.99,
                   "resid_mid_0.untrained.frob_ratio": 0.96, "resid_mid_1.untrained.frob_ratio": 0.98,
                   "resid_mid_0.s1.identity_ev": 0.66, "resid_mid_0.s2.identity_ev": 0.64}}


def test_a_claim_the_null_passes_too_or_whose_values_meet_the_null_has_no_power():
    haar = {"metrics": "resid_mid_0.s*.frob_ratio", "expect": {"near": 1.0}, "tol": 0.05}
    assert evaluate(claim(**haar), NULLED).status == PASS
    # The untrained 0.96 and 0.98 lie within 5% of 1 as well: the claim says the same of them.
    v = evaluate(claim(**haar, null="*.untrained.frob_ratio"), NULLED)
    assert v.status == NO_POWER and v.null_spread == (0.96, 0.98) and v.null_n == 2
    assert v.null_shown == "0.96 … 0.98 (n=2)" and v.reason == "the null's 0.96 … 0.98 passes too"
    # Ends that print alike are printed once.
    alike = {"audit": {**NULLED["audit"], "resid_mid_0.untrained.frob_ratio": 0.96001, "resid_mid_1.untrained.frob_ratio": 0.96002}}
    v = evaluate(claim(**haar, null="*.untrained.frob_ratio"), alike)
    assert v.null_shown == "0.96 (n=2)" and v.reason == "the null's 0.96 passes too"
    # A null that fails the claim (0.90 is 10% off) but reaches the measured 0.97 … 0.99 has no power either.
    near = {"audit": {**NULLED["audit"], "resid_mid_0.untrained.frob_ratio": 0.975, "resid_mid_1.untrained.frob_ratio": 0.90}}
    v = evaluate(claim(**haar, null="*.untrained.frob_ratio"), near)
    assert v.status == NO_POWER and v.reason == "the null's 0.9 … 0.975 overlaps the measured 0.97 … 0.99"
    # Apart from the null's range the claim passes, and outside the paper's interval it fails.
    apart = {"audit": {**NULLED["audit"], "resid_mid_0.untrained.frob_ratio": 0.5, "resid_mid_1.untrained.frob_ratio": 0.6}}
    assert evaluate(claim(**haar, null="*.untrained.frob_ratio"), apart).status == PASS
    assert evaluate(claim(metrics="resid_mid_0.s*.frob_ratio", expect={"below": 0.9}, null="*.untrained.frob_ratio"),
                    NULLED).status == FAIL
    # A claim whose null was not logged keeps its verdict and says the null was not measured.
    v = evaluate(claim(**haar, null="*.never.frob_ratio"), NULLED)
    assert v.status == PASS and v.null_shown == "not measured"
    assert NO_POWER in VERDICTS and len(set(VERDICTS)) == 4
    assert failed_required([v, evaluate(claim(**haar, null="*.untrained.frob_ratio"), NULLED)]) != []


FIRING = {"audit": {"resid_mid_0.s1.firing_rotated_mean": 0.7, "resid_mid_0.s1.firing_raw_mean": 0.3,
                   "resid_mid_1.s1.firing_rotated_mean": 0.6, "resid_mid_1.s1.firing_raw_mean": 0.1,
                   "resid_mid_0.untrained.firing_rotated_mean": 0.25, "resid_mid_0.untrained.firing_raw_mean": 0.07,
                   "resid_mid_1.untrained.firing_rotated_mean": 0.22, "resid_mid_1.untrained.firing_raw_mean": 0.06}}


def test_a_compared_claim_compares_its_null_the_same_way():
    helps = {"metrics": "*.s*.firing_rotated_mean", "compare_to": "*.s*.firing_raw_mean", "expect": {"above": 0.2},
             "null": "*.untrained.firing_rotated_mean", "null_compare_to": "*.untrained.firing_raw_mean"}
    # Trained gains 0.4 and 0.5, the untrained pair's 0.18 and 0.16: apart, and the null fails.
    v = evaluate(claim(**helps), FIRING)
    assert v.status == PASS and v.null_spread == pytest.approx((0.16, 0.18)) and v.null_n == 2
    closer = {"audit": {**FIRING["audit"], "resid_mid_0.untrained.firing_rotated_mean": 0.52}}
    v = evaluate(claim(**helps), closer)
    assert v.status == NO_POWER and v.null_spread == pytest.approx((0.16, 0.45))
    assert v.reason == "the null's 0.16 … 0.45 overlaps the measured 0.4 … 0.5"
    # "Rotation helps at all" holds for the untrained pair too.
    v = evaluate(claim(**{**helps, "expect": {"above": 0}}), FIRING)
    assert v.status == NO_POWER and v.reason == "the null's 0.16 … 0.18 passes too"


def test_a_null_can_be_read_from_a_node_of_its_own():
    # The Hugging Face experiments audit untrained checkpoints (revision step0) as a node of their own,
    # with the same metric names as the trained audit's.
    metrics = {"audit": {"layer1.m-main.frob_ratio": 0.99, "layer2.m-main.frob_ratio": 1.0},
               "audit-null": {"layer1.m-step0.frob_ratio": 0.98, "layer2.m-step0.frob_ratio": 1.01}}
    haar = {"metrics": "*.frob_ratio", "expect": {"near": 1.0}, "tol": 0.05, "null": "*.m-step0.frob_ratio"}
    v = evaluate(claim(**haar, null_node="audit-nu*"), metrics)
    assert v.status == NO_POWER and v.null_spread == (0.98, 1.01) and v.reason == "the null's 0.98 … 1.01 passes too"
    # Without null_node the null is looked for on the claim's own node, where it was not logged.
    v = evaluate(claim(**haar), metrics)
    assert v.status == PASS and v.null_shown == "not measured"


def test_a_reduced_claim_has_power_when_its_reduced_value_leaves_the_null():
    metrics = {"audit": {"a.s1.sae_raw_ev": -6.0, "b.s1.sae_raw_ev": 0.5, "a.untrained.sae_raw_ev": 0.4,
                         "b.untrained.sae_raw_ev": 0.9}}
    mean = {"metrics": "*.s*.sae_raw_ev", "reduce": "mean", "expect": {"below": 0}, "null": "*.untrained.sae_raw_ev"}
    # The trained values straddle the null's 0.4 … 0.9, but their mean (-2.75) lies far from it, and
    # the null's own mean (0.65) fails the claim.
    v = evaluate(claim(**mean), metrics)
    assert v.status == PASS and v.measured == pytest.approx(-2.75) and v.spread == (-6.0, 0.5)
    v = evaluate(claim(**{**mean, "expect": {"below": 1}}), metrics)
    assert v.status == NO_POWER and v.reason == "the null's 0.4 … 0.9 passes too"
    inside = {"audit": {**metrics["audit"], "a.s1.sae_raw_ev": 0.0, "b.s1.sae_raw_ev": 1.0}}
    v = evaluate(claim(**{**mean, "expect": {"below": 0.6}}), inside)
    assert v.status == NO_POWER and v.reason == "the null's 0.4 … 0.9 overlaps the measured mean 0.5"


def test_a_verdict_that_does_not_pass_carries_its_attribution():
    why = {"metric": "resid_mid_0.s*.identity_ev", "text": "pinned by the shared unembedding: identity EV {value:.2f}"}
    v = evaluate(claim(metrics="resid_mid_0.s*.frob_ratio", expect={"below": 0.5}, attribution=why), NULLED)
    assert v.status == FAIL and v.reason == "pinned by the shared unembedding: identity EV 0.65"
    assert "identity EV 0.65" in render_text([v]) and "identity EV 0.65" in render_markdown([v])
    assert evaluate(claim(metrics="resid_mid_0.s*.frob_ratio", expect={"below": 5}, attribution=why), NULLED).reason == ""
    # No metric behind it: no attribution rather than a made-up one.
    ghost = {**why, "metric": "nothing.*"}
    assert evaluate(claim(metrics="resid_mid_0.s*.frob_ratio", expect={"below": 0.5}, attribution=ghost),
                    NULLED).reason == ""


@pytest.mark.parametrize("fields,message", [
    ({"metrics": "x", "expect": {"below": 0}, "attribution": "because"}, "'attribution' takes a mapping"),
    ({"metrics": "x", "expect": {"below": 0}, "attribution": {"metric": "x", "text": "{valu}"}},
     "must format with {value}"),
    ({"metrics": "x", "expect": {"below": 0}, "attribution": {"metric": "x", "text": "t", "by": 1}},
     "attribution has no field 'by'"),
    ({"metrics": "x", "expect": {"below": 0}, "null": []}, "'null' takes a metric-name glob"),
    ({"metrics": "x", "compare_to": "y", "expect": {"below": 0}, "null": "u.x"}, "needs null_compare_to"),
    ({"metrics": "x", "expect": {"below": 0}, "null": "u.x", "null_compare_to": "u.y"}, "null_compare_to needs compare_to"),
    ({"metrics": "x", "compare_to": "y", "expect": {"below": 0}, "null_compare_to": "u.y"}, "null_compare_to needs a null"),
    ({"metrics": "x", "expect": {"below": 0}, "null_node": "audit-null"}, "null_node needs a null"),
    ({"metrics": "x", "expect": {"below": 0}, "null": "x", "null_node": ""}, "'null_node' takes a node id or glob"),
    ({"expect": {"below": 0}}, "needs 'metrics'"),
    ({"metrics": "x", "expect": {"below": 0, "above": 1}}, "exactly one of"),
    ({"metrics": "x", "expect": {"near": 1}}, "'near' needs a positive 'tol'"),
    ({"metrics": "x", "expect": {"between": [2, 1]}}, "empty interval"),
    ({"metrics": "x", "expect": {"between": "a"}}, "bad 'expect'"),
    ({"metrics": "x", "expect": {"below": 0}, "reduce": "sum"}, "reduce must be one of"),
    ({"metrics": "x", "expect": {"below": 0}, "op": "product"}, "op must be one of"),
    ({"metrics": [], "expect": {"below": 0}}, "'metrics' takes a metric-name glob"),
    ({"metrics": "x", "expect": {"below": 0}, "bound": 3}, "claim has no field 'bound'"),
    ({"metrics": "x", "expect": {"below": 0}, "required": "no"}, "'required' takes true or false, got 'no'"),
    ({"metrics": "x", "expect": {"below": 0}, "final_only": 1}, "'final_only' takes true or false, got 1"),
    ({"metrics": "x", "expect": {"near": 1}, "tol": "1%"}, "'tol' takes a number, got '1%'"),
])
def test_bad_claims_say_what_is_wrong(fields, message):
    with pytest.raises(ClaimError, match=message) as err:
        claim(**fields)
    assert str(err.value).startswith("test.yaml:1: ")


def test_claims_in_an_experiment_file_are_checked_before_any_run(tmp_path):
    body = textwrap.dedent("""\
        name: with-claims
        profiles: {cpu: {}}
        nodes:
          - id: seed0
            stage: train_seed
            params: {seed: 0}
        claims:
          - id: acc
            paper: "99.99%"
            node: seed0
            metrics: final.acc.min
            expect: {above: 0.9999}
          - id: ghost
            paper: "-"
            node: audit
            metrics: x
            expect: {above: 0}
        """)
    path = tmp_path / "with-claims.yaml"
    path.write_text(body)
    with pytest.raises(pipeline.ExperimentError, match=r"with-claims.yaml:13: claim ghost's node 'audit' matches no node"):
        pipeline.load_experiment(str(path))
    path.write_text(body.replace("node: audit", 'node: seed0\n    "null": x\n    null_node: seed-untrained'))
    with pytest.raises(pipeline.ExperimentError, match=r"claim ghost's null_node 'seed-untrained' matches no node"):
        pipeline.load_experiment(str(path))
    path.write_text(body.replace("id: ghost", "id: acc"))
    with pytest.raises(pipeline.ExperimentError, match="duplicate claim id 'acc'"):
        pipeline.load_experiment(str(path))


def test_the_dyck3_experiments_state_at_least_twenty_claims():
    claims = [c for name in pipeline.available() if name.startswith("dyck3-")
              for c in pipeline.load_experiment(name).claims]
    assert len(claims) >= 20
    assert {c.section for c in claims} >= {"§8.1", "§8.2", "§8.3", "§8.5", "§8.6"}


def test_a_value_near_one_is_not_printed_as_one():
    v = evaluate(claim(metrics="r", expect={"above": 0.999}, null="u.r"), {"audit": {"r": 0.9996, "u.r": 0.999975}})
    assert v.shown == "0.9996" and v.null_shown == "0.999975" and v.status == NO_POWER
    assert v.reason == "the null's 0.999975 passes too"
    assert evaluate(claim(metrics="r", expect={"above": 0}), {"audit": {"r": 241.96}}).shown == "242"

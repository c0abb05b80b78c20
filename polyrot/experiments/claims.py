"""The paper's claims as data, and their verdicts on measured metrics.

A claim lives in an experiment file (`claims:` in projects/*.yaml) because it reads the metrics of
that experiment's nodes:

    - id: sae-raw-ev-negative              unique within the experiment
      section: "§8.1"                      where the paper says it
      claim: the source SAE reconstructs other seeds at negative EV, every internal site
      paper: "< 0 at every internal site"  the paper's value or bound, as the paper gives it
      node: audit                          node id whose run's metrics are read (a glob: seed*)
      metrics: ["resid_mid_*.s*.sae_raw_ev"]   metric-name globs (fnmatch, case-sensitive; `*` also
                                           matches dots, so `s[0-9].bar_b` rather than `s*.bar_b`,
                                           which would take `s1.cross.bar_b` too)
      compare_to: [...]                    optional: partner globs, paired by metric prefix
      op: difference                       difference (value - partner) or ratio (value / partner)
      reduce: all                          all (every value must pass), min, max, mean or median
      expect: {below: 0}                   below / above / between [lo, hi] / near + tol
      tol: 0                               added to the bounds (absolute)
      required: true                       a failing required claim makes `verify` exit 1
      "null": ["*.untrained.frob_ratio"]   optional: the same quantity on a null control (globs
                                           on the same node unless null_node says); values inside
                                           its range: NO POWER. Quoted: a bare null: key is YAML's null
      null_compare_to: [...]               the null's partner globs, needed by a compared claim
                                           with a null: the null is compared as the claim is
      null_node: untrained-audit           optional: the node (glob) the null is read from, when the
                                           control is a run of its own (untrained checkpoints
                                           through the same stage); default the claim's node
      final_only: true                     optional: the claim's premise holds on the final weights
                                           only, so claims along convergence leave it out
      attribution:                         optional: why a claim that fails, from a metric
        metric: "resid_post_1.s*.identity_ev"      (globs, node as the claim's unless given)
        text: "pinned by the shared unembedding: identity EV {value:.2f}"
        reduce: mean                       over the matched values (default mean)

Pairing with `compare_to`: a metric and its partner are paired when they come from the same node
and their names agree after dropping the last dotted component (`resid_mid_0.s1.firing_rotated_mean`
pairs with `resid_mid_0.s1.firing_raw_mean`; dotless names such as `r_ig` and `r_ap` pair by node);
a metric without a partner is an error of the claim.

Verdicts (VERDICTS, defined here only):
  PASS          the measured value lies in the paper's interval and, with a null, apart from it
  FAIL          it lies outside the paper's interval
  NO POWER      it lies inside the interval, but the claim cannot tell the trained models from the
                control, so nothing was shown: the null passes the claim too, or the null's values
                overlap the measured ones (for reduce: all) or the reduced value (for the others).
                Its reason says which, with the null's range
  NOT MEASURED  no metric matched (the node did not run, or logs other names)
Only PASS counts as verified: a required claim with any other verdict makes `verify` exit 1.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from polyrot.errors import ParameterError

REDUCERS = ("all", "min", "max", "mean", "median")
OPS = ("difference", "ratio")
EXPECTATIONS = ("below", "above", "between", "near")
PASS, FAIL, NO_POWER, MISSING = "PASS", "FAIL", "NO POWER", "NOT MEASURED"
VERDICTS = (PASS, FAIL, NO_POWER, MISSING)
_KEYS = {"id", "section", "claim", "paper", "node", "metrics", "compare_to", "op", "reduce", "expect", "tol",
         "required", "null", "null_compare_to", "null_node", "attribution", "final_only"}
_ATTRIBUTION_KEYS = {"metric", "text", "reduce", "node"}


def slug(status: str) -> str:
    """A verdict as a metric-name part: "NO POWER" -> "no_power"."""
    return status.lower().replace(" ", "_")


@dataclass(frozen=True)
class Attribution:
    """A one-line reason for a verdict other than PASS, read from a logged metric."""

    metrics: tuple[str, ...]
    text: str
    reduce: str = "mean"
    node: str | None = None


class ClaimError(ParameterError):
    pass


@dataclass(frozen=True)
class Claim:
    id: str
    section: str
    claim: str
    paper: str
    node: str
    metrics: tuple[str, ...]
    expect: Mapping[str, object]
    reduce: str = "all"
    compare_to: tuple[str, ...] = ()
    op: str = "difference"
    tol: float = 0.0
    required: bool = True
    null: tuple[str, ...] = ()
    null_compare_to: tuple[str, ...] = ()
    null_node: str | None = None
    attribution: Attribution | None = None
    final_only: bool = False

    @property
    def null_source(self) -> str:
        """The node glob the null is read from."""
        return self.null_node or self.node

    @property
    def bounds(self) -> tuple[float, float]:
        """The accepted interval [lo, hi], tolerance included."""
        e = self.expect
        if "below" in e:
            return -math.inf, float(e["below"]) + self.tol
        if "above" in e:
            return float(e["above"]) - self.tol, math.inf
        if "between" in e:
            lo, hi = e["between"]
            return float(lo) - self.tol, float(hi) + self.tol
        return float(e["near"]) - self.tol, float(e["near"]) + self.tol

    @property
    def expectation(self) -> str:
        """The accepted interval in words, for the table."""
        lo, hi = self.bounds
        which = "every value" if self.reduce == "all" else self.reduce
        if "near" in self.expect:  # at 4 significant digits, [1 - 5e-05, 1 + 5e-05] would print as [1, 1]
            return f"{which} in {float(self.expect['near']):.4g} ± {self.tol:.3g}"
        if math.isinf(lo):
            return f"{which} < {hi:.4g}"
        if math.isinf(hi):
            return f"{which} > {lo:.4g}"
        return f"{which} in [{lo:.4g}, {hi:.4g}]"


@dataclass
class Verdict:
    claim: Claim
    status: str
    measured: float | None = None  # the reduced value (for reduce=all: the worst one)
    spread: tuple[float, float] | None = None  # min and max over the matched values
    n: int = 0
    values: dict[str, float] = field(default_factory=dict)
    null_spread: tuple[float, float] | None = None  # min and max over the null's values
    null_n: int = 0
    reason: str = ""  # why: the overlap for NO POWER, the claim's attribution for FAIL

    @property
    def shown(self) -> str:
        if self.status == MISSING:
            return "not measured"
        if self.claim.reduce == "all" and self.n > 1:
            return f"{_span(*self.spread)} (n={self.n})"
        return _fmt(self.measured) + (f" (n={self.n})" if self.n > 1 else "")

    @property
    def null_shown(self) -> str:
        """The null's range, or "" without one (or when the claim names one that was not measured)."""
        if self.null_spread is None:
            return "not measured" if self.claim.null else ""
        lo, hi = self.null_spread
        return _span(lo, hi) + (f" (n={self.null_n})" if self.null_n > 1 else "")


def _fmt(x: float) -> str:
    text = f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3g}"
    # A correlation of 0.99997 is not 1: keep the digits that say so.
    return f"{x:.6g}" if abs(float(text)) == 1 and x != float(text) else text


def _span(lo: float, hi: float) -> str:
    return _fmt(lo) if _fmt(lo) == _fmt(hi) else f"{_fmt(lo)} … {_fmt(hi)}"


def _globs(value, where: str, key: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(g, str) and g for g in items):
        raise ClaimError(f"{where}: '{key}' takes a metric-name glob or a list of them")
    return tuple(items)


def _node(value, where: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ClaimError(f"{where}: '{key}' takes a node id or glob")
    return value


def _attribution(value, where: str, claim_id: str) -> Attribution:
    if not isinstance(value, Mapping) or "metric" not in value or "text" not in value:
        raise ClaimError(f"{where}: claim {claim_id}: 'attribution' takes a mapping with metric and text")
    value = {k: v for k, v in value.items() if k != "__line__"}
    unknown = sorted(set(value) - _ATTRIBUTION_KEYS)
    if unknown:
        raise ClaimError(f"{where}: claim {claim_id}: attribution has no field {unknown[0]!r}; "
                         f"fields: {', '.join(sorted(_ATTRIBUTION_KEYS))}")
    reduce = value.get("reduce", "mean")
    if reduce not in REDUCERS[1:]:
        raise ClaimError(f"{where}: claim {claim_id}: attribution reduce must be one of "
                         f"{', '.join(REDUCERS[1:])}, got {reduce!r}")
    try:
        str(value["text"]).format(value=0.0)
    except (KeyError, IndexError, ValueError) as e:
        raise ClaimError(f"{where}: claim {claim_id}: attribution text must format with {{value}} only: {e}") from None
    return Attribution(_globs(value["metric"], where, "attribution.metric"), str(value["text"]), reduce,
                       str(value["node"]) if "node" in value else None)


def _flag(entry: Mapping, key: str, default: bool, where: str) -> bool:
    """A yes/no field, YAML's true or false only: bool("no") would read as true."""
    value = entry.get(key, default)
    if not isinstance(value, bool):
        raise ClaimError(f"{where}: claim {entry['id']}: '{key}' takes true or false, got {value!r}")
    return value


def _tolerance(entry: Mapping, where: str) -> float:
    value = entry.get("tol", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ClaimError(f"{where}: claim {entry['id']}: 'tol' takes a number, got {value!r}")
    return float(value)


def parse_claim(entry: Mapping, where: str) -> Claim:
    """One claim from its YAML mapping; `where` (file:line) prefixes every error."""
    if not isinstance(entry, Mapping):
        raise ClaimError(f"{where}: a claim is a mapping with id, node, metrics and expect")
    entry = {k: v for k, v in entry.items() if k != "__line__"}
    if None in entry:
        raise ClaimError(f"{where}: claim {entry.get('id', '?')!r}: a bare null: key reads as YAML's null; "
                         'write "null": in quotes')
    unknown = sorted(set(entry) - _KEYS, key=str)
    if unknown:
        raise ClaimError(f"{where}: claim has no field {unknown[0]!r}; fields: {', '.join(sorted(_KEYS))}")
    for key in ("id", "node", "metrics", "expect", "paper"):
        if key not in entry:
            raise ClaimError(f"{where}: claim {entry.get('id', '?')!r} needs '{key}'")
    expect = entry["expect"]
    if not isinstance(expect, Mapping) or len(set(expect) & set(EXPECTATIONS)) != 1:
        raise ClaimError(f"{where}: claim {entry['id']}: 'expect' takes exactly one of {', '.join(EXPECTATIONS)}")
    expect = {k: v for k, v in expect.items() if k != "__line__"}
    reduce, op = entry.get("reduce", "all"), entry.get("op", "difference")
    if reduce not in REDUCERS:
        raise ClaimError(f"{where}: claim {entry['id']}: reduce must be one of {', '.join(REDUCERS)}, got {reduce!r}")
    if op not in OPS:
        raise ClaimError(f"{where}: claim {entry['id']}: op must be one of {', '.join(OPS)}, got {op!r}")
    claim = Claim(
        id=str(entry["id"]), section=str(entry.get("section", "")), claim=str(entry.get("claim", "")),
        paper=str(entry["paper"]), node=str(entry["node"]), metrics=_globs(entry["metrics"], where, "metrics"),
        expect=expect, reduce=reduce, op=op, tol=_tolerance(entry, where), required=_flag(entry, "required", True, where),
        compare_to=_globs(entry["compare_to"], where, "compare_to") if "compare_to" in entry else (),
        null=_globs(entry["null"], where, "null") if "null" in entry else (),
        null_compare_to=_globs(entry["null_compare_to"], where, "null_compare_to") if "null_compare_to" in entry else (),
        null_node=_node(entry["null_node"], where, "null_node") if "null_node" in entry else None,
        attribution=_attribution(entry["attribution"], where, str(entry["id"])) if "attribution" in entry else None,
        final_only=_flag(entry, "final_only", False, where),
    )
    try:
        lo, hi = claim.bounds
    except (TypeError, ValueError):
        raise ClaimError(f"{where}: claim {claim.id}: bad 'expect' {expect!r}") from None
    if "near" in expect and claim.tol <= 0:
        raise ClaimError(f"{where}: claim {claim.id}: 'near' needs a positive 'tol'")
    if lo > hi:
        raise ClaimError(f"{where}: claim {claim.id}: empty interval [{lo}, {hi}]")
    # A compared claim's values are differences or ratios: its null must be compared the same way.
    if claim.null and bool(claim.compare_to) != bool(claim.null_compare_to):
        raise ClaimError(f"{where}: claim {claim.id}: " + (
            "a null on a claim with compare_to needs null_compare_to, the null's partner globs"
            if claim.compare_to else "null_compare_to needs compare_to"))
    if (claim.null_compare_to or claim.null_node) and not claim.null:
        raise ClaimError(f"{where}: claim {claim.id}: {'null_compare_to' if claim.null_compare_to else 'null_node'} "
                         "needs a null")
    return claim


def _matching(metrics: Mapping[str, Mapping[str, float]], node_glob: str, globs: tuple[str, ...]) -> dict[str, float]:
    """{'node/metric': value} for every metric of a matching node whose name matches a glob."""
    found = {}
    for node, values in metrics.items():
        if fnmatch.fnmatchcase(node, node_glob):
            for name, value in values.items():
                if any(fnmatch.fnmatchcase(name, g) for g in globs):
                    found[f"{node}/{name}"] = float(value)
    return found


def _prefix(key: str) -> str:
    """'node/a.b.c' -> 'node/a.b'; a dotless metric name pairs by its node alone ('node/r_ap' -> 'node')."""
    node, name = key.split("/", 1)
    return f"{node}/{name.rsplit('.', 1)[0]}" if "." in name else node


def _reason(claim: Claim, metrics: Mapping[str, Mapping[str, float]]) -> str:
    found = claim.attribution
    if found is None:
        return ""
    values = [v for v in _matching(metrics, found.node or claim.node, found.metrics).values() if not math.isnan(v)]
    return found.text.format(value=float(getattr(np, found.reduce)(values))) if values else ""


def evaluate(claim: Claim, metrics: Mapping[str, Mapping[str, float]]) -> Verdict:
    """The claim's verdict on `metrics` ({node id: {metric name: value}})."""
    verdict = _evaluate(claim, metrics)
    null = list(_values(claim, metrics, claim.null, claim.null_compare_to, claim.null_source).values()) \
        if claim.null else []
    if null:
        verdict.null_spread, verdict.null_n = (min(null), max(null)), len(null)
    if null and verdict.status == PASS:
        lo, hi = verdict.null_spread
        # For reduce: all, every trained value must leave the null's range; for a reduced claim, its
        # reduced value must: a mean far from the null can come from values that straddle it.
        low, high = verdict.spread if claim.reduce == "all" else (verdict.measured,) * 2
        if _passes(claim, null):  # the claim would say the same of untrained models
            verdict.status = NO_POWER
            verdict.reason = f"the null's {_span(lo, hi)} passes too"
        elif low <= hi and high >= lo:  # the trained values do not leave the null's range
            verdict.status = NO_POWER
            verdict.reason = f"the null's {_span(lo, hi)} overlaps the measured " + (
                _span(low, high) if claim.reduce == "all" else f"{claim.reduce} {_fmt(low)}")
    if verdict.status == FAIL:
        verdict.reason = _reason(claim, metrics)
    return verdict


def _values(claim: Claim, metrics: Mapping[str, Mapping[str, float]], globs: tuple[str, ...],
            partner_globs: tuple[str, ...], node: str) -> dict[str, float]:
    """{'node/metric': value} for `globs` on `node` (a glob), each taken against its partner under
    `partner_globs` (by claim.op) when there are any; NaNs dropped."""
    values = _matching(metrics, node, globs)
    if partner_globs:
        partners = {_prefix(k): v for k, v in _matching(metrics, node, partner_globs).items()}
        if values and not all(_prefix(k) in partners for k in values):
            lonely = next(k for k in values if _prefix(k) not in partners)
            raise ClaimError(f"claim {claim.id}: metric {lonely} has no partner among {', '.join(partner_globs)}")
        values = {k: (v - partners[_prefix(k)] if claim.op == "difference" else v / partners[_prefix(k)])
                  for k, v in values.items()}
    return {k: v for k, v in values.items() if not math.isnan(v)}


def _reduced(claim: Claim, values: list[float]) -> float:
    """The value a claim judges: for reduce all, the one furthest outside the interval (or closest to
    its edge); else the reduction."""
    arr = np.array(values)
    if claim.reduce != "all":
        return float(getattr(np, claim.reduce)(arr))
    lo, hi = claim.bounds
    return float(arr[int(np.argmax(np.maximum(lo - arr, arr - hi)))])


def _passes(claim: Claim, values: list[float]) -> bool:
    lo, hi = claim.bounds
    return lo <= _reduced(claim, values) <= hi


def _evaluate(claim: Claim, metrics: Mapping[str, Mapping[str, float]]) -> Verdict:
    values = _values(claim, metrics, claim.metrics, claim.compare_to, claim.node)
    if not values:
        return Verdict(claim, MISSING)
    found = list(values.values())
    return Verdict(claim, PASS if _passes(claim, found) else FAIL, _reduced(claim, found),
                   (min(found), max(found)), len(found), values)


def verdict_table(verdicts: list[Verdict]) -> pd.DataFrame:
    return pd.DataFrame([{
        "id": v.claim.id, "section": v.claim.section, "claim": v.claim.claim, "paper": v.claim.paper,
        "expected": v.claim.expectation, "tolerance": v.claim.tol, "measured": v.shown, "value": v.measured, "n": v.n,
        "null": v.null_shown, "status": v.status, "why": v.reason, "required": v.claim.required,
    } for v in verdicts])


def failed_required(verdicts: list[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if v.claim.required and v.status != PASS]


def render_text(verdicts: list[Verdict], width: int = 48) -> str:
    """The verify table for a terminal: claim, paper, measured, verdict."""
    def cut(text: str, n: int) -> str:
        return text if len(text) <= n else text[:n - 1] + "…"

    lines = [f"{'claim':<34} {'paper':<{width - 14}} {'measured':<34} {'null':<26} verdict"]
    for v in verdicts:
        flag = v.status + ("" if v.claim.required else " (optional)") + (f": {v.reason}" if v.reason else "")
        lines.append(f"{cut(v.claim.id, 34):<34} {cut(v.claim.paper, width - 14):<{width - 14}} "
                     f"{cut(v.shown, 34):<34} {cut(v.null_shown, 26):<26} {flag}")
    counts = ", ".join(f"{sum(v.status == s for v in verdicts)} {s}" for s in VERDICTS)
    lines.append(f"{len(verdicts)} claims: {counts}; {len(failed_required(verdicts))} required claim(s) not passing")
    return "\n".join(lines)


def render_markdown(verdicts: list[Verdict]) -> str:
    """The claims table in Markdown; "accepted" is the interval with the tolerance already added."""
    rows = ["| claim | § | paper | accepted | tolerance | measured | null | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    def cell(text: str) -> str:  # a '|' in a claim (||R - I||_F) would end the cell
        return str(text).replace("|", "\\|")

    for v in verdicts:
        verdict = v.status if v.status in (PASS, MISSING) else f"**{v.status}**"
        cells = [f"{v.claim.id}: {v.claim.claim}", v.claim.section, v.claim.paper, v.claim.expectation,
                 f"{v.claim.tol:.3g}", v.shown, v.null_shown,
                 f"{verdict}{'' if v.claim.required else ' (optional)'}{f': {v.reason}' if v.reason else ''}"]
        rows.append("| " + " | ".join(map(cell, cells)) + " |")
    return "\n".join(rows) + ("\n\nThe tolerance is absolute and widens the paper's bound or bounds; the "
                              "accepted interval includes it.")

"""Experiments as stage graphs: load a projects/*.yaml definition, reuse finished runs, run the rest.

An experiment file names nodes; each node is one stage with its parameters. A parameter value
"@node" is that node's run ID, "@prefix*" the comma-joined run IDs of every node whose id starts
with prefix. `matrix` expands one node into several ("{seed}" in ids and values is replaced).
`profiles` give per-stage default parameters (cpu, paper, ...) under the nodes' own. `claims`
list the paper's claims the experiment tests (polyrot.experiments.claims). `mlflow_experiment` names the MLflow
experiment its runs go to when that is not the definition's own name: an experiment that builds on
another's runs (the cross-checkpoint curve on Cohort A's seed 0) shares its MLflow experiment and
so reuses them.

Every node runs as a plain command line, `polyrot STAGE --param value ... --parent-run ID`, so a
batch system can run the same graph: the executor is the small part to replace. A node whose
stage, code version and parameters (upstream run IDs included) match a FINISHED run of the
experiment is reused, not rerun — so an interrupted reproduction continues where it stopped.
"""

from __future__ import annotations

import ctypes
import fnmatch
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from polyrot.errors import PolyrotError
from polyrot.experiments.claims import Claim, ClaimError, parse_claim
from polyrot.experiments.resources import Resources, parse_resources
from polyrot.stages import STAGES
from polyrot.stages.base import Stage

PROJECTS = Path(__file__).resolve().parents[2] / "projects"
_REF = re.compile(r"^@([A-Za-z0-9_.\-]+)(\*?)$")


class ExperimentError(PolyrotError):
    pass


@dataclass
class Node:
    id: str
    stage: Stage
    params: dict[str, str]  # raw values, "@refs" unresolved
    line: int

    @property
    def refs(self) -> list[str]:
        return [m.group(0) for v in self.params.values() for part in str(v).split(",")
                if (m := _REF.match(part.strip()))]


@dataclass
class Experiment:
    name: str
    description: str
    profile: str
    nodes: dict[str, Node] = field(default_factory=dict)
    path: Path | None = None
    claims: list[Claim] = field(default_factory=list)
    mlflow_experiment: str = ""  # default: the definition's name
    # What each stage's batch job asks for (the `resources` section, this profile): {stage or "default": ...}
    resources: dict[str, Resources] = field(default_factory=lambda: parse_resources(None, "", set(), ""))

    def upstream(self, node: Node) -> list[str]:
        """Ids of the nodes `node` reads from."""
        deps = []
        for ref in node.refs:
            m = _REF.match(ref)
            if m.group(2):
                deps += [n for n in self.nodes if n.startswith(m.group(1)) and n != node.id]
            else:
                deps.append(m.group(1))
        return deps

    def order(self) -> list[str]:
        """Node ids in dependency order, the file's order first: each is the first node of the file
        not yet listed whose upstream nodes all are. Every executor takes it as its priority, so a
        long node defined early (Cohort A's bars) starts once its inputs exist, not after every
        node fewer steps from the graph's roots."""
        done: list[str] = []
        pending = list(self.nodes)
        while pending:
            ready = next((n for n in pending if all(d in done for d in self.upstream(self.nodes[n]))), None)
            if ready is None:
                raise ExperimentError(f"experiment {self.name}: dependency cycle among {', '.join(pending)}")
            done.append(ready)
            pending.remove(ready)
        return done

    def always_alone(self) -> set[str]:
        """Ids of the nodes that run alone whatever the schedule: every other node is upstream or
        downstream of them (Cohort A's seed 0, whose W_E every other seed copies)."""
        ancestors: dict[str, set[str]] = {}
        for node_id in self.order():
            ancestors[node_id] = set()
            for dep in self.upstream(self.nodes[node_id]):
                ancestors[node_id] |= {dep} | ancestors[dep]
        return {n for n in self.nodes
                if all(m == n or m in ancestors[n] or n in ancestors[m] for m in self.nodes)}


def available() -> list[str]:
    return sorted(p.stem for p in PROJECTS.glob("*.yaml"))


class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers each mapping's line, so errors can point at it."""


def _mapping_with_line(loader, node):
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_line)


def _expand(entry: dict) -> list[tuple[str, dict]]:
    matrix = entry.get("matrix") or {}
    keys = [k for k in matrix if k != "__line__"]
    combos = itertools.product(*(matrix[k] for k in keys)) if keys else [()]
    out = []
    for combo in combos:
        values = dict(zip(keys, combo))
        fill = (lambda s: str(s).format(**values)) if values else str
        params = {k: fill(v) for k, v in (entry.get("params") or {}).items() if k != "__line__"}
        out.append((fill(entry["id"]), params))
    return out


def load_experiment(name: str, profile: str = "cpu") -> Experiment:
    """Parse and validate an experiment before any run starts; every error names file and line."""
    path = Path(name) if name.endswith(".yaml") else PROJECTS / f"{name}.yaml"
    if not path.is_file():
        raise ExperimentError(f"unknown experiment {name!r}; available: {', '.join(available())}")
    where = f"{path.name}"
    try:
        doc = yaml.load(path.read_text(), Loader=_LineLoader)
    except yaml.MarkedYAMLError as exc:
        # The context mark is where the broken construct opened; the problem mark may be end of file.
        mark = exc.context_mark or exc.problem_mark
        raise ExperimentError(f"{where}:{mark.line + 1}: malformed YAML: {exc.context or ''} {exc.problem}".replace("  ", " ")) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise ExperimentError(f"{where}: an experiment needs a top-level 'nodes' list")
    profiles = doc.get("profiles") or {}
    if profile not in profiles:
        raise ExperimentError(f"{where}: no profile {profile!r}; it has: {', '.join(k for k in profiles if k != '__line__')}")
    defaults = profiles[profile] or {}
    exp = Experiment(doc.get("name", path.stem), doc.get("description", ""), profile, path=path)
    exp.mlflow_experiment = str(doc.get("mlflow_experiment") or exp.name)
    for entry in doc["nodes"]:
        line = entry.get("__line__", 0) if isinstance(entry, dict) else 0
        if not isinstance(entry, dict) or "id" not in entry or "stage" not in entry:
            raise ExperimentError(f"{where}:{line}: each node needs an 'id' and a 'stage'")
        stage = STAGES.get(entry["stage"])
        if stage is None:
            raise ExperimentError(f"{where}:{line}: unknown stage {entry['stage']!r}; stages: {', '.join(STAGES)}")
        base = {k: str(v) for k, v in (defaults.get(entry["stage"]) or {}).items() if k != "__line__"}
        for node_id, params in _expand(entry):
            if node_id in exp.nodes:
                raise ExperimentError(f"{where}:{line}: duplicate node id {node_id!r}")
            merged = {**base, **params}
            known = {o.name for o in stage.all_options} - {"experiment", "parent_run"}
            unknown = sorted(set(merged) - known)
            if unknown:
                raise ExperimentError(f"{where}:{line}: stage {stage.name} has no parameter {unknown[0]!r}; "
                                      f"it has: {', '.join(sorted(known))}")
            exp.nodes[node_id] = Node(node_id, stage, merged, line)
    for node in exp.nodes.values():
        for dep in exp.upstream(node):
            if dep not in exp.nodes:
                raise ExperimentError(f"{where}:{node.line}: node {node.id} refers to unknown node {dep!r}")
        if any(_REF.match(r).group(2) for r in node.refs) and not exp.upstream(node):
            raise ExperimentError(f"{where}:{node.line}: node {node.id}: a wildcard reference matches no node")
        # Values are checked now (bad steps, unknown choices) with placeholder run IDs for refs.
        node.stage.parse({k: ("0" * 32 if _REF.match(str(v).split(",")[0].strip()) else v)
                          for k, v in node.params.items()})
    exp.order()
    _load_claims(exp, doc.get("claims") or [], where)
    try:
        exp.resources = parse_resources(doc.get("resources"), profile, set(STAGES), where)
    except PolyrotError as exc:
        raise ExperimentError(str(exc)) from None
    return exp


def _load_claims(exp: Experiment, entries: list, where: str) -> None:
    if not isinstance(entries, list):
        raise ExperimentError(f"{where}: 'claims' is a list of claims")
    seen: set[str] = set()
    for entry in entries:
        at = f"{where}:{entry.get('__line__', 0) if isinstance(entry, dict) else 0}"
        try:
            claim = parse_claim(entry, at)
        except ClaimError as exc:
            raise ExperimentError(str(exc)) from None
        if claim.id in seen:
            raise ExperimentError(f"{at}: duplicate claim id {claim.id!r}")
        for key, node in (("node", claim.node), ("null_node", claim.null_node)):
            if node is not None and not fnmatch.filter(exp.nodes, node):
                raise ExperimentError(f"{at}: claim {claim.id}'s {key} {node!r} matches no node")
        seen.add(claim.id)
        exp.claims.append(claim)


def resolve(exp: Experiment, node: Node, run_ids: dict[str, str]) -> dict[str, str]:
    """The node's parameters with "@refs" replaced by upstream run IDs."""
    def one(part: str) -> str:
        m = _REF.match(part.strip())
        if not m:
            return part
        if m.group(2):
            return ",".join(run_ids[n] for n in exp.nodes if n.startswith(m.group(1)) and n != node.id)
        return run_ids[m.group(1)]
    return {k: ",".join(one(p) for p in str(v).split(",")) for k, v in node.params.items()}


def command(node: Node, params: dict[str, str], experiment: str, parent_run: str) -> list[str]:
    """The plain command line that runs one node: what a batch system would submit."""
    args = [sys.executable, "-m", "polyrot", node.stage.cli_name]
    options = {o.name: o for o in node.stage.all_options}
    for name, value in {**params, "experiment": experiment, "parent_run": parent_run}.items():
        if value is None:  # no parent run: a graph submitted without waiting (reproduce --no-wait)
            continue
        args += [str(value)] if options[name].positional else [options[name].flag, str(value)]
    return args


def _die_with_parent() -> None:
    """Children die with the orchestrator (kill -9 included), so no orphan finishes a stage later
    and duplicates the run a re-invocation starts."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_local(cmd: list[str], env: dict[str, str]) -> str:
    """Execute one node's command here; its last stdout line is the run ID."""
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=_die_with_parent)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ExperimentError(f"exit {proc.returncode}: {last}")
    return proc.stdout.strip().splitlines()[-1]


Executor = Callable[[list[str], dict[str, str]], str]


@dataclass
class Outcome:
    run_ids: dict[str, str]
    reused: list[str]
    ran: list[str]
    pending: list[str] = field(default_factory=list)  # batch job IDs still queued or running (not waited for)


def stage_env() -> dict[str, str]:
    """The environment a node's command runs in: this process's stores, no run to adopt by accident."""
    from polyrot import tracking

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env.update(MLFLOW_TRACKING_URI=tracking.tracking_uri(), MLFLOW_REGISTRY_URI=tracking.registry_uri())
    return env


def plan(exp: Experiment, node: Node, run_ids: dict[str, str], *, experiment: str, parent_run: str | None,
         threads: int) -> tuple[list[str], str]:
    """The node's command line and reuse key, its upstream run IDs filled in from `run_ids`."""
    from polyrot import tracking

    params = resolve(exp, node, run_ids)
    if "threads" in {o.name for o in node.stage.all_options} and "threads" not in params:
        params["threads"] = str(threads)
    parsed = node.stage.parse({**params, "experiment": experiment})
    key = tracking.reuse_key(node.stage.name, node.stage.code_version, parsed)
    return command(node, params, experiment, parent_run), key


def progress(count: int, total: int, node: Node, text: str) -> str:
    """One progress line of a reproduction, the same for every executor."""
    return f"[{count:>3}/{total}] {node.id:<24} {node.stage.name:<14} {text}"


def skipped_note(run_id: str) -> str:
    """", skipped: <why>" for a run that had nothing to compute (polyrot.stages.skip), else ""."""
    from polyrot import tracking

    why = tracking.configure().get_run(run_id).data.tags.get(tracking.TAG_SKIPPED)
    return f", skipped: {why}" if why else ""


def execute(exp: Experiment, *, experiment: str, parent_run: str, jobs: int = 1,
            executor: Executor = run_local, echo: Callable[[str], None] = print) -> Outcome:
    """Run the graph: reuse what matches, run the rest `jobs` at a time, each free slot taking the
    first node in dependency order (Experiment.order) whose upstream has finished."""
    from polyrot import tracking

    order = exp.order()
    run_ids: dict[str, str] = {}
    reused: list[str] = []
    ran: list[str] = []
    env = stage_env()
    # Each of `jobs` concurrent nodes gets its share of the cores; a node that always runs alone
    # gets them all (at two threads a seed trains 1.5x faster, and as deterministically as at one).
    cores = os.cpu_count() or 1
    threads, alone = max(1, cores // jobs), exp.always_alone()
    total, started = len(order), time.perf_counter()

    pending = list(order)
    running: dict[Future, str] = {}
    failure: str | None = None
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while (pending and failure is None) or running:
            for node_id in list(pending):
                if failure or len(running) >= jobs:
                    break
                node = exp.nodes[node_id]
                if not all(d in run_ids for d in exp.upstream(node)):
                    continue
                pending.remove(node_id)
                cmd, key = plan(exp, node, run_ids, experiment=experiment, parent_run=parent_run,
                                threads=cores if node_id in alone else threads)
                found = tracking.find_finished_run(experiment, key)
                done = len(run_ids) + 1
                if found:
                    run_ids[node_id] = found
                    reused.append(node_id)
                    echo(progress(done, total, node, f"reused {found}{skipped_note(found)}"))
                    continue
                echo(progress(len(run_ids) + len(running) + 1, total, node, f"running: {' '.join(cmd[2:])}"))
                running[pool.submit(executor, cmd, env)] = node_id
            if not running:
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                node_id = running.pop(fut)
                try:
                    run_ids[node_id] = fut.result()
                    ran.append(node_id)
                    elapsed = time.perf_counter() - started
                    echo(progress(len(run_ids), total, exp.nodes[node_id],
                                  f"finished {run_ids[node_id]} ({elapsed / 60:.1f} min so far)"
                                  f"{skipped_note(run_ids[node_id])}"))
                except Exception as exc:  # noqa: BLE001 — reported with the node's name below
                    failure = f"node {node_id} failed: {exc}"
    if failure:
        raise ExperimentError(failure)
    return Outcome(run_ids, reused, ran)

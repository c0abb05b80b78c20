"""Experiment files, run reuse and interruption, with train_seed graphs small enough to run here."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from polyrot import tracking
from polyrot.errors import PolyrotError
from polyrot.experiments import pipeline
from polyrot.stages import STAGES
from tests.conftest import TINY_TRAIN_YAML


def write(tmp_path: Path, body: str, name: str = "exp.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


GRAPH = f"""\
name: tiny-cohort
profiles:
  cpu:
    train_seed: {TINY_TRAIN_YAML}
  paper: {{}}
nodes:
  - id: seed0
    stage: train_seed
    params: {{seed: 0}}
  - id: seed{{seed}}
    stage: train_seed
    matrix: {{seed: [1, 2]}}
    params: {{seed: "{{seed}}", shared_io_from: "@seed0"}}
"""
# A node that needs no other, to append to GRAPH.
INDEPENDENT = "  - id: other\n    stage: train_seed\n    params: {seed: 7}\n"


def test_every_shipped_experiment_loads_in_both_profiles():
    assert pipeline.available()
    for name in pipeline.available():
        for profile in ("cpu", "paper"):
            exp = pipeline.load_experiment(name, profile)
            assert exp.order()


def test_graph_expansion_and_order(tmp_path):
    exp = pipeline.load_experiment(write(tmp_path, GRAPH))
    assert exp.order() == ["seed0", "seed1", "seed2"]
    assert exp.nodes["seed2"].params["shared_io_from"] == "@seed0"
    assert exp.nodes["seed1"].params["max_steps"] == "40"
    assert exp.upstream(exp.nodes["seed1"]) == ["seed0"]
    # A node that needs nothing but is defined last comes last: the file's order is the priority.
    later = pipeline.load_experiment(write(tmp_path, GRAPH + INDEPENDENT, "later.yaml"))
    assert later.order() == ["seed0", "seed1", "seed2", "other"]
    upstream_last = GRAPH.replace("params: {seed: 0}", "params: {seed: 0, shared_io_from: \"@base\"}")
    upstream_last += "  - id: base\n    stage: train_seed\n    params: {seed: 9}\n"
    assert pipeline.load_experiment(write(tmp_path, upstream_last, "ul.yaml")).order() == ["base", "seed0", "seed1", "seed2"]


def test_a_node_that_always_runs_alone_gets_every_core(own_store, tmp_path):
    unpinned = GRAPH.replace(", threads: 1", "")  # the threads come from the schedule
    exp = pipeline.load_experiment(write(tmp_path, unpinned))
    assert exp.always_alone() == {"seed0"}  # seeds 1 and 2 may run side by side
    apart = unpinned + INDEPENDENT
    assert pipeline.load_experiment(write(tmp_path, apart, "apart.yaml")).always_alone() == set()

    parent = STAGES["reproduce"](name=str(exp.path), experiment="pipeline-threads", jobs=2)
    client = MlflowClient()
    nodes = {k.split(".")[-1]: v for k, v in client.get_run(parent).data.tags.items() if k.startswith("polyrot.node.")}
    threads = {node: client.get_run(run).data.params["threads"] for node, run in nodes.items()}
    cores = os.cpu_count()
    assert threads == {"seed0": str(cores), "seed1": str(max(1, cores // 2)), "seed2": str(max(1, cores // 2))}


def test_unknown_experiment_lists_the_available_ones():
    with pytest.raises(PolyrotError, match="available: .*smoke"):
        pipeline.load_experiment("no-such-experiment")


def test_malformed_file_points_at_the_line(tmp_path):
    with pytest.raises(PolyrotError, match=r"exp.yaml:4: malformed YAML"):
        pipeline.load_experiment(write(tmp_path, "name: x\nprofiles: {cpu: {}}\nnodes:\n  - id: [unclosed\n"))


def test_unknown_stage_parameter_points_at_the_node(tmp_path):
    body = GRAPH + "  - id: extra\n    stage: train_seed\n    params: {seed: 3, learning_speed: 2}\n"
    with pytest.raises(PolyrotError, match=r"exp.yaml:14: stage train_seed has no parameter 'learning_speed'"):
        pipeline.load_experiment(write(tmp_path, body))


def test_bad_values_and_dangling_references_fail_before_any_run(tmp_path):
    with pytest.raises(PolyrotError, match="--max-steps must be positive"):
        pipeline.load_experiment(write(tmp_path, GRAPH.replace("max_steps: 40", "max_steps: 0")))
    with pytest.raises(PolyrotError, match="refers to unknown node 'seed9'"):
        pipeline.load_experiment(write(tmp_path, GRAPH.replace("@seed0", "@seed9")))
    cycle = GRAPH.replace("params: {seed: 0}", "params: {seed: 0, shared_io_from: \"@seed1\"}")
    with pytest.raises(PolyrotError, match="dependency cycle among seed0, seed1, seed2"):
        pipeline.load_experiment(write(tmp_path, cycle))
    with pytest.raises(PolyrotError, match="no profile 'gpu'"):
        pipeline.load_experiment(write(tmp_path, GRAPH), profile="gpu")


def test_reproduce_runs_in_file_order_once_then_reuses_everything(own_store, tmp_path):
    # `other` needs nothing, so it is ready from the start; defined last, it runs last (one job).
    path = write(tmp_path, GRAPH + INDEPENDENT)
    first = STAGES["reproduce"](name=path, experiment="pipeline-reuse")
    client = MlflowClient()
    tags = client.get_run(first).data.tags
    nodes = {k.split(".")[-1]: v for k, v in tags.items() if k.startswith("polyrot.node.")}
    assert set(nodes) == {"seed0", "seed1", "seed2", "other"}
    assert sorted(nodes, key=lambda n: client.get_run(nodes[n]).info.start_time) == ["seed0", "seed1", "seed2", "other"]
    assert client.get_run(nodes["seed2"]).data.tags[tracking.TAG_UPSTREAM + "shared_io"] == nodes["seed0"]
    assert client.get_run(nodes["seed1"]).data.tags["mlflow.parentRunId"] == first

    started = time.perf_counter()
    second = STAGES["reproduce"](name=path, experiment="pipeline-reuse")
    assert time.perf_counter() - started < 60
    metrics = client.get_run(second).data.metrics
    assert metrics["reused"] == 4 and metrics["ran"] == 0
    again = {k.split(".")[-1]: v for k, v in client.get_run(second).data.tags.items() if k.startswith("polyrot.node.")}
    assert again == nodes


def test_kill_9_then_rerun_completes_without_duplicates(own_store, tmp_path):
    body = GRAPH.replace("max_steps: 40", "max_steps: 300")
    path = write(tmp_path, body)
    exp_name = "pipeline-kill"
    env = {**os.environ}
    proc = subprocess.Popen([sys.executable, "-m", "polyrot", "reproduce", path, "--experiment", exp_name],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = MlflowClient()
    deadline = time.time() + 240
    killed = False
    while time.time() < deadline and not killed:
        time.sleep(0.5)
        exp = client.get_experiment_by_name(exp_name)
        if exp is None:
            continue
        runs = client.search_runs([exp.experiment_id], "tags.`polyrot.stage` = 'train_seed'")
        if any(r.info.status == "FINISHED" for r in runs) and any(r.info.status == "RUNNING" for r in runs):
            proc.send_signal(signal.SIGKILL)  # mid-way: one seed done, the next one training
            killed = True
    proc.wait()
    assert killed, "the reproduction never reached its second stage"
    time.sleep(1.0)  # the orphaned stage dies with its parent (PR_SET_PDEATHSIG)

    STAGES["reproduce"](name=path, experiment=exp_name)
    runs = client.search_runs([client.get_experiment_by_name(exp_name).experiment_id])
    finished = Counter(r.data.tags[tracking.TAG_REUSE_KEY] for r in runs
                       if r.info.status == "FINISHED" and r.data.tags[tracking.TAG_STAGE] == "train_seed")
    assert len(finished) == 3 and set(finished.values()) == {1}
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert [r for r in runs if r.info.status == "FAILED"]  # the killed stage and parent, marked stale


def test_where_a_stage_runs_stays_out_of_the_reuse_key():
    # Seeds trained on a GPU are then reused by a reproduction on the CPU, and vice versa.
    plain = tracking.reuse_key("train_seed", "1", {"seed": 0, "max_steps": 40})
    assert tracking.reuse_key("train_seed", "1", {"seed": 0, "max_steps": 40, "device": "cuda", "threads": 1,
                                                  "experiment": "x"}) == plain
    assert tracking.reuse_key("train_seed", "1", {"seed": 0, "max_steps": 41}) != plain


def test_sigterm_once_the_run_shows_its_pid_closes_it_failed(own_store):
    # scancel and `kill` may arrive the moment a watcher sees the run's pid, while the stage still
    # records its parameters: the run must end FAILED then, not stay RUNNING with a dead pid.
    code = textwrap.dedent("""\
        import os, signal
        from polyrot import tracking
        record = tracking.StageRun.log_params
        def record_then_sigterm(run, params):
            record(run, params)
            os.kill(os.getpid(), signal.SIGTERM)
        tracking.StageRun.log_params = record_then_sigterm
        with tracking.stage_run("probe", {"x": 1}, code_version="1", experiment="sigterm"):
            print("the stage's body ran after SIGTERM")
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM and "body ran" not in done.stdout, done.stderr
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("sigterm").experiment_id])
    assert run.info.status == "FAILED" and int(run.data.tags[tracking.TAG_PID]) > 0

"""The Slurm executor: every node of an experiment one `sbatch` job, the graph submitted at once.

A node's job runs the very command line the local executor runs (`python -m polyrot STAGE ...`).
Its upstream run IDs must be in that command line before the upstream jobs have run, so the
executor creates each new node's MLflow run first (status SCHEDULED, tagged with its reuse key and
its job) and hands it to the job as MLFLOW_RUN_ID, which the stage adopts, as under `mlflow run`.
Jobs depend on their upstream jobs (`--dependency=afterok:...`) with `--kill-on-invalid-dep=yes`,
so Slurm cancels the dependants of a failed job instead of leaving them pending.

A later `reproduce` continues the graph: finished runs are reused by their reuse key as locally,
runs whose job is still queued or running are waited for, not submitted again, and runs whose job
Slurm no longer runs (scancel, a killed node) are closed FAILED (it had started) or KILLED (it never
did) first. Nothing here is a scheduler: Slurm orders, places and cancels.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable, Iterable

from polyrot import tracking
from polyrot.errors import SlurmError
from polyrot.experiments import pipeline
from polyrot.experiments.resources import Resources, for_stage

# Job states after which a job never runs again (squeue --states=all shows them for MinJobAge).
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}
POLL_S = 2.0
SCHEDULED, RUNNING, FINISHED, FAILED, KILLED = "SCHEDULED", "RUNNING", "FINISHED", "FAILED", "KILLED"


def _slurm(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    """Run one Slurm client command; its stdout, or SlurmError with Slurm's own last line."""
    try:
        done = subprocess.run(args, input=stdin, env=env, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError(f"Slurm is not reachable: {args[0]} is not on PATH (install Slurm's client tools)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"Slurm is not reachable: {args[0]} did not answer within 120 s") from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()] or [f"exit {done.returncode}"]
        raise SlurmError(f"Slurm: {args[0]}: {lines[-1]}")
    return done.stdout


def flags(res: Resources, partition: str | None, time_limit: str | None) -> list[str]:
    """sbatch options for one stage's job."""
    out = [f"--cpus-per-task={res.cpus}", f"--mem={res.mem}"]
    if res.gpus:
        out.append(f"--gres=gpu:{res.gpus}")
    if partition:
        out.append(f"--partition={partition}")
    if time_limit or res.time:
        out.append(f"--time={time_limit or res.time}")
    return out


def check(exp: pipeline.Experiment, partition: str | None, time_limit: str | None) -> None:
    """Before any run exists: Slurm answers, the partition exists, and it accepts every stage's
    request (`sbatch --test-only` submits nothing)."""
    try:
        partitions = _slurm("sinfo", "--noheader", "--format=%R").split()
    except SlurmError as exc:
        raise SlurmError(str(exc).replace("Slurm: sinfo: ", "Slurm is not reachable: ")) from None
    if partition and partition not in partitions:
        raise SlurmError(f"Slurm has no partition {partition!r}; partitions: {', '.join(sorted(set(partitions)))}")
    for stage in sorted({node.stage.name for node in exp.nodes.values()}):
        request = flags(for_stage(exp.resources, stage), partition, time_limit)
        try:
            _slurm("sbatch", "--test-only", *request, stdin="#!/bin/sh\ntrue\n")
        except SlurmError as exc:
            raise SlurmError(f"Slurm refuses the {stage} jobs ({' '.join(request)}): "
                             f"{str(exc).removeprefix('Slurm: sbatch: ')}") from None


def job_states(job_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
    """{job ID: (state, reason)} of the jobs Slurm still knows (finished ones for MinJobAge)."""
    wanted = set(job_ids)
    if not wanted:
        return {}
    out = _slurm("squeue", "--noheader", "--states=all", "--me", "--format=%i|%T|%r")
    states = {}
    for line in out.splitlines():
        job, state, reason = (line.split("|") + ["", ""])[:3]
        if job.strip() in wanted:
            states[job.strip()] = (state.strip(), reason.strip())
    return states


def _alive(state: tuple[str, str] | None) -> bool:
    return state is not None and state[0] not in TERMINAL


def close_lost_runs(experiment: str) -> list[str]:
    """Close the SCHEDULED or RUNNING runs whose Slurm job is over or gone: FAILED when the stage had
    started, KILLED when it never did. Returns their run IDs."""
    client = tracking.configure()
    exp_id = tracking.experiment_id(experiment)
    runs = [r for status in (SCHEDULED, RUNNING)
            for r in client.search_runs([exp_id], f"attributes.status = '{status}'", max_results=10_000)
            if tracking.TAG_SLURM_JOB in r.data.tags]
    states = job_states(r.data.tags[tracking.TAG_SLURM_JOB] for r in runs)
    closed = []
    for run in runs:
        if not _alive(states.get(run.data.tags[tracking.TAG_SLURM_JOB])):
            client.set_terminated(run.info.run_id, FAILED if run.info.status == RUNNING else KILLED)
            closed.append(run.info.run_id)
    return closed


def _in_flight(experiment: str, key: str) -> tuple[str, str] | None:
    """(run ID, job ID) of a run with this reuse key whose job is queued or running."""
    client = tracking.configure()
    runs = client.search_runs([tracking.experiment_id(experiment)], f"tags.`{tracking.TAG_REUSE_KEY}` = '{key}'",
                              order_by=["attributes.start_time DESC"], max_results=100)
    live = [r for r in runs if r.info.status in (SCHEDULED, RUNNING) and tracking.TAG_SLURM_JOB in r.data.tags]
    states = job_states(r.data.tags[tracking.TAG_SLURM_JOB] for r in live)
    for run in live:
        job = run.data.tags[tracking.TAG_SLURM_JOB]
        if _alive(states.get(job)):
            return run.info.run_id, job
    return None


def log_dir(experiment: str):
    """Where the jobs' output goes (a path the compute nodes share with the submitting host)."""
    path = tracking.store_root() / "mlruns" / "slurm" / experiment
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log_tail(experiment: str, node_id: str, job: str) -> str:
    path = log_dir(experiment) / f"{node_id}-{job}.out"
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()] \
        if path.is_file() else []
    return lines[-1] if lines else "(no output)"


def _submit(node: pipeline.Node, cmd: list[str], key: str, *, experiment: str, parent_run: str | None,
            after: list[str], sbatch_flags: list[str], env: dict[str, str]) -> tuple[str, str]:
    """Create the node's SCHEDULED run, submit its job; (run ID, job ID)."""
    client = tracking.configure()
    tags = {"mlflow.runName": node.id, tracking.TAG_STAGE: node.stage.name, tracking.TAG_REUSE_KEY: key,
            tracking.TAG_CODE_VERSION: node.stage.code_version}
    if parent_run:
        tags["mlflow.parentRunId"] = parent_run
    run_id = client.create_run(tracking.experiment_id(experiment), tags=tags).info.run_id
    client.update_run(run_id, status=SCHEDULED)
    args = ["sbatch", "--parsable", f"--job-name=polyrot.{experiment}.{node.id}",
            f"--output={log_dir(experiment) / f'{node.id}-%j.out'}", "--kill-on-invalid-dep=yes", *sbatch_flags]
    if after:
        args.append("--dependency=afterok:" + ":".join(after))
    try:
        job = _slurm(*args, stdin=f"#!/bin/bash\nexec {shlex.join(cmd)}\n",
                     env={**env, "MLFLOW_RUN_ID": run_id}).strip().split(";")[0]
    except SlurmError:
        client.set_terminated(run_id, KILLED)
        raise
    client.set_tag(run_id, tracking.TAG_SLURM_JOB, job)
    return run_id, job


def execute(exp: pipeline.Experiment, *, experiment: str, parent_run: str | None, jobs: int = 1,
            echo: Callable[[str], None] = print, partition: str | None = None, time_limit: str | None = None,
            wait: bool = True) -> pipeline.Outcome:
    """Submit every node that has no finished run, then (with `wait`) follow the jobs to the end.

    `jobs` is the local executor's; Slurm decides how many run at once. Without `wait` the
    outcome's `pending` lists the nodes still queued or running.
    """
    closed = close_lost_runs(experiment)
    if closed:
        echo(f"closed {len(closed)} run(s) whose Slurm job is over or gone")
    order = exp.order()
    total, started = len(order), time.perf_counter()
    env = pipeline.stage_env()
    run_ids: dict[str, str] = {}
    job_of: dict[str, str] = {}   # nodes queued or running on Slurm
    reused: list[str] = []
    submitted: list[str] = []
    try:
        for node_id in order:
            node = exp.nodes[node_id]
            res = for_stage(exp.resources, node.stage.name)
            cmd, key = pipeline.plan(exp, node, run_ids, experiment=experiment, parent_run=parent_run,
                                     threads=res.cpus)
            found = tracking.find_finished_run(experiment, key)
            if found:
                run_ids[node_id] = found
                reused.append(node_id)
                echo(pipeline.progress(len(run_ids), total, node, f"reused {found}{pipeline.skipped_note(found)}"))
                continue
            live = _in_flight(experiment, key)
            if live:
                run_ids[node_id], job_of[node_id] = live
                echo(pipeline.progress(len(run_ids), total, node, f"in flight as job {live[1]}, run {live[0]}"))
                continue
            after = [job_of[u] for u in exp.upstream(node) if u in job_of]
            run_ids[node_id], job_of[node_id] = _submit(
                node, cmd, key, experiment=experiment, parent_run=parent_run, after=after,
                sbatch_flags=flags(res, partition, time_limit), env=env)
            submitted.append(node_id)
            echo(pipeline.progress(len(run_ids), total, node, f"submitted job {job_of[node_id]}"
                                   f"{' after ' + ','.join(after) if after else ''}: {' '.join(cmd[2:])}"))
    except BaseException:
        # Half a graph on the queue would run without its caller knowing: take back what this call put there.
        mine = [job_of[n] for n in submitted]
        if mine:
            subprocess.run(["scancel", *mine], capture_output=True)
            for n in submitted:
                tracking.configure().set_terminated(run_ids[n], KILLED)
        raise
    if not wait:
        return pipeline.Outcome(run_ids, reused, [], pending=list(job_of.values()))
    ran, failure = _follow(exp, experiment, run_ids, job_of, echo, total, started)
    if failure:
        raise pipeline.ExperimentError(failure)
    return pipeline.Outcome(run_ids, reused, ran)


def _follow(exp, experiment: str, run_ids: dict[str, str], job_of: dict[str, str], echo, total: int,
            started: float) -> tuple[list[str], str | None]:
    """Poll Slurm until every job is over; close the runs of jobs that failed or were cancelled."""
    client = tracking.configure()
    pending = dict(job_of)
    shown_running: set[str] = set()
    ran: list[str] = []
    failure: str | None = None
    finished = total - len(pending)
    while pending:
        states = job_states(pending.values())
        for node_id, job in list(pending.items()):
            node = exp.nodes[node_id]
            state, reason = states.get(job, ("", ""))
            if state == RUNNING and node_id not in shown_running:
                shown_running.add(node_id)
                echo(pipeline.progress(finished + 1, total, node, f"running as job {job}"))
            if state and state not in TERMINAL:
                continue
            del pending[node_id]
            run = client.get_run(run_ids[node_id])
            if state in ("", "COMPLETED") and run.info.status == FINISHED:
                finished += 1
                ran.append(node_id)
                echo(pipeline.progress(finished, total, node, f"finished {run_ids[node_id]} "
                                       f"({(time.perf_counter() - started) / 60:.1f} min so far)"
                                       f"{pipeline.skipped_note(run_ids[node_id])}"))
                continue
            if run.info.status in (SCHEDULED, RUNNING):
                # A job killed with SIGKILL (or never started) cannot close its own run.
                client.set_terminated(run_ids[node_id], FAILED if run.info.status == RUNNING else KILLED)
            if reason == "DependencyNeverSatisfied":
                echo(pipeline.progress(finished, total, node, f"cancelled by Slurm (job {job}): an upstream job failed"))
                continue
            why = f"Slurm job {job} {state or 'vanished'}: {_log_tail(experiment, node_id, job)}"
            echo(pipeline.progress(finished, total, node, f"failed: {why}"))
            failure = failure or f"node {node_id} failed: {why}"
        if pending:
            time.sleep(POLL_S)
    return ran, failure

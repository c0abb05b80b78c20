"""Whole experiments on a one-node Slurm against the team server: the smoke experiment end to end
through a scancel of its whole graph, a job killed mid-stage, bad input, and no password anywhere."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.team.conftest import SERVICES_DIR, free_port, one_line_error, runs_of

pytestmark = pytest.mark.team

TAG_JOB, TAG_KEY, TAG_PID = "polyrot.slurm_job_id", "polyrot.reuse_key", "polyrot.pid"
SLURM = ["--executor", "slurm"]


def _jobs_alive(job_ids) -> set[str]:
    out = subprocess.run(["squeue", "--noheader", "--me", "--format=%i"], capture_output=True, text=True).stdout
    return set(out.split()) & set(job_ids)


def _until(what: str, condition, timeout: float = 600, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _run_of_job(client, experiment: str, job: str):
    """The node run of a job: the first run tagged with it (a group run's children, made later, carry it too)."""
    found = [r for r in runs_of(client, experiment) if r.data.tags.get(TAG_JOB) == job]
    return min(found, key=lambda r: r.info.start_time) if found else None


def test_bad_input_is_one_line_and_starts_nothing(team, admin, tmp_path):
    jobs_before = subprocess.run(["squeue", "--noheader", "--me", "--states=all", "--format=%i"], capture_output=True,
                                 text=True).stdout.split()
    args = ["reproduce", "smoke", *SLURM, "--experiment", "bad-input"]
    unreachable = tmp_path / "slurm.conf"
    unreachable.write_text(Path("/etc/slurm/slurm.conf").read_text() + f"SlurmctldPort={free_port()}\n")
    one_line_error(team.run(*args, env=team.env("writer", SLURM_CONF=str(unreachable))), "Slurm is not reachable: ")
    one_line_error(team.run(*args, "--partition", "nope"), "Slurm has no partition 'nope'; partitions: debug")
    one_line_error(team.run(*args, env={**team.env("writer"), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}),
                   "is not reachable: Connection refused")
    one_line_error(team.run(*args, password="wrong-password"), "refused the credentials of user 'writer' (401")
    one_line_error(team.run("reproduce", "smoke", "--no-wait"), "--no-wait need(s) --executor slurm")
    assert admin.get_experiment_by_name("bad-input") is None  # no run, not even its experiment
    jobs_after = subprocess.run(["squeue", "--noheader", "--me", "--states=all", "--format=%i"], capture_output=True,
                                text=True).stdout.split()
    assert set(jobs_after) <= set(jobs_before), "a refused reproduce submitted a job"


def test_smoke_on_slurm_through_a_scancel_of_the_whole_graph(team, admin):
    started = time.perf_counter()
    submitted = team.ok("reproduce", "smoke", *SLURM, "--no-wait")
    jobs = submitted.strip().splitlines()[-1].split(",")
    assert len(jobs) == 6 and len(set(jobs)) == 6
    assert {r.info.status for r in runs_of(admin, "smoke")} <= {"SCHEDULED", "RUNNING", "FINISHED"}
    # Let seed0 finish and seed1 start, then cancel every job of the graph.
    seed1 = _until("seed1's stage to start", lambda: (r := _run_of_job(admin, "smoke", jobs[1])) and
                   r.info.status == "RUNNING" and TAG_PID in r.data.tags and r)
    seed0 = _run_of_job(admin, "smoke", jobs[0])
    assert seed0.info.status == "FINISHED"
    subprocess.run(["scancel", *jobs], check=True)
    _until("the cancelled jobs to end", lambda: not _jobs_alive(jobs), timeout=120)
    # scancel sent SIGTERM: the stage closed its own run.
    assert admin.get_run(seed1.info.run_id).info.status == "FAILED"

    done = team.run("reproduce", "smoke", *SLURM)
    assert done.returncode == 0, done.stderr[-4000:]
    elapsed = time.perf_counter() - started
    print(f"\nsmoke on Slurm, with a scancel of the graph after seed0: {elapsed / 60:.1f} min", file=sys.stderr)
    assert f"reused {seed0.info.run_id}" in done.stderr
    parent = admin.get_run(done.stdout.strip().splitlines()[-1])
    nodes = {k.removeprefix("polyrot.node."): v for k, v in parent.data.tags.items() if k.startswith("polyrot.node.")}
    assert sorted(nodes) == ["audit", "rotation1", "sae0", "sae1", "seed0", "seed1"]
    node_runs = {n: admin.get_run(rid) for n, rid in nodes.items()}
    assert {r.info.status for r in node_runs.values()} == {"FINISHED"}
    # Every node ran as a Slurm job of its own, seed0 in the first graph's job, the others in the second's.
    node_jobs = {n: r.data.tags[TAG_JOB] for n, r in node_runs.items()}
    assert len(set(node_jobs.values())) == 6 and node_jobs["seed0"] == jobs[0]
    assert all(node_jobs[n] not in jobs for n in nodes if n != "seed0")
    # Every run and artifact lives on the server: served artifacts on its disk, none in the client's home.
    for run in node_runs.values():
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
        served = team.directory / "artifacts" / run.info.artifact_uri.split("mlflow-artifacts:/", 1)[1]
        digests = [k.removeprefix("polyrot.sha256.") for k in run.data.tags if k.startswith("polyrot.sha256.")]
        assert digests and all((served / d).is_file() for d in digests), (run.info.run_name, served)
    assert not (team.home / "mlruns" / "artifacts").exists() and not list(team.home.glob("*.db"))
    # Nothing left RUNNING or SCHEDULED, and no stage result twice.
    runs = runs_of(admin, "smoke")
    assert not [r for r in runs if r.info.status in ("RUNNING", "SCHEDULED")]
    finished = Counter(r.data.tags.get(TAG_KEY) for r in runs if r.info.status == "FINISHED"
                       and r.data.tags.get("polyrot.stage") != "reproduce")
    assert finished and max(finished.values()) == 1, finished

    # verify and report work against the server as they do locally.
    verified = team.ok("verify", "smoke")
    assert f"reproduction {parent.info.run_id}" in verified and "rotation-operator-norm" in verified
    assert team.ok("report", "smoke").strip().startswith("mlflow-artifacts:/")

    # A reader, in a fresh process, pulls the registered rotation back and may not register one.
    fit_run = nodes["rotation1"]
    code = textwrap.dedent(f"""
        import tempfile
        from pathlib import Path
        from polyrot import tracking
        from polyrot.tracking import registry
        R = registry.load_rotation("polyrot.smoke.resid_mid_1", alias="s0-to-s1")
        print("rotation", tuple(R.R.shape))
        run = tracking.StageRun({fit_run!r}, tracking.configure(), Path(tempfile.mkdtemp()))
        try:
            registry.register_rotation(R, run, name="polyrot.smoke.resid_mid_1", alias="s0-to-s1-reader",
                                       statistics={{}})
            print("registered")
        except Exception as exc:
            print("refused", exc.get_http_status_code())
    """)
    out = team.ok("-c", code, user="reader")
    assert "rotation (64, 64)" in out and "refused 403" in out and "registered" not in out.replace("refused", "")
    assert len(admin.search_model_versions("name = 'polyrot.smoke.resid_mid_1'")) == 1
    assert admin.get_registered_model("polyrot.smoke.resid_mid_1").aliases == {"s0-to-s1": "1"}
    one_line_error(team.run("fit-rotation", "--source", nodes["seed0"], "--target", nodes["seed1"], "--experiment",
                            "smoke", user="reader"), "the tracking server refused runs/create to user 'reader' (403")


KILL_GRAPH = """\
name: kill-test
profiles:
  cpu:
    train_seed: {eval_sequences: 64, confirm_sequences: 64, batch_size: 32, threads: 1}
  paper: {}
nodes:
  - id: first
    stage: train_seed
    params: {seed: 0, max_steps: 5000, eval_every: 25, checkpoint_every: 5000}
  - id: second
    stage: train_seed
    params: {seed: 1, shared_io_from: "@first", max_steps: 40, eval_every: 20, checkpoint_every: 20}
  - id: third
    stage: train_seed
    params: {seed: 2, shared_io_from: "@second", max_steps: 40, eval_every: 20, checkpoint_every: 20}
"""


def test_a_job_killed_mid_stage_fails_its_run_and_its_dependants_never_start(team, admin, tmp_path):
    path = tmp_path / "kill-test.yaml"
    path.write_text(KILL_GRAPH)
    proc = subprocess.Popen([sys.executable, "-m", "polyrot", "reproduce", str(path), *SLURM], env=team.env("writer"),
                            cwd=team.home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Only the first node can run: the others wait on it.
        first = _until("the first stage to log a metric", lambda: next(
            (r for r in runs_of(admin, "kill-test") if r.info.status == "RUNNING" and r.data.metrics), None),
            timeout=300)
        job = first.data.tags[TAG_JOB]
        subprocess.run(["scancel", "--signal=KILL", job], check=True)  # no handler runs: the run cannot close itself
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-3000:]
    assert f"node first failed: Slurm job {job} CANCELLED" in err.strip().splitlines()[-1]
    runs = {r.info.run_id: r for r in runs_of(admin, "kill-test")}
    assert runs[first.info.run_id].info.status == "FAILED"
    others = [r for rid, r in runs.items() if rid != first.info.run_id and r.data.tags.get("polyrot.stage") == "train_seed"]
    assert len(others) == 2
    for run in others:  # closed KILLED by the executor, never adopted by a stage: no process, no parameters
        assert run.info.status == "KILLED" and TAG_PID not in run.data.tags and not run.data.params, run.info.run_name
    states = subprocess.run(["squeue", "--noheader", "--states=all", "--me", "--format=%i|%T|%r"], capture_output=True,
                            text=True).stdout
    for run in others:
        assert f"{run.data.tags[TAG_JOB]}|CANCELLED|DependencyNeverSatisfied" in states
    assert not [r for r in runs.values() if r.info.status in ("RUNNING", "SCHEDULED")]


def test_no_password_reaches_a_log_parameter_tag_or_artifact(team, admin):
    """Run last: it reads what every test before it left on the server, in its logs and in Slurm's."""
    pgpass = (SERVICES_DIR / "pgpass").read_text().strip().rsplit(":", 1)[1]
    secrets = [team.admin_password, *team.passwords.values(), pgpass]
    logs = [p for p in [*team.directory.rglob("*"), *(team.home / "mlruns").rglob("*"),
                        *(SERVICES_DIR / "slurm").glob("*.log")] if p.is_file()]
    texts = {str(p): p.read_bytes().decode(errors="replace") for p in logs}
    scanned_runs = scanned_files = 0
    for exp in admin.search_experiments():
        for run in admin.search_runs([exp.experiment_id], max_results=10_000):
            scanned_runs += 1
            texts[f"run {run.info.run_id}"] = repr((run.info.run_name, run.data.params, run.data.tags))
            with tempfile.TemporaryDirectory() as tmp:
                if admin.list_artifacts(run.info.run_id):
                    local = Path(admin.download_artifacts(run.info.run_id, "", tmp))
                    for f in (p for p in local.rglob("*") if p.is_file()):
                        texts[f"artifact {run.info.run_id}/{f.relative_to(local)}"] = f.read_bytes().decode(errors="replace")
                        scanned_files += 1
    for model in admin.search_registered_models():
        texts[f"model {model.name}"] = repr((model.description, model.tags))
    leaks = [where for where, text in texts.items() for s in secrets if s in text]
    assert leaks == []
    assert scanned_runs and any("server.log" in k for k in texts)
    print(f"\nno password in {len(logs)} log/config files, {scanned_runs} runs, {scanned_files} artifacts",
          file=sys.stderr)

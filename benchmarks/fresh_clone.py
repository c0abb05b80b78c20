"""The README's first ten minutes, timed: a fresh clone followed literally.

Clones the checkout's HEAD into an empty folder and times, with the 1-minute load average at the
start and end of each step (on a shared machine a time means little without it):

  setup      the first command up to the main job: `python3.11 -m venv .venv`, torch, `pip install -e .`
  smoke      `.venv/bin/polyrot reproduce smoke`, first on the clone's default store (./mlflow.db),
             then --runs - 1 more times on fresh stores (POLYROT_HOME), for a median
  mlflow run `mlflow run . -e train_seed -P seed=3 -P max_steps=50 --env-manager local` from the
             clone's root with nothing exported, and where its run landed
  ui         `polyrot ui` until it has printed its links (the server answers first), then SIGTERM

and prints the smoke run's output once, as the README quotes it. Nothing runs the main job.

    .venv/bin/python benchmarks/fresh_clone.py [--dir /tmp/polyrot-fresh] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a user's shell has: no store named, nothing adopted.
UNSET = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "POLYROT_HOME")


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def timed(label: str, cmd: str, cwd: Path, env: dict[str, str]) -> tuple[float, str, str]:
    """Run `cmd` in bash; print its wall time, return it with its stdout and stderr."""
    before, start = load(), time.perf_counter()
    done = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    print(f"{label:<28} {seconds:7.1f} s   load {before} -> {load()}   exit {done.returncode}", flush=True)
    if done.returncode:
        sys.exit(f"{label} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds, done.stdout, done.stderr


def ui_time(clone: Path, env: dict[str, str]) -> float:
    """Seconds from starting `polyrot ui` to its last printed link; then SIGTERM, which must stop it."""
    start = time.perf_counter()
    ui = subprocess.Popen([str(clone / ".venv/bin/polyrot"), "ui", "--port", "5099"], cwd=clone, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in ui.stdout:
        if "registered rotations" in line:
            break
    seconds = time.perf_counter() - start
    ui.send_signal(signal.SIGTERM)
    print(f"{'polyrot ui (to its links)':<28} {seconds:7.1f} s   load {load()}   exit on SIGTERM {ui.wait(30)}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/polyrot-fresh"))
    parser.add_argument("--runs", type=int, default=3, help="smoke runs for the median")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in UNSET and not k.startswith("VIRTUAL_ENV")}
    clone = args.dir / "polyrot"
    timed("git clone", f"git clone -q {REPO} {clone}", Path("/"), env)
    timed("setup (first command)", "python3.11 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && "
          ".venv/bin/pip install -q -e .", clone, env)
    smoke = []
    seconds, out, err = timed("reproduce smoke (./mlflow.db)", ".venv/bin/polyrot reproduce smoke", clone, env)
    smoke.append(seconds)
    for i in range(args.runs - 1):
        with tempfile.TemporaryDirectory(prefix="polyrot-store-") as home:
            smoke.append(timed(f"reproduce smoke (store {i + 2})", ".venv/bin/polyrot reproduce smoke", clone,
                               {**env, "POLYROT_HOME": home})[0])
    print(f"smoke median {statistics.median(smoke):.1f} s over {len(smoke)} runs")
    run_id = timed("mlflow run train_seed", "PATH=$PWD/.venv/bin:$PATH .venv/bin/mlflow run . -e train_seed "
                   "-P seed=3 -P max_steps=50 --env-manager local", clone, env)[1].strip().splitlines()[-1]
    landed = subprocess.run([str(clone / ".venv/bin/python"), "-c",
                             "import mlflow, sys; r = mlflow.get_run(sys.argv[1]); "
                             "print(r.info.run_name, mlflow.get_experiment(r.info.experiment_id).name)", run_id],
                            cwd=clone, env=env, capture_output=True, text=True).stdout.strip()
    print(f"mlflow run {run_id}: run name, experiment = {landed}")
    ui_time(clone, env)
    print("\n--- reproduce smoke, as printed ---\n" + err + out)


if __name__ == "__main__":
    main()

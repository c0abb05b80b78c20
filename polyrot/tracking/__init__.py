"""The tracking layer: stores, experiments, stage runs, batched metrics, artifact digests, lineage.

Besides `registry.py` and the stages, this is the only module that imports mlflow. The default
store is one SQLite file at the checkout's root, `mlflow.db`, holding runs and the model registry,
with artifacts under mlruns/artifacts/: the very file plain MLflow opens by default when started
from the checkout, so `mlflow run .`, `mlflow ui` and a notebook there need no settings.
MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI point polyrot at any other store, a team server
included, without code changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A progress bar per downloaded upstream file would bury the one-line errors and our own bars.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

import polyrot  # noqa: E402
from polyrot.errors import (  # noqa: E402
    ArtifactCorruptError,
    ArtifactMissingError,
    LineageError,
    RunNotFinishedError,
    RunNotFoundError,
    WrongStageError,
)
from polyrot.tracking import remote  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EXPERIMENT = "polyrot"

# Tag names: the contract that lineage checks, run reuse and the UI read.
TAG_STAGE = "polyrot.stage"
TAG_VERSION = "polyrot.version"
TAG_CODE_VERSION = "polyrot.code_version"
TAG_COMMIT = "polyrot.git_commit"
TAG_DIRTY = "polyrot.git_dirty"
TAG_UPSTREAM = "polyrot.upstream."   # + role, value = run ID
TAG_DIGEST = "polyrot.sha256."       # + artifact path, value = hex digest
TAG_REUSE_KEY = "polyrot.reuse_key"  # stage + code version + parameters: equal keys, equal results
TAG_HOST, TAG_PID = "polyrot.host", "polyrot.pid"  # who runs it: tells a stale RUNNING run from a live one
TAG_SLURM_JOB = "polyrot.slurm_job_id"  # the Slurm job a run ran in (experiments.slurm follows and closes it)
# A run of another stage that holds the artifacts of this stage's runs (an imported seed is a
# train_seed run to every stage that reads one).
TAG_PROVIDES = "polyrot.provides"
TAG_NODE = "polyrot.node."  # + node id, on a reproduction's parent run: the node's run ID
TAG_SKIPPED = "polyrot.skipped"  # on a run that had nothing to compute (polyrot.stages.skip): why
TAG_MILESTONE = "polyrot.milestone."  # + accuracy level, on a train_seed run: the step first confirming it

# Parameters that say where and how a stage runs rather than what it computes, so they stay out of
# the reuse key: seeds trained on a GPU are reused by an analysis on the CPU.
NOT_IN_REUSE_KEY = ("experiment", "parent_run", "threads", "device")


def store_root() -> Path:
    """Where the default stores live: the checkout polyrot runs from (POLYROT_HOME overrides)."""
    return Path(os.environ.get("POLYROT_HOME", REPO_ROOT)).resolve()


# MLflow's own default store, relative to the working directory: from the checkout's root it is ours.
MLFLOW_DEFAULT_DB = "mlflow.db"
# Experiment tag with which MLflow 3's UI opens an experiment on its runs table, not on the GenAI
# overview (traces, latency, tokens) that it shows experiments of unknown kind.
KIND_TAG, KIND_TRAINING = "mlflow.experimentKind", "custom_model_development"


def default_tracking_uri() -> str:
    return f"sqlite:///{store_root() / MLFLOW_DEFAULT_DB}"


def absolute_uri(uri: str) -> str:
    """A relative SQLite URI (sqlite:///mlflow.db) made absolute against the working directory, as
    MLflow resolves it, so that two spellings of one file compare equal."""
    path = sqlite_path(uri)
    return f"sqlite:///{path.resolve()}" if path is not None else uri


def tracking_uri() -> str:
    return absolute_uri(os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())


def registry_uri() -> str:
    """The model registry: the explicit env var, else the tracking store itself (as in plain
    MLflow, so `models:/...` resolves wherever the runs are)."""
    return absolute_uri(os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri())


def wrong_store_hint(uri: str) -> str:
    """The one line that tells a user who reached a store other than polyrot's how to reach it."""
    return (f"{uri} is not polyrot's store ({default_tracking_uri()}): call polyrot.tracking.configure() "
            f"first, or export MLFLOW_TRACKING_URI={default_tracking_uri()}")


def artifact_root() -> Path:
    return store_root() / "mlruns" / "artifacts"


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_configured: tuple[str, str] | None = None


def configure() -> MlflowClient:
    """Point mlflow at polyrot's stores, creating local SQLite databases once, under a file lock.

    Two processes migrating one new SQLite file at once corrupt it, so the first one to arrive
    migrates while the others wait on the lock, then find the schema ready.
    """
    global _configured
    t_uri, r_uri = tracking_uri(), registry_uri()
    if _configured != (t_uri, r_uri):
        from mlflow.store.model_registry.sqlalchemy_store import (
            SqlAlchemyStore as RegistryStore,
        )
        from mlflow.store.tracking.sqlalchemy_store import (
            SqlAlchemyStore as TrackingStore,
        )

        db = sqlite_path(t_uri)
        if db is not None:
            with _file_lock(db):
                TrackingStore(t_uri, str(artifact_root()))
        reg = sqlite_path(r_uri)
        if reg is not None and reg != db:
            with _file_lock(reg):
                RegistryStore(r_uri)
        if remote.is_remote(t_uri):
            remote.check(t_uri)  # one line now, not minutes of retries at the first run
        mlflow.set_tracking_uri(t_uri)
        mlflow.set_registry_uri(r_uri)
        _configured = (t_uri, r_uri)
    return MlflowClient(tracking_uri=t_uri, registry_uri=r_uri)


def experiment_id(name: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment's ID, creating it with an explicit artifact location if needed, marked as
    a model-training experiment.

    Creation happens under the database lock: two processes creating one new experiment at once
    misfile runs (mlflow#12259). Against a server, a lost race is resolved by reading it back.
    """
    client = configure()
    found = client.get_experiment_by_name(name)
    if found is not None:
        mark_training(client, found)
        return found.experiment_id
    db = sqlite_path(tracking_uri())
    lock = _file_lock(db) if db is not None else contextlib.nullcontext()
    with lock:
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = (artifact_root() / name).as_uri() if db is not None else None
        try:
            return client.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND_TRAINING})
        except MlflowException:
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id


def mark_training(client: MlflowClient, experiment) -> None:
    """Tag an experiment made elsewhere (`mlflow run --experiment-name`) as model training."""
    if experiment.tags.get(KIND_TAG) is None:
        client.set_experiment_tag(experiment.experiment_id, KIND_TAG, KIND_TRAINING)


def experiment_of(run_ids: list[str]) -> str | None:
    """The experiment holding the first of `run_ids` that exists: where a stage run by hand on
    those inputs belongs. None when none exists (the stage's lineage check then says why)."""
    client = configure()
    for run_id in run_ids:
        try:
            return client.get_experiment(client.get_run(run_id).info.experiment_id).name
        except MlflowException:
            continue
    return None


def git_state() -> tuple[str, bool]:
    """(commit, dirty) of the checkout polyrot runs from; ("unknown", False) outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _param_value(value) -> str:
    return "" if value is None else str(value)


def reuse_key(stage: str, code_version: str, params: Mapping[str, object]) -> str:
    """Digest of what determines a stage's results; upstream run IDs are parameters, so they count."""
    payload = {"stage": stage, "code_version": code_version,
               # Unset options stay out too, so adding an optional parameter to a stage keeps old keys valid.
               "params": {k: _param_value(v) for k, v in params.items() if k not in NOT_IN_REUSE_KEY and v is not None}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def find_finished_run(experiment: str, key: str) -> str | None:
    """The newest FINISHED run of `experiment` with this reuse key, if any."""
    client = configure()
    runs = client.search_runs([experiment_id(experiment)],
                              f"tags.`{TAG_REUSE_KEY}` = '{key}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def fail_stale_runs(experiment: str) -> list[str]:
    """Mark FAILED the RUNNING runs of this host whose process is gone (killed with -9, power loss).

    Runs of other hosts are left alone: from here a live remote run looks the same as a dead one.
    """
    client = configure()
    stale = [run.info.run_id for run in client.search_runs([experiment_id(experiment)], "attributes.status = 'RUNNING'",
                                                           max_results=10_000) if _process_of(run) is False]
    for run_id in stale:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
    return stale


def claim_interrupted_run(run) -> None:
    """Before `run` (an MLflow run, as `fetch_run` returns it) is continued by a new one: refuse if
    its process still runs on this host, and mark it FAILED if that process is gone, so the UI no
    longer shows it training."""
    alive = _process_of(run)
    if alive:
        raise RunNotFinishedError(f"run {run.info.run_id} is still running (pid {run.data.tags[TAG_PID]} on this "
                                  "host); stop it before continuing it")
    if alive is False:
        configure().set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))


def _process_of(run) -> bool | None:
    """Whether the process of a RUNNING run of this host is alive; None for a run that is not
    RUNNING or runs elsewhere, whose process cannot be seen from here."""
    tags = run.data.tags
    if (run.info.status != "RUNNING" or tags.get(TAG_HOST) != socket.gethostname()
            or not tags.get(TAG_PID, "").isdigit()):
        return None
    return _process_alive(int(tags[TAG_PID]))


def _process_alive(pid: int) -> bool:
    """True for a live process; a zombie (killed, never reaped by an init that does not reap) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


@dataclass
class StageRun:
    """An open MLflow run of one stage: metrics in batches, artifacts with recorded digests."""

    run_id: str
    client: MlflowClient
    staging: Path

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """All of `metrics` in one call: per-value calls cost ~25 ms each on SQLite."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000], synchronous=True)

    def set_tags(self, tags: Mapping[str, object]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i:i + 100], synchronous=True)

    def log_params(self, params: Mapping[str, object]) -> None:
        """Log params not already on the run: `mlflow run` logs its entry-point params itself."""
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)

    def path(self, artifact_path: str) -> Path:
        """A local path to write an artifact to before `log_artifact`."""
        p = self.staging / artifact_path
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def log_artifact(self, artifact_path: str) -> str:
        """Upload the staged file at `artifact_path` and record its sha256 as a run tag."""
        local = self.staging / artifact_path
        digest = sha256_file(local)
        parent = os.path.dirname(artifact_path) or None
        self.client.log_artifact(self.run_id, str(local), artifact_path=parent)
        self.set_tags({TAG_DIGEST + artifact_path: digest})
        return digest

    def log_json(self, artifact_path: str, obj) -> str:
        self.path(artifact_path).write_text(json.dumps(obj, indent=2, sort_keys=True))
        return self.log_artifact(artifact_path)

    def log_figure(self, artifact_path: str, fig) -> str:
        fig.savefig(self.path(artifact_path), dpi=120, bbox_inches="tight")
        return self.log_artifact(artifact_path)


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, object],
    *,
    code_version: str,
    experiment: str = DEFAULT_EXPERIMENT,
    upstream: Mapping[str, str] | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, object] | None = None,
    adopt: bool = True,
) -> Iterator[StageRun]:
    """Open (or, under `mlflow run`, adopt) the run of one stage, record its provenance, close it.

    Under `mlflow run` the entry point's run (MLFLOW_RUN_ID) is the stage's run; runs a stage opens
    beneath its own (children) pass adopt=False.

    The run ends FINISHED only if the body completes; any exception, Ctrl-C included, marks it
    FAILED, so downstream lineage checks refuse half-written results.
    """
    client = configure()
    adopted = os.environ.get("MLFLOW_RUN_ID") if adopt else None
    commit, dirty = git_state()
    # The handler is in place before the run carries this process's pid: a scancel that arrives
    # once the pid is visible closes the run FAILED instead of leaving it RUNNING.
    with _sigterm_raises():
        if adopted:
            run_id = adopted
        else:
            run_tags = {"mlflow.runName": run_name} if run_name else {}
            if parent_run_id:
                run_tags["mlflow.parentRunId"] = parent_run_id
            run_id = client.create_run(experiment_id(experiment), tags=run_tags).info.run_id
        try:
            if adopted:
                # A run a batch executor prepared waits SCHEDULED until its job starts (experiments.slurm).
                client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                # `mlflow run` named it at random ("handsome-chimp-520") in an experiment it may have made.
                if run_name:
                    client.set_tag(run_id, "mlflow.runName", run_name)
                mark_training(client, client.get_experiment(client.get_run(run_id).info.experiment_id))
            with tempfile.TemporaryDirectory(prefix="polyrot-") as tmp:
                run = StageRun(run_id, client, Path(tmp))
                run.set_tags({
                    TAG_STAGE: stage, TAG_VERSION: polyrot.__version__, TAG_CODE_VERSION: code_version,
                    TAG_COMMIT: commit, TAG_DIRTY: str(dirty).lower(),
                    TAG_REUSE_KEY: reuse_key(stage, code_version, params),
                    TAG_HOST: socket.gethostname(), TAG_PID: os.getpid(),
                    **({TAG_SLURM_JOB: os.environ["SLURM_JOB_ID"]} if os.environ.get("SLURM_JOB_ID") else {}),
                    **{TAG_UPSTREAM + role: rid for role, rid in (upstream or {}).items()},
                    **(tags or {}),
                })
                run.log_params(params)
                yield run
        except BaseException:
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
            raise
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM (scancel, a batch system's time limit, `kill`) ends the stage with an exception, so its
    run is closed FAILED instead of being left RUNNING by a process that vanished."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def attach(run_id: str) -> Iterator[StageRun]:
    """Log more to an existing run (verify and report annotate a finished reproduction); its
    status is left as it is."""
    client = configure()
    try:
        client.get_run(run_id)
    except MlflowException:
        raise RunNotFoundError(f"run {run_id!r} not found in {tracking_uri()}") from None
    with tempfile.TemporaryDirectory(prefix="polyrot-") as tmp:
        yield StageRun(run_id, client, Path(tmp))


# --- lineage ---------------------------------------------------------------------------------


def fetch_run(run_id: str, stage: str | tuple[str, ...], *, finished: bool = True):
    """The MLflow run `run_id`, checked to exist, be FINISHED (unless `finished=False`: resuming
    a killed run) and belong to `stage` (or provide its artifacts, TAG_PROVIDES)."""
    client = configure()
    stages = (stage,) if isinstance(stage, str) else stage
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RunNotFoundError(f"run {run_id!r} not found in {tracking_uri()}") from None
    if finished and run.info.status != "FINISHED":
        raise RunNotFinishedError(f"run {run_id} is {run.info.status}, not FINISHED: its results are incomplete")
    actual = run.data.tags.get(TAG_STAGE)
    if actual not in stages and run.data.tags.get(TAG_PROVIDES) not in stages:
        raise WrongStageError(f"run {run_id} is a {actual or 'non-polyrot'} run; expected a {' or '.join(stages)} run")
    return run


_downloads: tempfile.TemporaryDirectory | None = None


def _download_dir() -> str:
    """A new folder for one download, inside a per-process temporary folder that is removed when
    the process exits: every stage fetches its upstream, and a folder each left behind for good
    filled /tmp (thousands after a day of runs)."""
    global _downloads
    if _downloads is None:
        _downloads = tempfile.TemporaryDirectory(prefix="polyrot-fetch-")
    return tempfile.mkdtemp(dir=_downloads.name)


def fetch_artifact(run_id: str, artifact_path: str, *, stage: str | tuple[str, ...], dst: Path | None = None,
                   finished: bool = True) -> Path:
    """Download one artifact of an upstream run after validating the run and the file's digest.

    Raises a LineageError subclass with a one-line message for each way this can fail.
    """
    run = fetch_run(run_id, stage, finished=finished)
    expected = run.data.tags.get(TAG_DIGEST + artifact_path)
    if expected is None:
        raise ArtifactMissingError(f"run {run_id} has no artifact {artifact_path!r}")
    dst = Path(dst or _download_dir())
    try:
        local = Path(configure().download_artifacts(run_id, artifact_path, str(dst)))
    except (MlflowException, OSError):
        raise ArtifactMissingError(f"run {run_id} has no downloadable artifact {artifact_path!r}") from None
    if not local.is_file():
        raise ArtifactMissingError(f"artifact {artifact_path!r} of run {run_id} is missing from the artifact store")
    actual = sha256_file(local)
    if actual != expected:
        raise ArtifactCorruptError(
            f"artifact {artifact_path!r} of run {run_id} is corrupt: sha256 {actual[:12]}… != logged {expected[:12]}…")
    return local


def artifact_dir(run_id: str) -> Path:
    """Local directory of a run's artifacts (only for file-based artifact stores: tests, tamper checks)."""
    uri = configure().get_run(run_id).info.artifact_uri
    if not uri.startswith("file:"):
        raise LineageError(f"run {run_id} stores artifacts remotely ({uri})")
    from urllib.parse import urlparse
    from urllib.request import url2pathname
    return Path(url2pathname(urlparse(uri).path))

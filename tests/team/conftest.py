"""Team mode against the real engines: PostgreSQL, `mlflow server` with basic auth, one-node Slurm.

scripts/team-services.sh brings up PostgreSQL and Slurm (`.ci/run` does, as root); each test session
then gets databases of its own and a team server of its own on a free port, started and stopped
by `polyrot server`, with a writer and a reader. Without the services the team tests are skipped,
except under CI, where that is a failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICES_DIR = Path(os.environ.get("POLYROT_SERVICES_DIR", "/tmp/polyrot-services"))
# Variables of the developer's own shell that would point a test process at another store or user.
FOREIGN = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
           "MLFLOW_TRACKING_TOKEN", "MLFLOW_RUN_ID", "MLFLOW_AUTH_ADMIN_PASSWORD", "POLYROT_HOME", "SLURM_CONF")


def services_env() -> dict[str, str]:
    """The `export K=V` lines of services.env, which `team-services.sh up` writes."""
    path = SERVICES_DIR / "services.env"
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            out[key] = value
    return out


@pytest.fixture(scope="session")
def services() -> dict[str, str]:
    up = (SERVICES_DIR / "services.env").is_file() and subprocess.run(
        [str(REPO / "scripts" / "team-services.sh"), "status"], capture_output=True).returncode == 0
    if not up:
        message = f"team services are not up in {SERVICES_DIR}: run scripts/team-services.sh up (as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return services_env()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Team:
    """One team server and its users; runs polyrot and python as one of them, in fresh processes."""

    url: str
    directory: Path
    home: Path                 # POLYROT_HOME of the client processes (their Slurm logs go below it)
    base: dict[str, str]       # the environment every process gets (database password file, no credentials)
    admin_password: str
    passwords: dict[str, str] = field(default_factory=dict)

    def env(self, user: str | None = "writer", password: str | None = None, **extra: str) -> dict[str, str]:
        env = {**self.base, "MLFLOW_TRACKING_URI": self.url, **extra}
        if user:
            env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password or self.passwords[user])
        return env

    def run(self, *args: str, user: str | None = "writer", password: str | None = None, timeout: float = 900,
            stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """`python -m polyrot ARGS` (or `python -c CODE` for args ("-c", CODE)) as `user`."""
        cmd = [sys.executable, *args] if args[0] == "-c" else [sys.executable, "-m", "polyrot", *args]
        return subprocess.run(cmd, env=env or self.env(user, password), input=stdin, capture_output=True,
                              text=True, timeout=timeout, cwd=self.home)

    def ok(self, *args: str, **kwargs) -> str:
        done = self.run(*args, **kwargs)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout



def one_line_error(done: subprocess.CompletedProcess, pattern: str) -> str:
    """Bad input in a fresh process: exit 2, one line on stderr holding `pattern`, nothing on stdout."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and not done.stdout.strip(), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and pattern in lines[0], lines[0]
    return lines[0]


def _psql(services: dict[str, str], sql: str) -> None:
    subprocess.run(["psql", "-qAt", "-v", "ON_ERROR_STOP=1", f"{services['POLYROT_TEAM_PG']}/postgres", "-c", sql],
                   env={**os.environ, "PGPASSFILE": services["PGPASSFILE"]}, check=True, capture_output=True)


@pytest.fixture(scope="session")
def team(services, tmp_path_factory):
    """A team server on fresh PostgreSQL databases, with users `writer` and `reader`."""
    name = f"polyrot_test_{os.getpid()}_{secrets.token_hex(3)}"
    pg = services["POLYROT_TEAM_PG"].replace("postgresql://", "postgresql+psycopg2://")
    for db in (name, name + "_auth"):
        _psql(services, f"CREATE DATABASE {db}")
    root = tmp_path_factory.mktemp("team")
    base = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    base.update(PGPASSFILE=services["PGPASSFILE"], POLYROT_HOME=str(root / "home"), MLFLOW_DISABLE_TELEMETRY="true",
                MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    (root / "home").mkdir()
    team = Team("", root / "server", root / "home", base, admin_password=secrets.token_urlsafe(18))
    admin = {"MLFLOW_AUTH_ADMIN_PASSWORD": team.admin_password}
    port = free_port()
    team.ok("server", "init", "--dir", str(team.directory), "--database", f"{pg}/{name}",
            "--auth-database", f"{pg}/{name}_auth", "--port", str(port), "--workers", "1", user=None)
    started = time.perf_counter()
    team.url = team.ok("server", "start", "--dir", str(team.directory), user=None,
                       env=team.env(None, **admin)).strip().splitlines()[-1]
    print(f"\nteam server up in {time.perf_counter() - started:.1f} s at {team.url}", file=sys.stderr)
    for user, role in (("writer", "writer"), ("reader", "reader")):
        team.passwords[user] = secrets.token_urlsafe(18)
        team.ok("server", "add-user", user, "--role", role, "--url", team.url, "--password-stdin",
                stdin=team.passwords[user] + "\n", user=None, env=team.env(None, **admin))
    yield team
    # A failed test may leave jobs queued: cancel this server's, by the job tags of its open runs.
    code = ("from polyrot import tracking\nc = tracking.configure()\n"
            "ids = [e.experiment_id for e in c.search_experiments()]\n"
            "print(' '.join({r.data.tags[tracking.TAG_SLURM_JOB] for s in ('SCHEDULED', 'RUNNING') for r in "
            "c.search_runs(ids, f\"attributes.status = '{s}'\") if tracking.TAG_SLURM_JOB in r.data.tags}))")
    jobs = team.run("-c", code).stdout.split()
    if jobs:
        subprocess.run(["scancel", "--quiet", *jobs], capture_output=True)
    team.run("server", "stop", "--dir", str(team.directory), user=None)
    for db in (name, name + "_auth"):
        _psql(services, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def admin(team, monkeypatch):
    """A plain MLflow client as the admin, who sees everything: for counting what the server holds."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team.admin_password)
    return MlflowClient(tracking_uri=team.url, registry_uri=team.url)


def runs_of(client, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], max_results=10_000)

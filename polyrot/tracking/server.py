"""A team tracking server: `mlflow server` on PostgreSQL, with MLflow's basic-auth app, workspaces
and served artifacts, managed from one directory.

    DIR/server.json   the database URIs (never a password), host, port, artifact destination
    DIR/auth.ini      MLflow's auth configuration (MLFLOW_AUTH_CONFIG_PATH): its database explicit
    DIR/secret_key    the Flask secret that signs CSRF tokens (0600; the auth app refuses to start without one)
    DIR/server.pid    the running server's process group
    DIR/server.log    its output

Passwords never reach these files or the log: the admin's comes from MLFLOW_AUTH_ADMIN_PASSWORD
(read by MLflow when it creates the admin user), a database's from libpq (PGPASSFILE, ~/.pgpass),
a new user's from a prompt or stdin, and each travels only in a request body.

Roles are MLflow workspace roles in the default workspace. A reader may read every experiment, run,
artifact and registered model, and create nothing; a writer may also create experiments, runs and
registered models and edit them. Workspaces are on because with plain basic-auth any logged-in user
may create registered models: only a workspace grant gives the right to create.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from polyrot.errors import TrackingServerError
from polyrot.tracking import remote

ADMIN = "admin"
WORKSPACE = "default"  # MLflow's default workspace: clients that name none work in it
# role -> [(resource type, pattern, permission)]: MLflow's RBAC grants, "*" for every resource.
ROLES = {
    "reader": [("experiment", "*", "READ"), ("registered_model", "*", "READ")],
    "writer": [("workspace", "*", "USE"), ("experiment", "*", "EDIT"), ("registered_model", "*", "EDIT")],
}
ADMIN_PASSWORD_VAR = "MLFLOW_AUTH_ADMIN_PASSWORD"
AUTH_CACHE_S = 60
# Client credentials in the environment are a user's, never the server's.
CLIENT_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "MLFLOW_RUN_ID")


def default_dir() -> Path:
    return Path(os.environ.get("POLYROT_SERVER_DIR") or Path.home() / ".polyrot" / "server")


@dataclass
class ServerConfig:
    database: str
    auth_database: str
    artifacts: str
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 2
    allowed_hosts: str | None = None  # Host headers MLflow accepts beyond localhost (a --host other than loopback)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _config_path(directory: Path) -> Path:
    return Path(directory) / "server.json"


def load(directory: Path) -> ServerConfig:
    path = _config_path(directory)
    if not path.is_file():
        raise TrackingServerError(f"{directory} holds no team server: run `polyrot server init --dir {directory}` first")
    return ServerConfig(**json.loads(path.read_text()))


def _without_password(uri: str, what: str) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(uri)
    except ArgumentError:
        raise TrackingServerError(f"{what} {uri!r} is not a database URI (postgresql+psycopg2://USER@HOST:PORT/DB)") from None
    if url.password:
        raise TrackingServerError(f"{what} holds a password: put it in ~/.pgpass or PGPASSFILE instead "
                                  "(the URI is written to server.json and the server's log)")


def _connect(uri: str, what: str) -> None:
    """Refuse a database that cannot be reached now, rather than a server that dies at start."""
    import sqlalchemy

    args = {"connect_timeout": 5} if uri.startswith("postgresql") else {}
    try:
        with sqlalchemy.create_engine(uri, connect_args=args).connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise TrackingServerError(f"cannot connect to the {what} {uri}: {cause}") from None


def init(directory: Path, database: str, *, auth_database: str | None = None, host: str = "127.0.0.1",
         port: int = 5000, artifacts: str | None = None, workers: int = 2,
         allowed_hosts: str | None = None) -> ServerConfig:
    """Write a server directory for `database` (PostgreSQL: runs and the model registry)."""
    directory = Path(directory).resolve()
    if _config_path(directory).exists():
        raise TrackingServerError(f"{directory} already holds a team server (server.json); pick another --dir")
    if not database.startswith("postgresql"):
        raise TrackingServerError(f"--database must be a PostgreSQL URI (postgresql+psycopg2://USER@HOST:PORT/DB), "
                                  f"got {database!r}")
    auth_database = auth_database or f"sqlite:///{directory / 'auth.db'}"
    for uri, what in ((database, "--database"), (auth_database, "--auth-database")):
        _without_password(uri, what)
    _connect(database, "database")
    if auth_database.startswith("postgresql"):
        _connect(auth_database, "auth database")
    config = ServerConfig(database, auth_database, artifacts or str(directory / "artifacts"), host, port, workers,
                          allowed_hosts)
    directory.mkdir(parents=True, exist_ok=True)
    auth = configparser.ConfigParser()
    auth["mlflow"] = {
        # Only roles grant anything: a user without one sees nothing.
        "default_permission": "NO_PERMISSIONS",
        "database_uri": auth_database,
        "admin_username": ADMIN,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access": "false",
        # Every request re-hashes the password (PBKDF2) unless a check is cached; a stage makes
        # hundreds of requests. A changed password or role reaches the other workers within this.
        "auth_cache_ttl_seconds": str(AUTH_CACHE_S),
    }
    with open(directory / "auth.ini", "w") as fh:
        auth.write(fh)
    secret = directory / "secret_key"
    secret.touch(mode=0o600)
    secret.write_text(secrets.token_hex(32))
    _config_path(directory).write_text(json.dumps(asdict(config), indent=2) + "\n")
    return config


def _pid(directory: Path) -> int | None:
    """The running server's process (group) ID, or None when it is not running."""
    # The one liveness check (zombies count as dead).
    from polyrot.tracking import _process_alive

    path = Path(directory) / "server.pid"
    if not path.is_file():
        return None
    pid = int(path.read_text().strip())
    return pid if _process_alive(pid) else None


def command(config: ServerConfig) -> list[str]:
    return [str(Path(sys.executable).with_name("mlflow")), "server", "--host", config.host, "--port", str(config.port),
            "--backend-store-uri", config.database, "--registry-store-uri", config.database,
            "--artifacts-destination", config.artifacts, "--serve-artifacts",
            "--app-name", "basic-auth", "--enable-workspaces", "--workers", str(config.workers),
            *(["--allowed-hosts", config.allowed_hosts] if config.allowed_hosts else [])]


def _admin_password() -> str:
    password = os.environ.get(ADMIN_PASSWORD_VAR)
    if not password:
        raise TrackingServerError(f"set {ADMIN_PASSWORD_VAR}: the team server's admin password is read from the "
                                  "environment only")
    return password


def _log_tail(directory: Path) -> str:
    log = Path(directory) / "server.log"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    return lines[-1].strip() if lines else "(no output)"


def start(directory: Path, timeout: float = 180.0) -> str:
    """Start the server in its own process group, wait until it answers, make sure the roles exist;
    return its URL."""
    directory = Path(directory).resolve()
    config = load(directory)
    admin_password = _admin_password()
    if _pid(directory):
        raise TrackingServerError(f"the team server of {directory} is already running at {config.url}")
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(directory / "auth.ini"),
               MLFLOW_FLASK_SERVER_SECRET_KEY=(directory / "secret_key").read_text().strip(),
               MLFLOW_DISABLE_TELEMETRY="true",
               # MLflow's server-side jobs (GenAI judges, trace roll-ups) start a job runner and a
               # dozen queue workers that polyrot never uses: on a small machine they double the load.
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(directory / "server.log", "ab") as log:
        proc = subprocess.Popen(command(config), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=directory)
    (directory / "server.pid").write_text(f"{proc.pid}\n")
    deadline = time.time() + timeout
    while not remote.answers(config.url, timeout=5):
        # A server that exits (a taken port, a database it cannot migrate) says why in its log.
        if proc.poll() is not None or time.time() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise TrackingServerError(f"the team server did not come up at {config.url}: {_log_tail(directory)}")
        time.sleep(0.5)
    ensure_roles(config.url, admin_password)
    return config.url


def stop(directory: Path, timeout: float = 30.0) -> bool:
    """Stop the server (SIGTERM to its group, SIGKILL after `timeout`); False if it was not running."""
    pid = _pid(directory)
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while _pid(directory) and time.time() < deadline:
        time.sleep(0.2)
    if _pid(directory):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    (Path(directory) / "server.pid").unlink(missing_ok=True)
    return True


def status(directory: Path) -> dict:
    """{"running", "healthy", "url", "pid", "database"} of the server in `directory`."""
    config = load(directory)
    pid = _pid(directory)
    healthy = bool(pid) and remote.answers(config.url, timeout=5)
    return {"running": pid is not None, "healthy": healthy, "url": config.url, "pid": pid,
            "database": config.database}


# --- users and roles, through the auth app's REST API as the admin ------------------------------


def _admin_request(url: str, password: str, endpoint: str, method: str, expected: tuple[int, ...] = (200,), **kwargs):
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    creds = MlflowHostCreds(url, username=ADMIN, password=password)
    try:
        resp = http_request(creds, endpoint, method, max_retries=0, timeout=30, raise_on_status=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a refused connection in any of its spellings
        raise TrackingServerError(f"tracking server {url} is not reachable: {remote.reason(exc)}") from None
    if resp.status_code == 401:
        raise TrackingServerError(f"tracking server {url} refused the admin's credentials ({ADMIN_PASSWORD_VAR} is wrong)")
    if resp.status_code not in expected:
        try:
            message = resp.json().get("message", resp.text)
        except ValueError:
            message = resp.text
        raise TrackingServerError(f"tracking server {url}: {endpoint} answered {resp.status_code}: "
                                  f"{str(message).strip().splitlines()[0][:160] if str(message).strip() else ''}")
    return resp.json() if resp.content else {}


def _routes():
    """MLflow's auth REST paths (importing them loads the server app, whose Starlette import warns
    on every command otherwise)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="starlette.middleware.wsgi is deprecated")
        from mlflow.server.auth import routes
    return routes


def _role_ids(url: str, password: str) -> dict[str, int]:
    LIST_ROLES = _routes().LIST_ROLES

    roles = _admin_request(url, password, LIST_ROLES, "GET", params={"workspace": WORKSPACE})["roles"]
    return {r["name"]: int(r["id"]) for r in roles}


def ensure_roles(url: str, password: str) -> dict[str, int]:
    """Create the reader and writer roles with their grants, once; {role: id}."""
    routes = _routes()
    ADD_ROLE_PERMISSION, CREATE_ROLE = routes.ADD_ROLE_PERMISSION, routes.CREATE_ROLE

    ids = _role_ids(url, password)
    for name, grants in ROLES.items():
        if name in ids:
            continue
        role = _admin_request(url, password, CREATE_ROLE, "POST",
                              json={"workspace": WORKSPACE, "name": name, "description": f"polyrot {name}"})["role"]
        ids[name] = int(role["id"])
        for resource_type, pattern, permission in grants:
            _admin_request(url, password, ADD_ROLE_PERMISSION, "POST",
                           json={"role_id": ids[name], "resource_type": resource_type,
                                 "resource_pattern": pattern, "permission": permission})
    return ids


def add_user(url: str, name: str, role: str, password: str) -> None:
    """Create user `name` with `password` and give them `role` (reader or writer)."""
    routes = _routes()

    if role not in ROLES:
        raise TrackingServerError(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
    admin_password = _admin_password()
    ids = ensure_roles(url, admin_password)
    _admin_request(url, admin_password, routes.CREATE_USER, "POST", json={"username": name, "password": password})
    _admin_request(url, admin_password, routes.ASSIGN_ROLE, "POST", json={"username": name, "role_id": ids[role]})

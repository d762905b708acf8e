"""A team tracking server on this machine, for trying team mode: PostgreSQL + `mlflow server`.

Everything lives in one folder: the PostgreSQL cluster (its own, started and stopped with the
server), the proxied artifact store, the auth configuration and the admin's password. PostgreSQL
listens on no TCP port at all: only on a Unix socket inside its data folder (mode 0700), so only
this user (and root) can reach the database, without a database password. The MLflow server listens
on loopback by default and, with auth on, runs MLflow's basic-auth app with its users and
permissions in the same PostgreSQL cluster.

Clients need only the URL and credentials: artifacts travel through the server (proxied), so a
client (and a Spark executor) never needs access to the artifact folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmflow.errors import SlmflowError

DB_USER = "slmflow"
PG_PORT = 5432  # names the socket file only: PostgreSQL listens on no TCP port
READY_TIMEOUT_S = 180.0
AUTH_CACHE_SECONDS = 60


@dataclass(frozen=True)
class TeamServerSpec:
    folder: Path
    host: str = "127.0.0.1"
    port: int = 5000
    auth: bool = True
    admin_user: str = "admin"
    workers: int = 2

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass
class TeamServer:
    """A started team server: its PostgreSQL cluster and its `mlflow server` process."""

    spec: TeamServerSpec
    postgres_data: Path
    mlflow: subprocess.Popen[bytes]
    admin_password: str | None

    @property
    def url(self) -> str:
        return self.spec.url

    def client_env(self) -> dict[str, str]:
        """The environment a client needs to use this server."""
        env = {"MLFLOW_TRACKING_URI": self.url}
        if self.admin_password is not None:
            env |= {"MLFLOW_TRACKING_USERNAME": self.spec.admin_user, "MLFLOW_TRACKING_PASSWORD": self.admin_password}
        return env

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "username": self.spec.admin_user if self.admin_password is not None else None,
            "password_file": str(_password_file(self.spec.folder)) if self.admin_password is not None else None,
            "backend_store": f"postgresql (socket in {self.postgres_data})",
            "artifacts": str(self.spec.folder / "artifacts"),
            "log": str(self.spec.folder / "mlflow-server.log"),
            "pid": self.mlflow.pid,
        }

    def stop(self) -> None:
        """Stop `mlflow server` (and its workers), then PostgreSQL."""
        if self.mlflow.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.mlflow.pid, signal.SIGTERM)
            try:
                self.mlflow.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.mlflow.pid, signal.SIGKILL)
                self.mlflow.wait()
        _pg(self.postgres_data, "pg_ctl", "-D", str(self.postgres_data), "-m", "fast", "-w", "stop", check=False)


def start(spec: TeamServerSpec, say: Callable[[str], None] = lambda message: None) -> TeamServer:
    """Start PostgreSQL (initialised and its databases created on first use), then `mlflow server`."""
    spec.folder.mkdir(parents=True, exist_ok=True)
    data = postgres_folder(spec.folder)
    say(f"starting PostgreSQL ({data})")
    _start_postgres(data)
    try:
        _create_database(data, "mlflow")
        password = None
        env = os.environ.copy()
        if spec.auth:
            _create_database(data, "mlflow_auth")
            password = _admin_password(spec.folder)
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(_write_auth_config(spec, data, password))
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = _secret(spec.folder / "flask-secret-key")
        say(f"starting mlflow server at {spec.url}")
        process = _start_mlflow(spec, data, env)
    except BaseException:
        _pg(data, "pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop", check=False)
        raise
    server = TeamServer(spec, data, process, password)
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def database_uri(data: Path, database: str) -> str:
    """SQLAlchemy URI of `database` in the cluster at `data`, through its Unix socket."""
    return f"postgresql://{DB_USER}@/{database}?host={data}&port={PG_PORT}"


def postgres_folder(folder: Path) -> Path:
    """Where the cluster of team folder `folder` lives.

    Inside the folder, except as root: PostgreSQL refuses to run as root, so it runs as the
    `postgres` user, who may not be able to reach the folder (a home or temporary folder with mode
    0700). Then the cluster lives under /var/lib/postgresql, named after the folder, and a symlink
    in the folder shows where.
    """
    link = folder / "postgres"
    if os.geteuid() != 0:
        return link
    if link.is_symlink():
        return link.resolve()
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    data = Path("/var/lib/postgresql/slmflow") / digest
    link.symlink_to(data)
    return data


def remove(folder: Path) -> None:
    """Delete a (stopped) team folder and its cluster, wherever that lives."""
    link = folder / "postgres"
    if link.is_symlink():
        shutil.rmtree(link.resolve(), ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)


def _postgres_bin(name: str) -> str:
    """A PostgreSQL server program: Debian keeps them out of PATH, under /usr/lib/postgresql/N/bin."""
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: _version(p.parent.parent.name))
    if versions:
        return str(versions[-1])
    found = shutil.which(name)
    if found:
        return found
    raise SlmflowError(f"PostgreSQL's {name} was not found: install the server (apt-get install postgresql)")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def _pg(data: Path, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program as the cluster's owner (`postgres` when we are root)."""
    command = [_postgres_bin(program), *args]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise SlmflowError(f"PostgreSQL {program} failed: {detail[-1] if detail else f'exit {result.returncode}'}")
    return result


def _start_postgres(data: Path) -> None:
    if not (data / "PG_VERSION").is_file():
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
        _pg(data, "initdb", "-D", str(data), "-U", DB_USER, "--auth=trust", "--no-locale", "-E", "UTF8")
    if _pg(data, "pg_ctl", "-D", str(data), "status", check=False).returncode == 0:
        # Sharing it would let the first server to stop pull the database from under the other.
        raise SlmflowError(f"a team server already runs on this folder (its PostgreSQL is up in {data}); stop it first")
    options = f"-c listen_addresses='' -c unix_socket_directories='{data}' -p {PG_PORT}"
    log = data / "server.log"
    _pg(data, "pg_ctl", "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")


def _create_database(data: Path, name: str) -> None:
    import psycopg

    with psycopg.connect(host=str(data), port=PG_PORT, user=DB_USER, dbname="postgres", autocommit=True) as db:
        if db.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            db.execute(f'CREATE DATABASE "{name}"')


def _password_file(folder: Path) -> Path:
    return folder / "admin-password"


def _admin_password(folder: Path) -> str:
    """The admin's password: made once, kept in the folder (mode 0600); MLflow stores only its hash."""
    return _secret(_password_file(folder))


def _secret(path: Path) -> str:
    if path.is_file():
        return path.read_text().strip()
    value = secrets.token_urlsafe(18)
    path.touch(mode=0o600)
    path.write_text(value + "\n")
    return value


def _write_auth_config(spec: TeamServerSpec, data: Path, password: str) -> Path:
    """MLflow's basic-auth settings: users and permissions in PostgreSQL, everyone may read by default."""
    path = spec.folder / "basic_auth.ini"
    path.touch(mode=0o600)
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database_uri(data, 'mlflow_auth')}\n"
        f"admin_username = {spec.admin_user}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Every uncached request checks a password hash (measured 0.24 s a request vs 0.065 s cached;
        # an eval of 60 rows: 3.5 min vs 19 s). Cached, a worker accepts a changed password's old
        # value for up to this long.
        f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n"
    )
    return path


def _start_mlflow(spec: TeamServerSpec, data: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    artifacts = spec.folder / "artifacts"
    artifacts.mkdir(exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        database_uri(data, "mlflow"),
        "--serve-artifacts",
        "--artifacts-destination",
        str(artifacts),
        "--host",
        spec.host,
        "--port",
        str(spec.port),
        "--workers",
        str(spec.workers),
    ]
    if spec.auth:
        command += ["--app-name", "basic-auth"]
    log = (spec.folder / "mlflow-server.log").open("ab")
    # A process group of its own: stop() ends the server and every worker it forked.
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_ready(server: TeamServer) -> None:
    import httpx

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.mlflow.poll() is not None:
            raise SlmflowError(f"mlflow server exited ({server.mlflow.returncode}): {_log_tail(server.spec.folder)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise SlmflowError(f"mlflow server did not answer on {server.url} within {READY_TIMEOUT_S:.0f} s")


def _log_tail(folder: Path) -> str:
    lines = (folder / "mlflow-server.log").read_text(errors="replace").strip().splitlines()
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["(no output)"])[-1]

"""Real servers for tests: a throw-away PostgreSQL 15 cluster and an `mlflow server` process.

    with postgres_cluster() as pg, mlflow_server(pg.mlflow_url, tmp_path / "artifacts") as uri:
        client = MlflowClient(tracking_uri=uri)
        study = optuna.create_study(storage=pg.optuna_url, study_name="s")

or its pytest fixtures, enabled by `pytest_plugins = ["servers"]` in a test module or in
tests/conftest.py: `postgres` (one cluster per test session, a `PostgresCluster`) and
`mlflow_server_on_postgres` (one server per test session on that cluster, an `MlflowServer` with
`.uri` and `.artifacts_dir`). Where PostgreSQL is not installed both skip the test, except
under CI=true, where they fail it (`missing_tool`): CI must not turn green by testing less.

URL schemes (checked with the venv here: SQLAlchemy 2.1, psycopg 3, no psycopg2)
-----------------------------------------------------------------------------
Both Optuna's RDBStorage and `mlflow server --backend-store-uri` hand the URL to SQLAlchemy.
SQLAlchemy 2.1 made psycopg (v3) the default PostgreSQL driver, so with it the plain
`postgresql://user:pw@host:port/db` works for both. SQLAlchemy 2.0 and older still default to
psycopg2, and the plain URL then fails with "No module named 'psycopg2'" when only psycopg v3 is
installed; `postgresql+psycopg://...` names the v3 driver explicitly and works with SQLAlchemy
>= 2.0 whichever default it has. `PostgresCluster.url()` therefore returns the explicit form by
default (`driver="psycopg"`); pass `driver=None` for the plain form.

The password may also be left out of the URL (`postgresql+psycopg://fractal@host:port/optuna`):
libpq then reads it from PGPASSWORD or a PGPASSFILE / ~/.pgpass file. Checked here for Optuna,
`mlflow server` and `python -m fractal_mlops.study --storage`; docker/compose.yaml relies on it.

How the cluster is run
----------------------
initdb refuses to run as root, so when the tests run as root every PostgreSQL binary runs as
the `postgres` OS user (subprocess's user=/group=), and the temp dir that holds the data dir,
the socket dir and the log file is handed to that user. As any other user they run directly.
The cluster trusts connections on its Unix socket (used only to create the role and the
databases) and asks for a password (scram-sha-256) on TCP, so a URL without the right password
is refused, as it would be by a real server. Durability is switched off (fsync and friends):
the cluster lives only for the tests.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

PG_USER = "fractal"
PG_PASSWORD = "s3cret-pw"
PG_DATABASES = ("optuna", "mlflow")
PG_SUPERUSER = "postgres"  # initdb -U: the same name whoever runs initdb


class ServerUnavailable(RuntimeError):
    """The server software is not installed here (the fixtures skip on it, outside CI)."""


class ServerStartError(RuntimeError):
    """The server is installed but did not start; the message holds the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def in_ci() -> bool:
    """CI=true (GitHub Actions, GitLab CI and .ci/run set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_tool(reason: str) -> NoReturn:
    """A tool a test needs is not installed: skip the test here, fail it in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing tool fails the test instead of skipping it; "
                    ".ci/run installs what the tests need)", pytrace=False)
    pytest.skip(reason)


def require_postgres() -> None:
    """Skip (fail under CI=true) where the PostgreSQL server binaries cannot run here."""
    try:
        for binary in ("initdb", "pg_ctl"):
            find_pg_binary(binary)
        _run_as()
    except ServerUnavailable as exc:
        missing_tool(str(exc))


def _log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class PostgresCluster:
    host: str
    port: int
    user: str
    password: str
    socket_dir: Path
    data_dir: Path
    log_file: Path
    options: str = ""  # pg_ctl -o, to start it again on the same port

    def url(self, database: str, driver: str | None = "psycopg") -> str:
        """`postgresql+psycopg://user:pw@host:port/db` (driver=None: `postgresql://...`)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    @property
    def optuna_url(self) -> str:
        return self.url("optuna")

    @property
    def mlflow_url(self) -> str:
        return self.url("mlflow")

    def connect_as_superuser(self, database: str = "postgres"):
        """A psycopg connection over the Unix socket (trusted, no password), autocommit on."""
        import psycopg

        return psycopg.connect(host=str(self.socket_dir), port=self.port, user=PG_SUPERUSER,
                               dbname=database, autocommit=True)


def find_pg_binary(name: str) -> str:
    """initdb / pg_ctl on PATH, else from Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if candidates:
        return candidates[-1]
    raise ServerUnavailable(f"PostgreSQL server binary {name!r} not found (install postgresql)")


def _run_as() -> dict:
    """subprocess keyword arguments that run a PostgreSQL binary as a non-root user."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServerUnavailable("running as root and there is no 'postgres' OS user "
                                "for initdb (which refuses root)") from None
    return {"user": "postgres", "group": "postgres"}


def _chown_to(path: Path, run_as: dict) -> None:
    if run_as:
        entry = pwd.getpwnam(run_as["user"])
        os.chown(path, entry.pw_uid, entry.pw_gid)


@contextlib.contextmanager
def postgres_cluster(
    user: str = PG_USER,
    password: str = PG_PASSWORD,
    databases: Sequence[str] = PG_DATABASES,
    host: str = "127.0.0.1",
    start_timeout: float = 60,
) -> Iterator[PostgresCluster]:
    """A fresh PostgreSQL cluster on `host`:<free port> with `user`/`password` owning `databases`.

    Stopped (`pg_ctl stop -m immediate`) and deleted on exit.
    """
    initdb, pg_ctl = find_pg_binary("initdb"), find_pg_binary("pg_ctl")
    run_as = _run_as()
    # Under /tmp when the binaries run as `postgres`: it must reach the dir (TMPDIR may be private).
    # The path stays short too: a Unix socket path is limited to ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="fractal-pg-", dir="/tmp" if run_as else None))
    data_dir, socket_dir, log_file = root / "data", root / "sock", root / "postgres.log"
    started = False
    try:
        _chown_to(root, run_as)
        socket_dir.mkdir()
        _chown_to(socket_dir, run_as)
        pg_env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        init = subprocess.run(
            [initdb, "-D", str(data_dir), "-U", PG_SUPERUSER, "--auth-local=trust",
             "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
            cwd=root, env=pg_env, capture_output=True, text=True, **run_as,
        )
        if init.returncode != 0:
            raise ServerStartError(f"initdb failed ({init.returncode}): {init.stderr.strip()}")
        for attempt in range(3):  # the free port can be taken between free_port() and bind
            port = free_port(host)
            options = (f"-c listen_addresses={host} -p {port} -k {socket_dir} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off")
            result = subprocess.run(
                [pg_ctl, "start", "-D", str(data_dir), "-l", str(log_file), "-w",
                 "-t", str(int(start_timeout)), "-o", options],
                cwd=root, env=pg_env, capture_output=True, text=True, **run_as,
            )
            if result.returncode == 0:
                started = True
                break
            if "could not bind" not in _log_tail(log_file) or attempt == 2:
                raise ServerStartError(f"pg_ctl start failed ({result.returncode}): "
                                       f"{result.stderr.strip()}\n{_log_tail(log_file)}")
        cluster = PostgresCluster(host=host, port=port, user=user, password=password,
                                  socket_dir=socket_dir, data_dir=data_dir, log_file=log_file,
                                  options=options)
        _create_role_and_databases(cluster, databases)
        yield cluster
    finally:
        if started or (data_dir / "postmaster.pid").exists():  # also after a pg_ctl timeout
            _stop_cluster(pg_ctl, data_dir, run_as)
        shutil.rmtree(root, ignore_errors=True)


def _create_role_and_databases(cluster: PostgresCluster, databases: Sequence[str]) -> None:
    from psycopg import sql

    with cluster.connect_as_superuser() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(cluster.user), sql.Literal(cluster.password)))
        for database in databases:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(database), sql.Identifier(cluster.user)))


def stop_cluster(cluster: PostgresCluster) -> None:
    """The server goes away, as in a restart or a failover: its clients' connections are
    closed and new ones refused. A "fast" stop, not an "immediate" one: with durability
    switched off here, a crash would lose commits that a real server keeps."""
    _stop_cluster(find_pg_binary("pg_ctl"), cluster.data_dir, _run_as(), mode="fast")


def start_cluster(cluster: PostgresCluster, timeout: float = 60) -> None:
    """Start a stopped cluster again, on the same port, with its data."""
    result = subprocess.run(
        [find_pg_binary("pg_ctl"), "start", "-D", str(cluster.data_dir), "-l",
         str(cluster.log_file), "-w", "-t", str(int(timeout)), "-o", cluster.options],
        cwd=cluster.data_dir.parent, env={**os.environ, "LC_ALL": "C", "LANG": "C"},
        capture_output=True, text=True, **_run_as())
    if result.returncode != 0:
        raise ServerStartError(f"pg_ctl start failed ({result.returncode}): "
                               f"{result.stderr.strip()}\n{_log_tail(cluster.log_file)}")


def _stop_cluster(pg_ctl: str, data_dir: Path, run_as: dict, mode: str = "immediate") -> None:
    result = subprocess.run([pg_ctl, "stop", "-D", str(data_dir), "-m", mode, "-w"],
                            capture_output=True, text=True, **run_as)
    if result.returncode == 0:
        return
    # pg_ctl could not stop it: kill the postmaster this context started, by its PID.
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- MLflow


def mlflow_command() -> list[str]:
    """`mlflow` of the Python environment running the tests."""
    return [sys.executable, "-m", "mlflow"]


def _wait_for_health(url: str, process: subprocess.Popen, log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"mlflow server exited with {process.returncode} before "
                                   f"answering {url}:\n{_log_tail(log_file)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise ServerStartError(f"mlflow server did not answer {url} within {timeout:.0f} s:\n"
                           f"{_log_tail(log_file)}")


def _stop_process_group(process: subprocess.Popen, grace: float = 10) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str,
    artifacts_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    allowed_hosts: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    timeout: float = 60,
    log_file: str | os.PathLike | None = None,
) -> Iterator[str]:
    """A real `mlflow server` (1 worker, proxied artifacts into `artifacts_dir`); yields its URI.

    `allowed_hosts`: Host headers to accept besides MLflow's defaults (localhost, 127.0.0.1 and
    private IPs: MLflow 3 answers any other Host with 403, except on /health). The whole process
    group is terminated on exit.
    """
    port = free_port(host)
    artifacts_dir = Path(artifacts_dir)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    log_dir = None
    if log_file is None:
        log_dir = tempfile.mkdtemp(prefix="fractal-mlflow-")
        log_file = Path(log_dir) / "mlflow-server.log"
    log_file = Path(log_file)
    command = [*mlflow_command(), "server", "--host", host, "--port", str(port),
               "--workers", "1", "--backend-store-uri", backend_store_uri,
               "--serve-artifacts", "--artifacts-destination", str(artifacts_dir)]
    if allowed_hosts:
        defaults = ["localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*"]
        command += ["--allowed-hosts", ",".join([*defaults, *allowed_hosts])]
    command += list(extra_args)
    uri = f"http://{host}:{port}"
    try:
        with open(log_file, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait_for_health(f"{uri}/health", process, log_file, timeout)
            yield uri
        finally:
            _stop_process_group(process)
    finally:
        if log_dir is not None:
            shutil.rmtree(log_dir, ignore_errors=True)


# --------------------------------------------------------------------------- pytest fixtures


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One PostgreSQL cluster for the test session (where PostgreSQL is not installed: skips,
    fails under CI=true).

    Tests sharing it should use their own study / experiment names.
    """
    require_postgres()
    with postgres_cluster() as cluster:
        yield cluster


@dataclass(frozen=True)
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT
    artifacts_dir: Path  # where the server stores the artifacts clients upload
    backend_store_uri: str


@pytest.fixture(scope="session")
def mlflow_server_on_postgres(
    postgres: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """One `mlflow server` on the session's PostgreSQL cluster (its `mlflow` database).

    It also accepts the Host header `mlflow:5000`, the name the compose file's worker uses.
    """
    artifacts = tmp_path_factory.mktemp("mlartifacts")
    with mlflow_server(postgres.mlflow_url, artifacts, allowed_hosts=["mlflow:5000"]) as uri:
        yield MlflowServer(uri=uri, artifacts_dir=artifacts, backend_store_uri=postgres.mlflow_url)

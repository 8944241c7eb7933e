"""Real stores for the multi-host tests and the store benchmark: PostgreSQL databases in the cluster that
``scripts/ci_postgres.sh`` starts (URL in ``SCALING_TEST_POSTGRES``), and real ``mlflow server`` processes
backed by one of them.

Every database an MLflow server uses starts as a copy of one that MLflow's own migrations made once
(``CREATE DATABASE ... TEMPLATE``: milliseconds instead of seconds of migrations). The server runs
without its job runner (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: otherwise it starts eight more
Python processes, a minute of CPU on two cores), in a process group of its own so that stopping it stops
all of it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

POSTGRES_ENV = "SCALING_TEST_POSTGRES"
MLFLOW_TEMPLATE_DB = "scaling_mlflow_template"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresCluster:
    admin_url: str  # a superuser's URL of the cluster's `postgres` database

    def url(self, database: str) -> str:
        return self.admin_url.rsplit("/", 1)[0] + "/" + database

    def _admin(self, sql: str) -> None:
        import sqlalchemy as sa

        engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as c:
                c.execute(sa.text(sql))
        finally:
            engine.dispose()

    def check(self) -> None:
        self._admin("SELECT 1")

    def database(self, name: str, template: str | None = None) -> str:
        """A fresh, empty database (dropped first if it exists); its URL."""
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def mlflow_database(self, name: str) -> str:
        """A fresh database holding an empty, migrated MLflow store."""
        self._ensure_mlflow_template()
        return self.database(name, template=MLFLOW_TEMPLATE_DB)

    def _ensure_mlflow_template(self) -> None:
        import sqlalchemy as sa
        from mlflow.store.db.utils import _initialize_tables

        engine = sa.create_engine(self.admin_url)
        try:
            with engine.connect() as c:
                exists = c.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                   {"n": MLFLOW_TEMPLATE_DB}).first()
        finally:
            engine.dispose()
        if exists:
            return
        url = self.database(MLFLOW_TEMPLATE_DB)
        engine = sa.create_engine(url)
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()


def postgres_cluster() -> PostgresCluster | None:
    url = os.environ.get(POSTGRES_ENV)
    return PostgresCluster(url) if url else None


@dataclass
class MlflowServer:
    """``mlflow server`` on 127.0.0.1:``port`` with ``backend_uri`` as its store and ``artifacts`` as the
    destination of the artifacts it serves (``mlflow-artifacts:``)."""

    backend_uri: str
    artifacts: Path
    port: int
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> None:
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(exe), "server", "--backend-store-uri", self.backend_uri, "--artifacts-destination",
               str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).read()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout:.0f} s: {self.log_tail()}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server and everything it started (its process group)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)

    def log_tail(self, n: int = 20) -> str:
        try:
            return " | ".join(self.log.read_text().splitlines()[-n:])
        except OSError:
            return ""

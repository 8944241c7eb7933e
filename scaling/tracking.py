"""Everything MLflow: where runs go, experiment per phase, batched logging, checkpoints, queries.

The default store is a real SQLite database at ``mlruns/mlflow.db`` with artifacts under
``mlruns/artifacts`` (both relative to the working directory); ``--tracking-uri`` or
``MLFLOW_TRACKING_URI`` point elsewhere (e.g. ``http://host:5000``). Logging goes through
``MlflowClient`` with explicit run ids (no global active run, so threads and nested sweeps are
safe) and metrics are sent with ``log_batch`` in chunks of at most 1,000 values.

A store that stops answering (a tracking server restarting, a dropped connection) is waited for:
every call of the client :func:`connect` returns is retried with backoff while the process's outage
lasts less than ``SCALING_STORE_RETRY_S`` seconds (default 120), a request that may already have been
applied only if sending it twice is harmless (not ``create_run``). Past the limit the call raises
:class:`StoreUnavailable`: one line, exit code 3, and the work resumes when the same command runs again.
"""

from __future__ import annotations

import functools
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from scaling.config import ConfigError, cache_dir, first_line

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlruns/artifacts"
COMPARE_EXPERIMENT = "scaling-compare"
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ITEMS_PER_BATCH = 1000
HTTP_TIMEOUT_S = 30  # a request to a tracking server without an answer this long counts as unanswered

# Tags every run of ours carries (the analysis relies on them).
TAG_PHASE = "phase"
TAG_CONFIG_HASH = "config_hash"
TAG_SOURCE = "source"  # train | sweep | search | import
TAG_DIVERGED = "diverged"  # "true" / "false"
TAG_CONVERGED = "converged"
TAG_LEARNED = "learned"  # "true" / "false" / "unknown"
TAG_OWNER = "scaling.owner"  # host:pid of the process training it (for stale-run detection)
TAG_ERROR = "scaling.error"  # why a run FAILED without diverging
TAG_CHECKPOINT_LOST = "scaling.checkpoint_lost"  # why a run's last checkpoint was not written (run FINISHED)
TAG_COMPILE = "scaling.compile"  # batched runs: off or a --compile-mode (how the step was compiled)


class TrackingError(ConfigError):
    """The tracking store cannot be used (unreachable server, bad URI): one line, exit 2."""


def experiment_name(phase: str) -> str:
    return f"scaling-phase-{phase}"


def sqlite_path(uri: str) -> str:
    """The database path of a ``sqlite:///`` URI ("" for any other store)."""
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""


# SQLite database files this process opened. A command that ends with os._exit closes no connection, and SQLite
# folds its write-ahead log into the database file only when the last connection closes: the log is durable,
# but a copy of the .db file alone would lack the newest records.
SQLITE_FILES: set[str] = set()


def note_sqlite_file(uri: str) -> None:
    """Remember the database file of a ``sqlite:///`` URI for :func:`checkpoint_sqlite_files`."""
    path = sqlite_path(uri)
    if path and path != ":memory:" and "?" not in path:
        SQLITE_FILES.add(str(Path(path).resolve()))


def checkpoint_sqlite_files() -> None:
    """Fold each noted SQLite store's write-ahead log into its database file (best effort: the log itself
    keeps every committed record)."""
    import sqlite3

    for path in sorted(SQLITE_FILES):
        try:
            con = sqlite3.connect(path, timeout=10)
            try:
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                con.close()
        except sqlite3.Error:
            pass


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``--tracking-uri`` beats ``MLFLOW_TRACKING_URI`` beats the local SQLite default."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if sqlite_path(uri):
        Path(sqlite_path(uri)).parent.mkdir(parents=True, exist_ok=True)
    return uri


def _default_artifact_location(uri: str) -> str | None:
    """Artifacts beside a local SQLite store (``<db dir>/artifacts``); a server decides its own."""
    if sqlite_path(uri):
        return (Path(sqlite_path(uri)).resolve().parent / "artifacts").as_uri()
    return None


def store_template() -> Path:
    """The empty SQLite store new stores start from (:func:`seed_sqlite_store`): made once per MLflow
    version in ``cache_dir()`` by MLflow's own migrations (``_initialize_tables``: the tables, nothing else),
    in write-ahead-log mode (a setting the database file keeps): a commit then costs one sync of the log
    instead of the rollback journal's several (MLflow commits about six times per imported run), and
    readers do not block the writer (several workers on one store)."""
    import sqlite3

    import mlflow
    from mlflow.store.db.utils import _initialize_tables
    from sqlalchemy import create_engine

    template = cache_dir() / f"mlflow-{mlflow.__version__}-wal-empty-store.db"
    if not template.exists():
        part = template.with_name(f"{template.name}.{os.getpid()}.tmp")
        try:
            engine = create_engine(f"sqlite:///{part}")
            try:
                _initialize_tables(engine)
            finally:
                engine.dispose()
            con = sqlite3.connect(part)
            try:
                con.execute("PRAGMA journal_mode=WAL")
            finally:
                con.close()  # the last connection merges the log into the file and removes it
            os.replace(part, template)
        finally:
            part.unlink(missing_ok=True)
    return template


def seed_sqlite_store(db: Path) -> bool:
    """Start a new SQLite store as a copy of :func:`store_template`; True if it was seeded.

    A new store runs MLflow's schema migrations (seconds on a small machine) at every first run into it; a copy
    of the migrated template takes milliseconds. MLflow then finds its tables, checks the schema revision and adds the default
    experiment, as for a store it migrated itself. Only a store file that does not exist yet is seeded
    (linked into place: a store another process creates meanwhile is left alone); whatever fails here
    leaves the store to MLflow.
    """
    if db.exists():
        return False
    tmp = db.with_name(f".{db.name}.{os.getpid()}.seed")
    try:
        shutil.copyfile(store_template(), tmp)
        os.link(tmp, db)  # fails if the store exists by now
        return True
    except Exception:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def connect(uri: str | None = None, check: bool = True) -> RetryingClient:
    """An ``MlflowClient`` on the resolved store (as a :class:`RetryingClient`); with ``check``, fail fast
    if it cannot be reached."""
    import logging

    import mlflow
    from mlflow.tracking import MlflowClient

    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):  # "Creating initial tables..." noise
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = resolve_tracking_uri(uri)
    path = sqlite_path(uri)
    if path and path != ":memory:" and "?" not in path:  # a plain database file
        seed_sqlite_store(Path(path))
        note_sqlite_file(uri)
    retry_limit_s()  # a bad SCALING_STORE_RETRY_S is an error now, not in a background thread later
    if uri.startswith(("http://", "https://")):
        # MLflow's own retries (minutes, per request) off: with_retry resends a request as long as the
        # process's outage clock allows, and a first check fails in seconds.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        # Ending a run through a server otherwise costs one more request (the run, for its name) and prints
        # two lines of links to stdout: 20,000 lines for an import of 10,000 rows.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        # A request that has had no answer for this long counts as the store not answering (and is resent
        # if it is safe to): long enough for a page of SERVER_PAGE runs on a loaded server.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    if check:  # once, unretried: a wrong URI or a server that is not there fails in seconds
        try:
            client.search_experiments(max_results=1)
        except Exception as e:  # any failure to reach the store is the user's to fix
            raise TrackingError(f"cannot reach the MLflow tracking store {uri!r}: {first_line(e)}") from None
    return RetryingClient(client)


# These are model-training runs: the tag says so to MLflow's UI. Its 3.18 release picks the view from a toggle
# instead (the URL's ?workflowType=machine_learning, or the choice it remembers), so the README links with that.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def get_or_create_experiment(client, name: str) -> str:
    """Experiment id by name, created on first use; tolerant of a concurrent creator (SQLite race)."""
    for attempt in range(8):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            for k, v in EXPERIMENT_TAGS.items():  # an experiment made before the tag existed
                if exp.tags.get(k) is None:
                    client.set_experiment_tag(exp.experiment_id, k, v)
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=_default_artifact_location(client.tracking_uri),
                                            tags=EXPERIMENT_TAGS)
        except Exception:
            time.sleep(0.05 * (attempt + 1) + random.random() * 0.05)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise TrackingError(f"could not create MLflow experiment {name!r}")
    return exp.experiment_id


RETRY_LIMIT_ENV = "SCALING_STORE_RETRY_S"
DEFAULT_RETRY_LIMIT_S = 120.0
FIRST_WAIT_S = 0.25
MAX_WAIT_S = 8.0
# Calls whose request may have reached the store before it failed are sent again only when sending them
# twice does no harm; creating a run twice makes a second run.
NOT_IDEMPOTENT = frozenset({"create_run"})


class StoreUnavailable(TrackingError):
    """The tracking store stopped answering for longer than the retry limit: one line, exit code 3 (the
    work is not lost: rerunning the same command resumes it)."""

    exit_code = 3


def retry_limit_s() -> float:
    """How long a store may stay unreachable before a process gives up (``SCALING_STORE_RETRY_S``)."""
    raw = os.environ.get(RETRY_LIMIT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_RETRY_LIMIT_S
    except ValueError:
        raise ConfigError(f"{RETRY_LIMIT_ENV} must be a number of seconds, got {raw!r}") from None


def failure_kind(e: BaseException) -> str:
    """How a failed store call may be retried: "locked" (SQLite busy), "unsent" (no connection was made:
    the request never reached the store), "maybe" (the connection broke or timed out, or a gateway
    answered 502-504: the request may have been applied) or "fatal" (anything else: not retried)."""
    text = str(e).lower()
    if "database is locked" in text or "database is busy" in text:
        return "locked"
    names = set()
    x: BaseException | None = e
    while x is not None and len(names) < 20:
        names.add(type(x).__name__)
        x = x.__cause__ or x.__context__
    if names & {"NewConnectionError", "ConnectTimeoutError", "ConnectionRefusedError", "ConnectTimeout"}:
        return "unsent"
    if names & {"ConnectionError", "ReadTimeout", "Timeout", "ReadTimeoutError", "ProtocolError",
                "RemoteDisconnected", "ConnectionResetError", "ChunkedEncodingError"}:
        return "maybe"
    if re.search(r"error code (502|503|504)\b", text):
        return "maybe"
    return "fatal"


@dataclass
class Outage:
    """When the store stopped answering (``since`` is None while it answers). One per process, shared by
    its threads: every retry counts from the same moment, so once the limit is past every call gives up
    at once instead of each waiting the whole limit again."""

    since: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self, e: BaseException, wait_s: float) -> float:
        """Sleep before the next try (the next wait is returned), or raise StoreUnavailable past the limit."""
        now = time.monotonic()
        limit = retry_limit_s()
        with self.lock:
            if self.since is None:
                self.since = now
                print(f"warning: the MLflow tracking store is not answering ({first_line(e, 120)}); "
                      f"retrying for up to {limit:.0f} s", file=sys.stderr)
            down = now - self.since
        if down >= limit:
            raise StoreUnavailable(f"the MLflow tracking store has not answered for {down:.0f} s "
                                   f"({first_line(e, 160)}); rerun the same command to resume") from None
        time.sleep(min(wait_s * (1 + 0.2 * random.random()), limit - down))
        return min(wait_s * 2, MAX_WAIT_S)

    def ended(self) -> None:
        if self.since is not None:
            with self.lock:
                if self.since is not None:
                    down = time.monotonic() - self.since
                    print(f"note: the MLflow tracking store answers again (after {down:.0f} s)", file=sys.stderr)
                self.since = None


OUTAGE = Outage()


def with_retry(fn, *args, attempts: int = 8, idempotent: bool = True, **kwargs):
    """Call ``fn``; SQLite's "database is locked" is retried ``attempts`` times, and a store that does not
    answer (a tracking server restarting, a dropped connection) with backoff until it has been down for
    :func:`retry_limit_s` (then :class:`StoreUnavailable`). A request that may have been applied is sent
    again only if ``idempotent``."""
    if getattr(fn, "retrying", False):  # a RetryingClient's method retries by itself
        return fn(*args, **kwargs)
    locked, wait_s = 0, FIRST_WAIT_S
    while True:
        try:
            out = fn(*args, **kwargs)
        except Exception as e:
            kind = failure_kind(e)
            if kind == "locked" and locked < attempts - 1:
                time.sleep(0.05 * 2 ** locked + random.random() * 0.05)
                locked += 1
                continue
            if kind == "unsent" or (kind == "maybe" and idempotent):
                wait_s = OUTAGE.wait(e, wait_s)
                continue
            raise
        OUTAGE.ended()
        return out


class RetryingClient:
    """An ``MlflowClient`` whose every method goes through :func:`with_retry` (``create_run`` only when
    its request surely did not reach the store). Attributes pass through; ``raw`` is the client itself."""

    def __init__(self, client):
        self.raw = client

    def __getattr__(self, name: str):
        attr = getattr(self.raw, name)
        if name.startswith("_") or not callable(attr):
            return attr
        idempotent = name not in NOT_IDEMPOTENT

        @functools.wraps(attr)
        def call(*args, **kwargs):
            return with_retry(attr, *args, idempotent=idempotent, **kwargs)

        call.retrying = True
        return call


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        with_retry(client.log_batch, run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])


def log_metrics(client, run_id: str, rows: Iterable[tuple[str, float, int]]) -> None:
    """Log ``(key, value, step)`` rows in batches of at most 1,000 (one request each)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(s)) for k, v, s in rows]
    for i in range(0, len(items), MAX_METRICS_PER_BATCH):
        with_retry(client.log_batch, run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])


def log_record(client, run_id: str, params: dict[str, Any] | None = None,
               metrics: Iterable[tuple[str, float, int]] = (), tags: dict[str, Any] | None = None) -> None:
    """Params, ``(key, value, step)`` metrics and tags of a run in as few ``log_batch`` requests as MLflow's
    limits allow (per request: 100 params, 100 tags, 1,000 metrics, 1,000 items in all)."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    ps = [Param(k, str(v)) for k, v in (params or {}).items()]
    ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    ms = [Metric(k, float(v), now, int(s)) for k, v, s in metrics]
    while ps or ts or ms:
        p, ps = ps[:MAX_PARAMS_PER_BATCH], ps[MAX_PARAMS_PER_BATCH:]
        t, ts = ts[:MAX_TAGS_PER_BATCH], ts[MAX_TAGS_PER_BATCH:]
        room = MAX_ITEMS_PER_BATCH - len(p) - len(t)
        m, ms = ms[:min(room, MAX_METRICS_PER_BATCH)], ms[min(room, MAX_METRICS_PER_BATCH):]
        with_retry(client.log_batch, run_id, metrics=m, params=p, tags=t)


def logged_through(client, run_id: str, metrics: Iterable[str] = ("train_loss", "val_loss")) -> dict[str, int]:
    """The last step at which each of ``metrics`` was logged in the run (absent: never). A resumed run
    restarts from its last checkpoint, which can be older than its last logged metrics: the steps up to
    these are in the store already and are not logged a second time."""
    out = {}
    for name in metrics:
        hist = with_retry(client.get_metric_history, run_id, name)
        if hist:
            out[name] = max(m.step for m in hist)
    return out


def set_tags(client, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    with_retry(client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def learned_tag(final_val_loss: float | None, baseline_unigram_loss: float | None, diverged: bool) -> str:
    """The ``learned`` tag: "true" when the final validation loss beats the unigram baseline (counting
    characters), "false" when it does not or the run diverged, "unknown" without both numbers."""
    if diverged:
        return "false"
    if final_val_loss is None or baseline_unigram_loss is None:
        return "unknown"
    return "true" if final_val_loss < baseline_unigram_loss else "false"


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the code this process runs (asked once: every run of a sweep records it)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def owner_id() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str | None) -> bool:
    """Whether the process named by a ``host:pid`` owner tag still runs (only knowable on this host)."""
    import socket

    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True  # another machine's run: not ours to judge by pid
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


SERVER_PAGE = 1_000  # runs per search request to a server: each stays well inside HTTP_TIMEOUT_S


def search_runs(client, experiment_ids: list[str], filter_string: str = "", max_results: int = 50_000):
    """All runs matching ``filter_string`` (paged), as MLflow ``Run`` objects."""
    runs, token = [], None
    page_size = SERVER_PAGE if client.tracking_uri.startswith(("http://", "https://")) else 10_000
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=min(max_results, page_size),
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token or len(runs) >= max_results:
            return runs

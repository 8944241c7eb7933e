"""The runs of an experiment with only the columns a reader needs: straight from the store's tables where
the tracking URI is an MLflow SQL database, through MLflow's ``search_runs`` otherwise.

MLflow offers no column selection: ``search_runs`` builds every run whole (all params, tags and latest
metrics), about 1 ms per run of ours on a 2-core machine, so 10,000 runs take 9-16 s. When the tracking URI
is the SQL database itself (``sqlite:///...``, ``postgresql://...``, ``mysql://...``) the same values are
read with four queries (runs, params, tags, latest metrics; only the keys asked for) in a fraction of a
second. A tracking server (``http://...``) hides its database: its runs come through ``search_runs``
(docs/reliability.md has the figures). The values are MLflow's own: a param or tag as its string, a metric
as its latest value (NaN for NaN, ±1.797e308 for ±inf, as MLflow stores them), runs newest first
(start time descending, then run id), active runs only. Should the direct read fail (a schema this code
does not know), the runs come through ``search_runs`` instead.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from scaling import tracking
from scaling.config import first_line

SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


@dataclass(frozen=True)
class Columns:
    params: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()


@dataclass
class RunRecord:
    run_id: str
    status: str
    start_time: int | None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def database_uri(tracking_uri: str) -> str | None:
    """The tracking URI when it is a SQL database MLflow can use as its store, else None."""
    scheme = tracking_uri.split(":", 1)[0].split("+", 1)[0].lower()
    return tracking_uri if scheme in SQL_SCHEMES and "://" in tracking_uri else None


def fetch_runs(client, experiment_id: str, columns: Columns, tag_equals: dict[str, str] | None = None,
               ) -> list[RunRecord]:
    """The experiment's active runs (with every tag of ``tag_equals`` at its value), ``columns`` only."""
    db = database_uri(client.tracking_uri)
    if db is not None:
        try:
            return read_tables(db, experiment_id, columns, tag_equals or {})
        except Exception as e:  # e.g. a store of another MLflow version: MLflow's own reader still works
            print(f"note: runs read through MLflow ({first_line(e, 120)})", file=sys.stderr)
    return search(client, experiment_id, columns, tag_equals or {})


def search(client, experiment_id: str, columns: Columns, tag_equals: dict[str, str]) -> list[RunRecord]:
    """Through MLflow's ``search_runs`` (whole runs, trimmed to ``columns``)."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tag_equals.items())
    out = []
    for r in tracking.search_runs(client, [experiment_id], where):
        d = r.data
        out.append(RunRecord(r.info.run_id, r.info.status, r.info.start_time,
                             {k: d.params[k] for k in columns.params if k in d.params},
                             {k: d.tags[k] for k in columns.tags if k in d.tags},
                             {k: d.metrics[k] for k in columns.metrics if k in d.metrics}))
    return out


def read_tables(db_uri: str, experiment_id: str, columns: Columns, tag_equals: dict[str, str]) -> list[RunRecord]:
    """Straight from MLflow's tables ``runs``, ``params``, ``tags`` and ``latest_metrics``."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_uri)
    try:
        with engine.connect() as c:
            chosen, args = _chosen_runs(experiment_id, tag_equals)
            runs = {row.run_uuid: RunRecord(row.run_uuid, row.status, row.start_time)
                    for row in c.execute(sa.text(f"SELECT run_uuid, status, start_time FROM runs r WHERE {chosen}"),
                                         args)}
            for table, keys, into in (("params", columns.params, "params"), ("tags", columns.tags, "tags")):
                for row in _values(c, table, "value", keys, chosen, args):
                    getattr(runs[row.run_uuid], into)[row.key] = row.value
            for row in _values(c, "latest_metrics", "value, is_nan", columns.metrics, chosen, args):
                runs[row.run_uuid].metrics[row.key] = float("nan") if row.is_nan else float(row.value)
    finally:
        engine.dispose()
    return sorted(runs.values(), key=lambda r: (-(r.start_time or 0), r.run_id))


def _chosen_runs(experiment_id: str, tag_equals: dict[str, str]) -> tuple[str, dict]:
    """The WHERE clause (on ``runs r``) of the runs asked for, and its parameters."""
    where = ["r.experiment_id = :exp", "r.lifecycle_stage = 'active'"]
    args: dict = {"exp": int(experiment_id)}
    for i, (k, v) in enumerate(tag_equals.items()):
        where.append(f"r.run_uuid IN (SELECT run_uuid FROM tags WHERE key = :tk{i} AND value = :tv{i})")
        args[f"tk{i}"], args[f"tv{i}"] = k, v
    return " AND ".join(where), args


def _values(c, table: str, value_cols: str, keys: tuple[str, ...], chosen: str, args: dict):
    import sqlalchemy as sa

    if not keys:
        return []
    stmt = sa.text(f"SELECT t.run_uuid, t.key, {', '.join('t.' + v.strip() for v in value_cols.split(','))} "
                   f"FROM {table} t JOIN runs r ON r.run_uuid = t.run_uuid WHERE {chosen} AND t.key IN :keys")
    return c.execute(stmt.bindparams(sa.bindparam("keys", expanding=True)), {**args, "keys": list(keys)})


__all__ = ["Columns", "RunRecord", "database_uri", "fetch_runs", "read_tables", "search"]

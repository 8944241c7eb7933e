"""The runs of an experiment with only the columns a reader needs: straight from the store's tables where
the tracking URI is an MLflow SQL database, through MLflow's ``search_runs`` otherwise.

MLflow offers no column selection: ``search_runs`` builds every run whole (all params, tags and latest
metrics), so 10,000 runs of ours take many seconds (docs/reliability.md has the figures). When the tracking
URI is the SQL database itself (``sqlite:///...``, ``postgresql://...``, ``mysql://...``) the same values
are read with one query, a column per value asked for. A tracking server (``http://...``) hides its
database: its runs come through ``search_runs``. The values are MLflow's own: a param or tag as its string,
a metric as its latest value (NaN for NaN, ±1.797e308 for ±inf, as MLflow stores them), runs newest first
(start time descending, then run id), active runs only. Should the direct read fail (a schema this code
does not know), the runs come through ``search_runs`` instead.

:func:`fetch_metric_history` reads one metric's full history for chosen runs only, the same two ways.
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


MAX_JOINS = 60  # SQLite joins at most 64 tables in one query


def read_tables(db_uri: str, experiment_id: str, columns: Columns, tag_equals: dict[str, str]) -> list[RunRecord]:
    """Straight from MLflow's tables: ONE query, a row per run and a column per value asked for (each a left
    join on the table's primary key ``(key, run_uuid)``), so the database does the pivot and 10,000 runs
    come back as 10,000 rows instead of one row per value."""
    import sqlalchemy as sa

    sql, args = _pivot_query(experiment_id, columns, tag_equals)
    engine = sa.create_engine(db_uri)
    try:
        with engine.connect() as c:
            rows = c.execute(sa.text(sql), args).fetchall()
    finally:
        engine.dispose()
    out = []
    n_p, n_t = len(columns.params), len(columns.tags)
    for row in rows:
        rec = RunRecord(row[0], row[1], row[2])
        vals = row[3:]
        rec.params = {k: v for k, v in zip(columns.params, vals[:n_p]) if v is not None}
        rec.tags = {k: v for k, v in zip(columns.tags, vals[n_p:n_p + n_t]) if v is not None}
        pairs = vals[n_p + n_t:]
        rec.metrics = {k: float("nan") if is_nan else float(v)
                       for k, v, is_nan in zip(columns.metrics, pairs[::2], pairs[1::2]) if v is not None}
        out.append(rec)
    return sorted(out, key=lambda r: (-(r.start_time or 0), r.run_id))


def _pivot_query(experiment_id: str, columns: Columns, tag_equals: dict[str, str]) -> tuple[str, dict]:
    """The query of :func:`read_tables` and its parameters (keys are bound, never spliced into the SQL)."""
    if len(columns.params) + len(columns.tags) + len(columns.metrics) > MAX_JOINS:
        raise ValueError(f"more than {MAX_JOINS} columns for one query")
    select, joins = ["r.run_uuid", "r.status", "r.start_time"], []
    args: dict = {"exp": int(experiment_id)}
    for prefix, table, keys in (("p", "params", columns.params), ("t", "tags", columns.tags),
                                ("m", "latest_metrics", columns.metrics)):
        for i, key in enumerate(keys):
            alias = f"{prefix}{i}"
            select += [f"{alias}.value"] + ([f"{alias}.is_nan"] if prefix == "m" else [])
            joins.append(f"LEFT JOIN {table} {alias} ON {alias}.key = :{alias} AND {alias}.run_uuid = r.run_uuid")
            args[alias] = key
    where = ["r.experiment_id = :exp", "r.lifecycle_stage = 'active'"]
    for i, (k, v) in enumerate(tag_equals.items()):
        where.append(f"r.run_uuid IN (SELECT run_uuid FROM tags WHERE key = :fk{i} AND value = :fv{i})")
        args[f"fk{i}"], args[f"fv{i}"] = k, v
    return (f"SELECT {', '.join(select)} FROM runs r {' '.join(joins)} WHERE {' AND '.join(where)}", args)


# ---------------------------------------------------------------------------------------------
# Metric histories of chosen runs

HISTORY_CHUNK = 500  # run ids per query: far below any SQL backend's limit on bound parameters


@dataclass(frozen=True)
class MetricPoint:
    run_id: str
    step: int
    timestamp: int
    value: float


def fetch_metric_history(client, run_ids: list[str], key: str) -> list[MetricPoint]:
    """Every logged value of metric ``key`` for ``run_ids`` only (NaN for NaN), ordered by run, step and
    time: from the store's ``metrics`` table where the tracking URI is the database (a query per
    :data:`HISTORY_CHUNK` runs, on its (run, key, step) index), else one ``get_metric_history`` per run."""
    ids = list(dict.fromkeys(run_ids))
    db = database_uri(client.tracking_uri)
    if db is not None and ids:
        try:
            return read_metric_history(db, ids, key)
        except Exception as e:  # a store this code does not know: MLflow's own reader still works
            print(f"note: metric history read through MLflow ({first_line(e, 120)})", file=sys.stderr)
    out = []
    for rid in ids:
        for m in tracking.with_retry(client.get_metric_history, rid, key):
            out.append(MetricPoint(rid, int(m.step), int(m.timestamp), float(m.value)))
    return sorted(out, key=lambda p: (p.run_id, p.step, p.timestamp))


def read_metric_history(db_uri: str, run_ids: list[str], key: str) -> list[MetricPoint]:
    """:func:`fetch_metric_history` straight from MLflow's ``metrics`` table."""
    import sqlalchemy as sa

    sql = sa.text("SELECT run_uuid, step, timestamp, value, is_nan FROM metrics "
                  "WHERE key = :key AND run_uuid IN :ids").bindparams(sa.bindparam("ids", expanding=True))
    engine = sa.create_engine(db_uri)
    out = []
    try:
        with engine.connect() as c:
            for i in range(0, len(run_ids), HISTORY_CHUNK):
                for rid, step, ts, value, is_nan in c.execute(sql, {"key": key, "ids": run_ids[i:i + HISTORY_CHUNK]}):
                    out.append(MetricPoint(rid, int(step), int(ts), float("nan") if is_nan else float(value)))
    finally:
        engine.dispose()
    return sorted(out, key=lambda p: (p.run_id, p.step, p.timestamp))


__all__ = ["Columns", "MetricPoint", "RunRecord", "database_uri", "fetch_metric_history", "fetch_runs",
           "read_metric_history", "read_tables", "search"]

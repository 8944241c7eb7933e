"""Grid sweeps: every configuration of a phase, one MLflow parent run, one nested child run per config.

Idempotent and resumable. MLflow is the record of *results*: a configuration with a FINISHED run of
its ``config_hash`` in the phase experiment is done (whoever trained it; imported runs do not count), a diverged one (FAILED,
``diverged=true``) is done with loss = inf, a KILLED one, or a RUNNING one whose owner is dead, is
resumed from its checkpoint, and a FAILED (not diverged) one is rerun only with ``retry_failed``.

The *claims* table (``scaling_claims`` in the ``--storage`` database; SQLite ``mlruns/sweeps.db``
beside the MLflow store by default, PostgreSQL/MySQL for several machines) says who is training what.
A claim is one row per (sweep, config) taken by a single atomic statement: an ``INSERT`` guarded by
the primary key, or an ``UPDATE ... WHERE version = <read version>`` compare-and-swap when the row is
free or its owner is dead (same host: the pid is gone; any host: no heartbeat for ``stale_after``
seconds). A worker claims, *then* checks MLflow again (so a config finished between its look and its
claim is never retrained), trains, records, releases. Optuna's GridSampler is not used for this: it
can hand the same grid point to two workers (see ``shared/notes/pitfalls.md``).

The three steps are separate functions so that a batched engine (several claimed configs trained in
one pass) replaces only :func:`train_sequential`: an engine takes ``(items, ctx, prepared)`` and
returns one :class:`WorkResult` per item. ``scaling.runner.start_run`` / ``finish_run`` /
``load_checkpoint`` give such an engine the same MLflow records as :func:`scaling.runner.run_config`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from scaling import tracking
from scaling.config import ConfigError, Phase, RunConfig, clip_text, error_line, first_line, positive_int, say_warmup
from scaling.devices import default_devices, worker_devices

TAG_SWEEP_ID = "scaling.sweep_id"
TAG_SEARCH_ID = "scaling.search_id"  # a search's parent run (scaling.search) and its trials
TAG_ROLE = "scaling.role"  # "sweep" / "search" on parent runs (children carry `source`)
TAG_LAUNCHER_OF = "scaling.launcher_of"  # set on an `mlflow run` run: the parent run it drove
DEFAULT_SWEEPS_DB = "sweeps.db"

HEARTBEAT_INTERVAL_S = 15.0
STALE_AFTER_S = 120.0  # a claim with no heartbeat for this long is taken over (any host)
POLL_INTERVAL_S = 2.0  # waiting for other workers' claims


# --------------------------------------------------------------------------------------------
# Storage URLs


def default_storage(tracking_uri: str | None, filename: str) -> str:
    """A SQLite file beside a local SQLite MLflow store (``mlruns/<filename>`` otherwise)."""
    db = tracking.sqlite_path(tracking.resolve_tracking_uri(tracking_uri))
    return f"sqlite:///{Path(db).parent / filename}" if db else f"sqlite:///mlruns/{filename}"


def check_storage_url(url: str) -> str:
    """Validate a SQLAlchemy URL without connecting (bad input creates nothing)."""
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
        u.get_dialect()
    except Exception as e:
        raise ConfigError(f"--storage must be a database URL such as sqlite:///mlruns/sweeps.db or "
                          f"postgresql://user@host/db, got {url!r} ({first_line(e, 120)})") from None
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return url


def safe_url(url: str) -> str:
    """The URL without its password (for tags and messages)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<storage>"


# --------------------------------------------------------------------------------------------
# The claims store


@dataclass
class Claim:
    config_hash: str
    previous_owner: str | None  # the dead/stale owner whose claim was taken over, if any


class ClaimStore:
    """Atomic per-config claims (and sweep/search parent runs) in a SQLAlchemy database."""

    def __init__(self, url: str):
        import sqlalchemy as sa

        self.url = url
        kwargs = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 60}
            tracking.note_sqlite_file(url)
        try:
            self.engine = sa.create_engine(url, **kwargs)
        except Exception as e:
            raise ConfigError(f"cannot open storage {safe_url(url)!r}: {first_line(e)}") from None
        md = sa.MetaData()
        self.parents = sa.Table(
            "scaling_parents", md,
            sa.Column("key", sa.String(128), primary_key=True),  # sweep id / search id
            sa.Column("kind", sa.String(16), nullable=False),
            sa.Column("phase", sa.String(128)),
            sa.Column("parent_run_id", sa.String(64), nullable=False),
            sa.Column("created_at", sa.Double),
        )
        self.claims = sa.Table(
            "scaling_claims", md,
            sa.Column("sweep_id", sa.String(64), primary_key=True),
            sa.Column("config_hash", sa.String(64), primary_key=True),
            sa.Column("label", sa.String(200)),
            sa.Column("state", sa.String(16), nullable=False),  # claimed | free
            sa.Column("owner", sa.String(255)),
            sa.Column("heartbeat", sa.Double),
            sa.Column("version", sa.Integer, nullable=False),
            sa.Column("run_id", sa.String(64)),
        )
        for attempt in range(10):  # concurrent creators race on CREATE TABLE: retry sees it exists
            try:
                md.create_all(self.engine)
                break
            except Exception as e:
                if attempt == 9:
                    raise ConfigError(f"cannot use storage {safe_url(url)!r}: "
                                      f"{first_line(e)}") from None
                time.sleep(0.1 * (attempt + 1))

    def _write(self, stmt) -> int:
        """One statement in its own transaction (no read-then-write upgrade), retried if locked."""
        def run():
            with self.engine.begin() as c:
                return c.execute(stmt).rowcount
        return tracking.with_retry(run, attempts=12)

    def _row(self, stmt):
        def run():
            with self.engine.connect() as c:
                return c.execute(stmt).first()
        return tracking.with_retry(run, attempts=12)

    # parents ------------------------------------------------------------------------------

    def parent_run(self, key: str) -> str | None:
        row = self._row(self.parents.select().where(self.parents.c.key == key))
        return row.parent_run_id if row else None

    def set_parent_run(self, key: str, kind: str, phase: str, run_id: str, replace: str | None = None) -> str:
        """Record ``run_id`` as the parent of ``key`` unless another process did first; the winner's id.

        ``replace``: an old parent id (e.g. a run deleted from MLflow) to swap out, compare-and-swap."""
        import sqlalchemy as sa

        p = self.parents
        if replace is not None:
            self._write(p.update().where(p.c.key == key, p.c.parent_run_id == replace)
                        .values(parent_run_id=run_id))
        else:
            try:
                self._write(p.insert().values(key=key, kind=kind, phase=phase, parent_run_id=run_id,
                                              created_at=time.time()))
            except sa.exc.IntegrityError:
                pass
        return self.parent_run(key)

    # claims -------------------------------------------------------------------------------

    def try_claim(self, sweep_id: str, config_hash: str, owner: str, label: str,
                  stale_after: float = STALE_AFTER_S) -> Claim | None:
        import sqlalchemy as sa

        c = self.claims
        now = time.time()
        try:
            self._write(c.insert().values(sweep_id=sweep_id, config_hash=config_hash, label=label[:200],
                                          state="claimed", owner=owner, heartbeat=now, version=1))
            return Claim(config_hash, None)
        except sa.exc.IntegrityError:
            pass
        row = self._row(c.select().where(c.c.sweep_id == sweep_id, c.c.config_hash == config_hash))
        if row is None:
            return None
        taken_over = None
        if row.state == "claimed" and row.owner != owner:
            fresh = now - (row.heartbeat or 0) < stale_after
            if fresh and tracking.owner_alive(row.owner):
                return None  # a live worker has it
            taken_over = row.owner
        n = self._write(c.update().where(c.c.sweep_id == sweep_id, c.c.config_hash == config_hash,
                                         c.c.version == row.version)
                        .values(state="claimed", owner=owner, heartbeat=now, version=row.version + 1))
        return Claim(config_hash, taken_over) if n == 1 else None

    def release(self, sweep_id: str, config_hash: str, owner: str, run_id: str | None = None) -> bool:
        c = self.claims
        values = {"state": "free", "heartbeat": time.time(), "version": c.c.version + 1}
        if run_id:
            values["run_id"] = run_id
        return self._write(c.update().where(c.c.sweep_id == sweep_id, c.c.config_hash == config_hash,
                                            c.c.owner == owner, c.c.state == "claimed").values(**values)) == 1

    def heartbeat(self, owner: str) -> int:
        c = self.claims
        return self._write(c.update().where(c.c.owner == owner, c.c.state == "claimed")
                           .values(heartbeat=time.time(), version=c.c.version + 1))

    def live_claims(self, sweep_id: str, stale_after: float = STALE_AFTER_S) -> list:
        """Claims of this sweep held by owners that look alive."""
        c = self.claims

        def run():
            with self.engine.connect() as conn:
                return conn.execute(c.select().where(c.c.sweep_id == sweep_id, c.c.state == "claimed")).all()
        now = time.time()
        return [r for r in tracking.with_retry(run, attempts=12)
                if now - (r.heartbeat or 0) < stale_after and tracking.owner_alive(r.owner)]

    def dispose(self) -> None:
        self.engine.dispose()


class Heartbeat:
    """Refreshes this process's claims every ``interval`` seconds from a daemon thread."""

    def __init__(self, store: ClaimStore, owner: str, interval: float):
        self.store, self.owner, self.interval = store, owner, interval
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.heartbeat(self.owner)
            except Exception as e:  # a missed beat is not fatal; stale_after is generous
                print(f"warning: sweep heartbeat failed ({first_line(e, 120)})", file=sys.stderr)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)


# --------------------------------------------------------------------------------------------
# What the grid is and where it stands (from MLflow)


def plan(phase: Phase, splits: tuple[str, str] = ("train", "valid")) -> list[RunConfig]:
    """Every configuration of the phase's grid, resolved (raises ConfigError on bad input)."""
    return phase.run_configs(splits)


# Sequences one batched pass may hold at its start: the phase 2.5 model (d_model 128, 4 layers, context 128) takes
# about 2.6 MB a sequence in bf16 (docs/performance.md), so 24,576 of them about 63 GB of an 80 GB GPU; a larger
# model's share shrinks in proportion to d_model x n_layers x context.
MAX_GROUP_SEQUENCES = 24_576
REFERENCE_ACTIVATIONS = 128 * 4 * 128


def group_sequence_cap(cfgs: Sequence[RunConfig]) -> float:
    """Sequences one batched pass of these configs' model may hold at its start."""
    m = cfgs[0].phase.model
    return MAX_GROUP_SEQUENCES * REFERENCE_ACTIVATIONS / (m.d_model * m.n_layers * m.context_length)


def default_group_size(cfgs: Sequence[RunConfig], workers: int, on_cuda: bool) -> int:
    """Configs a worker trains together per pass: on CUDA the grid shared evenly by the workers (one worker would
    otherwise claim the whole grid and leave the others, on their own GPUs, nothing), and no more than keeps every
    group of consecutive configs (the order they are claimed in) within the pass's memory; 1 on CPU."""
    if not on_cuda:
        return 1
    cap = group_sequence_cap(cfgs)
    size = -(-len(cfgs) // max(1, workers))
    while size > 1 and any(sum(c.batch_size for c in cfgs[i:i + size]) > cap for i in range(0, len(cfgs), size)):
        size -= 1
    return size


def sweep_id_for(cfgs: Sequence[RunConfig]) -> str:
    """Stable id of a resolved grid: the same grid (same config hashes) is the same sweep."""
    blob = json.dumps({"phase": cfgs[0].phase.name, "configs": sorted(c.config_hash() for c in cfgs)})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def label(cfg: RunConfig) -> str:
    return f"B{cfg.batch_size} lr={cfg.lr:g} clip={clip_text(cfg.clip)} seed={cfg.seed}{cfg.variant_text()}"


@dataclass
class ConfigResult:
    config_hash: str
    batch_size: int
    lr: float
    clip: float | None
    seed: int
    state: str  # FINISHED | DIVERGED | FAILED | PENDING
    run_id: str | None = None
    loss: float = float("nan")  # the phase's objective (train.objective); inf when diverged
    end_time: int | None = None  # ms
    learned: bool | None = None  # below the unigram baseline (the run's `learned` tag); None: not known
    variant: str = ""  # "size=m", "task=x_plus_y schedule=constant lr_rule=none": its own best LR per batch size


def runs_of_config(client, exp_id: str, config_hash: str) -> list:
    return tracking.search_runs(client, [exp_id], f"tags.{tracking.TAG_CONFIG_HASH} = '{config_hash}'")


def classify(cfg: RunConfig, runs: list, retry_failed: bool = False, session_start_ms: int = 0) -> ConfigResult:
    """Where one configuration stands: done (FINISHED/DIVERGED), FAILED (not retried now) or PENDING."""
    res = ConfigResult(cfg.config_hash(), cfg.batch_size, cfg.lr, cfg.clip, cfg.seed, "PENDING",
                       variant=cfg.variant_text().strip())
    # Imported results tables (`scaling import`) are someone else's measurement, often of another
    # pipeline: they never stand in for training the configuration here.
    runs = [r for r in runs if r.data.tags.get(tracking.TAG_SOURCE) != "import"]
    by_end = sorted(runs, key=lambda r: r.info.end_time or 0, reverse=True)
    finished = [r for r in by_end if r.info.status == "FINISHED"]
    diverged = [r for r in by_end if r.info.status == "FAILED" and r.data.tags.get(tracking.TAG_DIVERGED) == "true"]
    if finished:
        r = finished[0]
        res.state, res.run_id, res.end_time = "FINISHED", r.info.run_id, r.info.end_time
        res.loss = r.data.metrics.get(cfg.phase.train.objective, float("nan"))
        res.learned = {"true": True, "false": False}.get(r.data.tags.get(tracking.TAG_LEARNED, ""))
        return res
    if diverged:
        r = diverged[0]
        res.state, res.run_id, res.loss, res.end_time = "DIVERGED", r.info.run_id, float("inf"), r.info.end_time
        return res
    open_ = [r for r in runs if r.info.status in ("RUNNING", "SCHEDULED")
             or (r.info.status == "KILLED" and r.data.tags.get("pruned") != "true")]
    failed = [r for r in by_end if r.info.status == "FAILED"]
    if failed and not open_:
        retried_now = max(r.info.end_time or 0 for r in failed) >= session_start_ms  # failed in this session
        if not retry_failed or retried_now:
            res.state, res.run_id, res.end_time = "FAILED", failed[0].info.run_id, failed[0].info.end_time
    return res


@dataclass
class GridView:
    """What one process has seen of its grid: configurations found done (FINISHED or diverged) stay done,
    so a later pass asks MLflow only about the others."""

    done: dict[str, ConfigResult] = field(default_factory=dict)


def grid_status(client, exp_id: str, cfgs: Sequence[RunConfig], retry_failed: bool = False,
                session_start_ms: int = 0, view: GridView | None = None) -> dict[str, ConfigResult]:
    """Each config's state (by config hash): one query per configuration not yet known done, for the runs
    tagged with its ``config_hash`` (never a scan of the phase's experiment, which may hold thousands of
    runs: imports, searches, other grids)."""
    out = {}
    for c in cfgs:
        h = c.config_hash()
        known = view.done.get(h) if view is not None else None
        if known is None:
            known = classify(c, runs_of_config(client, exp_id, h), retry_failed, session_start_ms)
            if view is not None and known.state in ("FINISHED", "DIVERGED"):
                view.done[h] = known
        out[h] = known
    return out


def best_lr_by_batch_size(results) -> dict[int, tuple[float, float]]:
    """Per batch size: (LR, loss) of the lowest finite objective (train.objective) among finished configs."""
    best: dict[int, tuple[float, float]] = {}
    for r in results:
        if r.state == "FINISHED" and math.isfinite(r.loss):
            if r.batch_size not in best or r.loss < best[r.batch_size][1]:
                best[r.batch_size] = (r.lr, r.loss)
    return dict(sorted(best.items()))


def best_lr_by_variant(results) -> dict[str, dict[int, tuple[float, float]]]:
    """:func:`best_lr_by_batch_size` per variant (model size, task, schedule, LR rule): a best LR taken across
    variants would compare losses of different models or tasks."""
    variants = sorted({r.variant for r in results})
    return {v: best_lr_by_batch_size([r for r in results if r.variant == v]) for v in variants}


def variant_suffix(variant: str) -> str:
    """``size=m task=x`` -> ``_m_x``: a variant in a metric name."""
    return "".join("_" + part.split("=")[1] for part in variant.split())


def _best_text(results) -> str:
    return " ".join(f"B{b}{variant_suffix(v)}:{lr:g}" for v, best in best_lr_by_variant(results).items()
                    for b, (lr, _) in best.items())


# --------------------------------------------------------------------------------------------
# Sweep parent run


def ensure_parent(client, store: ClaimStore, key: str, kind: str, phase: Phase, exp_id: str,
                  tags: dict, params: dict, run_name: str) -> str:
    """The one parent run of ``key`` (a sweep or search id): found again, or created exactly once.

    Looked up in the storage first, then in MLflow by tag (storage lost or new); otherwise created
    and registered; a process that loses the registration race deletes its own run."""
    known = store.parent_run(key)
    if known is not None:
        try:
            if client.get_run(known).info.lifecycle_stage == "active":
                return known
        except Exception:
            pass
    found = tracking.search_runs(client, [exp_id], f"tags.`{TAG_ROLE}` = '{kind}' and "
                                                   f"tags.`{tag_key(kind)}` = '{key}'")
    mine = None
    if found:
        candidate = sorted(found, key=lambda r: r.info.start_time)[0].info.run_id
    else:
        run = tracking.with_retry(client.create_run, exp_id, run_name=run_name,
                                  tags={TAG_ROLE: kind, tag_key(kind): key, tracking.TAG_PHASE: phase.name,
                                        tracking.TAG_OWNER: tracking.owner_id(), **tags})
        candidate = mine = run.info.run_id
        tracking.log_params(client, mine, params)
    winner = store.set_parent_run(key, kind, phase.name, candidate, replace=known)
    if mine is not None and winner != mine:
        client.delete_run(mine)
    return winner


def tag_key(kind: str) -> str:
    return TAG_SWEEP_ID if kind == "sweep" else TAG_SEARCH_ID


def link_launcher_run(client, kind: str, key: str, parent_run_id: str) -> str | None:
    """Under ``mlflow run`` (``MLFLOW_RUN_ID`` set) tag the launcher's run with the parent it drove.

    The launcher's run is deliberately *not* the parent: every ``mlflow run`` makes a new one, while a
    sweep must re-attach to the same parent on every rerun. Our runs are created with explicit
    parent ids through ``MlflowClient``, so ``MLFLOW_RUN_ID`` cannot re-parent them."""
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if not launcher or launcher == parent_run_id:
        return None
    try:
        tracking.set_tags(client, launcher, {
            TAG_LAUNCHER_OF: parent_run_id, tag_key(kind): key,
            "mlflow.note.content": f"`mlflow run` launcher of {kind} {key}: results are in parent run "
                                   f"{parent_run_id} and its child runs."})
    except Exception as e:
        print(f"warning: could not tag the mlflow-run run {launcher} ({first_line(e, 120)})",
              file=sys.stderr)
    return launcher


def shared_params(cfg: RunConfig, phase: Phase) -> dict:
    """The parent's params: what all children share, plus the grid itself."""
    p = cfg.to_params()
    for k in ("batch_size", "lr", "grad_clip", "seed", "tokens_per_step", "steps", "warmup_steps"):
        p.pop(k)
    g = phase.grid
    p = phase.variant_grid_params(p)
    p["grid_batch_sizes"] = ",".join(map(str, g.batch_sizes))
    p["grid_lrs"] = (",".join(f"B{b}:{lr:g}" for b, lr in g.lr_by_batch_size) if g.lr_by_batch_size
                     else ",".join(f"{lr:g}" for lr in g.lrs))
    p["grid_clips"] = ",".join(clip_text(c) for c in g.clips)
    p["grid_seeds"] = ",".join(map(str, phase.train.seeds))
    return p


# --------------------------------------------------------------------------------------------
# Claim → train → record


@dataclass
class SweepContext:
    """Everything a worker process needs (picklable)."""

    phase: Phase
    cfgs: list[RunConfig]
    splits: tuple[str, str]
    device: str
    data_dir: str | None
    tracking_uri: str
    storage: str
    sweep_id: str
    parent_run_id: str
    exp_id: str
    retry_failed: bool
    session_start_ms: int
    progress: bool = False
    group_size: int = 1  # > 1: configs trained together by train_grouped
    compile: bool | str | dict = False  # train_group's compile argument (a value of config.COMPILE_MODES)
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S
    stale_after: float = STALE_AFTER_S
    poll_interval: float = POLL_INTERVAL_S


@dataclass
class WorkItem:
    cfg: RunConfig
    resume_run_id: str | None = None


@dataclass
class WorkResult:
    item: WorkItem
    outcome: object | None = None  # scaling.runner.RunOutcome
    error: BaseException | None = None


Engine = Callable[[list, SweepContext, dict], list]  # (items, ctx, prepared cache) -> [WorkResult]


def claim_work(store: ClaimStore, client, ctx: SweepContext, todo: Sequence[RunConfig], owner: str,
               limit: int = 1) -> tuple[list[WorkItem], set[str]]:
    """Claim up to ``limit`` pending configs; for each, what to resume. Also: configs busy outside sweeps.

    After the claim the config is checked in MLflow again, so one that another worker finished
    meanwhile is released, not retrained."""
    items: list[WorkItem] = []
    busy: set[str] = set()
    # A resumed grid's pending configs are not the chunks default_group_size checked: the cap holds for any.
    cap = group_sequence_cap(todo) if limit > 1 and todo else float("inf")
    for cfg in todo:
        if len(items) >= limit:
            break
        if items and data_key(cfg) != data_key(items[0].cfg):
            continue  # a group trains on one corpus
        if items and sum(i.cfg.batch_size for i in items) + cfg.batch_size > cap:
            continue  # the pass would not fit in memory: a later group takes it
        h = cfg.config_hash()
        claim = store.try_claim(ctx.sweep_id, h, owner, label(cfg), ctx.stale_after)
        if claim is None:
            continue
        fresh = runs_of_config(client, ctx.exp_id, h)
        if classify(cfg, fresh, ctx.retry_failed, ctx.session_start_ms).state != "PENDING":
            store.release(ctx.sweep_id, h, owner)
            continue
        resume, is_busy = _resume_target(client, fresh, claim.previous_owner, owner, ctx.sweep_id)
        if is_busy:  # a live process outside this sweep trains it (e.g. `scaling train`)
            store.release(ctx.sweep_id, h, owner)
            busy.add(h)
            continue
        items.append(WorkItem(cfg, resume))
    return items, busy


def _resume_target(client, runs: list, previous_owner: str | None, me: str,
                   sweep_id: str | None = None) -> tuple[str | None, bool]:
    """The run to continue (newest KILLED or dead-owner RUNNING), marking older stale ones FAILED.

    A RUNNING run of this sweep is stale whoever its owner was: the caller holds the config's claim, so
    no live worker of the sweep trains it (a worker on another host that gave up, e.g. when the
    tracking server was gone too long, cannot be judged by its pid)."""
    stale, busy = [], False
    for r in runs:
        owner = r.data.tags.get(tracking.TAG_OWNER)
        if r.info.status == "KILLED" and r.data.tags.get("pruned") != "true":
            stale.append(r)
        elif r.info.status in ("RUNNING", "SCHEDULED"):
            ours = sweep_id is not None and r.data.tags.get(TAG_SWEEP_ID) == sweep_id
            if ours or owner == me or owner == previous_owner or not tracking.owner_alive(owner):
                stale.append(r)
            else:
                busy = True
    if busy:
        return None, True
    if not stale:
        return None, False
    stale.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    for old in stale[1:]:
        if old.info.status != "KILLED":
            tracking.set_tags(client, old.info.run_id, {"scaling.stale": "true"})
            tracking.with_retry(client.set_terminated, old.info.run_id, "FAILED")
    return stale[0].info.run_id, False


def data_key(cfg: RunConfig):
    """Configs with the same key train on the same corpus and can train together: one architecture."""
    return cfg.corpus_key(), cfg.phase.model


def train_sequential(items: list[WorkItem], ctx: SweepContext, prepared: dict) -> list[WorkResult]:
    """The default engine: one configuration at a time through :func:`scaling.runner.run_config`.

    ``KeyboardInterrupt`` (SIGINT, or SIGTERM turned into it) propagates after the run is KILLED."""
    from scaling import runner

    out = []
    for item in items:
        cfg = item.cfg
        key = data_key(cfg)
        try:
            if key not in prepared:
                prepared[key] = runner.prepare(cfg, ctx.data_dir, ctx.tracking_uri, ctx.device)
            outcome = runner.run_config(cfg, device=ctx.device, data_dir=ctx.data_dir, tracking_uri=ctx.tracking_uri,
                                        resume_run_id=item.resume_run_id, progress=ctx.progress, source="sweep",
                                        parent_run_id=ctx.parent_run_id,
                                        extra_tags={TAG_SWEEP_ID: ctx.sweep_id}, prepared=prepared[key])
            out.append(WorkResult(item, outcome=outcome))
        except tracking.StoreUnavailable:
            raise  # not the configuration's failure: this worker stops, the run is resumed later
        except Exception as e:  # recorded FAILED by the runner; the sweep goes on
            out.append(_failed(item, e, ctx))
    return out


def train_grouped(items: list[WorkItem], ctx: SweepContext, prepared: dict) -> list[WorkResult]:
    """The batched engine: the claimed configs trained together in one pass (:func:`scaling.runner.run_group`).

    Use with ``run_sweep(..., engine=train_grouped, group_size=K)``; the claim loop hands it up to K
    configs that share a corpus."""
    from scaling import runner

    cfgs = [i.cfg for i in items]
    key = data_key(cfgs[0])
    try:
        if key not in prepared:
            prepared[key] = runner.prepare(cfgs[0], ctx.data_dir, ctx.tracking_uri, ctx.device)
        outcomes = runner.run_group(cfgs, device=ctx.device, resume_run_ids=[i.resume_run_id for i in items],
                                    progress=ctx.progress, source="sweep", parent_run_id=ctx.parent_run_id,
                                    extra_tags=[{TAG_SWEEP_ID: ctx.sweep_id} for _ in items], prepared=prepared[key],
                                    compile=ctx.compile)
    except tracking.StoreUnavailable:
        raise
    except Exception as e:
        return [_failed(i, e, ctx) for i in items]
    return [WorkResult(i, outcome=o) for i, o in zip(items, outcomes)]


def _failed(item: WorkItem, e: Exception, ctx: SweepContext) -> WorkResult:
    """Report a failure; a run that failed before training started (e.g. a bad checkpoint) is made FAILED,
    so it is not resumed again and again but waits for ``--retry-failed`` (which starts a fresh run)."""
    print(f"error: {label(item.cfg)} failed: {error_line(e, 300)}",
          file=sys.stderr)
    if item.resume_run_id:
        try:
            client = tracking.connect(ctx.tracking_uri, check=False)
            if client.get_run(item.resume_run_id).info.status in ("RUNNING", "KILLED", "SCHEDULED"):
                tracking.set_tags(client, item.resume_run_id, {tracking.TAG_ERROR: error_line(e, 500)})
                tracking.with_retry(client.set_terminated, item.resume_run_id, "FAILED")
        except Exception:
            pass
    return WorkResult(item, error=e)


def record(store: ClaimStore, ctx: SweepContext, results: list[WorkResult], owner: str) -> None:
    """Release the claims of trained configs (their runs are already terminal in MLflow)."""
    for r in results:
        run_id = getattr(r.outcome, "run_id", None)
        store.release(ctx.sweep_id, r.item.cfg.config_hash(), owner, run_id)


def work_loop(ctx: SweepContext, engine: Engine | None = None, group_size: int = 1,
              on_status: Callable[[dict], None] | None = None, prepared: dict | None = None) -> set[str]:
    """One worker: claim → train → record until no configuration is left to this worker.

    Waits (polling) while other live workers hold claims, so it can take over if they die.
    Returns the hashes skipped because a live process outside the sweep trains them."""
    engine = engine or train_sequential
    client = tracking.connect(ctx.tracking_uri, check=False)
    store = ClaimStore(ctx.storage)
    owner = tracking.owner_id()
    prepared = {} if prepared is None else prepared  # (client, device, corpus) per data key
    attempted: set[str] = set()
    busy_outside: set[str] = set()
    beat = Heartbeat(store, owner, ctx.heartbeat_interval)
    held: list[WorkItem] = []
    view = GridView()
    try:
        while True:
            status = grid_status(client, ctx.exp_id, ctx.cfgs, ctx.retry_failed, ctx.session_start_ms, view)
            if on_status is not None:
                on_status(status)
            todo = [c for c in ctx.cfgs if status[c.config_hash()].state == "PENDING"
                    and c.config_hash() not in attempted | busy_outside]
            if not todo:
                return busy_outside
            held, busy = claim_work(store, client, ctx, todo, owner, group_size)
            busy_outside |= busy
            if not held:
                if not busy:
                    time.sleep(ctx.poll_interval)
                continue
            attempted |= {i.cfg.config_hash() for i in held}
            results = engine(held, ctx, prepared)
            record(store, ctx, results, owner)
            held = []
    finally:
        beat.stop()
        for item in held:  # interrupted mid-train: free the claim at once (the run is KILLED, resumable)
            try:
                store.release(ctx.sweep_id, item.cfg.config_hash(), owner)
            except Exception:
                pass
        store.dispose()


def _worker_main(ctx: SweepContext, n_workers: int) -> None:
    """Entry of a ``--workers N`` child process, on its own device (``ctx.device``)."""
    from scaling.runner import Terminated, sigterm_as_interrupt

    _die_with_parent()
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_workers))
    if ctx.device.startswith("cuda:"):
        torch.cuda.set_device(ctx.device)  # kernels, graphs and streams the code makes without a device
    try:
        with sigterm_as_interrupt():
            work_loop(ctx, train_grouped if ctx.group_size > 1 else None, ctx.group_size)
    except (KeyboardInterrupt, Terminated):
        sys.exit(130)
    except (tracking.StoreUnavailable, ConfigError) as e:  # one line, as the CLI gives it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (so a SIGKILLed sweep leaves no orphans)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# --------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepSummary:
    sweep_id: str
    parent_run_id: str
    phase: str
    storage: str
    results: list[ConfigResult] = field(default_factory=list)
    trained_now: int = 0  # configs that reached a terminal state during this invocation
    busy_elsewhere: int = 0
    launcher_run_id: str | None = None
    objective: str = "final_val_loss"

    def count(self, state: str) -> int:
        return sum(r.state == state for r in self.results)

    @property
    def complete(self) -> bool:
        return all(r.state in ("FINISHED", "DIVERGED") for r in self.results)

    @property
    def best_lr(self) -> dict[int, tuple[float, float]]:
        """Per batch size, of a phase without variants (see :func:`best_lr_by_variant`)."""
        return best_lr_by_variant(self.results).get("", {})

    def losses(self) -> dict[tuple[int, float, float | None, int], float]:
        """(batch_size, lr, clip, seed) → the objective; inf for diverged (for analysis)."""
        return {(r.batch_size, r.lr, r.clip, r.seed): r.loss for r in self.results if r.state in ("FINISHED", "DIVERGED")}

    def lines(self) -> list[str]:
        n = len(self.results)
        out = [f"sweep {self.sweep_id} (phase {self.phase}): parent run {self.parent_run_id}; {n} configs: "
               f"{self.count('FINISHED')} finished, {self.count('DIVERGED')} diverged, {self.count('FAILED')} failed, "
               f"{self.count('PENDING')} pending; {self.trained_now} trained in this invocation"]
        finished = [r for r in self.results if r.state == "FINISHED"]
        if finished and all(r.learned is False for r in finished):
            out.append("  no run learned: every finished run ended above the unigram baseline (tag learned=false), "
                       "so the best LRs below say nothing about scaling; check the data, the budget and the LR range")
        for variant, best in best_lr_by_variant(self.results).items():
            out += self._best_lines(variant, best, [r for r in finished if r.variant == variant])
        if self.count("FAILED"):
            out.append("  failed configs are rerun with --retry-failed")
        if self.busy_elsewhere:
            out.append(f"  {self.busy_elsewhere} config(s) are being trained by a live process outside this sweep")
        return out

    def _best_lines(self, variant: str, best: dict, finished: list) -> list[str]:
        out = []
        for b, (lr, loss) in best.items():
            edge = ""
            lrs = sorted({r.lr for r in self.results if r.batch_size == b and r.variant == variant})
            if len(lrs) > 1 and lr in (lrs[0], lrs[-1]):
                edge = "  (on the grid's edge: try `scaling search`)"
            if not any(r.learned is not False for r in finished if r.batch_size == b):
                edge = "  (no run at this batch size learned)"
            where = f"B={b}" + (f" {variant}" if variant else "")
            out.append(f"  best LR at {where}: {lr:g} ({self.objective} {loss:.4f}){edge}")
        return out


def run_sweep(phase: Phase, *, device: str = "auto", data_dir=None, splits: tuple[str, str] = ("train", "valid"),
              tracking_uri: str | None = None, storage: str | None = None, workers: int = 1,
              retry_failed: bool = False, progress: bool = True, sweep_name: str | None = None,
              engine: Engine | None = None, group_size: int = 1, compile: bool | str | dict = False,
              heartbeat_interval: float = HEARTBEAT_INTERVAL_S, stale_after: float = STALE_AFTER_S,
              devices: list[str] | None = None) -> SweepSummary:
    """Run (or resume) the phase's whole grid; return where every configuration stands.

    ``group_size`` > 1 trains up to that many claimed configs together in one pass (the batched
    engine, :func:`train_grouped`; ``compile``: False or a value of ``config.COMPILE_MODES``), per worker.
    ``devices`` (checked, :func:`scaling.devices.parse_devices`): worker i trains on ``devices[i % n]``;
    by default every visible GPU when there are several workers, else ``device``.
    """
    from scaling import runner

    positive_int("workers", workers)
    positive_int("group_size", group_size)
    if engine is not None and workers > 1:
        raise ConfigError("a custom engine runs in-process: use workers=1 (it may batch configs itself)")
    if engine is None and group_size > 1 and workers == 1:
        engine = train_grouped
    cfgs = plan(phase, splits)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    storage = check_storage_url(storage or default_storage(uri, DEFAULT_SWEEPS_DB))
    pool = devices or ([device] if workers == 1 else default_devices(device))
    # Reach the store and the data before anything is created.
    prepared = {data_key(cfgs[0]): runner.prepare(cfgs[0], data_dir, uri, pool[0])}
    client = prepared[data_key(cfgs[0])][0]
    store = ClaimStore(storage)
    try:
        ctx, launcher = _open_sweep(client, store, phase, cfgs, sweep_name,
                                    SweepContext(phase=phase, cfgs=cfgs, splits=splits, device=pool[0],
                                                 data_dir=None if data_dir is None else str(data_dir),
                                                 tracking_uri=uri, storage=storage, sweep_id=sweep_id_for(cfgs),
                                                 parent_run_id="", exp_id="", retry_failed=retry_failed,
                                                 session_start_ms=int(time.time() * 1000),
                                                 progress=progress and workers == 1, group_size=group_size,
                                                 compile=compile, heartbeat_interval=heartbeat_interval,
                                                 stale_after=stale_after))
        view = GridView()
        bar = _Bar(len(cfgs)) if progress else None
        busy = _drive(ctx, client, store, view, bar, engine, workers, pool, prepared)
    finally:
        store.dispose()
    status = grid_status(client, ctx.exp_id, cfgs, retry_failed, ctx.session_start_ms, view)
    if bar is not None:
        bar.update(status)
        bar.close()
    summary = SweepSummary(sweep_id=ctx.sweep_id, parent_run_id=ctx.parent_run_id, phase=phase.name,
                           storage=safe_url(storage), results=list(status.values()), busy_elsewhere=len(busy),
                           launcher_run_id=launcher, objective=phase.train.objective)
    summary.trained_now = sum(1 for r in summary.results if r.end_time and r.end_time >= ctx.session_start_ms
                              and r.state != "PENDING")
    finalize_parent(client, ctx.parent_run_id, summary)
    return summary


def _open_sweep(client, store: ClaimStore, phase: Phase, cfgs: list[RunConfig], sweep_name: str | None,
                ctx: SweepContext) -> tuple[SweepContext, str | None]:
    """The sweep's experiment and parent run (found again or created once) filled into ``ctx``; the
    ``mlflow run`` launcher's run, if any."""
    ctx.exp_id = tracking.get_or_create_experiment(client, tracking.experiment_name(phase.name))
    ctx.parent_run_id = ensure_parent(client, store, ctx.sweep_id, "sweep", phase, ctx.exp_id,
                                      tags={"scaling.n_configs": str(len(cfgs)),
                                            "scaling.storage": safe_url(ctx.storage)},
                                      params=shared_params(cfgs[0], phase),
                                      run_name=sweep_name or f"sweep-{phase.name}-{ctx.sweep_id[:8]}")
    return ctx, link_launcher_run(client, "sweep", ctx.sweep_id, ctx.parent_run_id)


def _drive(ctx: SweepContext, client, store: ClaimStore, view: GridView, bar, engine: Engine | None,
           workers: int, pool: list[str], prepared: dict) -> set[str]:
    """Train what is pending: in this process (one worker) or in worker processes; the configs found busy
    outside the sweep. Ctrl-C / SIGTERM: the parent run is KILLED (unless workers elsewhere go on)."""
    from scaling import runner

    status = grid_status(client, ctx.exp_id, ctx.cfgs, ctx.retry_failed, ctx.session_start_ms, view)
    say_warmup(ctx.cfgs)
    if bar is not None:
        print(f"sweep {ctx.sweep_id}: {len(ctx.cfgs)} configs of phase {ctx.phase.name}, parent run "
              f"{ctx.parent_run_id} (storage {safe_url(ctx.storage)})", file=sys.stderr)
    pending = sum(s.state == "PENDING" for s in status.values())
    if pending:
        tracking.with_retry(client.update_run, ctx.parent_run_id, "RUNNING")
    try:
        if bar is not None:
            bar.update(status)
        if workers == 1 or not pending:  # nothing to do: no processes to start
            with runner.sigterm_as_interrupt():
                return work_loop(ctx, engine, ctx.group_size, on_status=bar.update if bar else None,
                                 prepared=prepared)
        _run_workers(ctx, worker_devices(min(workers, pending), pool), client, bar, view)
        return set()
    except (KeyboardInterrupt, runner.Terminated):
        if bar is not None:
            bar.close()
        if not store.live_claims(ctx.sweep_id, ctx.stale_after):
            tracking.with_retry(client.set_terminated, ctx.parent_run_id, "KILLED")
        print(f"interrupted: sweep {ctx.sweep_id} stopped; rerun the same command to resume it", file=sys.stderr)
        raise KeyboardInterrupt from None


def finalize_parent(client, parent: str, summary: SweepSummary) -> None:
    """Counts and best LR per batch size on the parent; FINISHED when complete, FAILED with failures."""
    rows = [("n_configs", len(summary.results)), ("n_finished", summary.count("FINISHED")),
            ("n_diverged", summary.count("DIVERGED")), ("n_failed", summary.count("FAILED"))]
    for variant, best in best_lr_by_variant(summary.results).items():
        for b, (lr, loss) in best.items():
            key = f"B{b}{variant_suffix(variant)}"
            rows += [(f"best_lr_{key}", lr), (f"best_val_loss_{key}", loss)]
    tracking.log_metrics(client, parent, [(k, v, 0) for k, v in rows])
    if summary.complete:
        status = "FINISHED"
    elif summary.count("FAILED") and not summary.count("PENDING"):
        status = "FAILED"
    else:
        status = "KILLED"  # incomplete (configs busy elsewhere): resumable
    tracking.with_retry(client.set_terminated, parent, status)


def _run_workers(ctx: SweepContext, devices: list[str], client, bar, view: GridView) -> None:
    """``--workers N`` on one machine: N processes, each running the same claim loop on its own device
    (``devices[i]``). The progress bar is the parent's only use of the store while they work: it skips an
    update the store does not answer (the workers decide whether to wait or stop)."""
    import dataclasses
    import multiprocessing as mp

    from scaling.runner import sigterm_as_interrupt

    n = len(devices)
    mpc = mp.get_context("spawn")
    procs = [mpc.Process(target=_worker_main, args=(dataclasses.replace(ctx, device=d), n),
                         name=f"sweep-worker-{i}") for i, d in enumerate(devices)]
    try:
        with sigterm_as_interrupt():
            for p in procs:
                p.start()
            while any(p.is_alive() for p in procs):
                for p in procs:
                    p.join(timeout=ctx.poll_interval / len(procs))
                if bar is not None:
                    with contextlib.suppress(tracking.StoreUnavailable):
                        bar.update(grid_status(client, ctx.exp_id, ctx.cfgs, ctx.retry_failed,
                                               ctx.session_start_ms, view))
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: each marks its run KILLED and frees its claim
        for p in procs:
            p.join(timeout=30)
        raise
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad:
        print(f"warning: {len(bad)} sweep worker(s) exited with codes {bad}", file=sys.stderr)


class _Bar:
    """Progress over configurations, with the current best LR per batch size."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="config", desc="sweep", file=sys.stderr, position=0, leave=True)

    def update(self, status: dict) -> None:
        done = sum(r.state != "PENDING" for r in status.values())
        self.bar.n = done
        self.bar.set_postfix_str(f"best lr {_best_text(status.values()) or '-'}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


__all__ = ["run_sweep", "SweepSummary", "ConfigResult", "ClaimStore", "SweepContext", "WorkItem", "WorkResult",
           "plan", "group_sequence_cap", "sweep_id_for", "grid_status", "GridView", "claim_work", "train_sequential",
           "train_grouped", "record", "work_loop",
           "ensure_parent", "link_launcher_run", "default_storage", "check_storage_url", "best_lr_by_batch_size",
           "best_lr_by_variant"]

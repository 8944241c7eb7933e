"""``scaling import FILE --phase P``: an existing results table → FINISHED MLflow runs of phase P.

Each CSV row becomes one run in ``scaling-phase-<P>`` with the params, tags and summary metrics of a
native run (docs/run-schema.md): ``source=import``, ``import_file``, ``import_row`` (the line
number), ``phase``, ``config_hash`` (of the phase's resolved config for that batch size / LR / clip /
steps), ``learned`` from the dataset's baselines when the data is available locally ("unknown"
otherwise). Every row is validated before anything is created: a bad row is a ConfigError naming its
line, and nothing from the file is imported. Re-importing creates nothing: each run carries an import
key (sha256 of the phase, the row's content and its occurrence among identical rows), and rows whose
key is already in the experiment are skipped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from scaling import runs_table, tracking
from scaling.config import ConfigError, Phase, first_line, load_phase

TAG_IMPORT_KEY = "scaling.import_key"
TAG_IMPORT_FILE = "import_file"
TAG_IMPORT_ROW = "import_row"

REQUIRED = ("batch_size", "lr", "final_val_loss")
#: CSV column → native name (aliases of the study's tables).
ALIASES = {"gradient_clip": "grad_clip", "clip": "grad_clip", "num_steps": "steps", "learning_rate": "lr",
           "val_loss": "final_val_loss", "train_loss": "final_train_loss"}
#: Summary metrics of docs/run-schema.md a table may carry.
METRICS = ("final_train_loss", "final_val_loss", "train_loss_std", "avg_grad_norm_before",
           "avg_grad_norm_after", "avg_clip_frequency", "min_val_loss", "min_val_loss_step",
           "val_loss_rise", "tokens_seen", "n_params", "tail_index_alpha")
IMPORT_JOBS = 8  # runs created at once through a server (import_jobs)
BOOL_TRUE = ("true", "1", "yes", "y", "t")
BOOL_FALSE = ("false", "0", "no", "n", "f")


@dataclass
class ImportSummary:
    file: str
    phase: str
    experiment_id: str
    rows: int
    created: int
    skipped: int
    run_ids: list[str] = field(default_factory=list)
    baselines: dict[str, float] | None = None
    baselines_note: str = ""
    learned: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        learned = (f"learned: {self.learned.get('true', 0)} yes, {self.learned.get('false', 0)} no, "
                   f"{self.learned.get('unknown', 0)} unknown")
        note = f" ({self.baselines_note})" if self.baselines_note else ""
        return (f"imported {self.created} run(s) from {self.file} into {tracking.experiment_name(self.phase)} "
                f"({self.skipped} already there); {learned}{note}")


@dataclass
class _Row:
    line: int
    key: str
    batch_size: int
    lr: float
    clip: float | None
    clip_given: bool
    steps: int | None
    seed: int | None
    converged: bool | None
    diverged: bool
    metrics: dict[str, float]
    extra: dict[str, str]


def _canon(name: str) -> str:
    n = name.strip().lower().replace(" ", "_").replace("-", "_")
    return ALIASES.get(n, n)


def read_table(path: str | Path, phase_name: str) -> list[_Row]:
    """Parse and validate the whole file (ConfigError with the line number on the first bad row)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{str(p)!r} is a directory, not a CSV file")
    if not p.is_file():
        raise ConfigError(f"import file not found: {str(p)!r}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{p.name} is not a CSV file (not UTF-8 text)") from None
    if "\x00" in text:
        raise ConfigError(f"{p.name} is not a CSV file (binary content)")
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    delim = "\t" if "\t" in first and "," not in first else ";" if ";" in first and "," not in first else ","
    reader = csv.reader(io.StringIO(text), delimiter=delim)
    try:
        header = next(reader)
    except StopIteration:
        raise ConfigError(f"{p.name} is not a CSV file (it is empty)") from None
    except csv.Error as e:
        raise ConfigError(f"{p.name} is not a CSV file ({e})") from None
    cols = [_canon(h) for h in header]
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise ConfigError(f"{p.name} is not a results CSV: its header lacks {', '.join(missing)} "
                          f"(got {', '.join(h.strip() for h in header[:8]) or 'nothing'})")
    dup = [c for c in set(cols) if cols.count(c) > 1]
    if dup:
        raise ConfigError(f"{p.name}: column {dup[0]!r} appears twice in the header")
    rows: list[_Row] = []
    seen: dict[str, int] = {}
    try:
        for rec in reader:
            line = reader.line_num
            if not any(c.strip() for c in rec):
                continue
            if len(rec) != len(cols):
                raise ConfigError(f"{p.name} line {line}: {len(rec)} fields, the header has {len(cols)}")
            d = {c: v.strip() for c, v in zip(cols, rec)}
            content = "\x1f".join(f"{c}={d[c]}" for c in sorted(d))
            n = seen.get(content, 0)
            seen[content] = n + 1
            key = hashlib.sha256(f"{phase_name}\x1e{content}\x1e{n}".encode()).hexdigest()
            rows.append(_parse_row(p.name, line, d, key))
    except csv.Error as e:
        raise ConfigError(f"{p.name} line {reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        raise ConfigError(f"{p.name}: no data rows")
    return rows


def _optional_int(fname: str, line: int, d: dict, key: str, minimum: int) -> int | None:
    """An optional integer column (``steps``, ``seed``): None when empty, else an int >= ``minimum``."""
    if d.get(key, "") == "":
        return None
    x = _num(fname, line, key, d[key])
    if x is None:  # "na", "null", ...
        return None
    if not (math.isfinite(x) and x >= minimum and x == int(x)):
        raise ConfigError(f"{fname} line {line}: {key} must be an integer >= {minimum}, got {d[key]!r}")
    return int(x)


def _num(fname: str, line: int, col: str, v: str, required: bool = False) -> float | None:
    if v == "" or v.lower() in ("na", "n/a", "null", "none"):
        if required:
            raise ConfigError(f"{fname} line {line}: required field {col!r} is missing")
        return None
    try:
        return float(v)
    except ValueError:
        raise ConfigError(f"{fname} line {line}: {col} must be a number, got {v!r}") from None


def _parse_row(fname: str, line: int, d: dict[str, str], key: str) -> _Row:
    b = _num(fname, line, "batch_size", d["batch_size"], True)
    if not (math.isfinite(b) and b >= 1 and b == int(b)):
        raise ConfigError(f"{fname} line {line}: batch_size must be an integer >= 1, got {d['batch_size']!r}")
    lr = _num(fname, line, "lr", d["lr"], True)
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"{fname} line {line}: lr must be a number > 0, got {d['lr']!r}")
    loss = _num(fname, line, "final_val_loss", d["final_val_loss"], True)
    converged = None
    if d.get("converged", "") != "":
        c = d["converged"].lower()
        if c not in BOOL_TRUE + BOOL_FALSE:
            raise ConfigError(f"{fname} line {line}: converged must be True or False, got {d['converged']!r}")
        converged = c in BOOL_TRUE
    diverged = not math.isfinite(loss)
    if diverged and converged:
        raise ConfigError(f"{fname} line {line}: final_val_loss is {d['final_val_loss']!r} but converged is True")
    clip, clip_given = None, "grad_clip" in d and d["grad_clip"] != ""
    if clip_given:
        if d["grad_clip"].lower() in ("none", "off", "null", "nan", "inf"):
            clip = None
        else:
            clip = _num(fname, line, "grad_clip", d["grad_clip"])
            if not (math.isfinite(clip) and clip > 0):
                raise ConfigError(f"{fname} line {line}: grad_clip must be a number > 0 or 'none', got {d['grad_clip']!r}")
    steps = _optional_int(fname, line, d, "steps", 1)
    seed = _optional_int(fname, line, d, "seed", 0)
    metrics = {}
    for m in METRICS:
        if m in d and m != "final_val_loss":
            v = _num(fname, line, m, d[m])
            if v is not None:
                if not math.isfinite(v) and not diverged:
                    raise ConfigError(f"{fname} line {line}: {m} must be finite, got {d[m]!r}")
                if math.isfinite(v):
                    metrics[m] = v
    if not diverged:
        metrics["final_val_loss"] = loss
    known = {"batch_size", "lr", "grad_clip", "steps", "seed", "converged", *METRICS}
    extra = {c: v for c, v in d.items() if c not in known and v != ""}
    return _Row(line, key, int(b), float(lr), clip, clip_given, steps, seed, converged, diverged, metrics, extra)


def _baselines(phase: Phase, data_dir, splits) -> tuple[dict[str, float] | None, str]:
    try:
        from scaling.data import baselines_for_phase
    except ImportError:
        return None, "baselines unknown: scaling.data is not available"
    try:
        return baselines_for_phase(phase, data_dir=data_dir, splits=splits), ""
    except ConfigError as e:
        return None, f"baselines unknown: {str(e).split(';')[0]}"


def import_table(path: str | Path, phase: str | None = None, tracking_uri: str | None = None,
                 phase_file: str | Path | None = None, data_dir: str | Path | None = None,
                 splits: tuple[str, str] | None = None, jobs: int | None = None) -> ImportSummary:
    """Import ``path`` as runs of ``phase`` (a built-in name, or the phase of ``phase_file``).
    Idempotent; all-or-nothing; ConfigError/TrackingError with one line on bad input. ``jobs``: runs
    created at once (default :func:`import_jobs`)."""
    if phase is None and phase_file is None:
        raise ConfigError("give the phase the table belongs to: --phase NAME or --phase-file FILE")
    ph = load_phase(phase if phase_file is None else None, phase_file)
    if phase is not None and phase_file is not None and ph.name != phase:
        raise ConfigError(f"--phase {phase!r} does not match the name {ph.name!r} in {str(phase_file)!r}")
    split_pair = tuple(splits) if splits else ("train", "valid")
    rows = read_table(path, ph.name)
    # resolve every config before touching the store (bad values name their line)
    resolved = []
    for r in rows:
        try:
            clip = r.clip if r.clip_given else "phase"
            cfg = ph.run_config(r.batch_size, r.lr, clip, r.seed, splits=split_pair)
            if r.steps is not None and r.steps != cfg.steps:  # the table's own step count
                cfg = ph.with_overrides(steps=r.steps).run_config(r.batch_size, r.lr, clip, r.seed,
                                                                   splits=split_pair)
        except ConfigError as e:
            raise ConfigError(f"{Path(path).name} line {r.line}: {e}") from None
        resolved.append((r, cfg))

    client = tracking.connect(tracking_uri)
    baselines, note = _baselines(ph, data_dir, splits)
    exp_id = tracking.get_or_create_experiment(client, tracking.experiment_name(ph.name))
    existing = {r.tags.get(TAG_IMPORT_KEY) for r in runs_table.fetch_runs(
        client, exp_id, runs_table.Columns(tags=(TAG_IMPORT_KEY,)), tag_equals={tracking.TAG_SOURCE: "import"})}
    summary = ImportSummary(file=Path(path).name, phase=ph.name, experiment_id=exp_id, rows=len(rows),
                            created=0, skipped=0, baselines=baselines, baselines_note=note,
                            learned={"true": 0, "false": 0, "unknown": 0})
    todo = [(r, cfg) for r, cfg in resolved if r.key not in existing]
    summary.skipped = len(resolved) - len(todo)
    batch = _ImportBatch(client, exp_id, Path(path).name, baselines)
    try:
        batch.create_all(todo, import_jobs(client.tracking_uri) if jobs is None else jobs)
    except BaseException as e:
        batch.delete_all()  # all or nothing
        if isinstance(e, ConfigError) or not isinstance(e, Exception):
            raise
        raise tracking.TrackingError(f"import failed, nothing imported: {first_line(e)}") from None
    summary.created = len(batch.created)
    summary.run_ids = batch.created
    summary.learned.update(batch.learned)
    return summary


def import_jobs(tracking_uri: str) -> int:
    """Runs created at once: several for a server or a client-server database (their requests wait on the
    network, and the store takes concurrent writes); one for SQLite (a single writer)."""
    return 1 if tracking_uri.startswith("sqlite") else IMPORT_JOBS


@dataclass
class _ImportBatch:
    """The runs of one import as they are created (by one or several threads)."""

    client: object
    exp_id: str
    file: str
    baselines: dict[str, float] | None
    created: list[str] = field(default_factory=list)  # appended at creation: what to delete on failure
    learned: Counter = field(default_factory=Counter)

    def create_all(self, todo: list, jobs: int) -> None:
        if jobs <= 1:
            for r, cfg in todo:
                self.learned[self.create(r, cfg)] += 1
            return
        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(self.create, r, cfg) for r, cfg in todo]
            try:
                for f in futures:
                    self.learned[f.result()] += 1
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def delete_all(self) -> None:
        for run_id in self.created:
            try:
                self.client.delete_run(run_id)
            except Exception:
                pass

    def create(self, r: _Row, cfg) -> str:
        """One FINISHED (or diverged: FAILED) run for a row in three requests: create (with its tags), one
        ``log_batch`` (params and metrics), end. Its ``learned`` tag is returned."""
        learned = tracking.learned_tag(r.metrics.get("final_val_loss"),
                                       (self.baselines or {}).get("baseline_unigram_loss"), r.diverged)
        converged = (not r.diverged) if r.converged is None else r.converged
        tags = {
            tracking.TAG_PHASE: cfg.phase.name, tracking.TAG_CONFIG_HASH: cfg.config_hash(),
            tracking.TAG_SOURCE: "import", tracking.TAG_DIVERGED: str(r.diverged).lower(),
            tracking.TAG_CONVERGED: str(converged).lower(), tracking.TAG_LEARNED: learned,
            TAG_IMPORT_FILE: self.file, TAG_IMPORT_ROW: str(r.line), TAG_IMPORT_KEY: r.key,
            "mlflow.runName": f"import {self.file}:{r.line}",
        }
        run_id = tracking.with_retry(self.client.create_run, self.exp_id, tags=tags, idempotent=False).info.run_id
        self.created.append(run_id)
        params = cfg.to_params()
        params.update({"converged": converged, "data_source": "import", "device": "unknown"})
        for k, v in r.extra.items():
            params.setdefault(k, v)
        metrics = dict(r.metrics)
        metrics.setdefault("tokens_seen", float(cfg.steps * cfg.tokens_per_step))
        if "min_val_loss" in metrics and "final_val_loss" in metrics:
            metrics.setdefault("val_loss_rise", metrics["final_val_loss"] - metrics["min_val_loss"])
        if self.baselines:
            metrics.update({k: float(v) for k, v in self.baselines.items()})
        tracking.log_record(self.client, run_id, params=params,
                            metrics=[(k, v, cfg.steps) for k, v in metrics.items()])
        tracking.with_retry(self.client.set_terminated, run_id, "FAILED" if r.diverged else "FINISHED")
        return learned

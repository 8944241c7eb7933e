"""One configuration, end to end: load data, open (or resume) its MLflow run, train, record everything.

Order matters for "bad input creates nothing": the tracking store is reached and the data loaded
before any MLflow run exists. A SIGINT/SIGTERM marks the run KILLED (resumable with ``--resume``);
a SIGKILL leaves it RUNNING with an owner tag (``host:pid``) by which sweeps recognise it as stale.
"""

from __future__ import annotations

import json
import math
import queue
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scaling import tracking
from scaling.checkpoints import CheckpointRecord, load_checkpoint, save_checkpoint
from scaling.config import ConfigError, RunConfig, compile_text, error_line, first_line, say_warmup
from scaling.data import HUB_CONFIG, Corpus, load_corpus
from scaling.train import Hooks, Pruned, TrainResult, resolve_device, train


@dataclass
class RunOutcome:
    run_id: str
    status: str  # FINISHED | FAILED | KILLED
    diverged: bool
    summary: dict[str, float] = field(default_factory=dict)
    config: RunConfig | None = None
    pruned: bool = False

    def objective(self, metric: str | None = None) -> float:
        """The value an analysis or a search minimises (default: the phase's ``train.objective``): ``inf`` for
        a diverged run."""
        metric = metric or (self.config.phase.train.objective if self.config else "final_val_loss")
        v = self.summary.get(metric)
        return float("inf") if self.diverged or v is None or not math.isfinite(v) else float(v)

    def summary_line(self) -> str:
        s = self.summary
        if self.diverged:
            what = "DIVERGED (non-finite loss)"
        else:
            what = (f"final_val_loss={s.get('final_val_loss', float('nan')):.4f} "
                    f"final_train_loss={s.get('final_train_loss', float('nan')):.4f} "
                    f"clip_frequency={s.get('avg_clip_frequency', float('nan')):.3f}")
            if "final_val_acc" in s:  # a modular run
                what += f" final_val_acc={s['final_val_acc']:.4f} step_val_acc_99={s.get('step_val_acc_99', 'none')}"
        return f"run {self.run_id} {self.status}: {what}"


# Held by the metric sink and the checkpoint writer while they work: one background thread runs at a time,
# because two at once slow the training loop beside them far more than both one after the other.
_BACKGROUND = threading.Lock()


class _Worker:
    """One daemon thread fed through a queue; ``close`` lets it finish what is queued, then reports the
    first error it kept."""

    failure = "work could not be done"

    def __init__(self, max_pending: int = 0):
        self.q: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            print(f"warning: {self.failure} ({first_line(self.error)})", file=sys.stderr)


class MetricSink(_Worker):
    """Sends the metric rows of one or many runs to MLflow from ONE background thread (off the hot path).

    One thread for a whole batched group: one store connection at a time, however many runs (a
    thread per run exhausts a SQL store's connection pool). Rows queued meanwhile are coalesced
    into ``log_batch`` requests of at most 1,000 values. A store that stops answering is waited for
    (``tracking.with_retry``: the rows stay queued, none is lost; a request is resent with the same
    timestamps, which the store keeps once); past the retry limit the next ``put`` raises
    :class:`~scaling.tracking.StoreUnavailable` in the training thread, which ends the run resumable.
    Any other failed request is retried a few times with backoff, then reported at ``close``.
    """

    failure = "some step metrics could not be logged"

    def __init__(self, client):
        self.client = client
        self.handed = 0  # puts so far (the training thread's count)
        self._done = 0  # puts sent or given up on (the sink thread's count)
        self._finished = False
        self._progress = threading.Condition()
        super().__init__()

    def put(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        if isinstance(self.error, tracking.StoreUnavailable):
            raise self.error
        self.q.put((run_id, [(k, v, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]))
        self.handed += 1

    def wait_done(self, mark: int) -> None:
        """Return once the first ``mark`` puts are sent (or given up on, or the sink has stopped)."""
        with self._progress:
            self._progress.wait_for(lambda: self._done >= mark or self._finished)

    def _count_done(self, n: int) -> None:
        with self._progress:
            self._done += n
            self._progress.notify_all()

    def _next_batch(self) -> tuple[dict[str, list], int, bool]:
        """What has queued up, per run (blocking for the first item); how many puts; whether the queue was
        closed."""
        item = self.q.get()
        if item is None:
            return {}, 0, True
        pending: dict[str, list] = {item[0]: list(item[1])}
        n = 1
        while True:
            try:
                more = self.q.get_nowait()
            except queue.Empty:
                return pending, n, False
            if more is None:
                return pending, n, True
            pending.setdefault(more[0], []).extend(more[1])
            n += 1

    def _send(self, run_id: str, rows: list) -> None:
        for attempt in range(6):
            try:
                with _BACKGROUND:
                    tracking.log_metrics(self.client, run_id, rows)
                return
            except tracking.StoreUnavailable as e:
                self.error = e
                return
            except Exception as e:  # surfaced at close(); training goes on
                if attempt == 5:
                    self.error = e
                else:
                    time.sleep(0.2 * 2 ** attempt)

    def _work(self) -> None:
        stop = False
        try:
            while not stop:
                pending, n, stop = self._next_batch()
                for run_id, rows in pending.items():
                    if not isinstance(self.error, tracking.StoreUnavailable):
                        self._send(run_id, rows)
                self._count_done(n)
        finally:
            with self._progress:
                self._finished = True
                self._progress.notify_all()


def _map(obj, fn, leaf=torch.Tensor):
    """``obj`` (nested dicts / lists / tuples) with every ``leaf`` replaced by ``fn(leaf)``."""
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn, leaf) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn, leaf) for v in obj)
    return obj


@dataclass(frozen=True)
class _Slot:
    key: tuple  # (device, dtype) of the flat buffer
    index: int
    shape: tuple


def _pack(state) -> tuple[Any, dict, dict]:
    """A snapshot of a checkpoint state: its tensors copied into ONE flat buffer per (device, dtype) (on a
    GPU the copy is queued on the stream: taking it does not wait), the state kept as a skeleton of slots."""
    groups: dict[tuple, list[torch.Tensor]] = {}

    def slot(t: torch.Tensor) -> _Slot:
        ts = groups.setdefault((t.device, t.dtype), [])
        ts.append(t)
        return _Slot((t.device, t.dtype), len(ts) - 1, tuple(t.shape))

    skeleton = _map(state, slot)
    flats = {k: torch.cat([t.detach().reshape(-1) for t in ts]) for k, ts in groups.items()}
    return skeleton, flats, {k: [t.numel() for t in ts] for k, ts in groups.items()}


def _unpack(skeleton, flats: dict, sizes: dict):
    """The state again, every tensor on the host: one device-to-host copy per buffer (a GPU checkpoint
    holds ~80 small tensors, and each synchronous copy would wait for the GPU's queue)."""
    pieces = {k: f.cpu().split(sizes[k]) for k, f in flats.items()}
    # clone: its own storage, so torch.save writes only what the tensor holds
    return _map(skeleton, lambda s: pieces[s.key][s.index].view(s.shape).clone(), leaf=_Slot)


class CheckpointWriter(_Worker):
    """Writes checkpoint states as MLflow artifacts from ONE background thread (off the training loop).

    ``put`` snapshots the state (one device-side copy per dtype, :func:`_pack`) and returns at once; the
    thread copies it to the host and saves it (:func:`scaling.checkpoints.save_checkpoint`: atomically, with a
    checksum recorded), in the order given (a run's later checkpoint always lands after its earlier one).
    At most ``max_pending`` states wait; ``put`` blocks beyond that. ``close`` writes everything still
    queued — call it before a run is ended (FINISHED, KILLED or FAILED), so an interrupted run keeps its
    newest checkpoint.

    With the run's ``sink``, a checkpoint is saved only once the metric rows put before it are in the
    store: a resume retrains from the checkpoint and logs only steps after the last logged one, so rows
    older than a checkpoint that never reached the store (a kill, a store gone past the retry limit) would
    be lost for good. Should the sink have lost rows to a store that is gone, no later checkpoint is saved.
    """

    failure = "a checkpoint could not be written"

    def __init__(self, client, max_pending: int = 64, sink: MetricSink | None = None):
        self.client, self.sink = client, sink
        self.lost: dict[str, str] = {}  # run id → why a checkpoint of it was not written
        self.records: dict[str, list[CheckpointRecord]] = {}  # run id → its checkpoint records, as last saved
        super().__init__(max_pending)

    def put(self, run_id: str, state: dict) -> None:
        if isinstance(self.error, tracking.StoreUnavailable):  # the run ends resumable
            raise self.error
        if self.error is not None:  # a lost checkpoint fails the run, as a synchronous write would
            raise RuntimeError(f"checkpoint writing failed: {self.error}") from self.error
        self.q.put((run_id, _pack(state), self.sink.handed if self.sink is not None else 0))

    def _work(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.sink is not None:
                self.sink.wait_done(item[2])
                if self.error is None and isinstance(self.sink.error, tracking.StoreUnavailable):
                    self.error = self.sink.error
            if self.error is None:
                try:
                    with _BACKGROUND:
                        self.records[item[0]] = save_checkpoint(self.client, item[0], _unpack(*item[1]),
                                                                self.records.get(item[0]))
                except Exception as e:
                    self.error = e
            if self.error is not None:  # this one and every later one are lost
                self.lost.setdefault(item[0], error_line(self.error))


class Terminated(BaseException):
    """SIGTERM, raised in the main thread while :func:`sigterm_as_interrupt` is active."""


@contextmanager
def sigterm_as_interrupt():
    """Turn SIGTERM into an exception so the run is closed as KILLED instead of left RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


GIL_SWITCH_S = 1e-4  # Python's thread switch interval while a run trains beside its threads (default 5 ms)


@contextmanager
def quick_gil_handoff(seconds: float | None = None):
    """A short switch interval while training: the metric-sink and checkpoint threads run Python (MLflow
    requests) beside the training thread, and each time that thread releases the GIL (every tensor op,
    every graph replay) it waits up to Python's 5 ms to get it back — long enough to leave the GPU idle.
    0.1 ms bounds that wait and still leaves the threads their share.
    ``seconds``: another interval (the benchmark compares them)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, GIL_SWITCH_S) if seconds is None else seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def prepare(cfg: RunConfig, data_dir=None, tracking_uri=None, device: str = "auto"):
    """Check the store, the device and the data before any run exists; print the data mapping."""
    dev = resolve_device(device)
    corpus = load_corpus(cfg.phase, cfg.seed, data_dir, (cfg.train_split, cfg.val_split), task=cfg.task)
    client = tracking.connect(tracking_uri)
    # Always said, even in quiet mode: which split trains and which validates is part of the result.
    print(f"data: {corpus.source} (fingerprint {corpus.fingerprint})", file=sys.stderr)
    return client, dev, corpus


def _dataset_input(corpus: Corpus, cfg: RunConfig):
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    data, split = cfg.phase.data, f"{cfg.train_split}:{cfg.val_split}"
    if data.dataset == "random":
        src = HuggingFaceDatasetSource(path="random-tokens", split=corpus.source)
    elif data.dataset == "text":  # read through datasets' own "text" builder
        src = HuggingFaceDatasetSource(path="text", config_name=data.corpus, split=split, data_files=corpus.source)
    elif corpus.name == "modular":
        src = HuggingFaceDatasetSource(path="modular-arithmetic", split=corpus.source)
    else:
        src = HuggingFaceDatasetSource(path="wikitext", config_name=HUB_CONFIG[data.dataset], split=split,
                                       data_files=corpus.source)
    ds = MetaDataset(src, name=f"{corpus.name}-{cfg.train_split}-{cfg.val_split}", digest=corpus.fingerprint)
    return DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])


def device_label(dev: torch.device) -> str:
    """The full device string a run records (``cuda:1``, not ``cuda``: several GPUs train side by side)."""
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return str(dev)


def start_run(client, cfg: RunConfig, corpus: Corpus, dev: torch.device, source: str,
              parent_run_id: str | None = None, extra_tags: dict | None = None, run_name: str | None = None) -> str:
    exp_id = tracking.get_or_create_experiment(client, tracking.experiment_name(cfg.phase.name))
    tags = {tracking.TAG_PHASE: cfg.phase.name, tracking.TAG_CONFIG_HASH: cfg.config_hash(),
            tracking.TAG_SOURCE: source, tracking.TAG_OWNER: tracking.owner_id(), tracking.TAG_DIVERGED: "false"}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    commit = tracking.git_commit()
    if commit:
        tags["git_commit"] = commit
    tags.update(extra_tags or {})
    name = run_name or cfg.run_name()
    run_id = tracking.with_retry(client.create_run, exp_id, run_name=name, tags=tags).info.run_id
    try:
        _describe_run(client, run_id, cfg, corpus, dev)
    except BaseException:  # Ctrl-C or an error while it is described: the run ends now, not left RUNNING
        tracking.with_retry(client.set_terminated, run_id, "KILLED")
        raise
    return run_id


def _describe_run(client, run_id: str, cfg: RunConfig, corpus: Corpus, dev: torch.device) -> None:
    """A new run's params, dataset input and config.json artifact."""
    params = dict(cfg.to_params(), device=device_label(dev), dataset_fingerprint=corpus.fingerprint,
                  data_source=corpus.source[:490])
    tracking.log_params(client, run_id, params)
    try:
        client.log_inputs(run_id, datasets=[_dataset_input(corpus, cfg)])
    except Exception as e:  # a store without dataset support still gets everything else
        print(f"warning: dataset not logged as an MLflow input ({e})", file=sys.stderr)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "config.json"
        p.write_text(json.dumps(cfg.to_params(), indent=2, sort_keys=True))
        client.log_artifact(run_id, str(p))


def finish_run(client, run_id: str, cfg: RunConfig, result: TrainResult,
               checkpoint_lost: str | None = None, extra_metrics: dict[str, float] | None = None) -> RunOutcome:
    """Summary metrics, tags and terminal status of a trained run. ``checkpoint_lost``: why a checkpoint of
    it could not be written after its last step (a write that fails while it trains fails the run). Its
    results stand, so it stays FINISHED, but the reason goes into the tag ``scaling.checkpoint_lost`` and
    onto stderr with the run's id: its artifacts lack the final state. ``extra_metrics`` are logged with
    the summary (a batched group's timings)."""
    s = result.summary
    diverged = result.status == "DIVERGED"
    converged = result.status == "FINISHED" and math.isfinite(s.get("final_val_loss", float("nan")))
    tracking.log_metrics(client, run_id, [(k, v, result.steps_done) for k, v in {**s, **(extra_metrics or {})}.items()
                                          if v is not None and math.isfinite(v)])
    learned = tracking.learned_tag(s.get("final_val_loss"), s.get("baseline_unigram_loss"), diverged)
    tracking.set_tags(client, run_id, {tracking.TAG_DIVERGED: str(diverged).lower(),
                                       tracking.TAG_CONVERGED: str(converged).lower(),
                                       tracking.TAG_LEARNED: learned,
                                       "pruned": str(result.status == "PRUNED").lower(),
                                       **({tracking.TAG_CHECKPOINT_LOST: checkpoint_lost} if checkpoint_lost else {})})
    tracking.log_params(client, run_id, {"n_params": result.n_params, "converged": converged})
    status = "FINISHED" if result.status == "FINISHED" else ("KILLED" if result.status == "PRUNED" else "FAILED")
    if checkpoint_lost:
        print(f"warning: run {run_id}: its last checkpoint was not written ({checkpoint_lost})", file=sys.stderr)
    tracking.with_retry(client.set_terminated, run_id, status)
    return RunOutcome(run_id=run_id, status=status, diverged=diverged, summary=s, config=cfg,
                      pruned=result.status == "PRUNED")


class RunRecorder:
    """The MLflow side of one run while it trains: metrics (background sink), checkpoints, progress."""

    def __init__(self, client, run_id: str, sink: MetricSink, writer: CheckpointWriter, bar=None, on_eval=None,
                 resumed: bool = False):
        self.client, self.run_id, self.sink, self.writer = client, run_id, sink, writer
        self.bar, self.on_eval = bar, on_eval
        # a resumed run: the steps it trains again (checkpoint → last logged step) are in the store already
        self.logged = tracking.logged_through(client, run_id) if resumed else {}

    def hooks(self) -> Hooks:
        def on_log(step, metrics):
            if step > self.logged.get("train_loss", 0):
                self.sink.put(self.run_id, step, metrics)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", clip=f"{metrics['clip_frequency']:.2f}")

        def on_eval(step, v):
            if step > self.logged.get("val_loss", 0):
                self.sink.put(self.run_id, step, {"val_loss": v})
            if self.on_eval is not None:
                self.on_eval(step, v)

        return Hooks(on_log=on_log, on_eval=on_eval,
                     on_checkpoint=lambda step, state: self.writer.put(self.run_id, state),
                     on_step=(lambda step: self.bar.update(1)) if self.bar is not None else (lambda step: None))

    def close(self, status: str | None = None) -> None:
        """Close the progress bar; with ``status``, also end the run (KILLED/FAILED on interruption or
        error). The caller closes the (possibly shared) sink and checkpoint writer first, so every logged
        row and every checkpoint is written before the run ends."""
        if self.bar is not None:
            self.bar.close()
        if status is not None:
            tracking.with_retry(self.client.set_terminated, self.run_id, status)


def open_run(client, cfg: RunConfig, corpus: Corpus, dev, *, resume_run_id=None, source="train",
             parent_run_id=None, extra_tags=None, resume_tags=None) -> tuple[str, dict | None]:
    """A new run for ``cfg`` (tagged with ``extra_tags``), or the existing ``resume_run_id`` (checked) with
    its last checkpoint (tagged with ``resume_tags`` and its new owner)."""
    if not resume_run_id:
        return start_run(client, cfg, corpus, dev, source, parent_run_id, extra_tags), None
    try:
        run = client.get_run(resume_run_id)
    except Exception:
        raise ConfigError(f"resume: no MLflow run {resume_run_id!r} in {client.tracking_uri}") from None
    have = run.data.tags.get(tracking.TAG_CONFIG_HASH)
    if have != cfg.config_hash():
        raise ConfigError(f"resume: run {resume_run_id} was started with other options ({param_changes(run, cfg)}); "
                          "pass the options it was started with")
    if run.info.status == "FINISHED":
        raise ConfigError(f"resume: run {resume_run_id} is already FINISHED")
    state = load_checkpoint(client, resume_run_id)
    client.update_run(resume_run_id, status="RUNNING")
    tracking.set_tags(client, resume_run_id, {tracking.TAG_OWNER: tracking.owner_id(), **(resume_tags or {})})
    if state is None:
        print(f"resuming run {resume_run_id} from step 0: it has no readable checkpoint (one is written every "
              f"{cfg.phase.train.checkpoint_every} steps)", file=sys.stderr)
    else:
        print(f"resuming run {resume_run_id} from step {state['step']}", file=sys.stderr)
    return resume_run_id, state


def param_changes(run, cfg: RunConfig) -> str:
    """The params of ``cfg`` that differ from those ``run`` recorded, as "lr 0.003 (now 0.001), ...";
    "its config_hash differs" when none of the recorded params shows the difference."""
    logged = run.data.params
    diffs = [f"{k} {logged[k]} (now {v})" for k, v in cfg.to_params().items()
             if k in logged and str(v) != logged[k]]
    return ", ".join(diffs) or f"config_hash {run.data.tags.get(tracking.TAG_CONFIG_HASH)} vs {cfg.config_hash()}"


def _drain(sink: MetricSink, writer: CheckpointWriter) -> bool:
    """Flush the background threads (metrics, then checkpoints). A SIGINT/SIGTERM meanwhile waits until
    they are done (a second Ctrl-C must not lose queued checkpoints); returns whether one came."""
    if threading.current_thread() is not threading.main_thread():
        sink.close()
        writer.close()
        return False
    got: list[int] = []
    old = {sig: signal.signal(sig, lambda s, f: got.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sink.close()
        writer.close()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    return bool(got)


def run_config(cfg: RunConfig, device: str = "auto", data_dir=None, tracking_uri=None, resume_run_id=None,
               progress: bool = True, source: str = "train", parent_run_id: str | None = None,
               extra_tags: dict | None = None, on_eval=None, prepared=None) -> RunOutcome:
    """Train one configuration and record it in MLflow; ``resume_run_id`` continues a killed run."""
    client, dev, corpus = prepared or prepare(cfg, data_dir, tracking_uri, device)
    run_id, resume_state = open_run(client, cfg, corpus, dev, resume_run_id=resume_run_id, source=source,
                                    parent_run_id=parent_run_id, extra_tags=extra_tags)
    if source == "train":
        say_warmup([cfg])
    if source == "train" and not resume_run_id:  # printed now: a kill leaves no chance to print it later
        print(f"run {run_id} started; if it is interrupted, continue it with --resume {run_id}", file=sys.stderr)
    corpus.to(dev)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=resume_state["step"] if resume_state else 0, unit="step",
                   desc=f"B={cfg.batch_size} lr={cfg.lr:g}", file=sys.stderr, mininterval=1.0)
    sink = MetricSink(client)
    writer = CheckpointWriter(client, sink=sink)
    rec = RunRecorder(client, run_id, sink, writer, bar, on_eval, resumed=bool(resume_run_id))

    resume_hint = f"; continue it with --resume {run_id}" if source == "train" else ""

    def killed():
        print(f"interrupted: run {run_id} marked KILLED{resume_hint}", file=sys.stderr)

    return _train_recorded(lambda: [train(cfg, corpus, dev, rec.hooks(), resume_state)], client, [cfg], [rec],
                           sink, writer, killed)[0]


def _close_all(recs: list[RunRecorder], status: str) -> None:
    """End every run with ``status``; a store that is gone leaves them as they are (resumable)."""
    for r in recs:
        try:
            r.close(status)
        except tracking.StoreUnavailable:
            pass


def _train_recorded(fit, client, cfgs: list[RunConfig], recs: list[RunRecorder], sink: MetricSink,
                    writer: CheckpointWriter, on_killed=None, extra_metrics=None) -> list[RunOutcome]:
    """Run ``fit()`` (one TrainResult per run) and end the runs: on Ctrl-C or SIGTERM every run's rows
    and checkpoints are written and the runs closed KILLED, on an error FAILED; otherwise written, closed
    and finished (with the metrics ``extra_metrics()`` returns then, if given). A signal that comes while
    the last rows are written is raised again once the runs are recorded. A store that stopped answering
    (StoreUnavailable) is not the runs' failure: they are left to be resumed (KILLED if the store answers
    again in time, else RUNNING with a dead owner)."""
    try:
        with sigterm_as_interrupt(), quick_gil_handoff():
            results = fit()
    except (KeyboardInterrupt, Terminated):
        _drain(sink, writer)
        _close_all(recs, "KILLED")
        if on_killed is not None:
            on_killed()
        raise KeyboardInterrupt from None
    except BaseException as e:
        _drain(sink, writer)
        _close_all(recs, "KILLED" if isinstance(e, tracking.StoreUnavailable) else "FAILED")
        raise
    interrupted = _drain(sink, writer)
    for r in recs:
        r.close()
    extra = extra_metrics() if extra_metrics is not None else None
    outcomes = [finish_run(client, r.run_id, c, res, writer.lost.get(r.run_id), extra)
                for r, c, res in zip(recs, cfgs, results)]
    if interrupted:  # the runs were complete: they are recorded, then the interruption goes on
        raise KeyboardInterrupt
    return outcomes


def run_group(cfgs: list[RunConfig], device: str = "auto", data_dir=None, tracking_uri=None,
              resume_run_ids: list[str | None] | None = None, progress: bool = True, source: str = "sweep",
              parent_run_id: str | None = None, extra_tags: list[dict] | None = None, on_evals=None,
              prepared=None, compile: bool | str | dict = False) -> list[RunOutcome]:
    """Train several configurations of one phase together (``scaling.batched``), one MLflow run each.

    Same records per run as :func:`run_config`, plus the tag ``scaling.compile`` (``compile`` is
    train_group's argument: False or a value of ``config.COMPILE_MODES``; a resumed run gets the
    mode of its latest session) and the group's timings as metrics (``group_*``, see
    :func:`scaling.batched.timing_metrics`: compile and steady step apart); the configs share the corpus,
    so for random-token data they must share the seed.
    """
    from scaling.batched import timing_metrics, train_group

    if not all(c.batchable for c in cfgs):  # e.g. modular or dropout: one at a time, the same records
        return [run_config(c, device=device, data_dir=data_dir, tracking_uri=tracking_uri, resume_run_id=r,
                           progress=progress, source=source, parent_run_id=parent_run_id, extra_tags=t,
                           on_eval=ev, prepared=prepared)
                for c, r, t, ev in zip(cfgs, resume_run_ids or [None] * len(cfgs), extra_tags or [None] * len(cfgs),
                                       on_evals or [None] * len(cfgs))]
    n = len(cfgs)
    client, dev, corpus = prepared or prepare(cfgs[0], data_dir, tracking_uri, device)
    resume_run_ids = resume_run_ids or [None] * n
    how = {tracking.TAG_COMPILE: compile_text(compile)}  # a resumed run: how its remaining steps are compiled
    extra_tags = [{**(t or {}), **how} for t in (extra_tags or [None] * n)]
    on_evals = on_evals or [None] * n
    opened = [open_run(client, c, corpus, dev, resume_run_id=r, source=source, parent_run_id=parent_run_id,
                       extra_tags=t, resume_tags=how) for c, r, t in zip(cfgs, resume_run_ids, extra_tags)]
    corpus.to(dev)
    sink = MetricSink(client)  # one thread each for the whole group
    writer = CheckpointWriter(client, sink=sink)
    recs = [RunRecorder(client, run_id, sink, writer, None, ev, resumed=bool(r))
            for (run_id, _), ev, r in zip(opened, on_evals, resume_run_ids)]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=max(c.steps for c in cfgs), unit="step", desc=f"{n} configs", file=sys.stderr,
                   mininterval=1.0)
        last = recs[max(range(n), key=lambda i: cfgs[i].steps)]
        last.bar = bar
    timings: dict = {}
    return _train_recorded(lambda: train_group(cfgs, corpus, dev, [r.hooks() for r in recs], [s for _, s in opened],
                                               compile=compile, timings=timings),
                           client, cfgs, recs, sink, writer, extra_metrics=lambda: timing_metrics(timings))


__all__ = ["RunOutcome", "CheckpointWriter", "MetricSink", "run_config", "run_group", "prepare", "open_run",
           "start_run", "finish_run", "load_checkpoint", "save_checkpoint", "device_label", "Terminated", "Pruned"]

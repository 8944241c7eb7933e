"""Optuna search over log(LR), per batch size, that follows the optimum past the edges of the grid.

Per batch size one Optuna study (``<study name>-B<batch size>``) over ``lr`` on a log scale:

* **Initial range** from the grid results already in MLflow for the phase (runs of the phase
  experiment whose ``config_hash`` is the one this search would give that LR: same steps, model,
  data...): centred on the best grid LR, half-width the distance to its farthest grid neighbour
  (``extend_factor`` if it has none), and pushed one more ``extend_factor`` past the grid's edge when
  the best LR sits on that edge. Without grid results: the phase's LR list.
* The grid's best point and its neighbours are enqueued first; a point that already has a run with
  the same ``config_hash`` is not retrained: its recorded result (and val-loss curve) is told to Optuna
  (user attr ``reused_run_id``) and does not count against ``trials``.
* After each ``batch`` of trials: **bracketed** (an LR below and an LR above the best one are worse
  by more than the bracketing margin, or pruned or diverged) → stop; the margin is
  ``BRACKET_Z``·√2·σ, σ the loss noise of one run — the spread between seeds of the same
  configuration in the phase's runs when there are such replicates, else ``loss_noise`` or
  ``DEFAULT_LOSS_NOISE`` — so that two runs of one configuration rarely pass for a bracket; else if the best
  LR is within ``margin`` of an edge (a fraction of the *initial* range's width in log space, so the test
  does not loosen as the range grows), that edge moves out by ``extend_factor`` — at most
  ``max_extensions`` times in all, after which the search stops with **limit**; the search also ends
  when the study holds ``trials`` evaluated trials (**trials**). The range state lives in the study's
  user attrs, so a resumed study goes on where it stopped.
* Trials report the validation loss at every evaluation (``trial.report``) so a pruner (``median``,
  ``hyperband``; off by default) can stop them (``Pruned``): Optuna state PRUNED, MLflow status KILLED
  with tag ``pruned=true``. A diverged trial is COMPLETE with value ``inf`` and user attr
  ``diverged=True`` (MLflow: FAILED, ``diverged=true``), so the sampler learns that the LR is too high.
* Every trained trial is an MLflow child run (``source=search``, tags ``optuna.study``,
  ``optuna.trial``, the same params as ``scaling train``) of one search parent run, found again by
  ``scaling.search_id`` on a rerun. A trial interrupted (SIGINT/SIGTERM, or SIGKILL: its owner is dead)
  is failed in Optuna and requeued with its LR, and its MLflow run is resumed from its checkpoint.

Studies live in ``storage`` (default: SQLite ``optuna.db`` beside a local MLflow store): several
processes or machines can work on the same studies with one ``--storage postgresql://...`` URL, and
``optuna-dashboard <storage>`` shows them.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

from scaling import tracking
from scaling.config import ConfigError, Phase, RunConfig, error_line, positive_int, say_warmup
from scaling.sweep import (
    TAG_SEARCH_ID,
    ClaimStore,
    check_storage_url,
    classify,
    default_storage,
    ensure_parent,
    link_launcher_run,
    runs_of_config,
    safe_url,
    shared_params,
)

SAMPLERS = ("tpe", "random", "cmaes")
#: The loss noise of one run (nats) assumed when the phase has no replicates to measure it from.
DEFAULT_LOSS_NOISE = 0.02
#: One-sided 95% normal quantile: a neighbour brackets when it is worse by more than this many SDs of
#: the difference of two runs.
BRACKET_Z = 1.645
PRUNERS = ("none", "median", "hyperband")
DEFAULT_OPTUNA_DB = "optuna.db"


@dataclass
class BatchSizeSearch:
    batch_size: int
    study_name: str
    initial_range: tuple[float, float]
    final_range: tuple[float, float]
    range_source: str
    extensions: tuple[int, int]  # (below, above)
    best_lr: float | None
    best_loss: float
    bracketed: bool
    stop_reason: str  # bracketed | limit | trials
    n_trials: int  # evaluated trials of the study (reused grid points not counted)
    n_pruned: int
    n_diverged: int
    n_reused: int
    grid_best: tuple[float, float] | None = None
    lower: float | None = None  # the worse LRs that bracket the best
    upper: float | None = None
    objective: str = "final_val_loss"
    bracket_margin: float = 0.0  # nats a neighbour must be worse by
    noise_source: str = ""

    def line(self) -> str:
        best = "none" if self.best_lr is None else f"{self.best_lr:.4g} ({self.objective} {self.best_loss:.4f})"
        if self.stop_reason == "bracketed":
            why = (f"BRACKETED: worse by more than {self.bracket_margin:.3g} ({self.noise_source}) at lr "
                   f"{self.lower:.4g} and {self.upper:.4g}")
        elif self.stop_reason == "limit":
            why = (f"NOT bracketed: extension limit reached, the best LR is still at the edge of "
                   f"[{self.final_range[0]:.3g}, {self.final_range[1]:.3g}]")
        else:
            why = (f"NOT bracketed: trial budget spent ({self.n_trials} trials; no LR on both sides worse by more "
                   f"than {self.bracket_margin:.3g}, {self.noise_source})")
        lo0, hi0 = self.initial_range
        lo, hi = self.final_range
        return (f"B={self.batch_size} study {self.study_name}: best lr {best}; {why}; range [{lo0:.3g}, {hi0:.3g}] "
                f"({self.range_source}) -> [{lo:.3g}, {hi:.3g}], extended {self.extensions[0]}x below, "
                f"{self.extensions[1]}x above; {self.n_trials} trials ({self.n_pruned} pruned, "
                f"{self.n_diverged} diverged), {self.n_reused} grid points reused")


@dataclass
class SearchSummary:
    phase: str
    search_id: str
    storage: str
    parent_run_id: str | None
    results: list[BatchSizeSearch] = field(default_factory=list)
    launcher_run_id: str | None = None

    def lines(self) -> list[str]:
        head = f"search {self.search_id} (phase {self.phase}, storage {self.storage})"
        if self.parent_run_id:
            head += f": parent run {self.parent_run_id}"
        return [head] + ["  " + r.line() for r in self.results]


# --------------------------------------------------------------------------------------------
# Grid results and the initial range


@dataclass
class GridPoint:
    lr: float
    loss: float  # inf: diverged
    run_id: str


def grid_results(client, exp_id: str, phase: Phase, batch_size: int, splits) -> dict[float, GridPoint]:
    """The phase's recorded results at ``batch_size`` whose config this search would reproduce."""
    out: dict[float, GridPoint] = {}
    runs = tracking.search_runs(client, [exp_id], f"params.batch_size = '{batch_size}'")
    by_hash: dict[str, list] = {}
    for r in runs:
        by_hash.setdefault(r.data.tags.get(tracking.TAG_CONFIG_HASH, ""), []).append(r)
    for h, group in by_hash.items():
        try:
            lr = float(group[0].data.params["lr"])
            cfg = phase.run_config(batch_size, lr, splits=splits)
        except (KeyError, ValueError):
            continue
        if cfg.config_hash() != h:
            continue
        res = classify(cfg, group)
        if res.state in ("FINISHED", "DIVERGED") and not math.isnan(res.loss):
            if lr not in out or res.loss < out[lr].loss:
                out[lr] = GridPoint(lr, res.loss, res.run_id)
    return dict(sorted(out.items()))


def initial_range(grid: dict[float, GridPoint], phase_lrs: Sequence[float], factor: float) -> tuple[float, float, str]:
    """(low, high, where it came from): centred on the best grid LR, past the grid's edge if it is on one."""
    finite = {lr: p.loss for lr, p in grid.items() if math.isfinite(p.loss)}
    if not finite:
        lrs = sorted(phase_lrs)
        lo, hi = lrs[0], lrs[-1]
        if lo == hi:
            lo, hi = lo / factor, hi * factor
        return lo, hi, "phase LR list, no grid results"
    lrs = sorted(grid)
    best = min(finite, key=finite.get)
    i = lrs.index(best)
    neighbours = lrs[max(0, i - 1):i] + lrs[i + 1:i + 2]
    h = max((abs(math.log(n / best)) for n in neighbours), default=math.log(factor))
    lo, hi = best * math.exp(-h), best * math.exp(h)
    where = f"grid best {best:g}"
    if i == len(lrs) - 1:
        hi *= factor
        where += ", on the grid's upper edge"
    if i == 0:
        lo /= factor
        where += ", on the grid's lower edge"
    return lo, hi, where


# --------------------------------------------------------------------------------------------
# Analysis of a study


@dataclass
class Analysis:
    best_lr: float | None
    best_loss: float
    lower: float | None  # nearest LR below the best that is worse by more than the margin
    upper: float | None
    near_low: bool
    near_high: bool
    margin: float = 0.0

    @property
    def bracketed(self) -> bool:
        return self.lower is not None and self.upper is not None


def analyse(points: list[tuple[float, float]], lo: float, hi: float, margin_log: float,
            noise_margin: float = 0.0) -> Analysis:
    """``points``: (lr, loss) with loss = inf for diverged/pruned; where the optimum stands.

    A neighbour brackets the best LR only when its loss exceeds the best by more than
    ``noise_margin`` (nats): a difference inside the runs' noise says nothing about the side the
    optimum is on. "Near an edge": within ``margin_log`` (natural-log units) of ``lo`` or ``hi``."""
    finite = [(lr, v) for lr, v in points if math.isfinite(v)]
    if not finite:
        return Analysis(None, float("inf"), None, None, False, False, noise_margin)
    best_lr, best = min(finite, key=lambda p: (p[1], p[0]))
    below = [lr for lr, v in points if lr < best_lr and v > best + noise_margin]
    above = [lr for lr, v in points if lr > best_lr and v > best + noise_margin]
    return Analysis(best_lr, best, max(below) if below else None, min(above) if above else None,
                    near_low=math.log(best_lr / lo) <= margin_log, near_high=math.log(hi / best_lr) <= margin_log,
                    margin=noise_margin)


def bracket_margin(noise_sd: float) -> float:
    """How much worse than the best a neighbour must be to bracket it: BRACKET_Z SDs of the
    difference of two runs with loss noise ``noise_sd``."""
    return BRACKET_Z * math.sqrt(2.0) * noise_sd


def replicate_noise(client, exp_id: str, phase: Phase, batch_sizes: Sequence[int], splits) -> tuple[float, int] | None:
    """(SD, degrees of freedom) of final_val_loss between seeds of the same configuration among the
    phase's recorded runs at ``batch_sizes`` (runs this search's config would reproduce but for the
    seed), pooled over configurations; None without two finished seeds of any configuration."""
    losses: dict[tuple[int, float], list[float]] = {}
    for b in batch_sizes:
        by_hash: dict[str, list] = {}
        for r in tracking.search_runs(client, [exp_id], f"params.batch_size = '{b}'"):
            by_hash.setdefault(r.data.tags.get(tracking.TAG_CONFIG_HASH, ""), []).append(r)
        for h, group in by_hash.items():
            try:
                lr, seed = float(group[0].data.params["lr"]), int(group[0].data.params["seed"])
                cfg = phase.run_config(b, lr, seed=seed, splits=splits)
            except (KeyError, ValueError, ConfigError):
                continue
            res = classify(cfg, group) if cfg.config_hash() == h else None
            if res is not None and res.state == "FINISHED" and math.isfinite(res.loss):
                losses.setdefault((b, lr), []).append(res.loss)
    groups = [v for v in losses.values() if len(v) > 1]
    dof = sum(len(v) - 1 for v in groups)
    if not dof:
        return None
    ss = sum(sum((x - sum(v) / len(v)) ** 2 for x in v) for v in groups)
    return math.sqrt(ss / dof), dof


def _trial_points(study) -> list[tuple[float, float]]:
    import optuna

    pts = []
    for t in study.get_trials(deepcopy=False):
        if "lr" not in t.params:
            continue
        if t.state == optuna.trial.TrialState.COMPLETE:
            pts.append((t.params["lr"], float(t.value)))
        elif t.state == optuna.trial.TrialState.PRUNED:
            pts.append((t.params["lr"], float("inf")))  # stopped for being worse than the others
    return pts


# --------------------------------------------------------------------------------------------
# The search


def _make_sampler(name: str, seed: int | None):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def _make_pruner(name: str | None, cfg: RunConfig):
    import optuna

    if name in (None, "none"):
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    return optuna.pruners.HyperbandPruner(min_resource=cfg.phase.train.eval_interval, max_resource=cfg.steps,
                                          reduction_factor=3)


def default_search_id(phase: Phase, splits) -> str:
    """Stable: the same phase settings (steps, model, data, splits...) give the same studies."""
    ref = phase.run_config(phase.grid.batch_sizes[0], 1.0, splits=splits).to_params()
    for k in ("batch_size", "lr", "steps", "warmup_steps", "tokens_per_step"):
        ref.pop(k)
    ref["budget"] = phase.train.budget
    if phase.train.objective != "final_val_loss":  # a study minimises one objective
        ref["objective"] = phase.train.objective
    blob = json.dumps(ref, sort_keys=True, default=str)
    return f"{phase.name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def _validate(batch_sizes, trials, sampler, pruner, extend_factor, margin, max_extensions, batch) -> None:
    if not batch_sizes:
        raise ConfigError("give at least one batch size (--batch-sizes 128,256)")
    for b in batch_sizes:
        positive_int("batch_size", b)
    positive_int("trials", trials)
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError("sampler cmaes needs the `cmaes` package (pip install cmaes)") from None
    if pruner not in (None, *PRUNERS):
        raise ConfigError(f"pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    if not (isinstance(extend_factor, (int, float)) and math.isfinite(extend_factor) and extend_factor > 1):
        raise ConfigError(f"extend_factor must be a number > 1, got {extend_factor!r}")
    if not (isinstance(margin, (int, float)) and 0 <= margin < 0.5):
        raise ConfigError(f"margin must be in [0, 0.5), got {margin!r}")
    if not (isinstance(max_extensions, int) and max_extensions >= 0):
        raise ConfigError(f"max_extensions must be an integer >= 0, got {max_extensions!r}")
    positive_int("batch", batch)


def run_search(phase: Phase, batch_sizes: Sequence[int], trials: int = 12, *, sampler: str = "tpe",
               pruner: str | None = None, storage: str | None = None, study_name: str | None = None,
               extend_factor: float = 3.0, margin: float = 0.1, max_extensions: int = 4, batch: int = 4,
               device: str = "auto", data_dir=None, splits: tuple[str, str] = ("train", "valid"),
               tracking_uri: str | None = None, objective_fn: Callable[[RunConfig], float] | None = None,
               seed: int | None = None, progress: bool = True, group: bool = False,
               compile: bool | str | dict = False, loss_noise: float | None = None) -> SearchSummary:
    """Boundary-aware LR search per batch size (see the module docstring).

    ``group``: the ``batch`` trials asked at a time are trained together in one batched pass
    (``scaling.batched``; ``compile`` compiles its step); otherwise one after another.

    ``trials``: evaluated trials per study (a resumed study counts what it already has).
    ``loss_noise``: the loss noise of one run (nats) the bracketing margin is made of; None: the
    spread between seeds in the phase's recorded runs, else DEFAULT_LOSS_NOISE.
    ``objective_fn(cfg) -> loss``: no training and no MLflow child runs — a cheap synthetic loss
    (tests). ``seed``: the sampler's seed (None: random)."""
    import optuna

    from scaling import runner

    _validate(list(batch_sizes), trials, sampler, pruner, extend_factor, margin, max_extensions, batch)
    if loss_noise is not None and not (isinstance(loss_noise, (int, float)) and math.isfinite(loss_noise)
                                       and loss_noise >= 0):
        raise ConfigError(f"loss_noise must be a number >= 0 (nats), got {loss_noise!r}")
    for b in batch_sizes:
        phase.run_config(b, 1.0, splits=splits)  # the phase resolves at every batch size (ConfigError if not)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    storage = check_storage_url(storage or default_storage(uri, DEFAULT_OPTUNA_DB))
    search_id = study_name or default_search_id(phase, splits)
    if any(c in search_id for c in "'\"\\"):
        raise ConfigError(f"study name must not contain quotes or backslashes, got {search_id!r}")
    if objective_fn is None:  # reach the store and the data before anything is created
        prepared = runner.prepare(phase.run_config(batch_sizes[0], 1.0, splits=splits), data_dir, uri, device)
        client = prepared[0]
    else:
        prepared, client = None, tracking.connect(uri)
    say_warmup(phase.run_config(b, 1.0, splits=splits) for b in batch_sizes)  # the warmup does not depend on the LR
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    exp_id = tracking.get_or_create_experiment(client, tracking.experiment_name(phase.name))
    parent = launcher = None
    store = None
    if objective_fn is None:
        store = ClaimStore(storage)
        ref = phase.run_config(batch_sizes[0], 1.0, splits=splits)
        params = dict(shared_params(ref, phase), search_batch_sizes=",".join(map(str, batch_sizes)),
                      search_sampler=sampler, search_pruner=pruner or "none")
        parent = ensure_parent(client, store, search_id, "search", phase, exp_id,
                               tags={"optuna.study": search_id, "scaling.storage": safe_url(storage)},
                               params=params, run_name=f"search-{search_id}")
        launcher = link_launcher_run(client, "search", search_id, parent)
        tracking.with_retry(client.update_run, parent, "RUNNING")
    summary = SearchSummary(phase=phase.name, search_id=search_id, storage=safe_url(storage), parent_run_id=parent,
                            launcher_run_id=launcher)
    noise = _noise_margin(loss_noise, None if objective_fn is not None else (client, exp_id), phase, batch_sizes,
                          splits)
    try:
        with runner.sigterm_as_interrupt():
            for b in batch_sizes:
                summary.results.append(_search_one(
                    phase, b, trials, sampler=sampler, pruner=pruner, storage=storage,
                    study_name=f"{search_id}-B{b}", extend_factor=extend_factor, margin=margin,
                    max_extensions=max_extensions, batch=batch, splits=splits, client=client, exp_id=exp_id,
                    parent=parent, search_id=search_id, objective_fn=objective_fn, seed=seed,
                    prepared=prepared, progress=progress, group=group,
                    compile=compile, noise=noise))
    except (KeyboardInterrupt, runner.Terminated):
        if parent:
            tracking.with_retry(client.set_terminated, parent, "KILLED")
        print(f"interrupted: search {search_id} stopped; rerun the same command to resume it", file=sys.stderr)
        raise KeyboardInterrupt from None
    finally:
        if store is not None:
            store.dispose()
    if parent:
        rows = []
        for r in summary.results:
            if r.best_lr is not None:
                rows += [(f"best_lr_B{r.batch_size}", r.best_lr, 0), (f"best_val_loss_B{r.batch_size}", r.best_loss, 0)]
            rows.append((f"bracketed_B{r.batch_size}", float(r.bracketed), 0))
        rows.append(("bracket_margin", noise[0], 0))
        tracking.log_metrics(client, parent, rows)
        tracking.set_tags(client, parent, {f"scaling.stop_B{r.batch_size}": r.stop_reason for r in summary.results})
        tracking.with_retry(client.set_terminated, parent, "FINISHED")
    return summary


def _noise_margin(loss_noise, store, phase: Phase, batch_sizes, splits) -> tuple[float, str]:
    """(bracketing margin in nats, where its noise came from): ``loss_noise`` when given, else the
    seeds' spread in the phase's runs (``store`` = (client, experiment id); None: no runs to read),
    else DEFAULT_LOSS_NOISE."""
    if loss_noise is not None:
        return bracket_margin(loss_noise), f"noise {loss_noise:.3g} given"
    measured = replicate_noise(*store, phase, batch_sizes, splits) if store is not None else None
    if measured is not None:
        sd, dof = measured
        return bracket_margin(sd), f"noise {sd:.3g} from the seeds' spread, {dof} dof"
    return bracket_margin(DEFAULT_LOSS_NOISE), f"noise {DEFAULT_LOSS_NOISE:g} assumed: no replicates"


def _search_one(phase: Phase, b: int, trials: int, *, sampler, pruner, storage, study_name, extend_factor, margin,
                max_extensions, batch, splits, client, exp_id, parent, search_id, objective_fn, seed, prepared,
                progress, group=False, compile=False, noise=(0.0, "")) -> BatchSizeSearch:
    import optuna
    from optuna.distributions import FloatDistribution

    grid = {} if objective_fn is not None else grid_results(client, exp_id, phase, b, splits)
    ref = phase.run_config(b, 1.0, splits=splits)
    store = optuna.storages.RDBStorage(storage)  # kept: interrupted trials are marked through it
    study = optuna.create_study(storage=store, study_name=study_name, direction="minimize", load_if_exists=True,
                                sampler=_make_sampler(sampler, seed), pruner=_make_pruner(pruner, ref))
    n_before = len(study.get_trials(deepcopy=False))
    if seed is not None and n_before:
        # a study continued with the same seed: the sampler would restart its random stream and ask the
        # first session's LRs again; seed + trials so far is a new stream, still reproducible
        study.sampler = _make_sampler(sampler, seed + n_before)
    attrs = study.user_attrs
    if "lr_low0" not in attrs:  # a new study: its range and its first points
        phase_lrs = phase.grid.lrs or [lr for bb, lr in phase.grid.lr_by_batch_size if bb == b] or \
            [lr for _, lr in phase.grid.lr_by_batch_size]
        lo0, hi0, where = initial_range(grid, phase_lrs, extend_factor)
        for k, v in {"lr_low0": lo0, "lr_high0": hi0, "range_source": where, "extend_factor": extend_factor,
                     "ext_low": 0, "ext_high": 0, "phase": phase.name, "batch_size": b}.items():
            study.set_user_attr(k, v)
        finite = sorted((p for p in grid.values() if math.isfinite(p.loss)), key=lambda p: p.loss)
        if finite:
            lrs = sorted(grid)
            i = lrs.index(finite[0].lr)
            for lr in [finite[0].lr] + lrs[max(0, i - 1):i] + lrs[i + 1:i + 2]:
                study.enqueue_trial({"lr": lr}, user_attrs={"grid_run_id": grid[lr].run_id}, skip_if_exists=True)
        attrs = study.user_attrs
    lo0, hi0, f = attrs["lr_low0"], attrs["lr_high0"], attrs["extend_factor"]
    if objective_fn is None:
        _recover_interrupted(study, store, client, exp_id)

    def state():
        a = study.user_attrs
        return a["ext_low"], a["ext_high"], lo0 / f ** a["ext_low"], hi0 * f ** a["ext_high"]

    def counted():
        return [t for t in study.get_trials(deepcopy=False)
                if "reused_run_id" not in t.user_attrs and not t.user_attrs.get("interrupted")
                and t.state != optuna.trial.TrialState.WAITING]

    grid_pts = [(p.lr, p.loss) for p in grid.values()]
    margin_log = margin * math.log(hi0 / lo0)
    reason = "trials"
    while True:
        el, eh, lo, hi = state()
        an = analyse(_trial_points(study) + grid_pts, lo, hi, margin_log, noise[0])
        if an.bracketed:
            reason = "bracketed"
            break
        if an.best_lr is not None and (an.near_low or an.near_high):
            if el + eh >= max_extensions:
                reason = "limit"
                break
            # Race-benign across workers: the new edge is a function of the count, not of the old edge.
            if an.near_high:
                study.set_user_attr("ext_high", eh + 1)
            else:
                study.set_user_attr("ext_low", el + 1)
            continue
        n = len(counted())
        if n >= trials:
            reason = "trials"
            break
        todo = min(batch, trials - n)
        while todo > 0:  # reused grid points are free: a batch is `batch` evaluated trials
            el, eh, lo, hi = state()
            asked = [study.ask({"lr": FloatDistribution(lo, hi, log=True)}) for _ in range(todo)]
            todo -= _evaluate(study, asked, phase, b, splits=splits, client=client, exp_id=exp_id, parent=parent,
                              search_id=search_id, objective_fn=objective_fn, prepared=prepared, progress=progress,
                              group=group, compile=compile)
    el, eh, lo, hi = state()
    an = analyse(_trial_points(study) + grid_pts, lo, hi, margin_log, noise[0])
    trials_ = counted()
    S = optuna.trial.TrialState
    best_grid = min(((p.lr, p.loss) for p in grid.values() if math.isfinite(p.loss)), key=lambda p: p[1], default=None)
    return BatchSizeSearch(
        batch_size=b, study_name=study_name, initial_range=(lo0, hi0), final_range=(lo, hi),
        range_source=study.user_attrs.get("range_source", ""), extensions=(el, eh), best_lr=an.best_lr,
        best_loss=an.best_loss, bracketed=an.bracketed, stop_reason=reason,
        n_trials=sum(t.state in (S.COMPLETE, S.PRUNED) for t in trials_),
        n_pruned=sum(t.state == S.PRUNED for t in trials_),
        n_diverged=sum(bool(t.user_attrs.get("diverged")) for t in trials_),
        n_reused=sum("reused_run_id" in t.user_attrs for t in study.get_trials(deepcopy=False)),
        grid_best=best_grid, lower=an.lower, upper=an.upper, objective=phase.train.objective,
        bracket_margin=noise[0], noise_source=noise[1])


def _evaluate(study, trials: list, phase: Phase, b: int, *, splits, client, exp_id, parent, search_id, objective_fn,
              prepared, progress, group: bool = False, compile: bool | str | dict = False) -> int:
    """Asked trials: synthetic, reused from a recorded run, or trained (and recorded) now — one by one,
    or all together in one batched pass with ``group`` (ask K, train K together, tell K). ``prepared``
    is runner.prepare's (client, device, corpus) of the search (None with an ``objective_fn``).
    Returns how many were evaluated (reused ones are free)."""
    import optuna

    from scaling import runner
    from scaling.train import Pruned

    S = optuna.trial.TrialState
    todo = []  # (trial, cfg, tags, resume_run_id, on_eval)
    n_evaluated = 0
    for trial in trials:
        trial.set_user_attr("owner", tracking.owner_id())  # a trial left RUNNING by a dead owner is recovered
        lr = trial.params["lr"]
        cfg = phase.run_config(b, lr, splits=splits)
        if objective_fn is not None:
            v = float(objective_fn(cfg))
            trial.set_user_attr("diverged", not math.isfinite(v))
            study.tell(trial, v if not math.isnan(v) else float("inf"))
            n_evaluated += 1
            continue
        known = runs_of_config(client, exp_id, cfg.config_hash())
        done = classify(cfg, known)
        if done.state in ("FINISHED", "DIVERGED") and not trial.user_attrs.get("resume_run_id"):
            for m in client.get_metric_history(done.run_id, "val_loss"):
                trial.report(m.value, m.step)
            trial.set_user_attr("reused_run_id", done.run_id)
            trial.set_user_attr("diverged", done.state == "DIVERGED")
            study.tell(trial, done.loss if not math.isnan(done.loss) else float("inf"))
            continue
        tags = {"optuna.study": study.study_name, "optuna.trial": str(trial.number), TAG_SEARCH_ID: search_id}
        resume = trial.user_attrs.get("resume_run_id")
        if resume:
            tracking.set_tags(client, resume, dict(tags, **{"optuna.resumed_from_trial":
                                                              str(trial.user_attrs.get("resumes_trial", ""))}))

        def on_eval(step: int, v: float, trial=trial) -> None:
            if math.isfinite(v):
                trial.report(v, step)
                if trial.should_prune():
                    raise Pruned()

        todo.append((trial, cfg, tags, resume, on_eval))
    if not todo:
        return n_evaluated
    try:
        if group and len(todo) > 1:
            outcomes = runner.run_group([t[1] for t in todo], resume_run_ids=[t[3] for t in todo],
                                        progress=progress, source="search", parent_run_id=parent,
                                        extra_tags=[t[2] for t in todo], on_evals=[t[4] for t in todo],
                                        prepared=prepared, compile=compile)
        else:
            outcomes = []
            for trial, cfg, tags, resume, on_eval in todo:
                try:
                    outcomes.append(runner.run_config(cfg, resume_run_id=resume, progress=progress, source="search",
                                                      parent_run_id=parent, extra_tags=tags, on_eval=on_eval,
                                                      prepared=prepared))
                except (KeyboardInterrupt, runner.Terminated):
                    raise
                except Exception as e:
                    outcomes.append(e)
    except (KeyboardInterrupt, runner.Terminated):
        for trial, *_ in todo:
            if trial.number not in {t.number for t in study.get_trials(deepcopy=False, states=(S.COMPLETE,
                                                                                                 S.PRUNED, S.FAIL))}:
                trial.set_user_attr("interrupted", True)
                study.tell(trial, state=S.FAIL)
        raise
    except Exception as e:  # the whole group failed
        outcomes = [e] * len(todo)
    for (trial, cfg, *_), outcome in zip(todo, outcomes):
        n_evaluated += 1
        if isinstance(outcome, Exception):
            e = outcome
            print(f"error: trial {trial.number} (lr {cfg.lr:g}) failed: {error_line(e, 300)}", file=sys.stderr)
            trial.set_user_attr("error", error_line(e, 500))
            study.tell(trial, state=S.FAIL)
            continue
        trial.set_user_attr("mlflow_run_id", outcome.run_id)
        trial.set_user_attr("diverged", outcome.diverged)
        if outcome.pruned:
            state = S.PRUNED
            study.tell(trial, state=state)
        else:
            state = S.COMPLETE
            study.tell(trial, outcome.objective())
        tracking.set_tags(client, outcome.run_id, {"optuna.state": state.name})
    return n_evaluated


def _recover_interrupted(study, storage, client, exp_id: str) -> None:
    """Trials whose process died (RUNNING, owner gone) are failed; interrupted ones are requeued to resume.
    ``storage``: the study's Optuna storage (it marks another process's trial)."""
    import optuna

    S = optuna.trial.TrialState
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(S.RUNNING,)):
        owner = t.user_attrs.get("owner")
        if owner and not tracking.owner_alive(owner):
            storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(study_id, t.number),
                                        "interrupted", True)
            study.tell(t.number, state=S.FAIL)
    trials = study.get_trials(deepcopy=False)
    requeued = {t.user_attrs.get("resume_run_id") for t in trials}
    for t in trials:
        if t.state != S.FAIL or not t.user_attrs.get("interrupted") or "lr" not in t.params:
            continue
        runs = tracking.search_runs(client, [exp_id], f"tags.`optuna.study` = '{study.study_name}' and "
                                                      f"tags.`optuna.trial` = '{t.number}'")
        for r in runs:
            alive = r.info.status == "RUNNING" and tracking.owner_alive(r.data.tags.get(tracking.TAG_OWNER))
            if r.info.status in ("KILLED", "RUNNING") and not alive and r.info.run_id not in requeued \
                    and r.data.tags.get("pruned") != "true":
                study.enqueue_trial({"lr": t.params["lr"]},
                                    user_attrs={"resume_run_id": r.info.run_id, "resumes_trial": t.number})
                requeued.add(r.info.run_id)


__all__ = ["run_search", "SearchSummary", "BatchSizeSearch", "initial_range", "analyse", "grid_results",
           "default_search_id", "bracket_margin", "replicate_noise", "DEFAULT_LOSS_NOISE", "BRACKET_Z"]

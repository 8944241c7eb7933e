"""The statistics of ``scaling compare``: pure functions on pandas DataFrames (no MLflow here).

Input is a *runs table*, one row per run (see :data:`RUN_COLUMNS`), as :mod:`scaling.report`
builds it from MLflow (or a test builds it by hand). From it:

1. :func:`config_table` — one row per (phase, batch size, budget, LR): the finished replicates
   (seeds) averaged, their spread kept; a configuration is ``inf`` (worse than any finite loss) only
   when every replicate diverged — a diverged seed beside finished ones is counted, not fatal. A run
   that FAILED without diverging (a crashed worker) has no result: it is left out, and said.
2. :func:`optimum_table` — one row per (phase, batch size, budget): the grid argmin and the vertex of
   a quadratic in ln LR through the argmin and its neighbours, fitted to every replicate with one
   intercept per seed (a seed's shared loss offset is not noise). The replicates' residuals, pooled
   over the phase's batch sizes (each batch size's own where Bartlett's test says they differ), give
   the loss noise and the vertex's delta-method standard error.
   An argmin on the smallest/largest LR is *censored*: the optimum lies beyond the middle of the
   grid's outer gap (the bound), not beyond the edge itself.
3. The fits of ln LR_opt = ln C + β ln B: :func:`fit_power` (``all`` / ``uncensored``: random-effects
   meta-regression, weights 1/(τ² + SE²) with τ² by Paule–Mandel, modified Knapp–Hartung t interval),
   :func:`fit_censored` (Tobit-style maximum likelihood with the bounds; profile interval with a
   cutoff calibrated to reduce to the t interval), :func:`fit_laws` (power / saturating / surge on
   vertex estimates, AICc, "cannot choose" when the data cannot).
4. :func:`analyze` — all of it per phase, as a JSON-ready dict (schema: docs/compare-schema.md).

Every β is local to the batch sizes it was fitted on: the power law is the small-B end of the
saturating and surge laws. The intervals' coverage is measured by simulation in
tests/test_coverage.py (numbers in docs/compare-schema.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, stats
from scipy.special import log_ndtr

from scaling.config import ConfigError, clip_text

#: Columns of the runs table (metric columns beyond these are kept when present).
RUN_COLUMNS = ("run_id", "phase", "batch_size", "lr", "grad_clip", "seed", "status", "diverged",
               "learned", "source", "budget_kind", "budget")
METRIC_COLUMNS = ("final_val_loss", "min_val_loss", "final_train_loss", "val_loss_rise",
                  "avg_clip_frequency", "avg_grad_norm_before", "avg_grad_norm_after",
                  "baseline_uniform_loss", "baseline_unigram_loss", "baseline_bigram_loss",
                  "tail_index_alpha", "tokens_seen", "epochs", "step_val_acc_99")
#: Objectives ``--metric`` accepts.
OBJECTIVES = ("final_val_loss", "min_val_loss", "final_train_loss",
              "step_val_acc_99")  # modular phases: the first step at >= 99% validation accuracy
ESTIMATORS = ("vertex", "argmin")
FIT_KINDS = ("all", "uncensored", "censored")

#: Theory values of β (LR_opt ∝ B^β).
THEORY = (
    ("gaussian", 0.5, "Gaussian noise, sqrt scaling (beta = 1/2)"),
    ("laplace_alpha3", 2.0 / 3.0, "heavy tails, Laplace alpha = 3 (beta = 2/3)"),
    ("linear", 1.0, "linear scaling (beta = 1)"),
    ("saturation", 0.0, "saturation (beta = 0)"),
)
REGIMES = ((0.5, "pre-saturation"), (0.99, "transition"), (math.inf, "saturation"))
MIN_POINTS = 3
NOT_ENOUGH = "not enough points"
DEGENERATE = "degenerate"
NOT_IDENTIFIABLE = "not identifiable"
#: An optimum from runs that passed over their training split more often than this is flagged: what
#: it measures is partly memorisation of repeated data.
MAX_EPOCHS = 4.0
#: AICc difference below which two laws are not told apart.
LAW_MARGIN = 2.0
#: AICc difference taken as decisive without simulating (Burnham & Anderson's "essentially none" for the rival).
DECISIVE_AICC = 10.0
#: Smallest scatter (ln LR) the censored fit considers; an estimate there is "at its floor".
SIGMA_FLOOR = 1e-3


# ---------------------------------------------------------------------------------------------
# The runs table


def normalize_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Check and coerce a runs table: numeric columns as floats, ``diverged`` bool, ``learned``
    True/False/None, ``grad_clip`` float with NaN for no clipping, ``budget_label``
    (``kind=value``). Raises ConfigError naming the first missing column."""
    missing = [c for c in ("phase", "batch_size", "lr") if c not in runs.columns]
    if missing:
        raise ConfigError(f"runs table lacks column {missing[0]!r}")
    df = runs.copy()
    if "run_id" not in df:
        df["run_id"] = [f"row{i}" for i in range(len(df))]
    df["phase"] = df["phase"].astype(str)
    df["batch_size"] = pd.to_numeric(df["batch_size"], errors="coerce")
    df["lr"] = pd.to_numeric(df["lr"], errors="coerce")
    bad = df["batch_size"].isna() | (df["batch_size"] <= 0) | df["lr"].isna() | (df["lr"] <= 0)
    df = df[~bad].copy()
    df["batch_size"] = df["batch_size"].astype(int)
    df["grad_clip"] = (df["grad_clip"].map(_clip_value) if "grad_clip" in df else np.nan)
    df["grad_clip"] = df["grad_clip"].astype(float)
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce") if "seed" in df else np.nan
    df["status"] = df["status"].astype(str).str.upper() if "status" in df else "FINISHED"
    df["diverged"] = (df["diverged"].map(_truthy).fillna(False).astype(bool) if "diverged" in df
                      else False)
    df["learned"] = (df["learned"].map(_tristate).astype(object) if "learned" in df else None)
    for c in ("source", "budget_kind"):
        df[c] = df[c].fillna("unknown").astype(str) if c in df else "unknown"
    df["budget"] = pd.to_numeric(df["budget"], errors="coerce") if "budget" in df else np.nan
    df["budget_label"] = [budget_label(k, v) for k, v in zip(df["budget_kind"], df["budget"])]
    for c in METRIC_COLUMNS:
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df = _drop_superseded_failures(df)
    # learned from the baselines when no tag says it
    if "baseline_unigram_loss" in df and "final_val_loss" in df:
        derive = df["learned"].isna() & df["baseline_unigram_loss"].notna() & df["final_val_loss"].notna()
        df.loc[derive, "learned"] = (df.loc[derive, "final_val_loss"]
                                     < df.loc[derive, "baseline_unigram_loss"]).astype(object)
    return df.reset_index(drop=True)


def infrastructure_failures(runs: pd.DataFrame) -> pd.Series:
    """Which runs FAILED without diverging: an infrastructure error (a crash, a lost worker), not the
    configuration's outcome. Such a run has no result (`scaling sweep ... --retry-failed` reruns it)."""
    return runs["status"].eq("FAILED") & ~runs["diverged"].astype(bool)


def _drop_superseded_failures(df: pd.DataFrame) -> pd.DataFrame:
    """Infrastructure failures (:func:`infrastructure_failures`) of a configuration that also has a
    FINISHED or diverged run: that run is its result, so the failure is dropped here, unmentioned (a
    lone failure is left out of the analysis later, with a warning: nothing reran it)."""
    key = ["phase", "batch_size", "lr", "grad_clip", "seed", "budget"]
    outcome = df["status"].eq("FINISHED") | df["diverged"]
    has_outcome = outcome.groupby([df[k].fillna(-1) for k in key]).transform("any")
    return df[~(infrastructure_failures(df) & has_outcome)].copy()


def budget_label(kind, value) -> str:
    """``kind=value`` (``steps=10000``), or the kind alone when the value is unrecorded."""
    if isinstance(value, (int, float, np.integer, np.floating)) and np.isfinite(value):
        return f"{kind}={float(value):g}"
    return str(kind)


def _clip_value(v) -> float:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return math.nan
    if isinstance(v, str):
        if v.strip().lower() in ("", "none", "null", "off", "nan"):
            return math.nan
        try:
            return float(v)
        except ValueError:
            return math.nan
    return float(v)


def _truthy(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return False
    return bool(v)


def _tristate(v):
    """True / False / None from bools, numpy bools, "true"/"false"/"unknown" strings, NaN."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, str):
        s = v.strip().lower()
        return True if s in ("true", "1", "yes") else False if s in ("false", "0", "no") else None
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return bool(v)


def objective_values(runs: pd.DataFrame, metric: str) -> pd.Series:
    """The value to minimise per run: the metric, ``inf`` for a diverged run (worse than any loss), NaN
    when a run has no result: a finished run lacking the metric, or a run that failed without diverging
    (:func:`infrastructure_failures`)."""
    v = runs[metric].astype(float) if metric in runs else pd.Series(np.nan, index=runs.index)
    v = v.where(~runs["diverged"].astype(bool), math.inf)
    return v.where(~infrastructure_failures(runs), np.nan)


def series_labels(runs: pd.DataFrame) -> pd.Series:
    """A phase whose runs use several clip thresholds is split into one series per threshold
    (``2_5[clip=none]``): LR_opt is only defined at a fixed threshold."""
    labels = runs["phase"].copy()
    for phase, g in runs.groupby("phase"):
        clips = sorted({_clip_label(c) for c in g["grad_clip"]})
        if len(clips) > 1:
            labels.loc[g.index] = [f"{phase}[clip={_clip_label(c)}]" for c in g["grad_clip"]]
    return labels


def _clip_label(c) -> str:
    return clip_text(None if c is None or (isinstance(c, float) and math.isnan(c)) else float(c))


def budgets_of(runs: pd.DataFrame) -> list[str]:
    """Distinct budgets among runs, as ``kind=value`` strings (``unknown`` when unrecorded)."""
    labels = runs["budget_label"] if "budget_label" in runs else [
        budget_label(k, v) for k, v in zip(runs["budget_kind"], runs["budget"])]
    return sorted(set(labels))


def select_budget(runs: pd.DataFrame, spec: str) -> pd.DataFrame:
    """The runs of one budget: ``spec`` is ``kind=value`` (``tokens=2e6``) or a value alone
    (``10000``). ConfigError when a phase has no run of that budget (naming the ones it has)."""
    text = str(spec).strip()
    kind, _, value = text.rpartition("=")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"budget must be KIND=VALUE or VALUE (e.g. steps=10000), got {spec!r}") from None
    match = np.isclose(runs["budget"].astype(float), number, rtol=1e-9, atol=0)
    if kind:
        match &= runs["budget_kind"].eq(kind.strip())
    for phase, g in runs.groupby("phase"):
        if not match[g.index].any():
            raise ConfigError(f"phase {phase!r} has no runs of budget {text!r} (its budgets: "
                              f"{', '.join(budgets_of(g))})")
    return runs[match].copy()


# ---------------------------------------------------------------------------------------------
# Per configuration

#: What identifies a configuration's optimum (one per phase, batch size and budget).
OPTIMUM_KEY = ["phase", "batch_size", "budget_label"]
_MEANS = ("avg_clip_frequency", "avg_grad_norm_before", "avg_grad_norm_after", "val_loss_rise", "epochs")


def config_table(runs: pd.DataFrame, metric: str = "final_val_loss") -> pd.DataFrame:
    """One row per (phase, batch_size, budget_label, lr): ``loss`` the mean objective over the
    finished replicates (``inf`` when none finished: every one diverged), ``loss_std``
    their std, ``n_runs``, ``n_diverged``, the means of clip, overfitting and epoch metrics,
    ``learned`` (every replicate learned), ``run_ids``. ``runs`` must be normalized and carry a
    ``phase`` (series) label."""
    df = runs.assign(_y=objective_values(runs, metric))
    df = df[df["_y"].notna()].copy()
    df["_yf"] = df["_y"].where(np.isfinite(df["_y"]))
    df["_learned"] = [np.nan if _tristate(v) is None else float(_tristate(v)) for v in df["learned"]]
    for c in _MEANS:
        df[c] = df[c].where(np.isfinite(df[c])) if c in df else np.nan
    keys = [*OPTIMUM_KEY, "lr"]
    g = df.groupby(keys, sort=True)
    out = g.agg(loss=("_yf", "mean"), loss_std=("_yf", "std"), n_runs=("_y", "size"),
                n_finite=("_yf", "count"), grad_clip=("grad_clip", "first"),
                learned_min=("_learned", "min"), learned_n=("_learned", "count"),
                **{c: (c, "mean") for c in _MEANS}).reset_index()
    out["run_ids"] = g["run_id"].agg(list).to_numpy() if len(out) else []
    out["n_diverged"] = out["n_runs"] - out["n_finite"]
    out["loss"] = out["loss"].where(out["n_finite"] > 0, math.inf)
    out["learned"] = [None if n == 0 else bool(m == 1.0) for m, n in zip(out["learned_min"], out["learned_n"])]
    out["learned"] = out["learned"].astype(object)
    cols = [*keys, "loss", "loss_std", "n_runs", "n_diverged", "grad_clip", *_MEANS, "learned", "run_ids"]
    return out.reindex(columns=cols)


def regime(clip_frequency: float | None) -> str:
    """pre-saturation (< 0.5), transition (0.5–0.99), saturation (≥ 0.99); ``unknown`` without data."""
    if clip_frequency is None or not np.isfinite(clip_frequency):
        return "unknown"
    return next(name for bound, name in REGIMES if clip_frequency < bound)


# ---------------------------------------------------------------------------------------------
# The optimum per batch size


def quadratic_vertex(x: np.ndarray, y: np.ndarray, x_range: tuple[float, float],
                     groups: np.ndarray | None = None) -> dict[str, Any]:
    """Vertex of ``y = c_g + c1 x + c2 x²`` fitted by least squares to every observation, with one
    intercept ``c_g`` per group (seed) when ``groups`` is given. Returns ``x``, ``status`` (``ok``
    only when the parabola opens upward and the vertex lies inside ``x_range``), ``dof``, ``rss``,
    ``unit_var`` (the vertex's delta-method variance per unit noise variance) and ``se`` (from this
    fit's own residuals; NaN without residual degrees of freedom)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    out = {"x": math.nan, "se": math.nan, "dof": 0, "rss": 0.0, "unit_var": math.nan}
    if len(np.unique(x)) < 3:
        return {**out, "status": "too few LRs"}
    codes = np.zeros(len(x), int) if groups is None else np.unique(np.nan_to_num(
        np.asarray(groups, float), nan=-1.0), return_inverse=True)[1].ravel()
    x0 = float(np.mean(x))
    X = np.column_stack([np.eye(codes.max() + 1)[codes], x - x0, (x - x0) ** 2])
    coef, _, rank, _ = np.linalg.lstsq(X, y, rcond=None)
    c1, c2 = coef[-2:]
    dof = int(len(x) - rank)
    rss = float(np.sum((y - X @ coef) ** 2)) if dof > 0 else 0.0
    out.update(dof=dof, rss=rss)
    if not c2 > 0:
        return {**out, "status": "opens downward"}
    vertex = x0 - c1 / (2 * c2)
    if not (x_range[0] <= vertex <= x_range[1]):
        return {**out, "x": vertex, "status": "outside sampled range"}
    grad = np.zeros(X.shape[1])
    grad[-2:] = [-1 / (2 * c2), c1 / (2 * c2 ** 2)]
    unit = float(grad @ np.linalg.pinv(X.T @ X) @ grad)
    se = math.sqrt(rss / dof * unit) if dof > 0 and unit > 0 and rss > 0 else math.nan
    return {**out, "x": vertex, "se": se, "unit_var": unit, "status": "ok"}


def optimum_table(runs: pd.DataFrame, metric: str = "final_val_loss", window: int = 1,
                  overfit_threshold: float = 0.05, configs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (phase, batch_size, budget_label) with both optimum estimates.

    Columns: ``argmin_lr, argmin_loss, argmin_loss_std, argmin_n, argmin_n_diverged`` (the grid
    argmin of the mean objective), ``censored`` (``None``/``"low"``/``"high"``) and ``bound_lr``
    (the middle of the outer gap: a censored optimum lies beyond it), ``grid_res_se``, ``lr_min,
    lr_max, n_lrs``, ``vertex_lr, vertex_log_se, vertex_dof, vertex_status`` (quadratic in ln LR
    through the argmin and its ``window`` neighbours on each side, fitted to every finished
    replicate with one intercept per seed; its SE from the loss noise pooled over the phase's batch
    sizes, or its own where they differ), ``noise_sd, noise_dof`` (that noise), ``noise_pooled``,
    ``noise_pooled_sd``, ``noise_homogeneity_p`` (Bartlett's test over the batch sizes), ``clip_frequency``, ``regime``,
    ``learned``, ``val_loss_rise``, ``overfitting``, ``epochs``, ``repeated_data`` at the argmin."""
    configs = config_table(runs, metric) if configs is None else configs
    obs = runs.assign(_y=objective_values(runs, metric))
    obs = obs[np.isfinite(obs["_y"].astype(float))]
    obs_at = obs.groupby(OPTIMUM_KEY, sort=False).indices if len(obs) else {}
    o_lr, o_y, o_seed = (obs["lr"].to_numpy(float), obs["_y"].to_numpy(float), obs["seed"].to_numpy(float))
    columns = {c: configs[c].to_numpy() for c in ("lr", "loss", "loss_std", "n_runs", "n_diverged", "grad_clip",
                                                  "learned", "run_ids", *_MEANS)}
    rows = []
    for key, idx in (configs.groupby(OPTIMUM_KEY, sort=True).indices.items() if len(configs) else []):
        idx = idx[np.argsort(columns["lr"][idx], kind="stable")]
        at = obs_at.get(key, np.array([], int))
        rows.append(_optimum_row(key, {c: v[idx] for c, v in columns.items()}, (o_lr[at], o_y[at], o_seed[at]),
                                 window, overfit_threshold))
    out = _pool_noise(pd.DataFrame(rows)).reindex(columns=OPTIMUM_COLUMNS)
    for c in ("censored", "learned", "overfitting", "repeated_data"):  # keep None (not NaN) and Python bools
        out[c] = pd.Series([_none_if_nan(v) for v in out[c]], index=out.index, dtype=object)
    return out


OPTIMUM_COLUMNS = [
    "phase", "batch_size", "budget_label", "status", "n_lrs", "lr_min", "lr_max", "n_runs", "n_diverged",
    "argmin_lr", "argmin_loss", "argmin_loss_std", "argmin_n", "argmin_n_diverged", "grid_res_se", "censored",
    "bound_lr", "vertex_lr", "vertex_log_se", "vertex_dof", "vertex_status", "noise_sd", "noise_dof",
    "noise_pooled", "noise_pooled_sd", "noise_homogeneity_p", "grad_clip", "clip_frequency", "regime", "learned",
    "val_loss_rise", "overfitting", "epochs", "repeated_data", "argmin_run_ids", "_rss", "_dof", "_unit"]


def _optimum_row(key, g: dict[str, np.ndarray], obs: tuple, window: int, overfit_threshold: float) -> dict[str, Any]:
    """The optimum of one batch size from its configurations ``g`` (config_table's columns as arrays,
    sorted by LR) and its finished observations ``obs`` = (lr, objective, seed) arrays."""
    phase, b, budget = key
    lrs, losses = g["lr"].astype(float), g["loss"].astype(float)
    row: dict[str, Any] = {"phase": phase, "batch_size": int(b), "budget_label": budget, "n_lrs": len(lrs),
                           "lr_min": float(lrs[0]), "lr_max": float(lrs[-1]), "n_runs": int(g["n_runs"].sum()),
                           "n_diverged": int(g["n_diverged"].sum()), "_rss": 0.0, "_dof": 0, "_unit": math.nan}
    if not np.isfinite(losses).any():
        return {**row, "status": "all diverged", "argmin_loss": math.inf, "vertex_status": "all diverged"}
    i = int(np.argmin(np.where(np.isfinite(losses), losses, np.inf)))
    best = {c: v[i] for c, v in g.items()}
    ln = np.log(lrs)
    gaps = np.diff(ln)
    censored = "single LR" if len(lrs) == 1 else "low" if i == 0 else "high" if i == len(lrs) - 1 else None
    bound = {"low": ln[0] + gaps[0] / 2 if len(gaps) else math.nan,
             "high": ln[-1] - gaps[-1] / 2 if len(gaps) else math.nan}.get(censored, math.nan)
    # resolution of the grid argmin: the SD of a uniform over its cell (the LRs nearer to it than to
    # its neighbours, in ln LR); an edge cell counts its inner half twice (taken as a value, as the
    # 'all' fit takes it, an edge argmin is no more precise than an inner one)
    inner = [gaps[i - 1] / 2 if i > 0 else math.nan, gaps[i] / 2 if i < len(gaps) else math.nan]
    half = [h if np.isfinite(h) else next((v for v in inner if np.isfinite(v)), 0.0) for h in inner]
    epochs = float(best["epochs"])
    row.update({
        "status": "single LR" if censored == "single LR" else "ok", "censored": censored,
        "grid_res_se": float(sum(half) / math.sqrt(12)),
        "bound_lr": math.exp(bound) if np.isfinite(bound) else math.nan,
        "argmin_lr": float(lrs[i]), "argmin_loss": float(losses[i]), "argmin_loss_std": float(best["loss_std"]),
        "argmin_n": int(best["n_runs"]), "argmin_n_diverged": int(best["n_diverged"]),
        "clip_frequency": float(best["avg_clip_frequency"]), "regime": regime(best["avg_clip_frequency"]),
        "grad_clip": float(best["grad_clip"]), "learned": best["learned"],
        "val_loss_rise": float(best["val_loss_rise"]),
        "overfitting": (None if not np.isfinite(best["val_loss_rise"])
                        else bool(best["val_loss_rise"] > overfit_threshold)),
        "epochs": epochs, "repeated_data": None if not np.isfinite(epochs) else bool(epochs > MAX_EPOCHS),
        "argmin_run_ids": best["run_ids"],
    })
    if censored is not None:
        return {**row, "vertex_status": "censored" if censored != "single LR" else "too few LRs"}
    lo, hi = max(0, i - window), min(len(lrs) - 1, i + window)
    if not np.isfinite(losses[lo:hi + 1]).all():
        return {**row, "vertex_status": "a neighbour diverged"}
    o_lr, o_y, o_seed = obs
    sel = (o_lr >= lrs[lo]) & (o_lr <= lrs[hi])
    q = quadratic_vertex(np.log(o_lr[sel]), o_y[sel], (ln[0], ln[-1]), groups=o_seed[sel])
    return {**row, "vertex_lr": math.exp(q["x"]) if q["status"] == "ok" else math.nan,
            "vertex_status": q["status"], "_rss": q["rss"], "_dof": q["dof"], "_unit": q["unit_var"]}


# Below this p-value of Bartlett's test the batch sizes' loss noises differ (e.g. runs near an unstable LR scatter
# far more than the rest) and each vertex takes its own; above it one pooled noise serves every batch size.
NOISE_HOMOGENEITY_P = 0.01


def bartlett_p(rss: np.ndarray, dof: np.ndarray) -> float:
    """Bartlett's test that variances rss/dof (each with dof degrees of freedom) are equal: its p-value."""
    ok = (dof > 0) & (rss > 0)
    v, n = rss[ok] / dof[ok], dof[ok].astype(float)
    k = len(v)
    if k < 2:
        return 1.0
    pooled = v @ n / n.sum()
    m = n.sum() * math.log(pooled) - n @ np.log(v)
    c = 1 + (np.sum(1 / n) - 1 / n.sum()) / (3 * (k - 1))
    return float(stats.chi2.sf(m / c, k - 1))


def _pool_noise(out: pd.DataFrame) -> pd.DataFrame:
    """The loss noise of one run from a phase's vertex fits (their residuals around the quadratic, seeds'
    offsets removed): pooled over the batch sizes when they agree (:data:`NOISE_HOMOGENEITY_P`), else each
    batch size's own; ``noise_sd``, ``noise_dof``, ``noise_pooled``, and the vertices' SEs from it."""
    if not len(out):
        return out
    out = out.copy()
    rss = out.groupby("phase")["_rss"].transform("sum")
    dof = out.groupby("phase")["_dof"].transform("sum")
    p_by_phase = {ph: bartlett_p(g["_rss"].to_numpy(float), g["_dof"].to_numpy(float)) for ph, g in out.groupby("phase")}
    out["noise_homogeneity_p"] = out["phase"].map(p_by_phase)
    pooled = out["noise_homogeneity_p"] >= NOISE_HOMOGENEITY_P
    pooled_s2 = (rss / dof).where(dof > 0)
    s2 = pooled_s2.where(pooled, (out["_rss"] / out["_dof"]).where(out["_dof"] > 0))
    out["noise_sd"] = np.sqrt(s2)
    out["noise_dof"] = dof.where(pooled, out["_dof"]).fillna(0).astype(int)
    out["noise_pooled"] = pooled
    out["noise_pooled_sd"] = np.sqrt(pooled_s2)
    ok = out["vertex_status"].eq("ok") & (out["noise_dof"] > 0) & (s2 > 0)
    out["vertex_log_se"] = np.where(ok, np.sqrt(s2 * out["_unit"].astype(float)), np.nan)
    out["vertex_dof"] = np.where(ok, out["noise_dof"], 0).astype(int)
    return out


def _none_if_nan(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def estimate_points(optima: pd.DataFrame, estimator: str = "vertex") -> pd.DataFrame:
    """The per-batch-size values the fits use (one series' optima): ``batch_size, budget_label,
    x = ln B, y = ln LR_opt, se`` (its standard error: the vertex's, NaN for a vertex without
    replicates; for a grid argmin the SD of a uniform over a grid cell, the series' median cell, so
    that a slightly uneven grid does not weight its argmins unevenly), ``censored``, ``edge_y`` (ln
    of the argmin LR; the value the ``all`` fit uses for a censored point), ``bound_y`` (ln of the
    bound a censored optimum lies beyond), ``from`` (``vertex``/``argmin``), ``vertex_y,
    vertex_se`` (for the law comparison), ``learned``. ``vertex``: the vertex where it exists, else the argmin; ``argmin``: the argmin."""
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    ok = optima[optima["status"].to_numpy() == "ok"]
    col = {c: ok[c].to_numpy() for c in ("batch_size", "budget_label", "vertex_status", "vertex_lr", "vertex_log_se",
                                         "argmin_lr", "grid_res_se", "bound_lr", "censored", "learned")}
    has_v = col["vertex_status"] == "ok"
    use_v = has_v & (estimator == "vertex")
    with np.errstate(all="ignore"):
        v_y = np.where(has_v, np.log(col["vertex_lr"].astype(float)), np.nan)
        edge = np.log(col["argmin_lr"].astype(float))
        bound = np.log(col["bound_lr"].astype(float))
    v_se = np.where(has_v, col["vertex_log_se"].astype(float), np.nan)
    return pd.DataFrame({
        "batch_size": col["batch_size"].astype(int), "budget_label": col["budget_label"],
        "x": np.log(col["batch_size"].astype(float)), "y": np.where(use_v, v_y, edge),
        "se": np.where(use_v, v_se, np.median(col["grid_res_se"].astype(float)) if len(ok) else np.nan),
        "censored": pd.array([_none_if_nan(v) for v in col["censored"]], dtype=object), "edge_y": edge,
        "bound_y": bound, "from": np.where(use_v, "vertex", "argmin"), "vertex_y": v_y, "vertex_se": v_se,
        "learned": pd.array([_none_if_nan(v) for v in col["learned"]], dtype=object)})


# ---------------------------------------------------------------------------------------------
# Power-law fits


@functools.lru_cache(maxsize=256)
def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided ``confidence`` quantile of Student's t with ``dof`` degrees of freedom."""
    return float(stats.t.ppf(0.5 + confidence / 2, dof)) if dof > 0 else math.nan


def _wls(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> dict[str, Any]:
    """Weighted least squares of y = a + b x: a, b, the weighted residual sum Q, (XᵀWX)⁻¹, R²."""
    sw = w.sum()
    xm, ym = (w * x).sum() / sw, (w * y).sum() / sw
    sxx = float((w * (x - xm) ** 2).sum())
    b = float((w * (x - xm) * (y - ym)).sum() / sxx)
    a = float(ym - b * xm)
    resid = y - a - b * x
    q = float((w * resid ** 2).sum())
    ss_tot = float((w * (y - ym) ** 2).sum())
    inv = np.array([[1 / sw + xm ** 2 / sxx, -xm / sxx], [-xm / sxx, 1 / sxx]])
    return {"a": a, "b": b, "Q": q, "inv": inv, "r2": 1 - q / ss_tot if ss_tot > 0 else math.nan}


def paule_mandel_tau2(x: np.ndarray, y: np.ndarray, se2: np.ndarray) -> float:
    """Between-point variance τ² of a random-effects meta-regression y_i = a + b x_i + u_i + e_i
    (u ~ N(0, τ²), e_i ~ N(0, se2_i) known): the τ² ≥ 0 at which the weighted residual sum with
    weights 1/(τ² + se2) equals its n − 2 degrees of freedom (Paule & Mandel 1982)."""
    dof = len(x) - 2
    ols = _wls(x, y, np.ones_like(x))
    if not np.any(se2 > 0):
        return ols["Q"] / dof
    excess = lambda t: _wls(x, y, 1 / (t + se2))["Q"] - dof
    hi = ols["Q"] / dof + float(se2.max())  # Q(hi) <= RSS_ols / (RSS_ols / dof) = dof
    lo = 0.0 if np.all(se2 > 0) else 1e-12 * hi  # a point without SE: infinite weight at τ² = 0
    if excess(lo) <= 0:
        return lo
    return float(optimize.brentq(excess, lo, hi, xtol=1e-12 * max(hi, 1e-12)))


def meta_regression(x: np.ndarray, y: np.ndarray, se: np.ndarray | None = None,
                    confidence: float = 0.95) -> dict[str, Any]:
    """Line y = a + b x through points with standard errors ``se`` (NaN or None: unknown, taken as
    0) and a scatter τ² between points estimated by Paule–Mandel: weights 1/(τ² + se²), covariance
    max(1, Q/(n−2))·(XᵀWX)⁻¹ (the modified Knapp–Hartung variance), t interval with n − 2 dof.
    Without SEs this is ordinary least squares with its t interval. ``degenerate`` when the points
    lie exactly on a line and carry no SE (nothing to estimate an error from)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    se2 = np.zeros_like(x) if se is None else np.where(np.isfinite(se), np.asarray(se, float) ** 2, 0.0)
    tau2 = paule_mandel_tau2(x, y, se2)
    v = tau2 + se2
    dof = len(x) - 2
    if not np.all(v > 1e-18):  # an SD below 1e-9 in ln LR: the points lie exactly on a line
        return {"degenerate": True, "tau2": tau2, "dof": dof}
    f = _wls(x, y, 1 / v)
    scale = max(1.0, f["Q"] / dof)
    t = t_quantile(confidence, dof)
    cov = scale * f["inv"]
    return {"degenerate": False, "a": f["a"], "b": f["b"], "cov": cov, "tau2": tau2, "scale": scale,
            "dof": dof, "t_crit": t, "r2": f["r2"], "weighted": bool(np.any(se2 > 0)),
            "beta_se": math.sqrt(cov[1, 1]), "log_C_se": math.sqrt(cov[0, 0])}


def bootstrap_slope(x: np.ndarray, y: np.ndarray, w: np.ndarray | None, n_resamples: int,
                    seed: int, confidence: float = 0.95) -> dict[str, Any]:
    """Pairs bootstrap over the fit's points (configurations = batch sizes): resample them with
    replacement (numpy ``default_rng(seed)``), refit the (weighted, weights ``w`` kept) slope, take
    the percentile interval. Resamples with a single distinct batch size have no slope and are
    skipped (counted). With a handful of points this is *not* a 95% interval (it covers less)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n_resamples <= 0 or n < 2:
        return {"ci": [math.nan, math.nan], "resamples": int(max(n_resamples, 0)), "valid": 0}
    w = np.ones(n) if w is None else np.asarray(w, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    xs, ys, ws = x[idx], y[idx], w[idx]
    sw = ws.sum(1)
    xm, ym = (ws * xs).sum(1) / sw, (ws * ys).sum(1) / sw
    sxx = (ws * (xs - xm[:, None]) ** 2).sum(1)
    ok = sxx > 1e-12 * max(1.0, float(np.var(x)))
    slopes = (ws * (xs - xm[:, None]) * (ys - ym[:, None])).sum(1)[ok] / sxx[ok]
    alpha = 1 - confidence
    ci = (np.quantile(slopes, [alpha / 2, 1 - alpha / 2]).tolist() if len(slopes) else [math.nan, math.nan])
    return {"ci": [float(v) for v in ci], "resamples": int(n_resamples), "valid": int(ok.sum())}


def theory_comparison(ci: Iterable[float] | None, alpha: float | None = None) -> list[dict[str, Any]]:
    """For each theory value of β: is it outside the interval ``ci``? (None when the interval is
    unknown or not a calibrated interval: pass ``None``.) With a measured tail index α > 0, also
    β = 1 − 1/α."""
    lo, hi = (list(ci or []) + [math.nan, math.nan])[:2]
    theories = list(THEORY)
    if alpha is not None and np.isfinite(alpha) and alpha > 0:
        theories.append(("tail_index", 1 - 1 / alpha, f"measured tail index alpha = {alpha:.3g} (beta = 1 - 1/alpha)"))
    known = lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi))
    return [{"name": name, "beta": beta, "description": what,
             "excluded": (not (lo <= beta <= hi)) if known else None} for name, beta, what in theories]


def _fit_base(kind: str, pts: pd.DataFrame, estimator: str, confidence: float) -> dict[str, Any]:
    bs = [int(b) for b in pts["batch_size"].to_numpy()]
    cens = [c in ("low", "high") for c in pts["censored"].to_numpy()]
    learned = pts["learned"].to_numpy()
    return {"kind": kind, "estimator": estimator, "n_points": len(bs), "batch_sizes": bs,
            "local_to": [min(bs), max(bs)] if bs else None,
            "n_censored": int(sum(cens)), "n_uncensored": len(bs) - int(sum(cens)),
            "censored_batch_sizes": [b for b, c in zip(bs, cens) if c],
            "unlearned_batch_sizes": [b for b, v in zip(bs, learned) if _tristate(v) is False],
            "confidence": confidence}


def _not_fitted(base: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
    return {**base, "status": status, "reason": reason, "theory": theory_comparison(None)}


def fit_power(points: pd.DataFrame, kind: str = "all", bootstrap: int = 0, seed: int = 0,
              confidence: float = 0.95, alpha: float | None = None, estimator: str = "vertex") -> dict[str, Any]:
    """ln LR_opt = ln C + β ln B over ``points`` (from :func:`estimate_points`) by
    :func:`meta_regression`. ``kind="all"`` uses every point, censored ones at their edge LR (the
    study's method: its interval is then not calibrated and excludes no theory value);
    ``"uncensored"`` drops them. ``status``: ``ok``, ``not enough points`` (< 3 batch sizes) or
    ``degenerate`` (every point censored, or an exact line without SEs: no interval)."""
    if kind not in ("all", "uncensored"):
        raise ValueError(kind)
    pts = points if kind == "all" else points[points["censored"].isna()]
    base = _fit_base(kind, pts, estimator, confidence)
    if len(pts) < MIN_POINTS:
        return _not_fitted(base, NOT_ENOUGH, f"{len(pts)} usable batch size(s); a fit needs at least {MIN_POINTS}")
    if base["n_uncensored"] == 0:
        return _not_fitted(base, DEGENERATE, f"every one of the {len(pts)} optima is censored (on the grid's "
                                              f"edge): their edges are bounds, not values, and fix no slope")
    x, y, se = pts["x"].to_numpy(float), pts["y"].to_numpy(float), pts["se"].to_numpy(float)
    m = meta_regression(x, y, se, confidence)
    if m["degenerate"] or not m["beta_se"] > 0:
        return _not_fitted(base, DEGENERATE, "the optima lie exactly on a line and carry no standard error: "
                                             "there is no error to make an interval from")
    t, b, a = m["t_crit"], m["b"], m["a"]
    ci = [b - t * m["beta_se"], b + t * m["beta_se"]]
    calibrated = base["n_censored"] == 0
    out = {**base, "status": "ok", "rests_on_censored": not calibrated,
           "method": "random-effects meta-regression" if m["weighted"] else "least squares",
           "weighted": m["weighted"], "tau2": m["tau2"], "kh_scale": m["scale"],
           "beta": b, "beta_se": m["beta_se"], "log_C": a, "log_C_se": m["log_C_se"], "C": math.exp(a),
           "cov": m["cov"].tolist(), "r2": m["r2"], "dof": m["dof"], "t_crit": t,
           "beta_ci_t": ci, "beta_ci": ci, "interval_method": "t (modified Knapp-Hartung)",
           "interval_calibrated": calibrated,
           "interval_note": None if calibrated else (f"rests on {base['n_censored']} censored optimum/optima taken "
                                                     f"at the edge LR: not a 95% interval for beta"),
           "C_ci_t": [math.exp(a - t * m["log_C_se"]), math.exp(a + t * m["log_C_se"])],
           "theory": theory_comparison(ci if calibrated else None, alpha)}
    return {**out, **_bootstrap_fields(x, y, se, m["tau2"], bootstrap, seed, confidence)}


def _bootstrap_fields(x, y, se, tau2, n_resamples, seed, confidence) -> dict[str, Any]:
    v = tau2 + np.where(np.isfinite(se), se ** 2, 0.0)
    w = 1 / v if np.all(v > 0) else None
    boot = bootstrap_slope(x, y, w, n_resamples, seed, confidence) if n_resamples > 0 else None
    return {"beta_ci_bootstrap": boot["ci"] if boot else None,
            "bootstrap_resamples": int(n_resamples), "bootstrap_valid": boot["valid"] if boot else 0,
            "bootstrap_seed": seed,
            "bootstrap_note": ("pairs bootstrap percentile interval over the batch sizes: with this few "
                               "points it covers less than its nominal level (not a 95% interval)") if boot else None}


# ---------------------------------------------------------------------------------------------
# The censored fit

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
#: The scatter σ the profile likelihood searches over (ln LR), geometric: 40 steps of ×1.29.
_SIGMA_GRID = np.geomspace(SIGMA_FLOOR, 20.0, 40)
#: How far from its start the censored fit looks for β (either side).
_BETA_REACH = 40.0


@dataclass
class CensoredData:
    """The data of a censored fit: per point ``x`` = ln B, ``y`` (ln LR_opt, or for a censored
    point the bound it lies beyond), ``cens`` (0; +1 above its bound; −1 below), ``se2`` (the
    known variance of an uncensored value; 0 when unknown)."""
    x: np.ndarray
    y: np.ndarray
    cens: np.ndarray
    se2: np.ndarray

    @classmethod
    def from_points(cls, pts: pd.DataFrame) -> CensoredData:
        c = pts["censored"].to_numpy()
        cens = np.array([1 if v == "high" else -1 if v == "low" else 0 for v in c], int)
        y = np.where(cens == 0, pts["y"].to_numpy(float), pts["bound_y"].to_numpy(float))
        se = pts["se"].to_numpy(float)
        return cls(pts["x"].to_numpy(float), y, cens, np.where((cens == 0) & np.isfinite(se), se ** 2, 0.0))


def calibrated_cutoff(n: int, confidence: float = 0.95) -> float:
    """The likelihood-ratio cutoff n·ln(1 + t²/(n − 2)), t the t quantile with n − 2 dof: for a
    line fitted to n exact points with σ estimated by maximum likelihood, the profile interval at
    this cutoff *is* the t interval (the χ²₁ cutoff is too small at small n). The censored fit uses
    n = its number of uncensored points."""
    t = t_quantile(confidence, n - 2)
    return n * math.log1p(t * t / (n - 2))


def censored_profile(betas, d: CensoredData) -> dict[str, np.ndarray]:
    """Profile log-likelihood of ln LR_opt,i ~ N(ln C + β x_i, σ² + se2_i) (censored points: the
    probability of lying beyond their bound, with variance σ²) at each β: the maximum over σ (a
    log grid from SIGMA_FLOOR, refined by a parabola) and ln C (Newton steps: the likelihood is
    concave in it). Returns ``loglik``, ``log_C``, ``sigma``, ``at_floor`` per β."""
    betas = np.atleast_1d(np.asarray(betas, float))
    ex = d.cens == 0
    v = _SIGMA_GRID[:, None] ** 2 + np.where(ex, d.se2, 0.0)[None, :]  # σ grid × points
    r = d.y[None, :] - betas[:, None] * d.x[None, :]  # β × points
    wx, rx, rc = 1 / v[:, ex], r[:, ex], r[:, ~ex]
    sdc, sg = np.sqrt(v[:, ~ex]), d.cens[~ex].astype(float)
    a = (rx @ wx.T) / wx.sum(1)  # β × σ: start at the weighted mean of the uncensored residuals
    with np.errstate(all="ignore"):
        for _ in range(8 if sg.size else 0):  # without censored points the start is the maximum
            z = np.clip(sg * (a[..., None] - rc[:, None, :]) / sdc, -1e6, 1e6)
            lam = np.exp(-0.5 * z * z - _LOG_SQRT_2PI - log_ndtr(z))  # inverse Mills ratio
            grad = ((rx[:, None, :] - a[..., None]) * wx).sum(-1) + (sg * lam / sdc).sum(-1)
            hess = -wx.sum(1)[None, :] - (lam * (z + lam) / sdc ** 2).sum(-1)
            a = a - grad / hess
        dx = rx[:, None, :] - a[..., None]
        ll = -0.5 * (dx * dx * wx).sum(-1) - 0.5 * np.log(v[:, ex]).sum(1) - _LOG_SQRT_2PI * ex.sum()
        if sg.size:
            ll = ll + log_ndtr(sg * (a[..., None] - rc[:, None, :]) / sdc).sum(-1)
    return _max_over_sigma(np.where(np.isfinite(ll), ll, -np.inf), a)


def _max_over_sigma(ll: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    rows = np.arange(ll.shape[0])
    k = ll.argmax(1)
    kk = np.clip(k, 1, ll.shape[1] - 2)
    l0, l1, l2 = ll[rows, kk - 1], ll[rows, kk], ll[rows, kk + 1]
    den = l0 - 2 * l1 + l2
    inner = (k > 0) & (k < ll.shape[1] - 1) & (den < 0) & np.isfinite(den)
    with np.errstate(all="ignore"):
        shift = np.where(inner, 0.5 * (l0 - l2) / den, 0.0)
        top = np.where(inner, l1 - 0.25 * (l0 - l2) * shift, ll[rows, k])
    step = math.log(_SIGMA_GRID[1] / _SIGMA_GRID[0])
    return {"loglik": np.maximum(top, ll[rows, k]), "log_C": a[rows, k],
            "sigma": _SIGMA_GRID[k] * np.exp(shift * step), "at_floor": k == 0}


def _censored_mle(d: CensoredData) -> dict[str, Any]:
    """β̂ by the profile: a coarse grid reaching ±_BETA_REACH around the uncensored points' slope,
    then two finer grids around its best point."""
    ex = d.cens == 0
    b0 = float(np.polyfit(d.x[ex], d.y[ex], 1)[0])
    reach = np.geomspace(0.01, _BETA_REACH, 20)
    grid = np.concatenate([b0 - reach[::-1], [b0], b0 + reach])
    coarse = censored_profile(grid, d)["loglik"]
    j = int(np.argmax(coarse))
    lo, hi = grid[max(j - 1, 0)], grid[min(j + 1, len(grid) - 1)]
    for _ in range(2):
        fine = np.linspace(lo, hi, 9)
        prof = censored_profile(fine, d)
        jj = int(np.argmax(prof["loglik"]))
        lo, hi = fine[max(jj - 1, 0)], fine[min(jj + 1, 8)]
    at = {k: v[jj] for k, v in prof.items()}
    return {"beta": float(fine[jj]), "loglik": float(at["loglik"]), "log_C": float(at["log_C"]),
            "sigma": float(at["sigma"]), "at_floor": bool(at["at_floor"]), "at_edge": j in (0, len(grid) - 1),
            "grid": grid, "grid_loglik": coarse}


def _profile_interval(d: CensoredData, mle: dict[str, Any], cutoff: float) -> list[float]:
    """Where the profile log-likelihood falls ``cutoff``/2 below its maximum, either side of β̂
    (bracketed on the coarse grid, narrowed twice, then interpolated); ±inf where it never does
    within _BETA_REACH."""
    target = mle["loglik"] - cutoff / 2
    grid, ll, b = mle["grid"], mle["grid_loglik"], mle["beta"]
    brackets: list[list[float] | None] = []
    for side in (-1, 1):
        on = (grid - b) * side > 0
        order = np.argsort(np.abs(grid[on] - b))
        gs, ls = grid[on][order], ll[on][order]
        below = np.nonzero(ls < target)[0]
        brackets.append(None if not len(below) else
                        [b if below[0] == 0 else gs[below[0] - 1], gs[below[0]], mle["loglik"], ls[below[0]]])
    live = [br for br in brackets if br is not None]
    for _ in range(2):
        if not live:
            break
        pts = [np.linspace(br[0], br[1], 9) for br in live]
        values = censored_profile(np.concatenate(pts), d)["loglik"]
        for m, (br, bs) in enumerate(zip(live, pts)):
            seg = values[9 * m:9 * m + 9]
            q = max(1, int(np.argmax(seg < target)) if (seg < target).any() else 8)
            br[:] = [bs[q - 1], bs[q], seg[q - 1], seg[q]]
    ci = []
    for side, br in zip((-1, 1), brackets):
        if br is None:
            ci.append(side * math.inf)
            continue
        frac = (br[2] - target) / (br[2] - br[3]) if br[2] != br[3] else 0.5
        ci.append(float(br[0] + min(max(frac, 0.0), 1.0) * (br[1] - br[0])))
    return sorted(ci)


def fit_censored(points: pd.DataFrame, confidence: float = 0.95, alpha: float | None = None,
                 estimator: str = "vertex") -> dict[str, Any]:
    """Tobit-style maximum likelihood of ln LR_opt = ln C + β ln B + u + e, u ~ N(0, σ²) the scatter
    between batch sizes, e ~ N(0, SE_i²): an uncensored point contributes its density, a point
    censored high the probability that its optimum lies above its bound (the middle of the grid's
    outer gap), censored low below it. β's interval: the profile likelihood at the
    :func:`calibrated_cutoff` of the uncensored points (the t interval when nothing is censored);
    ±inf where the data do not bound β. ``not identifiable`` (no β, no theory excluded) when fewer
    than 3 optima are uncensored, or when σ sits at its floor while an uncensored point has no SE
    (a line through them makes the likelihood unbounded)."""
    base = {**_fit_base("censored", points, estimator, confidence), "method": "tobit_mle"}
    n_unc = base["n_uncensored"]
    if len(points) < MIN_POINTS:
        return _not_fitted(base, NOT_ENOUGH, f"{len(points)} usable batch size(s); the censored fit needs at "
                                             f"least {MIN_POINTS}")
    if n_unc < MIN_POINTS:
        return _not_fitted(base, NOT_IDENTIFIABLE, f"{n_unc} uncensored optimum/optima: the fit rests on bounds, "
                                                   f"and needs at least {MIN_POINTS} values")
    d = CensoredData.from_points(points)
    mle = _censored_mle(d)
    if mle["at_floor"] and np.any(d.se2[d.cens == 0] == 0):
        return _not_fitted({**base, "sigma_at_floor": True}, NOT_IDENTIFIABLE,
                           "the scatter sigma sits at its floor: a line passes through every uncensored optimum "
                           "and honours every bound, and the likelihood grows without limit")
    if mle["at_edge"]:
        return _not_fitted(base, NOT_IDENTIFIABLE, f"the likelihood rises as far as |beta| = {_BETA_REACH:g}")
    cutoff = calibrated_cutoff(n_unc, confidence)
    ci = _profile_interval(d, mle, cutoff)
    return {**base, "status": "ok", "beta": mle["beta"], "log_C": mle["log_C"], "C": math.exp(mle["log_C"]),
            "sigma": mle["sigma"], "sigma_at_floor": mle["at_floor"], "loglik": mle["loglik"],
            "weighted": bool(np.any(d.se2 > 0)), "beta_ci_lr": ci, "beta_ci": ci, "cutoff": cutoff,
            "cutoff_n": n_unc, "interval_method": "profile likelihood, t-calibrated cutoff",
            "interval_calibrated": True, "rests_on_censored": base["n_censored"] > 0,
            "theory": theory_comparison(ci, alpha)}


# ---------------------------------------------------------------------------------------------
# Which law? power / saturating (McCandlish et al. 2018) / surge (Li et al. 2024)


def _logcosh(z):
    z = np.abs(z)
    return z + np.log1p(np.exp(-2 * z)) - math.log(2)


def law_power(x, log_c, beta):
    """ln LR = ln C + β ln B."""
    return log_c + beta * x


def law_saturating(x, log_eps, log_bn, a):
    """ln LR = ln ε_max − a ln(1 + B_noise / B) (McCandlish et al. 2018)."""
    return log_eps - a * np.logaddexp(0.0, log_bn - x)


def law_surge(x, log_eps, log_bn):
    """ln LR = ln ε_max − ln(½(√(B_noise/B) + √(B/B_noise))) = ln ε_max − ln cosh(½ ln(B_noise/B))
    (Li et al., NeurIPS 2024): rises, peaks at B = B_noise, falls."""
    return log_eps - _logcosh(0.5 * (log_bn - x))


#: name → (function of (x, *params), parameter names in log space, description)
LAWS: dict[str, tuple[Any, tuple[str, ...], str]] = {
    "power": (law_power, ("log_C", "beta"), "LR_opt = C * B^beta"),
    "saturating_a1": (lambda x, e, n: law_saturating(x, e, n, 1.0), ("log_eps_max", "log_B_noise"),
                      "LR_opt = eps_max / (1 + B_noise/B)  (a = 1, SGD)"),
    "saturating_a1_2": (lambda x, e, n: law_saturating(x, e, n, 0.5), ("log_eps_max", "log_B_noise"),
                        "LR_opt = eps_max / (1 + B_noise/B)^(1/2)  (a = 1/2, Adam)"),
    "saturating_free": (law_saturating, ("log_eps_max", "log_B_noise", "a"),
                        "LR_opt = eps_max / (1 + B_noise/B)^a  (a free)"),
    "surge": (law_surge, ("log_eps_max", "log_B_noise"),
              "LR_opt = eps_max / (0.5 (sqrt(B_noise/B) + sqrt(B/B_noise)))"),
}


def _law_bounds(name: str, x: np.ndarray, y: np.ndarray):
    if name == "power":
        return None
    lo_x, hi_x = float(x.min()), float(x.max())
    span = max(hi_x - lo_x, 1.0)
    bn = (lo_x - 3 * span, hi_x + 3 * span)
    eps = (float(y.min()) - 20.0, float(y.max()) + 20.0)
    if name == "saturating_free":
        return ([eps[0], bn[0], 0.0], [eps[1], bn[1], 5.0])
    return ([eps[0], bn[0]], [eps[1], bn[1]])


def _law_profile(name: str, x: np.ndarray, y: np.ndarray, w: np.ndarray, log_bn: np.ndarray):
    """For data sets ``y`` (D × n) and ln B_noise values ``log_bn`` (D × G): the law's other
    parameters by weighted least squares (they enter linearly once B_noise is fixed; ``a`` of the
    free saturating law kept in its bounds) → (parameters D × G × p in the law's order, weighted
    residual sums D × G)."""
    lo, hi = _law_bounds(name, x, y)
    bn = log_bn[..., None]
    yy = y[:, None, :]
    ym = (w * y).sum(-1)[:, None] / w.sum()
    with np.errstate(all="ignore"):
        if name == "saturating_free":  # y = e − a·softplus(ln B_noise − x): linear in (e, a)
            s = np.logaddexp(0.0, bn - x)
            ds = s - ((s * w).sum(-1) / w.sum())[..., None]
            a = -(w * ds * (yy - ym[..., None])).sum(-1) / (w * ds ** 2).sum(-1)
            a = np.clip(np.nan_to_num(a, nan=1.0), lo[2], hi[2])
            e = ym + a * (s * w).sum(-1) / w.sum()
            pred, theta = e[..., None] - a[..., None] * s, np.stack([e, log_bn, a], -1)
        else:
            g = LAWS[name][0](x, 0.0, bn)
            e = (w * (yy - g)).sum(-1) / w.sum()
            pred, theta = e[..., None] + g, np.stack([e, log_bn], -1)
        wrss = (w * (yy - pred) ** 2).sum(-1)
    return theta, np.where(np.isfinite(wrss), wrss, np.inf)


def fit_law_batch(name: str, x: np.ndarray, y: np.ndarray, w: np.ndarray, grid_points: int = 121):
    """The law's least-squares parameters for each data set ``y`` (D × n) at once → (parameters
    D × p, weighted residual sums D): closed form for the power law; for the others the best point
    of the exact profile over ln B_noise, on a grid refined twice (21 points across the best
    point's neighbouring intervals each time)."""
    y = np.atleast_2d(y)
    if name == "power":
        sw = w.sum()
        xm, ym = (w * x).sum() / sw, (w * y).sum(-1) / sw
        b = (w * (x - xm) * (y - ym[:, None])).sum(-1) / (w * (x - xm) ** 2).sum()
        a = ym - b * xm
        return np.column_stack([a, b]), (w * (y - a[:, None] - b[:, None] * x) ** 2).sum(-1)
    lo, hi = _law_bounds(name, x, y)
    grid = np.broadcast_to(np.linspace(lo[1], hi[1], grid_points), (len(y), grid_points))
    rows = np.arange(len(y))
    for _ in range(3):
        theta, wrss = _law_profile(name, x, y, w, grid)
        j = np.argmin(wrss, 1)
        left, right = grid[rows, np.maximum(j - 1, 0)], grid[rows, np.minimum(j + 1, grid.shape[1] - 1)]
        grid = left[:, None] + (right - left)[:, None] * np.linspace(0, 1, 21)
    return theta[rows, j], wrss[rows, j]


def _fit_law_params(name: str, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    return fit_law_batch(name, x, y[None, :], w)[0][0]


def _law_jacobian(name: str, x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    fn = LAWS[name][0]
    h = 1e-6 * np.maximum(1.0, np.abs(theta))
    cols = []
    for j in range(len(theta)):
        up, dn = theta.copy(), theta.copy()
        up[j] += h[j]
        dn[j] -= h[j]
        cols.append((fn(x, *up) - fn(x, *dn)) / (2 * h[j]))
    return np.column_stack(cols)


def law_weights(se: np.ndarray | None, tau2: float) -> np.ndarray | None:
    """1/(τ² + SE²) when every point has an SE (τ² the scatter of the power fit on the same points),
    else None (equal weights)."""
    if se is None or not np.all(np.isfinite(se)) or not np.all(tau2 + np.asarray(se) ** 2 > 0):
        return None
    return 1 / (tau2 + np.asarray(se, float) ** 2)


def fit_law(name: str, x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None,
            confidence: float = 0.95, loo: bool = True) -> dict[str, Any]:
    """Fit one law by weighted least squares in ln LR (weights ``w``, default equal; the nonlinear
    laws through their exact profile over ln B_noise, :func:`_fit_law_params`).

    Parameter intervals: Wald t intervals (n − p dof) from the Jacobian covariance scaled by the
    residual variance, reported on the natural scale (ε_max, B_noise, C exponentiated): approximate
    for the nonlinear laws. AICc with K = p + 1 (σ counted): ``None`` when n ≤ K + 1. Leave-one-out:
    RMS error of each point predicted from a fit to the others."""
    fn, pnames, desc = LAWS[name]
    x, y = np.asarray(x, float), np.asarray(y, float)
    n, p = len(x), len(pnames)
    weighted = w is not None
    w = np.ones(n) if w is None else np.asarray(w, float)
    out: dict[str, Any] = {"law": name, "formula": desc, "k": p, "n_points": n}
    if n < p + 1:
        return {**out, "status": NOT_ENOUGH, "reason": f"{n} points for {p} parameters"}
    theta = _fit_law_params(name, x, y, w)
    resid = y - fn(x, *theta)
    wrss = float(np.sum(w * resid ** 2))
    dof = n - p
    J = _law_jacobian(name, x, theta) * np.sqrt(w)[:, None]
    try:
        cov = np.linalg.inv(J.T @ J) * (wrss / dof)
    except np.linalg.LinAlgError:
        cov = np.full((p, p), math.nan)
    bounds = _law_bounds(name, x, y)
    at_bound = [pn for j, pn in enumerate(pnames) if bounds is not None
                and min(abs(theta[j] - bounds[0][j]), abs(theta[j] - bounds[1][j])) < 1e-6]
    t = t_quantile(confidence, dof)
    score = aicc(wrss, n, p)
    xs = np.array([x.min(), 0.5 * (x.min() + x.max()), x.max()])
    local = (fn(xs + 1e-4, *theta) - fn(xs - 1e-4, *theta)) / 2e-4
    return {**out, "status": "ok", "params": _law_params(pnames, theta, cov, t), "theta": [float(v) for v in theta],
            "cov": [[float(c) for c in row] for row in cov], "dof": dof, "t_crit": t,
            "interval_method": "Wald t (approximate for the nonlinear laws)",
            "wrss": wrss, "rmse": float(math.sqrt(np.mean(resid ** 2))),
            "aicc": None if score is None else float(score),
            "loo_rmse": _loo_rmse(name, x, y, w) if loo else None,
            "at_bound": at_bound, "weighted": weighted,
            "local_beta": {"at_B": [float(math.exp(v)) for v in xs], "beta": [float(v) for v in local]}}


def _law_params(pnames, theta, cov, t) -> dict[str, Any]:
    params = {}
    for j, pn in enumerate(pnames):
        v = float(theta[j])
        s = float(math.sqrt(cov[j, j])) if np.isfinite(cov[j, j]) and cov[j, j] >= 0 else math.nan
        lo, hi = v - t * s, v + t * s
        if pn.startswith("log_"):
            params[pn[4:]] = {"value": math.exp(v), "ci": [_exp(lo), _exp(hi)], "log_value": v, "log_se": s}
        else:
            params[pn] = {"value": v, "ci": [lo, hi], "se": s}
    return params


def _loo_rmse(name, x, y, w) -> float | None:
    n, p = len(x), len(LAWS[name][1])
    if n - 1 < p + 1:
        return None
    errs = []
    for i in range(n):
        m = np.arange(n) != i
        theta = _fit_law_params(name, x[m], y[m], w[m])
        errs.append(float(y[i] - LAWS[name][0](x[i:i + 1], *theta)[0]))
    return float(math.sqrt(np.mean(np.square(errs))))


def _exp(v):
    try:
        return math.exp(v) if np.isfinite(v) else (math.inf if v > 0 else 0.0) if not math.isnan(v) else math.nan
    except OverflowError:
        return math.inf


def aicc(wrss, n: int, k: int):
    """AICc of a least-squares fit with ``k`` parameters and σ (K = k + 1); None when n ≤ K + 1."""
    K = k + 1
    if n - K - 1 <= 0:
        return None
    return n * np.log(np.maximum(wrss, 1e-300) / n) + 2 * K + 2 * K * (K + 1) / (n - K - 1)


@dataclass
class LawEvidence:
    """The data of a law comparison, for the parametric bootstrap of :meth:`p_value`."""
    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    seed: int = 0
    draws: int = 100

    def p_value(self, models: dict[str, dict[str, Any]], winner: str, rival: str,
                others: Iterable[str] = ()) -> float:
        """How often data generated by the ``rival`` law as fitted (its residual scale, the
        weights' shape) make the best of ``winner`` and ``others`` beat it by at least the observed
        AICc difference of ``winner``: small means that difference is not the rival fitting noise
        worse by chance (the best of several laws is compared, as the winner was picked among them)."""
        n, r = len(self.x), models[rival]
        scale = np.sqrt(r["wrss"] / (n - r["k"]) / self.w)
        rng = np.random.default_rng([self.seed, *(ord(c) for c in winner + "|" + rival)])
        ys = LAWS[rival][0](self.x, *r["theta"]) + rng.standard_normal((self.draws, n)) * scale
        best = np.full(self.draws, np.inf)
        for name in dict.fromkeys([winner, *others]):
            if name != rival:
                best = np.minimum(best, aicc(fit_law_batch(name, self.x, ys, self.w, 41)[1], n, models[name]["k"]))
        sim = aicc(fit_law_batch(rival, self.x, ys, self.w, 41)[1], n, r["k"]) - best
        obs = r["aicc"] - models[winner]["aicc"]
        return float((1 + np.sum(sim >= obs)) / (self.draws + 1))


def select_law(models: dict[str, dict[str, Any]], n: int, margin: float = LAW_MARGIN,
               evidence: LawEvidence | None = None, alpha: float = 0.05) -> dict[str, Any]:
    """Conservative selection by AICc.

    - n ≤ 4: the data cannot choose (AICc needs n > K + 1 = 3 for a 2-parameter law, and a single
      residual degree of freedom decides nothing).
    - the 3-parameter law (saturating, a free) is chosen when n ≥ 6 and its AICc beats the best
      2-parameter law's by more than ``margin`` (and, with ``evidence``, beyond chance).
    - else, among the 2-parameter laws the best AICc wins only if it beats every other 2-parameter
      law by more than ``margin``: otherwise the data cannot choose between those within
      ``margin`` (no law is a default: the power law is one candidate among them). With
      ``evidence``, it must also beat each of them by more than that law, had it generated the
      data, would lose by chance (parametric bootstrap p-value < ``alpha``)."""
    two = {k: m for k, m in models.items() if m.get("status") == "ok" and m["k"] == 2 and m["aicc"] is not None}
    three = {k: m for k, m in models.items() if m.get("status") == "ok" and m["k"] == 3 and m["aicc"] is not None}
    if n <= 4 or not two:
        return {"selected": None, "candidates": sorted(two), "p_values": {},
                "verdict": f"the data cannot choose: {n} batch sizes (a law comparison needs at least 5, "
                           f"and 6 for a 3-parameter law)"}
    ranked = sorted(two, key=lambda k: two[k]["aicc"])
    p: dict[str, float] = {}
    pick3, note3 = _three_parameter_pick(models, three, ranked[0], n, margin, evidence, alpha, p)
    if pick3:
        return {"selected": pick3, "candidates": [pick3], "p_values": p, "verdict": f"selected {pick3}: {note3}"}
    close = [k for k in ranked if two[k]["aicc"] - two[ranked[0]]["aicc"] <= margin]
    if len(close) > 1:
        return {"selected": None, "candidates": close, "p_values": p,
                "verdict": f"cannot choose: {', '.join(close)} are within {margin:g} AICc of each other{note3}"}
    sel = ranked[0]
    # a gap beyond DECISIVE_AICC is not chance at these sample sizes: no simulation needed
    if evidence:
        p.update({k: evidence.p_value(models, sel, k, ranked) for k in ranked[1:]
                  if two[k]["aicc"] - two[sel]["aicc"] <= DECISIVE_AICC})
    doubt = [k for k in ranked[1:] if p.get(k, 0.0) >= alpha]
    if doubt:
        return {"selected": None, "candidates": [sel, *doubt], "p_values": p,
                "verdict": f"cannot choose: {sel} has the lowest AICc, but {', '.join(doubt)} would lose to it "
                           f"by as much by chance (bootstrap p >= {alpha:g}){note3}"}
    why = f"{sel} has the lowest AICc, by more than {margin:g}" + (
        f" and beyond chance (bootstrap p < {alpha:g})" if evidence else "") + " over every other 2-parameter law"
    return {"selected": sel, "candidates": close, "p_values": p, "verdict": f"selected {sel}: {why}{note3}"}


def _three_parameter_pick(models, three, best2, n, margin, evidence, alpha, p) -> tuple[str | None, str]:
    """(the 3-parameter law when it beats the best 2-parameter one clearly, else None; a note)."""
    fitted = [k for k, m in models.items() if m.get("status") == "ok" and m["k"] == 3]
    if not fitted:
        return None, ""
    if n < 6 or not three:
        return None, f"; {', '.join(fitted)} not considered (3 parameters need at least 6 batch sizes)"
    k3 = min(three, key=lambda k: three[k]["aicc"])
    gain = models[best2]["aicc"] - three[k3]["aicc"]
    if gain > margin and evidence and gain <= DECISIVE_AICC:
        p[k3] = evidence.p_value(models, k3, best2)
    if gain > margin and p.get(k3, 0.0) < alpha:
        return k3, f"{k3} beats the best 2-parameter law ({best2}) by {gain:.1f} AICc (> {margin:g})" + (
            " beyond chance" if evidence else "")
    return None, f"; {k3} does not beat {best2} by more than {margin:g} AICc beyond chance"


def fit_laws(points: pd.DataFrame, which: str = "uncensored", confidence: float = 0.95,
             estimator: str = "vertex", loo: bool = True, seed: int = 0) -> dict[str, Any]:
    """Fit every law in :data:`LAWS` to the *vertex* estimates of the uncensored optima (a grid
    argmin's error is the grid's step, not Gaussian scatter, and a censored optimum is a bound) and
    select conservatively (:func:`select_law`). Weights 1/(τ² + SE²) when every vertex has an SE
    (τ² from the power fit on the same points), else equal. ``which`` is kept for the record: only
    uncensored optima have a vertex."""
    has_v = np.isfinite(points["vertex_y"].astype(float)) & points["censored"].isna()
    pts = points[has_v]
    n = len(pts)
    base = {"points": which, "uses": "vertex estimates", "estimator": estimator, "n_points": n,
            "batch_sizes": [int(b) for b in pts["batch_size"]],
            "n_censored_left_out": int(points["censored"].notna().sum()),
            "n_without_vertex_left_out": int((~has_v & points["censored"].isna()).sum())}
    if n < MIN_POINTS:
        return {**base, "status": NOT_ENOUGH, "selected": None, "models": {},
                "verdict": f"{n} batch size(s) with a vertex estimate: no law can be fitted (at least "
                           f"{MIN_POINTS} needed)"}
    x, y, se = pts["x"].to_numpy(float), pts["vertex_y"].to_numpy(float), pts["vertex_se"].to_numpy(float)
    m = meta_regression(x, y, se, confidence)
    w = law_weights(se, 0.0 if m["degenerate"] else m["tau2"])
    models = {name: fit_law(name, x, y, w, confidence, loo=loo) for name in LAWS}
    return {**base, "status": "ok", "weighted": w is not None,
            "local_to": [int(pts["batch_size"].min()), int(pts["batch_size"].max())],
            "models": models,
            **select_law(models, n, evidence=LawEvidence(x, y, np.ones(n) if w is None else w, seed))}


# ---------------------------------------------------------------------------------------------
# Per-run checks


def clip_flags(runs: pd.DataFrame, rtol: float = 1e-3) -> list[dict[str, Any]]:
    """Runs whose clip metrics contradict each other: the post-clip norm above the threshold while
    clipping is on, or the post-clip norm equal to the pre-clip norm while the clip frequency is > 0
    (clipping reported but not applied — the defect of the study's phase 3a table)."""
    need = {"avg_grad_norm_before", "avg_grad_norm_after", "avg_clip_frequency"}
    if not need & set(runs.columns):
        return []
    col = lambda c: runs[c].to_numpy(float) if c in runs else np.full(len(runs), math.nan)  # noqa: E731
    before, after, freq, clip = (col(c) for c in ("avg_grad_norm_before", "avg_grad_norm_after",
                                                  "avg_clip_frequency", "grad_clip"))
    with np.errstate(invalid="ignore"):  # NaN compares False: a missing metric flags nothing
        above = after > clip * (1 + rtol)
        unapplied = (freq > 0) & (np.abs(after - before) <= rtol * np.maximum(np.abs(before), 1e-12))
    out = []
    for i in np.flatnonzero(above | unapplied):  # a vectorised test, then only the flagged runs one by one
        problems = ([f"post-clip norm {after[i]:.4g} above the threshold {clip[i]:g}"] if above[i] else []) + (
            [f"post-clip norm equals pre-clip norm ({after[i]:.4g}) at clip frequency {freq[i]:.3g}"]
            if unapplied[i] else [])
        r = runs.iloc[i]
        out.append({"run_id": r["run_id"], "phase": r["phase"], "batch_size": int(r["batch_size"]),
                    "lr": float(r["lr"]), "problem": "; ".join(problems)})
    return sorted(out, key=lambda d: (d["batch_size"], d["lr"], d["run_id"]))


# ---------------------------------------------------------------------------------------------
# Everything, per phase


def _single_threaded_blas():
    """Every matrix here is tiny: BLAS threads only cost (badly, on a busy machine). Limited when
    threadpoolctl is installed; a no-op otherwise."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


#: An extra per-phase analysis: (the series' normalized runs, its result so far) → a JSON-ready dict or None.
SectionFn = Callable[[pd.DataFrame, dict[str, Any]], dict[str, Any] | None]


def fit_series(points: pd.DataFrame, estimator: str = "vertex", bootstrap: int = 0, seed: int = 0,
               confidence: float = 0.95, alpha: float | None = None, law_points: str = "uncensored",
               loo: bool = True) -> dict[str, Any]:
    """Every fit of one series' optima (from :func:`estimate_points`): ``{"fits": {all, uncensored,
    censored}, "laws": ...}``."""
    fits = {kind: fit_power(points, kind, bootstrap, seed, confidence, alpha, estimator)
            for kind in ("all", "uncensored")}
    fits["censored"] = fit_censored(points, confidence, alpha, estimator)
    return {"fits": fits, "laws": fit_laws(points, law_points, confidence, estimator, loo=loo, seed=seed)}


def analyze(runs: pd.DataFrame, metric: str = "final_val_loss", estimator: str = "vertex",
            exclude_unlearned: bool = False, pool_budgets: bool = False, bootstrap: int = 0,
            seed: int = 0, window: int = 1, overfit_threshold: float = 0.05, confidence: float = 0.95,
            law_points: str = "uncensored", phases: list[str] | None = None,
            budget: str | None = None, sections: dict[str, SectionFn] | None = None) -> dict[str, Any]:
    """The whole analysis of a runs table, JSON-ready (NaN/inf → None; see docs/compare-schema.md):
    ``{"phases": [...], "comparison": [...], "optima": [...]}`` plus the per-(phase, B, LR) grid
    under each phase's ``grid``. ``budget`` keeps only the runs of that budget (``kind=value`` or a
    value); ``pool_budgets`` fits a phase's budgets together, each (batch size, budget) its own
    optimum. ``sections``: extra per-phase analyses, name → function(the series' runs, its result)
    returning a JSON-ready dict (or None: no section), stored under the phase's ``sections``.
    Raises ConfigError for a bad metric/estimator/budget, or a phase mixing budgets with neither
    option."""
    with _single_threaded_blas():
        opts = {"metric": metric, "estimator": estimator, "exclude_unlearned": exclude_unlearned,
                "bootstrap": bootstrap, "seed": seed, "window": window, "overfit_threshold": overfit_threshold,
                "confidence": confidence, "law_points": law_points}
        df, order = _checked_runs(runs, metric, estimator, bootstrap, pool_budgets, phases, budget)
        results = []
        for p in order:
            g = df[df["phase"] == p]
            for label in dict.fromkeys(g["series"]):
                series = g[g["series"] == label].assign(phase=label)
                res = analyze_series(series, p, budgets=budgets_of(g), pooled=pool_budgets and len(budgets_of(g)) > 1,
                                     **opts)
                for name, fn in (sections or {}).items():
                    extra = fn(series, res)
                    if extra is not None:
                        res["sections"][name] = extra
                results.append(res)
        return jsonable({"phases": results, "comparison": [summary_row(r) for r in results],
                         "optima": [{"phase": r["phase"], **o} for r in results for o in r["optima"]]})


def _checked_runs(runs, metric, estimator, bootstrap, pool_budgets, phases, budget):
    """The normalized runs of the asked phases with their ``series`` labels, after every check that
    refuses the input (ConfigError)."""
    if metric not in OBJECTIVES:
        raise ConfigError(f"metric must be one of {', '.join(OBJECTIVES)}, got {metric!r}")
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if bootstrap < 0:
        raise ConfigError(f"bootstrap must be >= 0, got {bootstrap}")
    if budget is not None and pool_budgets:
        raise ConfigError("--budget selects one budget and --pool-budgets fits several together: give one of them")
    df = normalize_runs(runs)
    order = phases or list(dict.fromkeys(df["phase"]))
    df = df[df["phase"].isin(order)]
    if budget is not None:
        df = select_budget(df, budget)
    for p in order:
        g = df[df["phase"] == p]
        b = budgets_of(g)
        if len(b) > 1 and not pool_budgets:
            raise ConfigError(f"phase {p!r} mixes runs of different budgets ({', '.join(b)}); choose one with "
                              f"--budget (e.g. --budget {b[0]}), or pass --pool-budgets to fit them together")
        fin = g[g["status"].eq("FINISHED") & ~g["diverged"]]
        if len(fin) and (metric not in fin or fin[metric].isna().all()):
            raise ConfigError(f"phase {p!r}: none of its {len(fin)} finished runs records {metric!r}; "
                              f"choose another --metric (e.g. final_val_loss)")
    return df.assign(series=series_labels(df)), order


def _usable_runs(runs: pd.DataFrame, metric: str, exclude_unlearned: bool) -> tuple[pd.DataFrame, dict, list]:
    """The runs that enter the analysis (finished or diverged; unlearned ones dropped when asked),
    the learned counts, and the warnings about what was left out."""
    warn = []
    ended = runs[runs["status"].isin(["FINISHED", "FAILED"])]
    if len(runs) > len(ended):
        warn.append(f"{len(runs) - len(ended)} run(s) neither finished nor failed (running or killed) were left out")
    crashed = infrastructure_failures(ended)
    usable = ended[~crashed]
    if crashed.any():
        warn.append(f"{int(crashed.sum())} run(s) failed without diverging (an infrastructure error, e.g. a crashed "
                    f"worker) and have no result: left out; `scaling sweep ... --retry-failed` reruns them")
    n_missing = int(objective_values(usable, metric).isna().sum())
    if n_missing:
        warn.append(f"{n_missing} finished run(s) lack the metric {metric!r} and were left out")
    finished = usable["status"].eq("FINISHED") & ~usable["diverged"]
    state = usable["learned"].map(_tristate)
    counts = {"true": int((finished & state.eq(True)).sum()), "false": int((finished & state.eq(False)).sum()),
              "unknown": int((finished & state.isna()).sum()), "diverged_or_failed": int((~finished).sum()),
              "missing_metric": n_missing, "excluded": 0, "failed_no_result": int(crashed.sum())}
    if exclude_unlearned:
        drop = finished & state.eq(False)
        counts["excluded"] = int(drop.sum())
        usable = usable[~drop]
    return usable, counts, warn


def analyze_series(runs: pd.DataFrame, phase_name: str, metric: str = "final_val_loss",
                   estimator: str = "vertex", exclude_unlearned: bool = False, bootstrap: int = 0,
                   seed: int = 0, window: int = 1, overfit_threshold: float = 0.05,
                   confidence: float = 0.95, law_points: str = "uncensored",
                   budgets: list[str] | None = None, pooled: bool = False) -> dict[str, Any]:
    """The analysis of one phase (or one clip series of it): normalized runs with ``phase`` = label."""
    usable, counts, warn = _usable_runs(runs, metric, exclude_unlearned)
    configs = config_table(usable, metric)
    optima = optimum_table(usable, metric, window=window, overfit_threshold=overfit_threshold, configs=configs)
    points = estimate_points(optima, estimator)
    alpha = (float(usable["tail_index_alpha"].median())
             if "tail_index_alpha" in usable and usable["tail_index_alpha"].notna().any() else None)
    fitted = fit_series(points, estimator, bootstrap, seed, confidence, alpha, law_points)
    baselines = {k: (float(runs[c].median()) if c in runs and runs[c].notna().any() else None)
                 for k, c in (("uniform", "baseline_uniform_loss"), ("unigram", "baseline_unigram_loss"),
                              ("bigram", "baseline_bigram_loss"))}
    records = [_optimum_record(r) for _, r in optima.iterrows()]
    ok = [o for o in records if o["status"] == "ok"]
    cf = np.array([o["clip_frequency"] for o in ok], float)
    cf = cf[np.isfinite(cf)]
    flags = clip_flags(usable)
    label = str(runs["phase"].iloc[0])
    res = {
        "phase": label, "phase_name": phase_name, "metric": metric, "estimator": estimator,
        "grad_clip": (float(usable["grad_clip"].dropna().iloc[0]) if usable["grad_clip"].notna().any() else None),
        "n_runs": len(runs), "n_runs_used": int(len(usable) - counts["missing_metric"]),
        "statuses": runs["status"].value_counts().to_dict(),
        "n_diverged_or_failed": counts["diverged_or_failed"], "n_failed_no_result": counts["failed_no_result"],
        "n_excluded_unlearned": counts["excluded"],
        "sources": usable["source"].value_counts().to_dict(),
        "budget": {"kinds": sorted(set(usable["budget_kind"])), "budgets": budgets or budgets_of(usable),
                   "pooled": pooled},
        "baselines": baselines,
        "learned": {k: counts[k] for k in ("true", "false", "unknown", "diverged_or_failed")}
        | {"optima_unlearned": sum(_tristate(o["learned"]) is False for o in ok),
           "optima_unknown": sum(_tristate(o["learned"]) is None for o in ok), "excluded": exclude_unlearned},
        "best": _best_config(configs),
        "regime": {"name": regime(float(cf.mean()) if len(cf) else None),
                   "mean_clip_frequency_at_optimum": float(cf.mean()) if len(cf) else None,
                   "clip_metrics_consistent": not flags},
        "clip_flags": flags, "tail_index_alpha": alpha,
        "loss_noise": _loss_noise(optima),
        "epochs": {"threshold": MAX_EPOCHS,
                   "repeated_data_batch_sizes": [o["batch_size"] for o in ok if o["repeated_data"]]},
        "optima": records,
        "needs_search_past_edge": [{"batch_size": o["batch_size"], "budget": o["budget"], "direction": o["censored"],
                                    "edge_lr": o["argmin_lr"], "bound_lr": o["bound_lr"]}
                                   for o in ok if o["censored"] in ("low", "high")],
        **fitted,
        "grid": [_grid_record(r) for _, r in configs.iterrows()],
        "sections": {},
    }
    res["warnings"] = warn + phase_warnings(res, overfit_threshold, exclude_unlearned)
    return res


def _loss_noise(optima: pd.DataFrame) -> dict[str, Any] | None:
    if not len(optima) or not (optima["noise_dof"] > 0).any():
        return None
    r = optima.iloc[0]
    dof = int(optima["_dof"].sum())
    source = "replicates' residuals around each batch size's quadratic (seed offsets removed), " + (
        "pooled over the batch sizes" if r["noise_pooled"] else
        f"each batch size's own (they differ: Bartlett p = {r['noise_homogeneity_p']:.2g}; sd the pooled value)")
    return {"sd": float(r["noise_pooled_sd"]), "dof": dof, "pooled": bool(r["noise_pooled"]),
            "homogeneity_p": float(r["noise_homogeneity_p"]), "source": source}


def _best_config(configs: pd.DataFrame) -> dict[str, Any] | None:
    finite = configs[np.isfinite(configs["loss"].astype(float))]
    if not len(finite):
        return None
    r = finite.loc[finite["loss"].astype(float).idxmin()]
    return {"loss": float(r["loss"]), "batch_size": int(r["batch_size"]), "budget": r["budget_label"],
            "lr": float(r["lr"]), "grad_clip": None if not np.isfinite(r["grad_clip"]) else float(r["grad_clip"]),
            "run_ids": list(r["run_ids"])}


def _grid_record(r: pd.Series) -> dict[str, Any]:
    return {"batch_size": int(r["batch_size"]), "budget": r["budget_label"], "lr": float(r["lr"]),
            "loss": r["loss"], "loss_std": r["loss_std"], "n_runs": int(r["n_runs"]),
            "n_diverged": int(r["n_diverged"]), "avg_clip_frequency": r["avg_clip_frequency"],
            "learned": r["learned"], "epochs": r["epochs"]}


def phase_warnings(ph: dict[str, Any], overfit_threshold: float, exclude_unlearned: bool) -> list[str]:
    """The plain-language caveats of a phase's result (the text, the JSON and the plots carry them)."""
    ok = [o for o in ph["optima"] if o["status"] == "ok"]
    fa, fc = ph["fits"]["all"], ph["fits"]["censored"]
    bl = f" {ph['baselines']['unigram']:.3f}" if ph["baselines"].get("unigram") is not None else ""
    flags = ph["clip_flags"]
    warn = [(f"{len(flags)} run(s) have inconsistent clip metrics (e.g. B={flags[0]['batch_size']} "
             f"lr={flags[0]['lr']:g}: {flags[0]['problem']}); the regime read from them is suspect")] if flags else []
    if ph["needs_search_past_edge"]:
        warn.append("optimum on the edge of the LR grid (censored) for " + ", ".join(
            f"B={d['batch_size']} ({d['direction']}, edge {d['edge_lr']:g}: beyond {d['bound_lr']:.3g})"
            for d in ph["needs_search_past_edge"]) + ": search past the edge (scaling search)")
    if fa["status"] == "ok" and fa["rests_on_censored"]:
        warn.append(f"the 'all' fit takes {fa['n_censored']} censored optimum/optima at their edge LR (bounds used as "
                    f"values): its interval is not a 95% interval for beta and excludes no theory value")
    for kind, f in ph["fits"].items():
        if f["status"] in (DEGENERATE, NOT_IDENTIFIABLE):
            warn.append(f"the {kind} fit is {f['status']}: {f['reason']}")
    n_un = ph["learned"]["optima_unlearned"]
    if n_un and "ok" in (fa["status"], fc["status"]):
        warn.append(f"the fits rest on {n_un} optimum/optima from runs that did not learn (final val loss above "
                    f"the unigram baseline{bl})")
    ln = ph["learned"]
    if ln["false"]:
        warn.append(f"{ln['false']} of {ln['false'] + ln['true'] + ln['unknown']} finished run(s) did not learn "
                    f"(final val loss above the unigram baseline{bl})"
                    + ("; they were excluded" if exclude_unlearned else "; --exclude-unlearned drops them"))
    over = [str(o["batch_size"]) for o in ok if o["overfitting"]]
    if over:
        warn.append(f"validation loss rose by more than {overfit_threshold:g} after its minimum at the optimum "
                    f"of B={', '.join(over)} (overfitting)")
    rep = [o for o in ok if o["repeated_data"]]
    if rep:
        warn.append(f"the optimum of B={', '.join(str(o['batch_size']) for o in rep)} comes from runs that passed over "
                    f"their training split up to {max(o['epochs'] for o in rep):.3g} times (more than "
                    f"{MAX_EPOCHS:g}): repeated data")
    div = [o for o in ok if o["argmin_n_diverged"]]
    if div:
        warn.append("some replicates of the optimum diverged (" + ", ".join(
            f"B={o['batch_size']}: {o['argmin_n_diverged']} of {o['argmin_n']}" for o in div)
            + "); its loss is the mean of the finished ones")
    lt = next((f["local_to"] for f in ph["fits"].values() if f["status"] == "ok"), None)
    if lt:
        warn.append(f"beta is local to the batch sizes tested (B = {lt[0]}..{lt[1]})")
    if len(ph["budget"]["budgets"]) > 1:
        warn.append(f"runs of different budgets fitted together, each (batch size, budget) its own optimum: "
                    f"{', '.join(ph['budget']['budgets'])}")
    return warn


def _optimum_record(r: pd.Series) -> dict[str, Any]:
    keys = ["batch_size", "status", "n_lrs", "lr_min", "lr_max", "n_runs", "n_diverged", "argmin_lr",
            "argmin_loss", "argmin_loss_std", "argmin_n", "argmin_n_diverged", "grid_res_se", "censored",
            "bound_lr", "vertex_lr", "vertex_log_se", "vertex_dof", "vertex_status", "clip_frequency", "regime",
            "learned", "val_loss_rise", "overfitting", "epochs", "repeated_data", "argmin_run_ids"]
    d = {k: _none_if_nan(r.get(k)) for k in keys}
    d["budget"] = r.get("budget_label")
    d["batch_size"] = int(d["batch_size"])
    for k in ("argmin_n", "argmin_n_diverged", "vertex_dof"):
        d[k] = None if d[k] is None else int(d[k])
    return d


def headline_fit(ph: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The fit a phase's β is read from: the censored fit where it was made, else the uncensored one,
    else ``all`` when its interval is calibrated; None when no fit qualifies."""
    for kind in ("censored", "uncensored", "all"):
        f = ph["fits"][kind]
        if f["status"] == "ok" and f.get("interval_calibrated", True):
            return kind, f
    return None


def summary_row(res: dict[str, Any]) -> dict[str, Any]:
    """One row per phase for the side-by-side table."""
    fa, fu, fc = res["fits"]["all"], res["fits"]["uncensored"], res["fits"]["censored"]
    ok = [o for o in res["optima"] if o["status"] == "ok"]
    return {
        "phase": res["phase"], "budget": ", ".join(res["budget"]["budgets"]), "estimator": res["estimator"],
        "n_batch_sizes": len(ok), "n_censored": sum(1 for o in ok if o["censored"] in ("low", "high")),
        "beta_all": fa.get("beta"), "beta_all_ci_t": fa.get("beta_ci_t"), "r2_all": fa.get("r2"),
        "beta_all_se": fa.get("beta_se"), "beta_all_calibrated": fa.get("interval_calibrated"),
        "beta_all_ci_bootstrap": fa.get("beta_ci_bootstrap"), "status_all": fa["status"],
        "beta_uncensored": fu.get("beta"), "beta_uncensored_ci_t": fu.get("beta_ci_t"),
        "status_uncensored": fu["status"],
        "beta_censored": fc.get("beta"), "beta_censored_ci": fc.get("beta_ci"), "status_censored": fc["status"],
        "loss_noise_sd": (res["loss_noise"] or {}).get("sd"),
        "regime": res["regime"]["name"],
        "best_loss": (res["best"] or {}).get("loss"),
        "best_config": (None if not res["best"] else f"B={res['best']['batch_size']} lr={res['best']['lr']:g}"),
        "baseline_unigram": res["baselines"]["unigram"], "baseline_bigram": res["baselines"]["bigram"],
        "n_unlearned": res["learned"]["false"], "n_learned_unknown": res["learned"]["unknown"],
        "n_repeated_data": len(res["epochs"]["repeated_data_batch_sizes"]),
        "selected_law": res["laws"].get("selected"), "law_verdict": res["laws"].get("verdict"),
    }


def jsonable(obj):
    """numpy scalars → Python, NaN/±inf → None, tuples → lists, recursively."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if obj is pd.NA or obj is pd.NaT:
        return None
    return obj

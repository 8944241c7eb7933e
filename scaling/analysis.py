"""The statistics of ``scaling compare``: pure functions on pandas DataFrames (no MLflow here).

Input is a *runs table*, one row per run (see :data:`RUN_COLUMNS`), as :mod:`scaling.report`
builds it from MLflow (or a test builds it by hand). From it:

1. :func:`config_table` — one row per (phase, batch size, LR): replicates (seeds) averaged, their
   spread kept; a diverged or failed run counts as ``inf`` (worse than any finite loss).
2. :func:`optimum_table` — one row per (phase, batch size): the grid argmin (the study's estimate)
   and a continuous estimate, the vertex of a quadratic in log LR through the argmin and its
   neighbours (kept only when the parabola opens upward and the vertex lies inside the sampled
   range) with a delta-method standard error where the quadratic has residual degrees of freedom
   (i.e. replicates). An argmin on the smallest/largest sampled LR is *censored* (a bound, not a
   value).
3. :func:`fit_power` (``all`` / ``uncensored``: least squares of log LR_opt on log B, weighted by
   1/SE² when every point has an SE), :func:`fit_censored` (Tobit-style maximum likelihood in log
   LR where a censored optimum contributes the probability of lying beyond its edge; profile
   likelihood-ratio interval), :func:`fit_laws` (power / saturating / surge, AICc, leave-one-out,
   conservative selection).
4. :func:`analyze` — all of it per phase, as a JSON-ready dict (schema: docs/compare-schema.md).

Every β is local to the batch sizes it was fitted on: the power law is the small-B end of the
saturating and surge laws.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import pandas as pd
from scipy import optimize, stats

from scaling.config import ConfigError, clip_text

#: Columns of the runs table (metric columns beyond these are kept when present).
RUN_COLUMNS = ("run_id", "phase", "batch_size", "lr", "grad_clip", "seed", "status", "diverged",
               "learned", "source", "budget_kind", "budget")
METRIC_COLUMNS = ("final_val_loss", "min_val_loss", "final_train_loss", "val_loss_rise",
                  "avg_clip_frequency", "avg_grad_norm_before", "avg_grad_norm_after",
                  "baseline_uniform_loss", "baseline_unigram_loss", "baseline_bigram_loss",
                  "tail_index_alpha", "tokens_seen", "step_val_acc_99")
#: Objectives ``--metric`` accepts.
OBJECTIVES = ("final_val_loss", "min_val_loss", "final_train_loss",
              "step_val_acc_99")  # modular phases: the first step at >= 99% validation accuracy
ESTIMATORS = ("argmin", "vertex")
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


# ---------------------------------------------------------------------------------------------
# The runs table


def normalize_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Check and coerce a runs table: numeric columns as floats, ``diverged`` bool, ``learned``
    True/False/None, ``grad_clip`` float with NaN for no clipping. Raises ConfigError naming the
    first missing column."""
    missing = [c for c in ("phase", "batch_size", "lr") if c not in runs.columns]
    if missing:
        raise ConfigError(f"runs table lacks column {missing[0]!r}")
    df = runs.copy()
    n = len(df)
    if "run_id" not in df:
        df["run_id"] = [f"row{i}" for i in range(n)]
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
    for c in METRIC_COLUMNS:
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    # A FAILED run that did not diverge is an infrastructure failure (a crash, a lost worker), not the
    # configuration's outcome: when the same configuration also has a FINISHED or diverged run, that
    # run is its result and the failure is left out (alone, it still counts as worse than any loss).
    key = ["phase", "batch_size", "lr", "grad_clip", "seed", "budget"]
    outcome = df["status"].eq("FINISHED") | df["diverged"]
    has_outcome = outcome.groupby([df[k].fillna(-1) for k in key]).transform("any")
    df = df[~(df["status"].eq("FAILED") & ~df["diverged"] & has_outcome)].copy()
    # learned from the baselines when no tag says it
    if "baseline_unigram_loss" in df and "final_val_loss" in df:
        derive = df["learned"].isna() & df["baseline_unigram_loss"].notna() & df["final_val_loss"].notna()
        df.loc[derive, "learned"] = (df.loc[derive, "final_val_loss"]
                                     < df.loc[derive, "baseline_unigram_loss"]).astype(object)
    return df.reset_index(drop=True)


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
    """The value to minimise per run: the metric, ``inf`` for diverged/failed runs, NaN when a
    finished run lacks the metric (such runs are left out and counted)."""
    v = runs[metric].astype(float) if metric in runs else pd.Series(np.nan, index=runs.index)
    bad = runs["diverged"].astype(bool) | runs["status"].eq("FAILED")
    v = v.where(~bad, math.inf)
    return v.where(~(v.isna() & ~bad), np.nan)


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


# ---------------------------------------------------------------------------------------------
# Per configuration and per batch size


def config_table(runs: pd.DataFrame, metric: str = "final_val_loss") -> pd.DataFrame:
    """One row per (phase, batch_size, lr): mean objective over replicates (``inf`` if any replicate
    diverged or failed), its std over the finite replicates, counts, and the means of clip and
    overfitting metrics. ``runs`` must be normalized and carry a ``phase`` (series) label."""
    df = runs.copy()
    df["_y"] = objective_values(df, metric)
    df = df[df["_y"].notna()]
    cols = ["phase", "batch_size", "lr", "loss", "loss_std", "n_runs", "n_diverged", "grad_clip",
            "avg_clip_frequency", "avg_grad_norm_before", "avg_grad_norm_after", "val_loss_rise",
            "learned", "run_ids"]
    rows = []
    for (phase, b, lr), g in df.groupby(["phase", "batch_size", "lr"], sort=True):
        y = g["_y"].to_numpy(float)
        finite = y[np.isfinite(y)]
        learned = [x for x in g["learned"] if x is not None and not (isinstance(x, float) and math.isnan(x))]
        rows.append({
            "phase": phase, "batch_size": int(b), "lr": float(lr),
            "loss": float(np.mean(y)) if np.all(np.isfinite(y)) else math.inf,
            "loss_std": float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan,
            "n_runs": int(len(y)), "n_diverged": int(np.sum(~np.isfinite(y))),
            "grad_clip": float(g["grad_clip"].iloc[0]),
            **{c: _finite_mean(g, c) for c in ("avg_clip_frequency", "avg_grad_norm_before",
                                               "avg_grad_norm_after", "val_loss_rise")},
            "learned": None if not learned else bool(all(learned)),
            "run_ids": list(g["run_id"]),
        })
    return pd.DataFrame(rows, columns=cols)


def _finite_mean(g: pd.DataFrame, col: str) -> float:
    if col not in g:
        return math.nan
    v = g[col].to_numpy(float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def quadratic_vertex(x: np.ndarray, y: np.ndarray, x_range: tuple[float, float]) -> dict[str, Any]:
    """Vertex of ``y = c0 + c1 x + c2 x²`` fitted by least squares to (x, y) (all observations,
    replicates included). Returns ``{"x", "se", "status", "dof"}``: status ``ok`` only when the
    parabola opens upward and the vertex lies inside ``x_range``; ``se`` from the delta method on
    the coefficients' covariance when there are residual degrees of freedom, else NaN."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(np.unique(x)) < 3:
        return {"x": math.nan, "se": math.nan, "status": "too few LRs", "dof": 0}
    x0 = float(np.mean(x))
    X = np.vander(x - x0, 3, increasing=True)
    coef, _, rank, _ = np.linalg.lstsq(X, y, rcond=None)
    c0, c1, c2 = coef
    dof = len(x) - 3
    if not c2 > 0:
        return {"x": math.nan, "se": math.nan, "status": "opens downward", "dof": dof}
    xv = -c1 / (2 * c2)
    vertex = xv + x0
    if not (x_range[0] <= vertex <= x_range[1]):
        return {"x": vertex, "se": math.nan, "status": "outside sampled range", "dof": dof}
    se = math.nan
    if dof > 0:
        rss = float(np.sum((y - X @ coef) ** 2))
        cov = rss / dof * np.linalg.inv(X.T @ X)
        grad = np.array([0.0, -1 / (2 * c2), c1 / (2 * c2 ** 2)])
        var = float(grad @ cov @ grad)
        se = math.sqrt(var) if var > 0 else math.nan
    return {"x": vertex, "se": se, "status": "ok", "dof": dof}


def regime(clip_frequency: float | None) -> str:
    """pre-saturation (< 0.5), transition (0.5–0.99), saturation (≥ 0.99); ``unknown`` without data."""
    if clip_frequency is None or not np.isfinite(clip_frequency):
        return "unknown"
    return next(name for bound, name in REGIMES if clip_frequency < bound)


def optimum_table(runs: pd.DataFrame, metric: str = "final_val_loss", window: int = 1,
                  overfit_threshold: float = 0.05, configs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (phase, batch_size) with both optimum estimates.

    Columns: ``argmin_lr, argmin_loss, argmin_loss_std, argmin_n`` (the grid argmin over the mean
    objective), ``censored`` (``None``/``"low"``/``"high"``), ``lr_min, lr_max, n_lrs``,
    ``vertex_lr, vertex_log_se, vertex_status`` (quadratic in ln LR through the argmin and its
    ``window`` neighbours on each side, fitted to every replicate), ``clip_frequency`` and
    ``regime`` at the argmin, ``learned`` (all replicates of the argmin config learned: True/False,
    None unknown), ``val_loss_rise`` and ``overfitting`` (rise > ``overfit_threshold``)."""
    configs = config_table(runs, metric) if configs is None else configs
    obs = runs.assign(_y=objective_values(runs, metric))
    obs = obs[obs["_y"].notna()]
    rows = []
    for (phase, b), g in configs.groupby(["phase", "batch_size"], sort=True):
        g = g.sort_values("lr").reset_index(drop=True)
        lrs = g["lr"].to_numpy(float)
        losses = g["loss"].to_numpy(float)
        row: dict[str, Any] = {"phase": phase, "batch_size": int(b), "n_lrs": len(lrs),
                               "lr_min": float(lrs[0]), "lr_max": float(lrs[-1]),
                               "n_runs": int(g["n_runs"].sum()), "n_diverged": int(g["n_diverged"].sum())}
        if not np.isfinite(losses).any():
            rows.append({**row, "status": "all diverged", "censored": None, "argmin_lr": math.nan,
                         "argmin_loss": math.inf, "vertex_lr": math.nan, "vertex_log_se": math.nan,
                         "vertex_status": "all diverged", "learned": None, "overfitting": None})
            continue
        i = int(np.argmin(losses))
        best = g.iloc[i]
        if len(lrs) == 1:
            censored = "single LR"
        elif i == 0:
            censored = "low"
        elif i == len(lrs) - 1:
            censored = "high"
        else:
            censored = None
        # resolution of the grid argmin: the SD of a uniform over its cell (the LRs nearer to it
        # than to its neighbours, in ln LR); an edge argmin's cell has its one inner half-gap
        gaps = np.diff(np.log(lrs))
        half = [gaps[i - 1] / 2 if i > 0 else 0.0, gaps[i] / 2 if i < len(gaps) else 0.0]
        row.update({
            "status": "ok" if censored != "single LR" else "single LR",
            "grid_res_se": float(sum(half) / math.sqrt(12)),
            "censored": censored,
            "argmin_lr": float(lrs[i]), "argmin_loss": float(losses[i]),
            "argmin_loss_std": float(best["loss_std"]), "argmin_n": int(best["n_runs"]),
            "clip_frequency": float(best["avg_clip_frequency"]),
            "regime": regime(best["avg_clip_frequency"]),
            "grad_clip": float(best["grad_clip"]),
            "learned": best["learned"],
            "val_loss_rise": float(best["val_loss_rise"]),
            "overfitting": (None if not np.isfinite(best["val_loss_rise"])
                            else bool(best["val_loss_rise"] > overfit_threshold)),
            "argmin_run_ids": best["run_ids"],
        })
        if censored is not None:
            row.update({"vertex_lr": math.nan, "vertex_log_se": math.nan,
                        "vertex_status": "censored" if censored != "single LR" else "too few LRs"})
        else:
            lo, hi = max(0, i - window), min(len(lrs) - 1, i + window)
            sel = lrs[lo:hi + 1]
            if not np.isfinite(losses[lo:hi + 1]).all():
                row.update({"vertex_lr": math.nan, "vertex_log_se": math.nan,
                            "vertex_status": "a neighbour diverged"})
            else:
                o = obs[(obs["phase"] == phase) & (obs["batch_size"] == b) & obs["lr"].isin(sel)]
                q = quadratic_vertex(np.log(o["lr"].to_numpy(float)), o["_y"].to_numpy(float),
                                     (math.log(lrs[0]), math.log(lrs[-1])))
                row.update({"vertex_lr": math.exp(q["x"]) if q["status"] == "ok" else math.nan,
                            "vertex_log_se": q["se"], "vertex_status": q["status"]})
        rows.append(row)
    cols = ["phase", "batch_size", "status", "n_lrs", "lr_min", "lr_max", "n_runs", "n_diverged",
            "argmin_lr", "argmin_loss", "argmin_loss_std", "argmin_n", "grid_res_se", "censored", "vertex_lr",
            "vertex_log_se", "vertex_status", "grad_clip", "clip_frequency", "regime", "learned",
            "val_loss_rise", "overfitting", "argmin_run_ids"]
    out = pd.DataFrame(rows).reindex(columns=cols)
    for c in ("censored", "learned", "overfitting"):  # keep None (not NaN) and Python bools
        out[c] = pd.Series([_none_if_nan(v) for v in out[c]], index=out.index, dtype=object)
    return out


def _none_if_nan(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def estimate_points(optima: pd.DataFrame, estimator: str = "argmin") -> pd.DataFrame:
    """The per-batch-size values the fits use: columns ``batch_size, x = ln B, y = ln LR_opt,
    se`` (SE of y, NaN when unknown), ``censored`` and ``edge_y`` (ln of the edge LR of a censored
    point), ``learned``. ``argmin``: the grid argmin (no SE: its error is the grid spacing).
    ``vertex``: the quadratic vertex where it exists, else the argmin (flagged in ``from``)."""
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    ok = optima[optima["status"].eq("ok")]
    rows = []
    for _, r in ok.iterrows():
        use_vertex = estimator == "vertex" and r["vertex_status"] == "ok"
        lr = r["vertex_lr"] if use_vertex else r["argmin_lr"]
        se = r["vertex_log_se"] if use_vertex else math.nan
        rows.append({"batch_size": int(r["batch_size"]), "x": math.log(r["batch_size"]),
                     "y": math.log(lr), "se": float(se) if se is not None else math.nan,
                     "res_se": 0.0 if use_vertex else float(r["grid_res_se"]),
                     "censored": r["censored"], "edge_y": math.log(r["argmin_lr"]),
                     "from": "vertex" if use_vertex else "argmin", "learned": r["learned"]})
    out = pd.DataFrame(rows, columns=["batch_size", "x", "y", "se", "res_se", "censored", "edge_y",
                                      "from", "learned"])
    out["censored"] = pd.Series([_none_if_nan(v) for v in out["censored"]], index=out.index, dtype=object)
    out["learned"] = pd.Series([_none_if_nan(v) for v in out["learned"]], index=out.index, dtype=object)
    return out


# ---------------------------------------------------------------------------------------------
# Power-law fits


def _weights(se: np.ndarray) -> np.ndarray | None:
    """SEs usable as weights only when every point has a finite positive one."""
    se = np.asarray(se, float)
    if len(se) and np.all(np.isfinite(se)) and np.all(se > 0):
        return se
    return None


def wls_line(x: np.ndarray, y: np.ndarray, se: np.ndarray | None = None) -> dict[str, Any]:
    """Least squares ``y = a + b x``, weighted by 1/se² when given (the residual scale is estimated
    from the data, as ``curve_fit(absolute_sigma=False)`` does): exact linear least squares
    (:func:`scipy.linalg.lstsq` on the whitened design), covariance s²(XᵀWX)⁻¹ with s² = WRSS/(n−2).
    Returns a, b, their covariance, R² (weighted when weighted), dof, the weighted RSS."""
    from scipy import linalg

    x, y = np.asarray(x, float), np.asarray(y, float)
    w = np.ones_like(x) if se is None else 1 / np.asarray(se, float) ** 2
    sw = np.sqrt(w)
    X = np.column_stack([np.ones_like(x), x])
    coef, _, _, _ = linalg.lstsq(X * sw[:, None], y * sw)
    resid = y - X @ coef
    ss_res = float(np.sum(w * resid ** 2))
    ybar = np.sum(w * y) / np.sum(w)
    ss_tot = float(np.sum(w * (y - ybar) ** 2))
    dof = len(x) - 2
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else math.nan
    try:
        cov = (ss_res / dof if dof > 0 else math.nan) * linalg.inv(X.T @ (X * w[:, None]))
    except linalg.LinAlgError:
        cov = np.full((2, 2), math.nan)
    return {"a": float(coef[0]), "b": float(coef[1]), "cov": cov, "r2": r2, "dof": dof, "ss_res": ss_res}


def bootstrap_slope(x: np.ndarray, y: np.ndarray, se: np.ndarray | None, n_resamples: int,
                    seed: int, confidence: float = 0.95) -> dict[str, Any]:
    """Pairs bootstrap over the fit's points (configurations = batch sizes): resample them with
    replacement (numpy ``default_rng(seed)``), refit the (weighted) slope, take the percentile
    interval. Resamples with a single distinct batch size have no slope and are skipped (counted)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n_resamples <= 0 or n < 2:
        return {"ci": [math.nan, math.nan], "resamples": int(max(n_resamples, 0)), "valid": 0}
    w = np.ones(n) if se is None else 1 / np.asarray(se, float) ** 2
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


def theory_comparison(ci: Iterable[float], alpha: float | None = None) -> list[dict[str, Any]]:
    """For each theory value of β: is it outside the interval ``ci``? (None when the interval is
    unknown.) With a measured tail index α > 1, also β = 1 − 1/α."""
    lo, hi = (list(ci) + [math.nan, math.nan])[:2]
    theories = list(THEORY)
    if alpha is not None and np.isfinite(alpha) and alpha > 0:
        theories.append(("tail_index", 1 - 1 / alpha, f"measured tail index alpha = {alpha:.3g} "
                         f"(beta = 1 - 1/alpha)"))
    out = []
    for name, beta, what in theories:
        known = lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi))
        out.append({"name": name, "beta": beta, "description": what,
                    "excluded": (not (lo <= beta <= hi)) if known else None})
    return out


def _not_enough(kind: str, pts: pd.DataFrame, estimator: str, why: str | None = None) -> dict[str, Any]:
    return {"kind": kind, "status": NOT_ENOUGH, "estimator": estimator, "n_points": int(len(pts)),
            "batch_sizes": [int(b) for b in pts["batch_size"]],
            "reason": why or f"{len(pts)} usable batch size(s); a fit needs at least {MIN_POINTS}"}


def fit_power(points: pd.DataFrame, kind: str = "all", bootstrap: int = 1000, seed: int = 0,
              confidence: float = 0.95, alpha: float | None = None, estimator: str = "argmin") -> dict[str, Any]:
    """Least-squares fit of ln LR_opt = ln C + β ln B over ``points`` (from :func:`estimate_points`).

    ``kind="all"`` uses every point (censored ones at their edge — the study's method);
    ``"uncensored"`` drops censored points. Weighted by 1/SE² only when every point has an SE.
    Returns β, C, R², SE, a t interval with n−2 dof, a seeded bootstrap interval, theory
    comparison; or ``status = "not enough points"`` below 3 batch sizes."""
    if kind not in ("all", "uncensored"):
        raise ValueError(kind)
    pts = points if kind == "all" else points[points["censored"].isna()]
    if len(pts) < MIN_POINTS:
        return _not_enough(kind, pts, estimator)
    x, y = pts["x"].to_numpy(float), pts["y"].to_numpy(float)
    se = _weights(pts["se"].to_numpy(float))
    f = wls_line(x, y, se)
    beta_se = math.sqrt(f["cov"][1, 1]) if np.isfinite(f["cov"][1, 1]) else math.nan
    a_se = math.sqrt(f["cov"][0, 0]) if np.isfinite(f["cov"][0, 0]) else math.nan
    t = float(stats.t.ppf(0.5 + confidence / 2, f["dof"]))
    ci_t = [f["b"] - t * beta_se, f["b"] + t * beta_se]
    boot = bootstrap_slope(x, y, se, bootstrap, seed, confidence)
    n_cens = int(pts["censored"].notna().sum())
    unlearned = [int(b) for b, l in zip(pts["batch_size"], pts["learned"]) if _tristate(l) is False]
    return {
        "kind": kind, "status": "ok", "method": "weighted least squares" if se is not None else "least squares",
        "estimator": estimator, "weighted": se is not None,
        "n_points": int(len(pts)), "batch_sizes": [int(b) for b in pts["batch_size"]],
        "local_to": [int(pts["batch_size"].min()), int(pts["batch_size"].max())],
        "n_censored": n_cens, "rests_on_censored": n_cens > 0,
        "censored_batch_sizes": [int(b) for b, c in zip(pts["batch_size"], pts["censored"]) if c in ("low", "high")],
        "unlearned_batch_sizes": unlearned,
        "beta": f["b"], "beta_se": beta_se, "log_C": f["a"], "log_C_se": a_se, "C": math.exp(f["a"]),
        "cov": [[float(v) for v in row] for row in f["cov"]],
        "r2": f["r2"], "dof": f["dof"], "confidence": confidence,
        "t_crit": t, "beta_ci_t": ci_t, "beta_ci": ci_t, "interval_method": "t",
        "C_ci_t": [math.exp(f["a"] - t * a_se), math.exp(f["a"] + t * a_se)] if np.isfinite(a_se) else [math.nan] * 2,
        "beta_ci_bootstrap": boot["ci"], "bootstrap_resamples": boot["resamples"],
        "bootstrap_valid": boot["valid"], "bootstrap_seed": seed,
        "theory": theory_comparison(ci_t, alpha),
    }


_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _tobit_nll(params, x, y, cens, se2):
    from scipy.special import log_ndtr

    a, b, log_s = params
    s = np.sqrt(math.exp(2 * log_s) + se2)
    z = (y - (a + b * x)) / s
    ll = np.where(cens == 0, -0.5 * z * z - _LOG_SQRT_2PI - np.log(s), log_ndtr(np.where(cens > 0, -z, z)))
    return -float(np.sum(ll))


def fit_censored(points: pd.DataFrame, confidence: float = 0.95, alpha: float | None = None,
                 estimator: str = "argmin") -> dict[str, Any]:
    """Tobit-style maximum likelihood of ln LR_opt = ln C + β ln B + ε, ε ~ N(0, σ² + SE_i²):
    an uncensored point contributes its density, a point censored high the probability that the
    true optimum lies above its edge (``norm.logsf``), censored low below it. β's interval is the
    profile likelihood-ratio interval (χ²₁); a bound is ``±inf`` when the profile never drops far
    enough (the data do not bound β on that side). Needs ≥ 3 batch sizes, ≥ 2 of them uncensored;
    when a line passes through every uncensored point while honouring every censored bound, the
    likelihood is unbounded (σ → 0) and the fit is reported ``not identifiable``."""
    pts = points
    n_unc = int(pts["censored"].isna().sum())
    if len(pts) < MIN_POINTS or n_unc < 2:
        why = (f"{len(pts)} usable batch size(s), {n_unc} uncensored; the censored fit needs at "
               f"least {MIN_POINTS}, two of them uncensored")
        return {**_not_enough("censored", pts, estimator, why), "method": "tobit_mle"}
    x = pts["x"].to_numpy(float)
    cens = pts["censored"].map({"high": 1, "low": -1}).fillna(0).to_numpy(int)
    y = np.where(cens == 0, pts["y"].to_numpy(float), pts["edge_y"].to_numpy(float))
    se = pts["se"].to_numpy(float)
    res = pts["res_se"].to_numpy(float) if "res_se" in pts else np.zeros(len(pts))
    se2 = np.where(np.isfinite(se), se ** 2, 0.0) + np.where(np.isfinite(res), res ** 2, 0.0)
    weighted = bool(np.any(np.isfinite(se) & (se > 0)))
    unc = cens == 0
    ols = wls_line(x[unc], y[unc]) if unc.sum() >= 2 else wls_line(x, y)
    resid = y[unc] - (ols["a"] + ols["b"] * x[unc])
    s0 = max(float(np.sqrt(np.mean(resid ** 2))) if len(resid) else 0.1, 0.05)
    log_s_min = math.log(1e-4)
    bounds = [(None, None), (None, None), (log_s_min, math.log(100.0))]

    def solve(start, fixed_b=None, scales=(1.0, 3.0, 0.3)):
        if fixed_b is None:
            fun = lambda p: _tobit_nll(p, x, y, cens, se2)
            p0, bnds = start, bounds
        else:
            fun = lambda p: _tobit_nll((p[0], fixed_b, p[1]), x, y, cens, se2)
            p0, bnds = (start[0], start[2]), [bounds[0], bounds[2]]
        best = None
        for scale in scales:
            p = np.array(p0, float)
            p[-1] = math.log(math.exp(p[-1]) * scale)
            r = optimize.minimize(fun, p, method="L-BFGS-B", bounds=bnds)
            if best is None or r.fun < best.fun:
                best = r
        return best

    r = solve((ols["a"], ols["b"], math.log(s0)))
    a_hat, b_hat, log_s_hat = r.x
    base = {"kind": "censored", "method": "tobit_mle", "estimator": estimator, "weighted": weighted,
            "n_points": int(len(pts)), "batch_sizes": [int(b) for b in pts["batch_size"]],
            "local_to": [int(pts["batch_size"].min()), int(pts["batch_size"].max())],
            "n_censored": int((cens != 0).sum()), "n_uncensored": n_unc,
            "censored_batch_sizes": [int(b) for b, c in zip(pts["batch_size"], cens) if c],
            "unlearned_batch_sizes": [int(b) for b, l in zip(pts["batch_size"], pts["learned"]) if _tristate(l) is False],
            "confidence": confidence}
    if log_s_hat <= log_s_min + 1e-3 and np.any(se2[unc] == 0):
        return {**base, "status": "not identifiable",
                "reason": "a line passes through every uncensored optimum and honours every censored "
                          "bound: the likelihood is unbounded (sigma -> 0)"}
    ll_hat = -r.fun
    crit = float(stats.chi2.ppf(confidence, 1))

    def excess(bv):
        rp = solve((a_hat + (b_hat - bv) * float(np.mean(x)), bv, log_s_hat), fixed_b=bv, scales=(1.0, 3.0))
        return 2 * (ll_hat + rp.fun) - crit

    ci = []
    step = 0.25
    for direction in (-1, 1):
        lo_b, bound = b_hat, math.nan
        d = step
        while d <= 40:
            bv = b_hat + direction * d
            if excess(bv) > 0:
                try:
                    bound = optimize.brentq(excess, *sorted((lo_b, bv)), xtol=1e-4)
                except ValueError:
                    bound = bv
                break
            lo_b = bv
            d *= 2
        ci.append(bound if not math.isnan(bound) else direction * math.inf)
    return {**base, "status": "ok", "beta": float(b_hat), "log_C": float(a_hat), "C": math.exp(a_hat),
            "sigma": math.exp(log_s_hat), "loglik": ll_hat, "beta_ci_lr": ci, "beta_ci": ci,
            "interval_method": "profile likelihood ratio",
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
    lo_x, hi_x = float(x.min()), float(x.max())
    span = max(hi_x - lo_x, 1.0)
    if name == "power":
        return None
    bn = (lo_x - 3 * span, hi_x + 3 * span)
    eps = (float(y.min()) - 20.0, float(y.max()) + 20.0)
    if name == "saturating_free":
        return ([eps[0], bn[0], 0.0], [eps[1], bn[1], 5.0])
    return ([eps[0], bn[0]], [eps[1], bn[1]])


def _law_starts(name: str, x: np.ndarray, y: np.ndarray):
    if name == "power":
        b = np.polyfit(x, y, 1)
        return [(b[1], b[0])]
    grid = np.linspace(x.min() - 1, x.max() + 1, 5)
    starts = []
    for bn in grid:
        if name == "saturating_free":
            for a in (0.5, 1.0, 2.0):
                starts.append((float(y.max()) + 0.5, bn, a))
        else:
            starts.append((float(y.max()) + 0.5, bn))
    return starts


def _fit_law_once(name, x, y, se, starts=None):
    fn, pnames, _ = LAWS[name]
    sig = np.ones_like(x) if se is None else se
    res_fn = lambda p: (y - fn(x, *p)) / sig
    bounds = _law_bounds(name, x, y)
    best = None
    for p0 in starts if starts is not None else _law_starts(name, x, y):
        p0 = np.array(p0, float)
        if bounds is not None:
            p0 = np.clip(p0, np.array(bounds[0]) + 1e-9, np.array(bounds[1]) - 1e-9)
        r = optimize.least_squares(res_fn, p0, bounds=bounds if bounds is not None else (-np.inf, np.inf),
                                   method="trf" if bounds is not None else "lm" if len(x) >= len(p0) else "trf",
                                   x_scale="jac")
        if best is None or r.cost < best.cost:
            best = r
    return best


def fit_law(name: str, x: np.ndarray, y: np.ndarray, se: np.ndarray | None = None,
            confidence: float = 0.95, loo: bool = True) -> dict[str, Any]:
    """Fit one law by (weighted) least squares in ln LR with :func:`scipy.optimize.least_squares`.

    Parameter intervals: t intervals (n − p dof) from the Jacobian covariance scaled by the residual
    variance, reported on the natural scale (ε_max, B_noise, C exponentiated). AICc with K = p + 1
    (σ counted): ``None`` when n ≤ K + 1. Leave-one-out: RMS error of each point predicted from a
    fit to the others."""
    fn, pnames, desc = LAWS[name]
    x, y = np.asarray(x, float), np.asarray(y, float)
    n, p = len(x), len(pnames)
    out: dict[str, Any] = {"law": name, "formula": desc, "k": p, "n_points": n}
    if n < p + 1:
        return {**out, "status": NOT_ENOUGH, "reason": f"{n} points for {p} parameters"}
    r = _fit_law_once(name, x, y, se)
    w = np.ones(n) if se is None else 1 / se ** 2
    pred = fn(x, *r.x)
    wrss = float(np.sum(w * (y - pred) ** 2))
    dof = n - p
    s2 = wrss / dof if dof > 0 else math.nan
    J = r.jac
    try:
        cov = np.linalg.inv(J.T @ J) * s2
    except np.linalg.LinAlgError:
        cov = np.full((p, p), math.nan)
    bounds = _law_bounds(name, x, y)
    at_bound = []
    if bounds is not None:
        for j, pn in enumerate(pnames):
            if min(abs(r.x[j] - bounds[0][j]), abs(r.x[j] - bounds[1][j])) < 1e-6:
                at_bound.append(pn)
    t = float(stats.t.ppf(0.5 + confidence / 2, dof)) if dof > 0 else math.nan
    params = {}
    for j, pn in enumerate(pnames):
        v, s = float(r.x[j]), float(math.sqrt(cov[j, j])) if np.isfinite(cov[j, j]) and cov[j, j] >= 0 else math.nan
        lo, hi = v - t * s, v + t * s
        if pn.startswith("log_"):
            nat = pn[4:]
            params[nat] = {"value": math.exp(v), "ci": [_exp(lo), _exp(hi)], "log_value": v, "log_se": s}
        else:
            params[pn] = {"value": v, "ci": [lo, hi], "se": s}
    K = p + 1
    rss_floor = max(wrss, 1e-300)
    aicc = (n * math.log(rss_floor / n) + 2 * K + 2 * K * (K + 1) / (n - K - 1)) if n - K - 1 > 0 else None
    loo_err = None
    if loo and n - 1 >= p + 1:
        errs = []
        for i in range(n):
            m = np.arange(n) != i
            ri = _fit_law_once(name, x[m], y[m], None if se is None else se[m], starts=[r.x])
            errs.append(float(y[i] - fn(x[i:i + 1], *ri.x)[0]))
        loo_err = float(math.sqrt(np.mean(np.square(errs))))
    xs = np.array([x.min(), 0.5 * (x.min() + x.max()), x.max()])
    h = 1e-4
    local = (fn(xs + h, *r.x) - fn(xs - h, *r.x)) / (2 * h)
    return {**out, "status": "ok", "params": params, "theta": [float(v) for v in r.x],
            "cov": [[float(c) for c in row] for row in cov], "dof": dof, "t_crit": t,
            "wrss": wrss, "rmse": math.sqrt(wrss / n), "aicc": aicc, "loo_rmse": loo_err,
            "at_bound": at_bound, "weighted": se is not None,
            "local_beta": {"at_B": [float(math.exp(v)) for v in xs], "beta": [float(v) for v in local]}}


def _exp(v):
    try:
        return math.exp(v) if np.isfinite(v) else (math.inf if v > 0 else 0.0) if not math.isnan(v) else math.nan
    except OverflowError:
        return math.inf


def select_law(models: dict[str, dict[str, Any]], n: int, margin: float = 2.0) -> dict[str, Any]:
    """Conservative selection by AICc.

    - n ≤ 4: the data cannot choose (AICc needs n > K + 1 = 3 for a 2-parameter law, and a single
      residual degree of freedom decides nothing).
    - among the 2-parameter laws, the best AICc wins only if it beats every other 2-parameter law
      by more than ``margin``; the power law is the default when it is within ``margin`` of the
      best (the simplest description, and the small-B end of the others).
    - the 3-parameter law (saturating, a free) needs ≥ 6 batch sizes and an AICc better than the
      2-parameter choice by more than ``margin``."""
    two = {k: m for k, m in models.items() if m.get("status") == "ok" and m["k"] == 2 and m["aicc"] is not None}
    three = {k: m for k, m in models.items() if m.get("status") == "ok" and m["k"] == 3 and m["aicc"] is not None}
    if n <= 4 or not two:
        return {"selected": None, "candidates": sorted(two),
                "verdict": f"the data cannot choose: {n} batch sizes (a law comparison needs at least 5, "
                           f"and 6 for a 3-parameter law)"}
    ranked = sorted(two, key=lambda k: two[k]["aicc"])
    best = ranked[0]
    close = [k for k in ranked if two[k]["aicc"] - two[best]["aicc"] <= margin]
    if len(close) == 1:
        sel, why = best, f"{best} has the lowest AICc, by more than {margin:g} over every other 2-parameter law"
    elif "power" in close:
        sel, why = "power", (f"power is within {margin:g} AICc of the best ({', '.join(close)}): "
                             f"the simpler description is kept")
    else:
        return {"selected": None, "candidates": close,
                "verdict": f"the data cannot choose between {', '.join(close)} (AICc within {margin:g})"}
    three_fitted = [k for k, m in models.items() if m.get("status") == "ok" and m["k"] == 3]
    if three_fitted and (n < 6 or not three):
        why += f"; {', '.join(three_fitted)} not considered (3 parameters need at least 6 batch sizes)"
    elif three:
        k3 = min(three, key=lambda k: three[k]["aicc"])
        if two[sel]["aicc"] - three[k3]["aicc"] > margin:
            sel, why = k3, f"{k3} beats {sel} by {two[sel]['aicc'] - three[k3]['aicc']:.1f} AICc (> {margin:g})"
        else:
            why += f"; {k3} does not beat it by more than {margin:g} AICc"
    return {"selected": sel, "candidates": close, "verdict": f"selected {sel}: {why}"}


def fit_laws(points: pd.DataFrame, which: str = "uncensored", confidence: float = 0.95,
             estimator: str = "argmin", loo: bool = True) -> dict[str, Any]:
    """Fit every law in :data:`LAWS` to ``points`` (``which="uncensored"``: censored optima are
    bounds, not values, and are left out; ``"all"``: the study's way) and select conservatively."""
    pts = points if which == "all" else points[points["censored"].isna()]
    n = len(pts)
    base = {"points": which, "estimator": estimator, "n_points": n,
            "batch_sizes": [int(b) for b in pts["batch_size"]],
            "n_censored_left_out": int(points["censored"].notna().sum()) if which != "all" else 0}
    if n < MIN_POINTS:
        return {**base, "status": NOT_ENOUGH, "selected": None,
                "verdict": f"{n} usable batch size(s): no law can be fitted (at least {MIN_POINTS} needed)",
                "models": {}}
    x, y = pts["x"].to_numpy(float), pts["y"].to_numpy(float)
    se = _weights(pts["se"].to_numpy(float))
    models = {name: fit_law(name, x, y, se, confidence, loo=loo) for name in LAWS}
    sel = select_law(models, n)
    return {**base, "status": "ok", "weighted": se is not None,
            "local_to": [int(pts["batch_size"].min()), int(pts["batch_size"].max())],
            "models": models, **sel}


# ---------------------------------------------------------------------------------------------
# Per-run checks


def clip_flags(runs: pd.DataFrame, rtol: float = 1e-3) -> list[dict[str, Any]]:
    """Runs whose clip metrics contradict each other: the post-clip norm above the threshold while
    clipping is on, or the post-clip norm equal to the pre-clip norm while the clip frequency is > 0
    (clipping reported but not applied — the defect of the study's phase 3a table)."""
    need = {"avg_grad_norm_before", "avg_grad_norm_after", "avg_clip_frequency"}
    out = []
    if not need & set(runs.columns):
        return out
    for _, r in runs.iterrows():
        before = float(r.get("avg_grad_norm_before", math.nan))
        after = float(r.get("avg_grad_norm_after", math.nan))
        freq = float(r.get("avg_clip_frequency", math.nan))
        clip = float(r.get("grad_clip", math.nan))
        problems = []
        if np.isfinite(clip) and np.isfinite(after) and after > clip * (1 + rtol):
            problems.append(f"post-clip norm {after:.4g} above the threshold {clip:g}")
        if np.isfinite(freq) and freq > 0 and np.isfinite(before) and np.isfinite(after) \
                and abs(after - before) <= rtol * max(abs(before), 1e-12):
            problems.append(f"post-clip norm equals pre-clip norm ({after:.4g}) at clip frequency {freq:.3g}")
        if problems:
            out.append({"run_id": r["run_id"], "phase": r["phase"], "batch_size": int(r["batch_size"]),
                        "lr": float(r["lr"]), "problem": "; ".join(problems)})
    return sorted(out, key=lambda d: (d["batch_size"], d["lr"], d["run_id"]))


# ---------------------------------------------------------------------------------------------
# Everything, per phase


def budgets_of(runs: pd.DataFrame) -> list[str]:
    """Distinct budgets among a phase's runs, as ``kind=value`` strings (``unknown`` when unrecorded)."""
    out = set()
    for k, v in zip(runs["budget_kind"], runs["budget"]):
        out.add(f"{k}={v:g}" if isinstance(v, (int, float)) and np.isfinite(v) else str(k))
    return sorted(out)


def _single_threaded_blas():
    """Every matrix here is tiny: BLAS threads only cost (badly, on a busy machine). Limited when
    threadpoolctl is installed; a no-op otherwise."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def analyze(runs: pd.DataFrame, metric: str = "final_val_loss", estimator: str = "argmin",
            exclude_unlearned: bool = False, pool_budgets: bool = False, bootstrap: int = 1000,
            seed: int = 0, window: int = 1, overfit_threshold: float = 0.05, confidence: float = 0.95,
            law_points: str = "uncensored", phases: list[str] | None = None) -> dict[str, Any]:
    """The whole analysis of a runs table, JSON-ready (NaN/inf → None; see docs/compare-schema.md):
    ``{"phases": [...], "comparison": [...], "optima": [...]}`` plus the per-(phase, B, LR) grid
    under each phase's ``grid``. Raises ConfigError for a bad metric/estimator, or a phase mixing
    budgets without ``pool_budgets``."""
    with _single_threaded_blas():
        return _analyze(runs, metric, estimator, exclude_unlearned, pool_budgets, bootstrap, seed, window,
                        overfit_threshold, confidence, law_points, phases)


def _analyze(runs, metric, estimator, exclude_unlearned, pool_budgets, bootstrap, seed, window,
             overfit_threshold, confidence, law_points, phases):
    if metric not in OBJECTIVES:
        raise ConfigError(f"metric must be one of {', '.join(OBJECTIVES)}, got {metric!r}")
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if bootstrap < 0:
        raise ConfigError(f"bootstrap must be >= 0, got {bootstrap}")
    df = normalize_runs(runs)
    order = phases or list(dict.fromkeys(df["phase"]))
    for p in order:
        g = df[df["phase"] == p]
        b = budgets_of(g)
        if len(b) > 1 and not pool_budgets:
            raise ConfigError(f"phase {p!r} mixes runs of different budgets ({', '.join(b)}); compare them "
                              f"as separate phases, or pass --pool-budgets to fit them together")
    for p in order:
        g = df[df["phase"] == p]
        fin = g[g["status"].eq("FINISHED") & ~g["diverged"]]
        if len(fin) and (metric not in fin or fin[metric].isna().all()):
            raise ConfigError(f"phase {p!r}: none of its {len(fin)} finished runs records {metric!r}; "
                              f"choose another --metric (e.g. final_val_loss)")
    df["series"] = series_labels(df)
    results, comparison, all_optima = [], [], []
    for p in order:
        g = df[df["phase"] == p]
        for label in dict.fromkeys(g["series"]):
            s = g[g["series"] == label]
            res = analyze_series(s.assign(phase=label), p, metric=metric, estimator=estimator,
                                 exclude_unlearned=exclude_unlearned, bootstrap=bootstrap, seed=seed,
                                 window=window, overfit_threshold=overfit_threshold,
                                 confidence=confidence, law_points=law_points,
                                 budgets=budgets_of(g), pooled=pool_budgets and len(budgets_of(g)) > 1)
            results.append(res)
            comparison.append(summary_row(res))
            all_optima.extend({"phase": res["phase"], **o} for o in res["optima"])
    return jsonable({"phases": results, "comparison": comparison, "optima": all_optima})


def analyze_series(runs: pd.DataFrame, phase_name: str, metric: str = "final_val_loss",
                   estimator: str = "argmin", exclude_unlearned: bool = False, bootstrap: int = 1000,
                   seed: int = 0, window: int = 1, overfit_threshold: float = 0.05,
                   confidence: float = 0.95, law_points: str = "uncensored",
                   budgets: list[str] | None = None, pooled: bool = False) -> dict[str, Any]:
    """The analysis of one phase (or one clip series of it): normalized runs with ``phase`` = label."""
    label = str(runs["phase"].iloc[0])
    warn: list[str] = []
    n_all = len(runs)
    statuses = runs["status"].value_counts().to_dict()
    usable = runs[runs["status"].isin(["FINISHED", "FAILED"])]
    n_unfinished = n_all - len(usable)
    if n_unfinished:
        warn.append(f"{n_unfinished} run(s) neither finished nor failed (running or killed) were left out")
    y = objective_values(usable, metric)
    n_missing = int(y.isna().sum())
    if n_missing:
        warn.append(f"{n_missing} finished run(s) lack the metric {metric!r} and were left out")
    finished = usable["status"].eq("FINISHED") & ~usable["diverged"]
    learned_counts = {
        "true": int((finished & usable["learned"].map(lambda v: _tristate(v) is True)).sum()),
        "false": int((finished & usable["learned"].map(lambda v: _tristate(v) is False)).sum()),
        "unknown": int((finished & usable["learned"].map(lambda v: _tristate(v) is None)).sum()),
        "diverged_or_failed": int((~finished).sum()),
    }
    n_excluded = 0
    if exclude_unlearned:
        drop = finished & usable["learned"].map(lambda v: _tristate(v) is False)
        n_excluded = int(drop.sum())
        usable = usable[~drop]
    clip_series = usable["grad_clip"].dropna()
    grad_clip = float(clip_series.iloc[0]) if len(clip_series) else None
    configs = config_table(usable, metric)
    optima = optimum_table(usable, metric, window=window, overfit_threshold=overfit_threshold,
                           configs=configs)
    points = estimate_points(optima, estimator)
    alpha = None
    if "tail_index_alpha" in usable and usable["tail_index_alpha"].notna().any():
        alpha = float(usable["tail_index_alpha"].median())
    fits = {"all": fit_power(points, "all", bootstrap, seed, confidence, alpha, estimator),
            "uncensored": fit_power(points, "uncensored", bootstrap, seed, confidence, alpha, estimator),
            "censored": fit_censored(points, confidence, alpha, estimator)}
    laws = fit_laws(points, law_points, confidence, estimator)

    baselines = {}
    for k in ("uniform", "unigram", "bigram"):
        c = f"baseline_{k}_loss"
        baselines[k] = float(runs[c].median()) if c in runs and runs[c].notna().any() else None

    ok_opt = optima[optima["status"].eq("ok")]
    cf = ok_opt["clip_frequency"].to_numpy(float) if len(ok_opt) else np.array([])
    cf = cf[np.isfinite(cf)]
    mean_cf = float(cf.mean()) if len(cf) else None
    flags = clip_flags(usable)
    if flags:
        warn.append(f"{len(flags)} run(s) have inconsistent clip metrics (e.g. B={flags[0]['batch_size']} "
                    f"lr={flags[0]['lr']:g}: {flags[0]['problem']}); the regime read from them is suspect")
    censored_pts = ok_opt[ok_opt["censored"].isin(["low", "high"])]
    needs_search = [{"batch_size": int(r["batch_size"]), "direction": r["censored"],
                     "edge_lr": float(r["argmin_lr"])} for _, r in censored_pts.iterrows()]
    if needs_search:
        warn.append("optimum on the edge of the LR grid (censored) for " + ", ".join(
            f"B={d['batch_size']} ({d['direction']}, edge {d['edge_lr']:g})" for d in needs_search)
            + ": search past the edge (scaling search)")
    fa = fits["all"]
    if fa["status"] == "ok" and fa["rests_on_censored"]:
        warn.append(f"the 'all' fit rests on {fa['n_censored']} censored optimum/optima (bounds used as values)")
    n_opt_unlearned = int(ok_opt["learned"].map(lambda v: _tristate(v) is False).sum()) if len(ok_opt) else 0
    if n_opt_unlearned and fa["status"] == "ok":
        warn.append(f"the fit rests on {n_opt_unlearned} optimum/optima from runs that did not learn "
                    f"(final val loss above the unigram baseline{_bl(baselines)})")
    if learned_counts["false"]:
        warn.append(f"{learned_counts['false']} of {learned_counts['false'] + learned_counts['true'] + learned_counts['unknown']} "
                    f"finished run(s) did not learn (final val loss above the unigram baseline{_bl(baselines)})"
                    + ("; they were excluded" if exclude_unlearned else "; --exclude-unlearned drops them"))
    n_unknown_opt = int(ok_opt["learned"].map(lambda v: _tristate(v) is None).sum()) if len(ok_opt) else 0
    over = ok_opt[ok_opt["overfitting"].map(lambda v: _tristate(v) is True)] if len(ok_opt) else ok_opt
    if len(over):
        warn.append(f"validation loss rose by more than {overfit_threshold:g} after its minimum at the optimum "
                    f"of B={', '.join(str(int(b)) for b in over['batch_size'])} (overfitting)")
    if fa["status"] == "ok" or fits["uncensored"]["status"] == "ok":
        lt = (fa if fa["status"] == "ok" else fits["uncensored"])["local_to"]
        warn.append(f"beta is local to the batch sizes tested (B = {lt[0]}..{lt[1]})")
    if len(budgets or []) > 1:
        warn.append(f"runs of different budgets pooled: {', '.join(budgets)}")

    finite = configs[np.isfinite(configs["loss"].astype(float))]
    best = None
    if len(finite):
        r = finite.loc[finite["loss"].idxmin()]
        best = {"loss": float(r["loss"]), "batch_size": int(r["batch_size"]), "lr": float(r["lr"]),
                "grad_clip": None if not np.isfinite(r["grad_clip"]) else float(r["grad_clip"]),
                "run_ids": list(r["run_ids"])}
    kinds = sorted(set(usable["budget_kind"])) if len(usable) else []
    return {
        "phase": label, "phase_name": phase_name, "grad_clip": grad_clip, "metric": metric,
        "estimator": estimator,
        "n_runs": n_all, "n_runs_used": int(len(usable) - n_missing), "statuses": statuses,
        "n_diverged_or_failed": learned_counts["diverged_or_failed"],
        "n_excluded_unlearned": n_excluded,
        "sources": usable["source"].value_counts().to_dict(),
        "budget": {"kinds": kinds, "budgets": budgets or budgets_of(usable), "pooled": pooled},
        "baselines": baselines,
        "learned": {**learned_counts, "optima_unlearned": n_opt_unlearned, "optima_unknown": n_unknown_opt,
                    "excluded": exclude_unlearned},
        "best": best,
        "regime": {"name": regime(mean_cf), "mean_clip_frequency_at_optimum": mean_cf,
                   "clip_metrics_consistent": not flags},
        "clip_flags": flags,
        "tail_index_alpha": alpha,
        "optima": [_optimum_record(r) for _, r in optima.iterrows()],
        "needs_search_past_edge": needs_search,
        "fits": fits, "laws": laws,
        "grid": [{"batch_size": int(r["batch_size"]), "lr": float(r["lr"]), "loss": r["loss"],
                  "loss_std": r["loss_std"], "n_runs": int(r["n_runs"]), "n_diverged": int(r["n_diverged"]),
                  "avg_clip_frequency": r["avg_clip_frequency"], "learned": r["learned"]}
                 for _, r in configs.iterrows()],
        "warnings": warn,
    }


def _bl(b: dict) -> str:
    return f" {b['unigram']:.3f}" if b.get("unigram") is not None else ""


def _optimum_record(r: pd.Series) -> dict[str, Any]:
    keys = ["batch_size", "status", "n_lrs", "lr_min", "lr_max", "n_runs", "n_diverged", "argmin_lr",
            "argmin_loss", "argmin_loss_std", "argmin_n", "censored", "vertex_lr", "vertex_log_se",
            "vertex_status", "clip_frequency", "regime", "learned", "val_loss_rise", "overfitting",
            "argmin_run_ids"]
    d = {k: r.get(k) for k in keys}
    d["batch_size"] = int(d["batch_size"])
    return d


def summary_row(res: dict[str, Any]) -> dict[str, Any]:
    """One row per phase for the side-by-side table."""
    fa, fu, fc = res["fits"]["all"], res["fits"]["uncensored"], res["fits"]["censored"]
    ok = [o for o in res["optima"] if o["status"] == "ok"]
    return {
        "phase": res["phase"], "budget": ", ".join(res["budget"]["budgets"]),
        "n_batch_sizes": len(ok),
        "n_censored": sum(1 for o in ok if o["censored"] in ("low", "high")),
        "beta_all": fa.get("beta"), "beta_all_ci_t": fa.get("beta_ci_t"), "r2_all": fa.get("r2"),
        "beta_all_se": fa.get("beta_se"), "beta_all_ci_bootstrap": fa.get("beta_ci_bootstrap"),
        "status_all": fa["status"],
        "beta_uncensored": fu.get("beta"), "beta_uncensored_ci_t": fu.get("beta_ci_t"),
        "status_uncensored": fu["status"],
        "beta_censored": fc.get("beta"), "beta_censored_ci": fc.get("beta_ci"), "status_censored": fc["status"],
        "regime": res["regime"]["name"],
        "best_loss": (res["best"] or {}).get("loss"),
        "best_config": (None if not res["best"] else
                        f"B={res['best']['batch_size']} lr={res['best']['lr']:g}"),
        "baseline_unigram": res["baselines"]["unigram"], "baseline_bigram": res["baselines"]["bigram"],
        "n_unlearned": res["learned"]["false"], "n_learned_unknown": res["learned"]["unknown"],
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

"""Predictions of β from the gradient noise measured in the runs themselves (pure numpy / pandas).

Each run measures its critical batch size B_noise (B_simple of McCandlish et al. 2018, metric
``b_noise``, in sequences) and the tail index α of its gradient noise (``tail_index_alpha``); see
:mod:`scaling.noise`. From them, per phase:

- B_noise at the end of training: the median over the runs near their optimum (the argmin LR of each
  batch size and its ``window`` neighbours in that batch size's LR grid), with its interquartile range
  (:func:`b_noise_summary`); B_noise over training from the runs' metric histories, on a clock of
  fractions of each run's steps (:func:`by_fraction_of_training`, :func:`b_noise_over_training`).
- The local slope d ln LR_opt / d ln B each law predicts at batch size B from B_noise alone
  (:data:`LAWS`, :func:`local_slope`), no fitting:

  ``sgd``        LR_opt = ε / (1 + B_noise/B)          slope B_noise / (B + B_noise)
  ``adam_sqrt``  LR_opt = ε / (1 + B_noise/B)^(1/2)    half of it
  ``surge``      LR_opt = ε / cosh(½ ln(B_noise/B))    ½ (B_noise − B) / (B_noise + B)

  and their average over the grid's batch sizes — and the least-squares slope of the predicted curve over
  the grid's ln B, which is what a power-law fit of exact optima would measure (:func:`predicted_beta`).
- The tail-index prediction β = 1 − 1/α (:func:`tail_index_beta`).
- :func:`compare_with_measured` sets each predicted β beside the β fitted to LR_opt(B) and its interval;
  :func:`theory_report` bundles all of it for one phase as a JSON-ready dict.

The plot of LR_opt(B) against the predicted laws is :func:`scaling.theory_plots.plot_noise_prediction`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd


def _slope_sgd(b, bn):
    return bn / (b + bn)


def _slope_adam(b, bn):
    return 0.5 * bn / (b + bn)


def _slope_surge(b, bn):
    return 0.5 * (bn - b) / (bn + b)


def _curve_sgd(b, bn):
    return -np.log1p(bn / b)


def _curve_adam(b, bn):
    return -0.5 * np.log1p(bn / b)


def _curve_surge(b, bn):
    z = np.abs(0.5 * np.log(bn / b))
    return -(z + np.log1p(np.exp(-2 * z)) - math.log(2))  # −ln cosh, without overflow


#: law → (local slope(B, B_noise), ln LR_opt(B) − ln ε (B, B_noise), formula)
LAWS: dict[str, tuple[Callable, Callable, str]] = {
    "sgd": (_slope_sgd, _curve_sgd, "LR_opt = eps / (1 + B_noise/B)  (SGD, McCandlish et al. 2018)"),
    "adam_sqrt": (_slope_adam, _curve_adam, "LR_opt = eps / (1 + B_noise/B)^(1/2)  (Adam, square root)"),
    "surge": (_slope_surge, _curve_surge, "LR_opt = eps / cosh(ln(B_noise/B) / 2)  (surge, Li et al. 2024)"),
}


def local_slope(law: str, batch_size, b_noise):
    """d ln LR_opt / d ln B of ``law`` at ``batch_size`` (array-like) for a given B_noise."""
    return LAWS[law][0](np.asarray(batch_size, float), float(b_noise))


def law_curve(law: str, batch_size, b_noise):
    """ln LR_opt(B) − ln ε of ``law``: the shape B_noise predicts, up to the unpredicted scale ε."""
    return LAWS[law][1](np.asarray(batch_size, float), float(b_noise))


def grid_slope(law: str, batch_sizes: Iterable[float], b_noise: float) -> float:
    """Least-squares slope of the predicted ln LR_opt on ln B over ``batch_sizes`` (NaN for one size)."""
    b = np.asarray(sorted({float(v) for v in batch_sizes}))
    if len(b) < 2 or not (b_noise > 0):
        return math.nan
    x, y = np.log(b), law_curve(law, b, b_noise)
    return float(np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2))


def predicted_beta(batch_sizes: Iterable[float], b_noise: float) -> dict[str, dict[str, Any]]:
    """Per law: the local slope at each batch size, their mean over the grid, the grid slope."""
    bs = sorted({int(v) for v in batch_sizes})
    out = {}
    for law in LAWS:
        slopes = [float(local_slope(law, b, b_noise)) if b_noise > 0 else math.nan for b in bs]
        out[law] = {"formula": LAWS[law][2], "per_batch": dict(zip(bs, slopes)),
                    "mean": float(np.mean(slopes)) if bs else math.nan,
                    "grid_slope": grid_slope(law, bs, b_noise)}
    return out


# ---------------------------------------------------------------------------------------------
# B_noise of a phase's runs


def runs_near_optima(runs: pd.DataFrame, optima: pd.DataFrame, window: int = 1) -> pd.DataFrame:
    """The runs at each batch size's optimum LR (``optima``: :func:`scaling.analysis.optimum_table`, rows
    with status ``ok``) or within ``window`` steps of it in that batch size's LR grid (the LRs of its runs)."""
    keep = pd.Series(False, index=runs.index)
    ok = optima[optima["status"].eq("ok")] if "status" in optima else optima
    # a phase whose budgets are fitted together has one optimum per (B, budget): match the budget too
    budget_key = next((k for k in ("budget_label", "budget") if k in optima), None)
    for _, o in ok.iterrows():
        at_b = runs["batch_size"].eq(o["batch_size"])
        if "phase" in runs and "phase" in o:
            at_b &= runs["phase"].astype(str).eq(str(o["phase"]))
        if budget_key and "budget_label" in runs and isinstance(o[budget_key], str):
            at_b &= runs["budget_label"].astype(str).eq(o[budget_key])
        lrs = np.sort(runs.loc[at_b, "lr"].astype(float).unique())
        if not len(lrs):
            continue
        i = int(np.argmin(np.abs(np.log(lrs) - math.log(float(o["argmin_lr"])))))
        near = lrs[max(0, i - window):i + window + 1]
        lr = runs["lr"].astype(float).to_numpy()
        keep |= at_b & np.isclose(lr[:, None], near[None, :], rtol=1e-9).any(1)
    return runs[keep]


def _quantiles(v: np.ndarray) -> dict[str, Any]:
    if not len(v):
        return {"median": None, "q25": None, "q75": None, "n": 0}
    q25, q50, q75 = np.quantile(v, [0.25, 0.5, 0.75])
    return {"median": float(q50), "q25": float(q25), "q75": float(q75), "n": len(v)}


def b_noise_summary(runs: pd.DataFrame, optima: pd.DataFrame, column: str = "b_noise",
                    window: int = 1) -> dict[str, Any]:
    """Median and interquartile range of ``column`` over the runs near their optimum, overall and per
    batch size (B_noise is a property of where training got to, so it may drift with B)."""
    if column not in runs:
        return {"column": column, "window": window, **_quantiles(np.array([])), "by_batch": []}
    near = runs_near_optima(runs, optima, window)
    vals = pd.to_numeric(near[column], errors="coerce")
    near = near[np.isfinite(vals) & (vals > 0)]
    vals = vals[near.index].to_numpy(float)
    by_batch = [{"batch_size": int(b), **_quantiles(pd.to_numeric(g[column]).to_numpy(float))}
                for b, g in near.groupby("batch_size")]
    return {"column": column, "window": window, **_quantiles(vals), "by_batch": by_batch}


def by_fraction_of_training(history: pd.DataFrame, bins: int = 10) -> pd.DataFrame:
    """A metric history (columns ``run_id``, ``step``, ``value``) on a common clock: each run's steps as
    fractions of its last logged step, cut into ``bins`` equal bins; per run and bin the last value
    (B_simple is a running average, so its last value in a bin is the bin's estimate). Runs of
    different batch sizes train for different numbers of steps; this is what lets their histories be
    pooled. Columns: run_id, fraction (the bin's upper edge), value."""
    h = history[["run_id", "step", "value"]].copy()
    h["value"] = pd.to_numeric(h["value"], errors="coerce")
    h = h[np.isfinite(h["value"]) & (h["step"] > 0)].sort_values(["run_id", "step"])
    if not len(h):
        return pd.DataFrame({"run_id": [], "fraction": [], "value": []})
    frac = h["step"] / h.groupby("run_id")["step"].transform("max")
    h["fraction"] = np.ceil(np.round(frac * bins, 9)) / bins
    return h.groupby(["run_id", "fraction"], as_index=False)["value"].last()


def b_noise_over_training(history: pd.DataFrame, x: str = "step", value: str = "value") -> pd.DataFrame:
    """Median and quartiles of a metric history over runs (``history``: one row per run and logged
    point, e.g. ``gns_b_simple`` from MLflow's metric history) at each ``x`` (a step, or a fraction of
    training where the runs' lengths differ). Columns: x, median, q25, q75, n."""
    h = history[[x, value]].copy()
    h[value] = pd.to_numeric(h[value], errors="coerce")
    h = h[np.isfinite(h[value])]
    g = h.groupby(x)[value]
    out = pd.DataFrame({"median": g.median(), "q25": g.quantile(0.25), "q75": g.quantile(0.75), "n": g.size()})
    return out.reset_index()


# ---------------------------------------------------------------------------------------------
# Predicted against measured


def tail_index_beta(alpha: float | None, q25: float | None = None, q75: float | None = None) -> dict[str, Any]:
    """β = 1 − 1/α (Şimşekli et al. 2019's α-stable noise), with the range from α's quartiles."""
    if alpha is None or not np.isfinite(alpha) or alpha <= 0:
        return {"alpha": None, "beta": None, "beta_range": None}
    rng = None
    if q25 is not None and q75 is not None and q25 > 0:
        rng = [1 - 1 / q25, 1 - 1 / q75]
    return {"alpha": float(alpha), "beta": 1 - 1 / alpha, "beta_range": rng}


def _inside(value: float | None, ci) -> bool | None:
    if value is None or ci is None or not np.isfinite(value):
        return None
    lo, hi = (list(ci) + [None, None])[:2]
    if lo is None or hi is None or not (np.isfinite(lo) or np.isfinite(hi)) or math.isnan(lo) or math.isnan(hi):
        return None
    return bool(lo <= value <= hi)


def compare_with_measured(b_noise: Mapping[str, Any], batch_sizes: Iterable[float], beta: float | None,
                          beta_ci, tail: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per prediction: ``name``, predicted ``beta`` (the mean local slope over the grid, or
    1 − 1/α), ``beta_grid`` (the grid slope), ``beta_range`` (the same at B_noise's quartiles, or α's),
    ``per_batch`` (the local slope at each batch size; None for the tail index), the measured
    ``beta_measured`` and ``beta_ci``, and ``consistent``: the prediction inside the interval (None
    when either is unknown)."""
    bs = list(batch_sizes)
    rows = []
    med = b_noise.get("median")
    for law in LAWS:
        if med is None:
            rows.append({"name": law, "beta": None, "beta_grid": None, "beta_range": None, "per_batch": None})
            continue
        p = predicted_beta(bs, med)[law]
        rng = None
        if b_noise.get("q25") and b_noise.get("q75"):
            rng = [predicted_beta(bs, b_noise["q25"])[law]["mean"], predicted_beta(bs, b_noise["q75"])[law]["mean"]]
        rows.append({"name": law, "beta": p["mean"], "beta_grid": p["grid_slope"], "beta_range": rng,
                     "per_batch": p["per_batch"]})
    if tail is not None and tail.get("beta") is not None:
        rows.append({"name": "tail_index", "beta": tail["beta"], "beta_grid": None, "beta_range": tail["beta_range"],
                     "per_batch": None})
    for r in rows:
        r.update(beta_measured=beta, beta_ci=list(beta_ci) if beta_ci is not None else None,
                 consistent=_inside(r["beta"], beta_ci))
    return rows


def theory_report(runs: pd.DataFrame, optima: pd.DataFrame, beta: float | None, beta_ci,
                  window: int = 1, batch_sizes: Iterable[float] | None = None) -> dict[str, Any]:
    """Everything above for one phase (``runs``: its runs table with ``b_noise`` / ``tail_index_alpha``
    columns where measured; ``optima``: its optimum table; ``beta``, ``beta_ci``: the fitted β and its
    interval; ``batch_sizes``: the grid the predictions average over, best the one β was fitted on;
    default: every batch size with an optimum). JSON-ready; B_noise in sequences."""
    if batch_sizes is None:
        batch_sizes = optima.loc[optima["status"].eq("ok"), "batch_size"] if len(optima) else []
    bs = sorted({int(b) for b in batch_sizes})
    out: dict[str, Any] = {"batch_sizes": bs}
    for col in ("b_noise", "b_noise_median", "b_noise_adam"):
        out[col] = b_noise_summary(runs, optima, col, window)
    tail = None
    if "tail_index_alpha" in runs:
        near = runs_near_optima(runs, optima, window)
        a = pd.to_numeric(near["tail_index_alpha"], errors="coerce").to_numpy(float)
        q = _quantiles(a[np.isfinite(a)])
        tail = {**tail_index_beta(q["median"], q["q25"], q["q75"]), "alpha_q25": q["q25"],
                "alpha_q75": q["q75"], "n": q["n"]}
    out["tail_index"] = tail
    out["predictions"] = compare_with_measured(out["b_noise"], bs, beta, beta_ci, tail)
    return out

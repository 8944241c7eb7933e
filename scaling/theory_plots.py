"""The plot of LR_opt(B) against the laws B_noise predicts (matplotlib, Agg backend; plain inputs).

:func:`plot_noise_prediction` draws the measured optima with error bars, the laws fitted to them (when
given), and the curve each law of :data:`scaling.theory.LAWS` predicts from the measured B_noise alone:
its shape is not fitted; only its height (the scale ε, which B_noise does not predict) is set so that
it passes through the measured points' centre in ln LR. A band shows the curves at B_noise's quartiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from scaling import analysis, theory  # noqa: E402

PREDICTED_COLORS = {"sgd": "tab:red", "adam_sqrt": "tab:green", "surge": "tab:purple"}


def is_censored(value) -> bool:
    """Whether a ``censored`` entry marks a bound: ``"low"`` / ``"high"`` (as the optimum table writes it)
    or True; None, NaN, False and "" do not."""
    return value is True or (isinstance(value, str) and value.strip().lower() in ("low", "high", "true"))


def _anchored(law: str, b: np.ndarray, bn: float, x_pts: np.ndarray, y_pts: np.ndarray) -> np.ndarray:
    """ln LR of the predicted law along ``b``, its ε set through the points' mean residual in ln LR."""
    shift = float(np.mean(y_pts - theory.law_curve(law, np.exp(x_pts), bn)))
    return shift + theory.law_curve(law, b, bn)


def plot_noise_prediction(points: pd.DataFrame, b_noise: Mapping[str, Any] | float, path: str | Path,
                          fitted: Mapping[str, Mapping[str, Any]] | None = None, title: str = "") -> Path:
    """LR_opt(B) measured, fitted and predicted from B_noise.

    ``points``: columns ``batch_size``, ``lr`` (the optimum), optional ``lr_lo`` / ``lr_hi`` (its
    interval) and ``censored`` (a truthy value marks a bound: drawn hollow, not used for the anchor).
    ``b_noise``: a number, or a dict with ``median`` and optional ``q25`` / ``q75`` (as
    :func:`scaling.theory.b_noise_summary` returns). ``fitted``: law name of
    :data:`scaling.analysis.LAWS` → a dict with ``theta`` (and ``status`` "ok"), as ``scaling compare``
    reports its fitted laws. Returns the path written."""
    bn = b_noise if isinstance(b_noise, (int, float)) else (b_noise or {}).get("median")
    quart = None if isinstance(b_noise, (int, float)) else (b_noise.get("q25"), b_noise.get("q75"))
    pts = points.sort_values("batch_size")
    cens = pts["censored"].map(is_censored) if "censored" in pts else pd.Series(False, index=pts.index)
    fig, ax = plt.subplots(figsize=(9.5, 5.6))
    bs = pts["batch_size"].to_numpy(float)
    grid = np.geomspace(bs.min() / 1.5, bs.max() * 1.5, 150) if len(bs) else np.array([1.0, 2.0])
    for mask, style, label in ((~cens, {"fmt": "o", "color": "black"}, "measured optimum"),
                               (cens, {"fmt": "o", "mfc": "white", "color": "gray"}, "censored optimum (bound)")):
        sel = pts[mask.to_numpy()]
        if not len(sel):
            continue
        lr = sel["lr"].to_numpy(float)
        err = None
        if {"lr_lo", "lr_hi"} <= set(sel):
            err = [lr - sel["lr_lo"].to_numpy(float), sel["lr_hi"].to_numpy(float) - lr]
        ax.errorbar(sel["batch_size"], lr, yerr=err, capsize=3, ms=7, zorder=5, label=label, **style)
    for name, m in (fitted or {}).items():
        if m.get("status", "ok") == "ok" and name in analysis.LAWS:
            y = analysis.LAWS[name][0](np.log(grid), *m["theta"])
            ax.plot(grid, np.exp(y), lw=1.2, alpha=0.7, label=f"fitted {name}")
    unc = pts[~cens.to_numpy()]
    if bn and len(unc):
        x_pts, y_pts = np.log(unc["batch_size"].to_numpy(float)), np.log(unc["lr"].to_numpy(float))
        for law in theory.LAWS:
            color = PREDICTED_COLORS.get(law)
            ax.plot(grid, np.exp(_anchored(law, grid, bn, x_pts, y_pts)), "--", lw=2.2, color=color,
                    label=f"predicted {law} from B_noise={bn:.3g} (shape not fitted)")
            if quart and all(q and q > 0 for q in quart):
                lo, hi = (np.exp(_anchored(law, grid, q, x_pts, y_pts)) for q in quart)
                ax.fill_between(grid, np.minimum(lo, hi), np.maximum(lo, hi), color=color, alpha=0.12, lw=0)
        ax.axvline(bn, color="gray", lw=1, ls=":", label="B_noise")
        if quart and all(q and q > 0 for q in quart):
            ax.axvspan(*quart, color="gray", alpha=0.08, lw=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size B (sequences)")
    ax.set_ylabel("optimal learning rate")
    ax.set_title(title or "LR_opt(B): measured, fitted, and predicted from the measured B_noise", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

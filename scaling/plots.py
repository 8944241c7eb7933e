"""PNG plots of a ``scaling compare`` report (matplotlib, Agg backend; no display needed).

- ``lr_opt_vs_batch_<phase>.png``: LR_opt vs B on log-log axes — grid argmins, censored optima as
  arrows from their bound, vertex estimates with ±1.96 SE, the fits that could be made with their
  95% bands, every fitted law, theory slopes through the headline fit (none when no fit was made),
  and the phase's caveats under the axes.
- ``loss_heatmap_<phase>.png``: objective over batch size × LR, one equal-width column per LR,
  optimum per batch size boxed.
- ``beta_by_phase.png``: β per phase and fit with its interval against the theory values, each
  phase's caveats under its name.
- ``clip_frequency_<phase>.png``: clip frequency vs LR per batch size (only where clip metrics exist).
- ``noise_prediction_<phase>.png``: LR_opt vs B against the laws the measured B_noise predicts
  (:func:`scaling.theory_plots.plot_noise_prediction`; only where the phase has the gradient noise section).
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.cm
import matplotlib.colors
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd

from scaling import analysis

FIT_STYLE = {"all": ("tab:blue", "-"), "uncensored": ("tab:green", "-"), "censored": ("tab:purple", "--")}
LAW_COLORS = {"power": "tab:blue", "saturating_a1": "tab:orange", "saturating_a1_2": "tab:brown",
              "saturating_free": "tab:red", "surge": "tab:olive"}
THEORY_STYLE = {"gaussian": ":", "laplace_alpha3": "-.", "linear": "--", "saturation": (0, (6, 2, 1, 2, 1, 2)),
                "tail_index": (0, (5, 1, 1, 1))}
DPI = 110
#: The most LRs an axis labels one by one; beyond, decades only.
MAX_LR_LABELS = 9


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_")


def make_plots(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Every plot of the report into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ph in report["phases"]:
        slug = _slug(ph["phase"])
        paths.append(plot_lr_opt(ph, out / f"lr_opt_vs_batch_{slug}.png"))
        paths.append(plot_heatmap(ph, out / f"loss_heatmap_{slug}.png"))
        p = plot_clip_frequency(ph, out / f"clip_frequency_{slug}.png")
        if p is not None:
            paths.append(p)
        p = plot_noise(ph, out / f"noise_prediction_{slug}.png")
        if p is not None:
            paths.append(p)
    paths.append(plot_beta(report, out / "beta_by_phase.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def lr_label(lr: float) -> str:
    """A learning rate in at most 2 significant digits, short: ``3e-4``, ``1.2e-3``, ``0.01``, ``0.3``."""
    if lr >= 0.01 or lr <= 0:
        return f"{lr:.2g}"
    mant, exp = f"{lr:.1e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


def _lr_ticks(ax, lrs, axis: str = "x", each: bool = True) -> None:
    """Label a log LR axis legibly: each LR when there are few and they are spread (×1.5 apart or
    more), else the decades only (search LRs joining a grid are many and close together)."""
    lrs = sorted({float(v) for v in lrs})
    target = ax.xaxis if axis == "x" else ax.yaxis
    ratios = np.diff(np.log(lrs)) if len(lrs) > 1 else np.array([math.inf])
    if each and len(lrs) <= MAX_LR_LABELS and ratios.min() >= math.log(1.5):
        target.set_major_locator(matplotlib.ticker.FixedLocator(lrs))
        target.set_major_formatter(matplotlib.ticker.FixedFormatter([lr_label(v) for v in lrs]))
        target.set_minor_locator(matplotlib.ticker.NullLocator())
    else:
        decades = math.log10(max(lrs) / min(lrs)) if len(lrs) > 1 else 0.0
        subs = (1.0,) if decades > 3 else (1.0, 2.0, 5.0)  # a narrow range still gets a few labels
        target.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
        target.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: lr_label(v)))
        target.set_minor_locator(matplotlib.ticker.NullLocator())


def caveats(ph: dict[str, Any], width: int = 110, limit: int = 6) -> str:
    """The phase's warnings as wrapped lines for under a plot (the plot says what the text says)."""
    skip = ("beta is local to",)
    lines = [w for w in ph.get("warnings", []) if not w.startswith(skip)]
    out = []
    for w in lines[:limit]:
        out += textwrap.wrap("! " + w, width, subsequent_indent="  ")
    if len(lines) > limit:
        out.append(f"! ... {len(lines) - limit} more in the report")
    return "\n".join(out)


def _add_caveats(fig, ph: dict[str, Any], width: int = 110) -> None:
    """The caveats under everything the figure already holds."""
    text = caveats(ph, width)
    if text:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        bottom = min(a.get_tightbbox(renderer).transformed(fig.transFigure.inverted()).y0 for a in fig.axes)
        fig.text(0.01, bottom - 0.02, text, ha="left", va="top", fontsize=7, color="crimson", family="monospace")


def _fit_label(kind: str, f: dict[str, Any], same: bool) -> str:
    name = "all = uncensored" if same else kind
    if kind == "censored":
        lab = f"censored MLE: beta={f['beta']:.2f}, 95% {_ci(f['beta_ci'])} ({f['n_censored']} censored as bounds)"
    else:
        lab = f"{name}: beta={f['beta']:.2f}, 95% {_ci(f['beta_ci_t'])}, R2={_f2(f.get('r2'))} (band: 95%)"
    if not f.get("interval_calibrated", True):
        lab += f"\n  NOT a 95% interval: {f['n_censored']} censored optima taken at their edge"
    if f.get("unlearned_batch_sizes"):
        lab += f"\n  rests on {len(f['unlearned_batch_sizes'])} optima of runs that did not learn"
    return lab


def plot_lr_opt(ph: dict[str, Any], path: str | Path, seed: int = 0) -> Path:
    """LR_opt vs B for one phase."""
    fig, ax = plt.subplots(figsize=(11.5, 5.6))
    ok = [o for o in ph["optima"] if o["status"] == "ok"]
    if not ok:
        ax.text(0.5, 0.5, "no usable optimum", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"phase {ph['phase']}: optimal LR vs batch size")
        _add_caveats(fig, ph)
        return _save(fig, Path(path))
    bs = np.array(sorted({o["batch_size"] for o in ok}), float)
    grid_b = np.geomspace(bs.min() / 1.25, bs.max() * 1.25, 120)
    lrs = _draw_optima(ax, ok)
    _draw_fits(ax, ph, grid_b)
    _draw_laws(ax, ph, grid_b, seed)
    drawn = _draw_theory(ax, ph, grid_b)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(bs)
    ax.set_xticklabels([str(int(b)) for b in bs])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlim(grid_b[0], grid_b[-1])
    ax.set_ylim(min(lrs) / 6, max(lrs) * 6)
    _lr_ticks(ax, [min(lrs) / 6, max(lrs) * 6], axis="y", each=False)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("optimal learning rate")
    est = ph.get("estimator", "vertex")
    ax.set_title(f"phase {ph['phase']}: optimal LR vs batch size (fits on {est}; beta local to "
                 f"B={int(bs.min())}..{int(bs.max())})" + ("" if drawn else "\nno fit could be made: theory slopes "
                                                            "not drawn"), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    _add_caveats(fig, ph)
    return _save(fig, Path(path))


def _draw_optima(ax, ok: list[dict[str, Any]]) -> list[float]:
    """Argmins (censored ones as arrows from their bound), vertices with ±1.96 SE, and marks on
    optima from runs that did not learn or repeated their data; returns the LRs drawn."""
    unc = [o for o in ok if not o["censored"]]
    if unc:
        ax.plot([o["batch_size"] for o in unc], [o["argmin_lr"] for o in unc], "o", color="black", ms=8,
                zorder=5, label="grid argmin")
    cen = [o for o in ok if o["censored"] in ("low", "high")]
    for i, o in enumerate(cen):
        up = o["censored"] == "high"
        at = o.get("bound_lr") or o["argmin_lr"]
        ax.plot(o["batch_size"], at, "^" if up else "v", color="crimson", ms=9, zorder=5,
                label="censored optimum: beyond the middle of the grid's outer gap" if i == 0 else None)
        ax.annotate("", xy=(o["batch_size"], at * (2.6 if up else 1 / 2.6)), xytext=(o["batch_size"], at),
                    arrowprops={"arrowstyle": "-|>", "color": "crimson", "lw": 1.8}, zorder=5)
    vx = [o for o in ok if o["vertex_status"] == "ok"]
    if vx:
        v = np.array([o["vertex_lr"] for o in vx])
        se = np.array([o["vertex_log_se"] if o["vertex_log_se"] is not None else 0.0 for o in vx])
        yerr = [v - v * np.exp(-1.96 * se), v * np.exp(1.96 * se) - v]
        ax.errorbar([o["batch_size"] * 1.04 for o in vx], v, yerr=yerr,
                    fmt="s", mfc="white", mec="dimgray", ecolor="dimgray", ms=6, capsize=3, zorder=4,
                    label="quadratic vertex" + (" ±1.96 SE" if np.any(se > 0) else " (no SE: one seed)"))
    marks = (("learned", False, "x", "did not learn (above the unigram baseline)"),
             ("repeated_data", True, "D", f"runs repeated their data (> {analysis.MAX_EPOCHS:g} epochs)"))
    for key, value, marker, label in marks:
        hit = [o for o in ok if o.get(key) is value]
        if hit:
            ax.plot([o["batch_size"] for o in hit], [o["argmin_lr"] for o in hit], marker, ms=15, mfc="none",
                    mec="darkorange", mew=2, zorder=6, label=f"optimum from runs that {label}")
    return [o["argmin_lr"] for o in ok] + [o["bound_lr"] for o in cen if o.get("bound_lr")] + \
        [o["vertex_lr"] for o in vx]


def _draw_fits(ax, ph: dict[str, Any], grid_b: np.ndarray) -> None:
    gx = np.log(grid_b)
    fa, fu = ph["fits"]["all"], ph["fits"]["uncensored"]
    same = fa["status"] == "ok" and fa["n_censored"] == 0 and fu["status"] == "ok"
    for kind in analysis.FIT_KINDS:
        f = ph["fits"][kind]
        if f["status"] != "ok" or (same and kind == "uncensored"):
            continue
        color, ls = FIT_STYLE[kind]
        calibrated = f.get("interval_calibrated", True)
        pred = f["log_C"] + f["beta"] * gx
        ax.plot(grid_b, np.exp(pred), ls if calibrated else ":", color=color, lw=2 if calibrated else 1.3,
                label=_fit_label(kind, f, same))
        c = np.array(f.get("cov") or np.full((2, 2), np.nan), float)
        if kind != "censored" and calibrated and np.all(np.isfinite(c)):
            sd = np.sqrt(np.maximum(c[0, 0] + 2 * gx * c[0, 1] + gx ** 2 * c[1, 1], 0))
            ax.fill_between(grid_b, np.exp(pred - f["t_crit"] * sd), np.exp(pred + f["t_crit"] * sd),
                            color=color, alpha=0.12, lw=0)


def _draw_laws(ax, ph: dict[str, Any], grid_b: np.ndarray, seed: int) -> None:
    laws = ph["laws"]
    if laws.get("status") != "ok":
        return
    gx = np.log(grid_b)
    rng = np.random.default_rng(seed)
    verdict = "selected" if laws.get("selected") else "cannot choose"
    for name, m in laws["models"].items():
        if m["status"] != "ok" or name == "power":
            continue
        fn, th = analysis.LAWS[name][0], np.array(m["theta"])
        pred = fn(gx, *th)
        sel = name == laws.get("selected")
        at_bound = bool(m.get("at_bound"))
        ax.plot(grid_b, np.exp(pred), color=LAW_COLORS[name], lw=2.4 if sel else 1.1, alpha=1 if sel else 0.7,
                label=f"law {name}{' (' + verdict + ')' if sel or verdict != 'selected' else ''}, AICc "
                      f"{_f1(m['aicc'])}" + (" (parameter at bound: no band)" if at_bound else ""))
        cov = np.array(m["cov"], float)
        if sel and np.all(np.isfinite(cov)) and not at_bound:
            try:
                draws = rng.multivariate_normal(th, cov, size=300, check_valid="ignore")
                with np.errstate(over="ignore", invalid="ignore"):
                    lo, hi = np.nanpercentile(np.array([fn(gx, *d) for d in draws]), [2.5, 97.5], axis=0)
                lo, hi = np.maximum(lo, pred - 2.0), np.minimum(hi, pred + 2.0)  # at most e^2 either way
                ax.fill_between(grid_b, np.exp(lo), np.exp(hi), color=LAW_COLORS[name], alpha=0.08, lw=0)
            except (np.linalg.LinAlgError, ValueError):
                pass


def _draw_theory(ax, ph: dict[str, Any], grid_b: np.ndarray) -> bool:
    """Theory slopes through the centre of the headline fit; nothing when no fit was made."""
    head = analysis.headline_fit(ph)
    if head is None:
        return False
    kind, f = head
    gx = np.log(grid_b)
    xm = float(np.mean(np.log(f["batch_sizes"])))
    ym = f["log_C"] + f["beta"] * xm
    theories = analysis.THEORY
    if ph.get("tail_index_alpha"):
        theories = (*theories, ("tail_index", 1 - 1 / ph["tail_index_alpha"], ""))
    for name, beta, _ in theories:
        ax.plot(grid_b, np.exp(ym + beta * (gx - xm)), color="gray", lw=1, ls=THEORY_STYLE.get(name, ":"), alpha=0.8,
                label=f"theory {name} (beta={beta:.2g}), through the {kind} fit's centre")
    return True


def plot_heatmap(ph: dict[str, Any], path: str | Path) -> Path:
    """The objective over (batch size, LR): one equal-width column per LR sampled at any batch size
    (blank where a batch size did not run it), one row per batch size (and budget, when a phase's
    budgets are fitted together); diverged cells grey; each row's argmin boxed in red."""
    grid = ph["grid"]
    fig, ax = plt.subplots(figsize=(8.6, 4.8))
    if not grid:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, Path(path))
    pooled = len({g.get("budget") for g in grid}) > 1
    rows = sorted({(g["batch_size"], g.get("budget")) for g in grid}, key=lambda r: (r[0], str(r[1])))
    cols = sorted({g["lr"] for g in grid})
    col_of = {lr: j for j, lr in enumerate(cols)}
    finite = np.array([g["loss"] for g in grid if g["loss"] is not None], float)
    vmin, vmax = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    norm = matplotlib.colors.Normalize(vmin, max(vmax, vmin + 1e-9))
    cmap = plt.get_cmap("viridis_r")
    opt = {(o["batch_size"], o.get("budget")): o for o in ph["optima"] if o["status"] == "ok"}
    small = len(cols) > 8
    for i, key in enumerate(rows):
        for g in (g for g in grid if (g["batch_size"], g.get("budget")) == key):
            j = col_of[g["lr"]]
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.45), 1, 0.9, lw=0,
                                       color="lightgray" if g["loss"] is None else cmap(norm(g["loss"]))))
            if len(grid) <= 120:
                dark = g["loss"] is not None and norm(g["loss"]) > 0.5
                ax.text(j, i, "div." if g["loss"] is None else f"{g['loss']:.3f}", ha="center", va="center",
                        fontsize=6 if small else 7, rotation=90 if small else 0, color="white" if dark else "black")
            o = opt.get(key)
            if o is not None and o["argmin_lr"] == g["lr"]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.45), 1, 0.9, fill=False, ec="red", lw=2.5))
                if o["censored"]:
                    side = 1 if o["censored"] == "high" else -1
                    ax.annotate("", xy=(j + side * 0.75, i), xytext=(j + side * 0.5, i), annotation_clip=False,
                                arrowprops={"arrowstyle": "-|>", "color": "red", "lw": 2})
    step = max(1, math.ceil(len(cols) / 14))
    ax.set_xticks(range(0, len(cols), step))
    ax.set_xticklabels([lr_label(cols[j]) for j in range(0, len(cols), step)], rotation=45, ha="right")
    ax.set_xlim(-0.9, len(cols) - 0.1)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{b} ({bud})" if pooled else str(b) for b, bud in rows])
    ax.set_xlabel("learning rate (one column per LR sampled; not to scale)")
    ax.set_ylabel("batch size")
    cb = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax)
    cb.set_label(ph.get("metric", "loss"))
    bl = ph.get("baselines") or {}
    extra = (f"\nunigram baseline {bl['unigram']:.3f}, bigram {_f3(bl.get('bigram'))}"
             if bl.get("unigram") is not None else "")
    ax.set_title(f"phase {ph['phase']}: {ph.get('metric', 'loss')} (optimum boxed; arrow = censored){extra}",
                 fontsize=10)
    _add_caveats(fig, ph, width=95)
    return _save(fig, Path(path))


def plot_beta(report: dict[str, Any], path: str | Path) -> Path:
    """β per phase and fit kind with its 95% interval (dotted: not calibrated, resting on censored
    optima taken at their edge); the fits that could not be made say why; theory values as
    horizontal lines; each phase's caveats (censored, unlearned, repeated data) under its name."""
    phases = report["phases"]
    fig, ax = plt.subplots(figsize=(max(7.5, 2.2 * len(phases) + 4.5), 5.4))
    offs = dict(zip(analysis.FIT_KINDS, (-0.22, 0.0, 0.22)))
    values = [v for ph in phases for f in ph["fits"].values() if f["status"] == "ok"
              for v in [f["beta"], *(f.get("beta_ci") or [])] if v is not None]
    lo_lim = max(min([-0.3, *values]) - 0.3, -3)
    hi_lim = min(max([1.3, *values]) + 0.3, 4)
    for xi, ph in enumerate(phases):
        for k in analysis.FIT_KINDS:
            _draw_beta(ax, ph["fits"][k], xi + offs[k], FIT_STYLE[k][0], (lo_lim, hi_lim))
    for name, beta, _ in analysis.THEORY:
        ax.axhline(beta, color="gray", lw=1, ls=THEORY_STYLE[name])
        ax.text(len(phases) - 0.45, beta, f"{name} ({beta:.2g})", va="center", fontsize=8, color="dimgray",
                bbox={"fc": "white", "ec": "none", "pad": 1})
    labels = {"all": "all (t 95%; dotted: not calibrated)", "uncensored": "uncensored (t 95%)",
              "censored": "censored MLE (profile 95%)"}
    for k in analysis.FIT_KINDS:
        ax.plot([], [], color=FIT_STYLE[k][0], lw=5, alpha=0.45, label=labels[k])
    ax.set_xticks(range(len(phases)))
    ax.set_xticklabels([f"{p['phase']}\n{_beta_caveat(p)}" for p in phases], fontsize=8)
    ax.set_xlim(-0.6, len(phases) - 0.5 + 0.9)
    ax.set_ylim(lo_lim, hi_lim)
    ax.set_ylabel("beta (LR_opt ∝ B^beta)")
    ax.set_title("beta per phase vs theory (intervals clipped to the axes)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
    return _save(fig, Path(path))


def _draw_beta(ax, f: dict[str, Any], x: float, color, lims: tuple[float, float]) -> None:
    lo_lim, hi_lim = lims
    if f["status"] != "ok":
        ax.text(x, lo_lim + 0.1, f["status"], rotation=90, ha="center", va="bottom", fontsize=7, color=color)
        return
    ci = [v if v is not None else (hi_lim if i else lo_lim) for i, v in enumerate(f["beta_ci"])]
    ci = [min(max(v, lo_lim), hi_lim) for v in ci]
    calibrated = f.get("interval_calibrated", True)
    ax.plot([x, x], ci, color=color, lw=5 if calibrated else 2, alpha=0.45 if calibrated else 0.8,
            ls="-" if calibrated else ":", solid_capstyle="butt")
    ax.plot(x, f["beta"], "o", color=color, ms=7, mfc=color if calibrated else "white")


def _beta_caveat(ph: dict[str, Any]) -> str:
    ok = [o for o in ph["optima"] if o["status"] == "ok"]
    n_cens = sum(o["censored"] in ("low", "high") for o in ok)
    parts = [f"{len(ok)} B"]
    if n_cens:
        parts.append(f"{n_cens} censored")
    if ph["learned"]["optima_unlearned"]:
        parts.append(f"{ph['learned']['optima_unlearned']} optima did not learn")
    if ph["epochs"]["repeated_data_batch_sizes"]:
        parts.append(f"{len(ph['epochs']['repeated_data_batch_sizes'])} repeated data")
    return "\n".join(textwrap.wrap(", ".join(parts), 28))


def noise_points(ph: dict[str, Any]) -> pd.DataFrame:
    """The optima as :func:`scaling.theory_plots.plot_noise_prediction` takes them: the vertex with its
    ±1.96 SE where there is one, else the grid argmin; a censored optimum at its bound."""
    rows = []
    for o in ph["optima"]:
        if o["status"] != "ok":
            continue
        vertex = o["vertex_status"] == "ok" and o.get("vertex_lr")
        lr = o["vertex_lr"] if vertex else (o.get("bound_lr") or o["argmin_lr"]) if o["censored"] else o["argmin_lr"]
        se = (o.get("vertex_log_se") or 0.0) if vertex else 0.0
        rows.append({"batch_size": o["batch_size"], "lr": lr, "lr_lo": lr * math.exp(-1.96 * se),
                     "lr_hi": lr * math.exp(1.96 * se), "censored": o["censored"]})
    return pd.DataFrame(rows, columns=["batch_size", "lr", "lr_lo", "lr_hi", "censored"])


def plot_noise(ph: dict[str, Any], path: str | Path) -> Path | None:
    """LR_opt(B) against the laws the phase's measured B_noise predicts (only where it has the section)."""
    from scaling import noise_report, theory_plots

    sec = (ph.get("sections") or {}).get(noise_report.SECTION)
    pts = noise_points(ph)
    if not sec or sec["b_noise"].get("median") is None or not len(pts):
        return None
    models = ph["laws"].get("models") or {}
    return theory_plots.plot_noise_prediction(
        pts, sec["b_noise"], path, fitted=models,
        title=f"phase {ph['phase']}: LR_opt(B) (vertex ±1.96 SE), fitted laws, and the laws predicted\nfrom "
              f"the B_noise measured in {sec['b_noise']['n']} runs near the optima")


def plot_clip_frequency(ph: dict[str, Any], path: str | Path) -> Path | None:
    """Clip frequency vs LR, one line per batch size; None when the phase has no clip metrics."""
    grid = [g for g in ph["grid"] if g.get("avg_clip_frequency") is not None]
    if not grid:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    bs = sorted({g["batch_size"] for g in grid})
    cmap = plt.get_cmap("plasma")
    opt = {o["batch_size"]: o["argmin_lr"] for o in ph["optima"] if o["status"] == "ok"}
    markers = "osD^vP*X"
    for k, b in enumerate(bs):
        pts = sorted((g["lr"], g["avg_clip_frequency"]) for g in grid if g["batch_size"] == b)
        c = cmap(k / max(1, len(bs) - 1) * 0.85)
        # earlier series drawn wider so that coinciding lines (e.g. all at 1.0) stay visible
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", marker=markers[k % len(markers)], color=c,
                lw=1.5 + 2.5 * (len(bs) - 1 - k) / max(1, len(bs) - 1), ms=11 - 5 * k / max(1, len(bs) - 1),
                alpha=0.85, label=f"B={b}")
        f = [p[1] for p in pts if p[0] == opt.get(b)]
        if f:
            ax.plot(opt[b], f[0], "*", color=c, ms=16, mec="black")
    (low, low_name), (high, mid_name), (_, high_name) = analysis.REGIMES  # the bounds the report's regimes use
    for y in (low, high):
        ax.axhline(y, color="gray", ls=":", lw=1)
    for y, name, va in ((low / 2, low_name, "center"), ((low + high) / 2, mid_name, "center"),
                        (1.035, high_name, "bottom")):
        ax.text(1.0, y, name, transform=ax.get_yaxis_transform(), ha="right", va=va, fontsize=8, color="gray")
    ax.set_xscale("log")
    _lr_ticks(ax, [g["lr"] for g in grid])
    for t in ax.get_xticklabels():
        t.set_rotation(30)
    ax.set_ylim(-0.03, 1.1)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("clip frequency (fraction of steps clipped)")
    n_flags = len(ph.get("clip_flags") or [])
    warn = (f"\n{n_flags} run(s) with INCONSISTENT clip metrics (post-clip norm = pre-clip or above the "
            f"threshold): regime suspect") if n_flags else ""
    ax.set_title(f"phase {ph['phase']}: clip frequency vs LR (star = optimum); regime {ph['regime']['name']}{warn}",
                 fontsize=9, color="crimson" if n_flags else "black")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def _f1(v):
    return "-" if v is None else f"{v:.1f}"


def _f2(v):
    return "-" if v is None else f"{v:.2f}"


def _f3(v):
    return "-" if v is None else f"{v:.3f}"


def _ci(ci):
    if not ci:
        return "-"
    lo, hi = ci
    a = "-inf" if lo is None or (isinstance(lo, float) and math.isinf(lo)) else f"{lo:.2f}"
    b = "inf" if hi is None or (isinstance(hi, float) and math.isinf(hi)) else f"{hi:.2f}"
    return f"[{a}, {b}]"

"""PNG plots of a ``scaling compare`` report (matplotlib, Agg backend; no display needed).

- ``lr_opt_vs_batch_<phase>.png``: LR_opt vs B on log-log axes — grid argmins, censored optima as
  arrows from their edge, quadratic-vertex estimates with ±1.96 SE, the ``all``/``uncensored`` power
  fits with their 95% t bands, the censored (Tobit) fit, every fitted law with its band, theory slopes.
- ``loss_heatmap_<phase>.png``: objective over batch × LR, optimum per batch size boxed.
- ``beta_by_phase.png``: β per phase and fit with its intervals against the theory values.
- ``clip_frequency_<phase>.png``: clip frequency vs LR per batch size (only where clip metrics exist).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.cm  # noqa: E402
import matplotlib.colors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scaling import analysis  # noqa: E402

FIT_STYLE = {"all": ("tab:blue", "-"), "uncensored": ("tab:green", "-"), "censored": ("tab:purple", "--")}
LAW_COLORS = {"power": "tab:blue", "saturating_a1": "tab:orange", "saturating_a1_2": "tab:brown",
              "saturating_free": "tab:red", "surge": "tab:olive"}
THEORY_STYLE = {"gaussian": ":", "laplace_alpha3": "-.", "linear": "--", "saturation": (0, (6, 2, 1, 2, 1, 2)),
                "tail_index": (0, (5, 1, 1, 1))}
DPI = 110


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
    paths.append(plot_beta(report, out / "beta_by_phase.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_lr_opt(ph: dict[str, Any], path: str | Path, seed: int = 0) -> Path:
    """LR_opt vs B for one phase."""
    fig, ax = plt.subplots(figsize=(8.2, 5.6))
    ok = [o for o in ph["optima"] if o["status"] == "ok"]
    if not ok:
        ax.text(0.5, 0.5, "no usable optimum", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"phase {ph['phase']}: optimal LR vs batch size")
        return _save(fig, Path(path))
    bs = np.array([o["batch_size"] for o in ok], float)
    b_lo, b_hi = bs.min() / 1.25, bs.max() * 1.25
    grid_b = np.geomspace(b_lo, b_hi, 120)
    gx = np.log(grid_b)

    unc = [o for o in ok if not o["censored"]]
    cen = [o for o in ok if o["censored"] in ("low", "high")]
    if unc:
        ax.plot([o["batch_size"] for o in unc], [o["argmin_lr"] for o in unc], "o", color="black", ms=8,
                zorder=5, label="grid argmin")
    for i, o in enumerate(cen):
        up = o["censored"] == "high"
        ax.plot(o["batch_size"], o["argmin_lr"], "^" if up else "v", color="crimson", ms=9, zorder=5,
                label="censored argmin (bound)" if i == 0 else None)
        ax.annotate("", xy=(o["batch_size"], o["argmin_lr"] * (2.6 if up else 1 / 2.6)),
                    xytext=(o["batch_size"], o["argmin_lr"]),
                    arrowprops=dict(arrowstyle="-|>", color="crimson", lw=1.8), zorder=5)
    vx = [o for o in ok if o["vertex_status"] == "ok"]
    if vx:
        v = np.array([o["vertex_lr"] for o in vx])
        se = np.array([o["vertex_log_se"] if o["vertex_log_se"] is not None else 0.0 for o in vx])
        lo, hi = v - v * np.exp(-1.96 * se), v * np.exp(1.96 * se) - v
        ax.errorbar([o["batch_size"] * 1.04 for o in vx], v, yerr=[lo, hi], fmt="s", mfc="white",
                    mec="dimgray", ecolor="dimgray", ms=6, capsize=3, zorder=4,
                    label="quadratic vertex" + (" ±1.96 SE" if np.any(se > 0) else " (no SE)"))

    anchor = None
    same = (ph["fits"]["all"]["status"] == "ok" and ph["fits"]["all"]["n_censored"] == 0
            and ph["fits"]["uncensored"]["status"] == "ok")
    for kind in analysis.FIT_KINDS:
        f = ph["fits"][kind]
        if f["status"] != "ok" or (same and kind == "uncensored"):
            continue
        color, ls = FIT_STYLE[kind]
        pred = f["log_C"] + f["beta"] * gx
        if kind == "censored":
            lab = f"censored MLE: beta={f['beta']:.2f} LR-CI {_ci(f['beta_ci'])}"
        else:
            name = "all = uncensored" if same else kind
            lab = f"{name}: beta={f['beta']:.2f}, 95% t-CI {_ci(f['beta_ci_t'])}, R2={f['r2']:.2f} (band: 95%)"
        ax.plot(grid_b, np.exp(pred), ls, color=color, lw=2, label=lab)
        if kind != "censored" and f.get("cov") is not None:
            c = np.array(f["cov"], float)
            if np.all(np.isfinite(c)):
                sd = np.sqrt(np.maximum(c[0, 0] + 2 * gx * c[0, 1] + gx ** 2 * c[1, 1], 0))
                ax.fill_between(grid_b, np.exp(pred - f["t_crit"] * sd), np.exp(pred + f["t_crit"] * sd),
                                color=color, alpha=0.12, lw=0)
        if anchor is None:
            xm = float(np.mean(np.log(bs)))
            anchor = (xm, f["log_C"] + f["beta"] * xm)

    laws = ph["laws"]
    if laws.get("status") == "ok":
        rng = np.random.default_rng(seed)
        for name, m in laws["models"].items():
            if m["status"] != "ok" or name == "power":
                continue
            fn = analysis.LAWS[name][0]
            th = np.array(m["theta"])
            pred = fn(gx, *th)
            sel = name == laws.get("selected")
            at_bound = bool(m.get("at_bound"))
            ax.plot(grid_b, np.exp(pred), color=LAW_COLORS[name], lw=2.4 if sel else 1.3,
                    label=f"{name}{' (selected)' if sel else ''}, AICc {_f(m['aicc'])}"
                          + (" (parameter at bound: no band)" if at_bound else ""))
            cov = np.array(m["cov"], float)
            if np.all(np.isfinite(cov)) and not at_bound:
                try:
                    draws = rng.multivariate_normal(th, cov, size=300, check_valid="ignore")
                    with np.errstate(over="ignore", invalid="ignore"):
                        preds = np.array([fn(gx, *d) for d in draws])
                        lo, hi = np.nanpercentile(preds, [2.5, 97.5], axis=0)
                        lo, hi = np.maximum(lo, pred - 2.0), np.minimum(hi, pred + 2.0)  # at most e^2 either way
                        ax.fill_between(grid_b, np.exp(lo), np.exp(hi),
                                        color=LAW_COLORS[name], alpha=0.08, lw=0)
                except (np.linalg.LinAlgError, ValueError):
                    pass

    if anchor is None:
        ys = np.log([o["argmin_lr"] for o in ok])
        anchor = (float(np.mean(np.log(bs))), float(np.mean(ys)))
    theories = analysis.THEORY
    if ph.get("tail_index_alpha"):
        a = ph["tail_index_alpha"]
        theories = (*theories, ("tail_index", 1 - 1 / a, ""))
    for name, beta, _ in theories:
        ax.plot(grid_b, np.exp(anchor[1] + beta * (gx - anchor[0])), color="gray", lw=1,
                ls=THEORY_STYLE.get(name, ":"), alpha=0.8, label=f"theory {name} (beta={beta:.2g}), through the fit's centre")

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(bs)
    ax.set_xticklabels([str(int(b)) for b in bs])
    ax.minorticks_off()
    ax.set_xlim(b_lo, b_hi)
    lrs = [o["argmin_lr"] for o in ok] + [o["vertex_lr"] for o in vx]
    ax.set_ylim(min(lrs) / 6, max(lrs) * 6)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("optimal learning rate")
    est = ph.get("estimator", "argmin")
    ax.set_title(f"phase {ph['phase']}: optimal LR vs batch size (fits on {est}; "
                 f"beta local to B={int(bs.min())}..{int(bs.max())})", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.set_size_inches(11.5, 5.6)
    return _save(fig, Path(path))


def plot_heatmap(ph: dict[str, Any], path: str | Path) -> Path:
    """The objective over (batch size, LR) as cells on a log-LR axis (each batch size's own LR grid:
    a cell spans half-way to its neighbours); diverged cells grey; each row's argmin boxed in red."""
    grid = ph["grid"]
    fig, ax = plt.subplots(figsize=(8.2, 4.8))
    if not grid:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, Path(path))
    bs = sorted({g["batch_size"] for g in grid})
    all_lrs = sorted({g["lr"] for g in grid})
    finite = np.array([g["loss"] for g in grid if g["loss"] is not None], float)
    vmin, vmax = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    if vmax <= vmin:
        vmax = vmin + 1e-9
    norm = matplotlib.colors.Normalize(vmin, vmax)
    cmap = plt.get_cmap("viridis_r")
    annotate = len(grid) <= 90
    opt = {o["batch_size"]: o for o in ph["optima"] if o["status"] == "ok"}
    lo_all, hi_all = math.inf, -math.inf
    for i, b in enumerate(bs):
        row = sorted((g for g in grid if g["batch_size"] == b), key=lambda g: g["lr"])
        x = np.log10([g["lr"] for g in row])
        gaps = np.diff(x)
        default = float(np.median(gaps)) if len(gaps) else 0.5
        edges_lo = np.concatenate([[x[0] - (gaps[0] if len(gaps) else default) / 2], x[1:] - gaps / 2])
        edges_hi = np.concatenate([x[:-1] + gaps / 2, [x[-1] + (gaps[-1] if len(gaps) else default) / 2]])
        lo_all, hi_all = min(lo_all, edges_lo[0]), max(hi_all, edges_hi[-1])
        for g, l, h in zip(row, edges_lo, edges_hi):
            color = "lightgray" if g["loss"] is None else cmap(norm(g["loss"]))
            ax.add_patch(plt.Rectangle((l, i - 0.45), h - l, 0.9, color=color, lw=0))
            if annotate:
                txt = "div." if g["loss"] is None else f"{g['loss']:.3f}"
                dark = g["loss"] is not None and norm(g["loss"]) > 0.5
                ax.text((l + h) / 2, i, txt, ha="center", va="center", fontsize=7 if len(row) <= 8 else 5.5,
                        color="white" if dark else "black", rotation=0 if len(row) <= 8 else 90)
            o = opt.get(b)
            if o is not None and o["argmin_lr"] == g["lr"]:
                ax.add_patch(plt.Rectangle((l, i - 0.45), h - l, 0.9, fill=False, ec="red", lw=2.5))
                if o["censored"]:
                    ax.annotate("", xy=(h + 0.22 if o["censored"] == "high" else l - 0.22, i),
                                xytext=(h if o["censored"] == "high" else l, i),
                                arrowprops=dict(arrowstyle="-|>", color="red", lw=2), annotation_clip=False)
    ax.set_xlim(lo_all - 0.3, hi_all + 0.3)
    ax.set_ylim(-0.6, len(bs) - 0.4)
    if len(all_lrs) <= 12:
        ax.set_xticks(np.log10(all_lrs))
        ax.set_xticklabels([f"{lr:g}" for lr in all_lrs], rotation=30)
    else:
        ticks = np.arange(math.floor(lo_all), math.ceil(hi_all) + 1)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{10.0 ** t:g}" for t in ticks])
    ax.set_yticks(range(len(bs)))
    ax.set_yticklabels([str(b) for b in bs])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("batch size")
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    cb = fig.colorbar(sm, ax=ax)
    cb.set_label(ph.get("metric", "loss"))
    bl = ph.get("baselines") or {}
    extra = f"\nunigram baseline {bl['unigram']:.3f}, bigram {bl['bigram']:.3f}" if bl.get("unigram") is not None else ""
    ax.set_title(f"phase {ph['phase']}: {ph.get('metric', 'loss')} (optimum boxed; arrow = censored){extra}",
                 fontsize=10)
    return _save(fig, Path(path))


def plot_beta(report: dict[str, Any], path: str | Path) -> Path:
    """β per phase and fit kind: t interval (thick), bootstrap interval (thin), profile-LR interval
    for the censored fit; theory values as horizontal lines."""
    phases = report["phases"]
    fig, ax = plt.subplots(figsize=(max(7.5, 1.8 * len(phases) + 4.5), 5.2))
    kinds = analysis.FIT_KINDS
    offs = dict(zip(kinds, (-0.22, 0.0, 0.22)))
    finite_vals = []
    for ph in phases:
        for k in kinds:
            f = ph["fits"][k]
            if f["status"] == "ok":
                finite_vals += [v for v in [f["beta"], *(f.get("beta_ci") or [])] if v is not None]
    lo_lim = min([-0.3, *finite_vals]) - 0.3
    hi_lim = max([1.3, *finite_vals]) + 0.3
    lo_lim, hi_lim = max(lo_lim, -3), min(hi_lim, 4)
    for xi, ph in enumerate(phases):
        for k in kinds:
            f = ph["fits"][k]
            x = xi + offs[k]
            color = FIT_STYLE[k][0]
            if f["status"] != "ok":
                ax.text(x, lo_lim + 0.1, f["status"], rotation=90, ha="center", va="bottom", fontsize=7,
                        color=color)
                continue
            ci = [v if v is not None else (hi_lim if i else lo_lim) for i, v in enumerate(f["beta_ci"])]
            ci = [min(max(v, lo_lim), hi_lim) for v in ci]
            ax.plot([x, x], ci, color=color, lw=5, alpha=0.45, solid_capstyle="butt")
            if k != "censored" and f.get("beta_ci_bootstrap") and None not in f["beta_ci_bootstrap"]:
                ax.plot([x + 0.05, x + 0.05], f["beta_ci_bootstrap"], color=color, lw=1.2)
            ax.plot(x, f["beta"], "o", color=color, ms=7)
    for name, beta, _ in analysis.THEORY:
        ax.axhline(beta, color="gray", lw=1, ls=THEORY_STYLE[name])
        ax.text(len(phases) - 0.45, beta, f"{name} ({beta:.2g})", va="center", fontsize=8, color="dimgray",
                bbox=dict(fc="white", ec="none", pad=1))
    for k in kinds:
        ax.plot([], [], color=FIT_STYLE[k][0], lw=5, alpha=0.45,
                label={"all": "all (t 95%; thin: bootstrap)", "uncensored": "uncensored (t 95%; thin: bootstrap)",
                       "censored": "censored MLE (profile-LR 95%)"}[k])
    ax.set_xticks(range(len(phases)))
    ax.set_xticklabels([p["phase"] for p in phases])
    ax.set_xlim(-0.6, len(phases) - 0.5 + 0.9)
    ax.set_ylim(lo_lim, hi_lim)
    ax.set_ylabel("beta (LR_opt ∝ B^beta)")
    ax.set_title("beta per phase vs theory (intervals clipped to the axes)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    return _save(fig, Path(path))


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
        if b in opt:
            f = [p[1] for p in pts if p[0] == opt[b]]
            if f:
                ax.plot(opt[b], f[0], "*", color=c, ms=16, mec="black")
    (low, low_name), (high, mid_name), (_, high_name) = analysis.REGIMES  # the bounds the report's regimes use
    for y in (low, high):
        ax.axhline(y, color="gray", ls=":", lw=1)
    ax.text(1.0, low / 2, low_name, transform=ax.get_yaxis_transform(), ha="right", fontsize=8, color="gray")
    ax.text(1.0, (low + high) / 2, mid_name, transform=ax.get_yaxis_transform(), ha="right", fontsize=8, color="gray")
    ax.text(1.0, 1.035, high_name, transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=8,
            color="gray")
    ax.set_xscale("log")
    lrs = sorted({g["lr"] for g in grid})
    if len(lrs) <= 8:  # a plain grid: its LRs as ticks; searched LRs are too many and too close for that
        ax.set_xticks(lrs)
        ax.set_xticklabels([f"{lr:g}" for lr in lrs], rotation=30)
        ax.minorticks_off()
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


def _f(v):
    return "-" if v is None else f"{v:.1f}"


def _ci(ci):
    if not ci:
        return "-"
    lo, hi = ci
    a = "-inf" if lo is None or (isinstance(lo, float) and math.isinf(lo)) else f"{lo:.2f}"
    b = "inf" if hi is None or (isinstance(hi, float) and math.isinf(hi)) else f"{hi:.2f}"
    return f"[{a}, {b}]"

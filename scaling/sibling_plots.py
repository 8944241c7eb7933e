"""PNG plots of the sibling sections of ``scaling compare`` (:mod:`scaling.sibling_report`).

- ``grokking_val_acc_<phase>_<task>.png``: validation accuracy over steps, one line per (schedule, LR rule,
  batch size, LR), mean over seeds with a ±1 s.e. band; one panel per LR rule (or per batch size).
- ``ladder_loss_vs_params_<phase>.png``: loss at each size's best LR against non-embedding parameters
  (log-log, ±1 s.e.), the fitted laws, and Kaplan et al. 2020's slope α_N = 0.076 through the fit's centre.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scaling import lawfit  # noqa: E402

DPI = 110
FORM_STYLE = {"power": ("tab:blue", "-"), "power_floor": ("tab:red", "--")}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(name)).strip("_")


def make_plots(sib: dict[str, Any] | None, out_dir: str | Path) -> list[Path]:
    """Every sibling plot into ``out_dir``; the paths written."""
    if not sib:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for sec in sib.get("grokking", []):
        for task in dict.fromkeys(c["task"] for c in sec["curves"]):
            paths.append(plot_grokking(sec, task, out / f"grokking_val_acc_{_slug(sec['phase'])}_{_slug(task)}.png"))
    for sec in sib.get("ladder", []):
        paths.append(plot_ladder(sec, out / f"ladder_loss_vs_params_{_slug(sec['phase'])}.png"))
    return paths


def _panels(curves: list[dict]) -> tuple[str | None, list]:
    """The axis the panels split on: the LR rule if it varies, else the batch size, else none."""
    for key in ("lr_rule", "batch_size"):
        values = list(dict.fromkeys(c[key] for c in curves))
        if len(values) > 1:
            return key, values
    return None, [None]


def plot_grokking(sec: dict[str, Any], task: str, path: Path) -> Path:
    curves = [c for c in sec["curves"] if c["task"] == task]
    key, values = _panels(curves)
    fig, axes = plt.subplots(1, len(values), figsize=(5.2 * len(values) + 1.5, 4.4), squeeze=False, sharey=True)
    for ax, value in zip(axes[0], values):
        mine = [c for c in curves if key is None or c[key] == value]
        colors = plt.get_cmap("tab10" if len(mine) <= 10 else "tab20")
        for i, c in enumerate(mine):
            if not c["steps"]:
                continue
            x, m, se = np.array(c["steps"]), np.array(c["mean"]), np.array(c["se"])
            label = " ".join(f"{k}={c[k]:g}" if isinstance(c[k], float) else f"{c[k]}"
                             for k in ("batch_schedule_name", "lr_rule", "batch_size", "lr") if k != key)
            ax.plot(x, m, color=colors(i % colors.N), lw=1.6, label=f"{label} (n={c['n']})")
            ax.fill_between(x, m - se, m + se, color=colors(i % colors.N), alpha=0.18, lw=0)
        ax.axhline(0.99, color="gray", ls=":", lw=1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_title(f"{key} = {value}" if key else task, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower right")
    axes[0][0].set_ylabel("validation accuracy (mean ± s.e. over seeds)")
    fig.suptitle(f"phase {sec['phase']}: {task}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_ladder(sec: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8.4, 5.2))
    pts = [s for s in sec["sizes"] if s["loss"] is not None]
    if not pts:
        ax.text(0.5, 0.5, "no finished sizes", ha="center", va="center", transform=ax.transAxes)
    else:
        n = np.array([s["n_nonembedding"] for s in pts], float)
        y = np.array([s["loss"] for s in pts])
        err = np.array([s["loss_se"] or 0.0 for s in pts])
        ax.errorbar(n, y, yerr=err, fmt="o", color="black", ms=6, capsize=3, zorder=5, label="best LR per size ±1 s.e.")
        for s in pts:
            ax.annotate(s["name"] + (" (LR on edge)" if s["censored"] else ""), (s["n_nonembedding"], s["loss"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=7,
                        color="crimson" if s["censored"] else "black")
        grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
        for form, f in sec["fits"].items():
            if f.get("status") != "ok":
                continue
            color, ls = FORM_STYLE[form]
            a = f["params"]["alpha"]
            ax.plot(grid, np.exp(lawfit.predict(form, f["theta"], np.log(grid))), ls, color=color, lw=1.8,
                    label=f"{form}: alpha={a['value']:.3f} {_ci(a)}" + (" (at bound)" if f["at_bound"] else ""))
        centre = np.exp(np.mean(np.log(n))), np.exp(np.mean(np.log(y)))
        ax.plot(grid, centre[1] * (grid / centre[0]) ** -0.076, ":", color="gray",
                label="Kaplan et al. 2020 slope alpha_N=0.076, through the points' centre")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters N = 12 n_layers d_model²")
    ax.set_ylabel(sec["metric"])
    ax.set_title(f"phase {sec['phase']}: loss at each size's best LR (95% profile intervals)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _ci(p: dict) -> str:
    lo, hi = p["ci"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return f"[{'≤' if p['ci_open'][0] else ''}{fmt(lo)}, {fmt(hi)}{'+' if p['ci_open'][1] else ''}]"

"""``scaling compare`` on the sibling experiments: grokking (modular phases) and the model-size ladder.

A phase is a *sibling phase* when its runs carry a task (modular) or a model size. For each:

* **grokking**: a table per task and schedule — one row per (task, batch-size schedule, LR rule, batch
  size, LR) with the mean and standard error over seeds of ``final_train_acc``, ``final_val_acc`` and
  ``step_val_acc_99``, how many seeds reached 99% validation accuracy — and the validation accuracy over
  steps of every row, mean ± s.e. over seeds (the plots, :mod:`scaling.sibling_plots`);
* **ladder**: per model size the loss at its best LR (the lowest mean over seeds of the objective among
  the LRs tried: sweep and search runs alike), then L(N) = (N_c/N)^α and, with four sizes or more,
  L = E + (N_c/N)^α (:mod:`scaling.lawfit`), N the non-embedding parameters 12·n_layers·d_model².

A sibling phase whose runs vary over a variant axis (several tasks, schedules, LR rules or sizes) is left
out of the LR_opt(B) analysis of :mod:`scaling.analysis` (it would average different experiments as if
they were seeds); one without (e.g. a constant-batch x LR grid on one task) goes through both.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from scaling import lawfit, tracking

AXES = ("model_size", "task", "batch_schedule_name", "lr_rule")
PARAMS = ("seed", "batch_size", "lr", "steps", "warmup_steps", "d_model", "n_layers", "n_heads", "n_params", *AXES)
METRICS = ("final_train_acc", "final_val_acc", "max_val_acc", "step_val_acc_99", "final_val_loss", "min_val_loss",
           "final_train_loss", "tokens_seen")
GROK_KEYS = ["task", "batch_schedule_name", "lr_rule", "batch_size", "lr"]
LOSS_METRICS = ("final_val_loss", "min_val_loss", "final_train_loss")
ACC_THRESHOLD = 0.99


def has_variant_runs(client, exp_id: str) -> bool:
    """Whether any run of the experiment has a task or a model size: one run asked for per axis, so a phase of
    10,000 LR x B runs is not read whole (as MLflow objects) to find it has no sibling section."""
    return any(tracking.search_runs(client, [exp_id], f"params.{k} LIKE '%'", max_results=1)
               for k in ("task", "model_size"))


def phase_runs(client, phase: str) -> pd.DataFrame:
    """One row per configuration run of the phase's experiment (params and summary metrics), newest first;
    an empty frame when it has none."""
    exp = client.get_experiment_by_name(tracking.experiment_name(phase))
    if exp is None or exp.lifecycle_stage == "deleted" or not has_variant_runs(client, exp.experiment_id):
        return pd.DataFrame()
    rows = []
    for r in tracking.search_runs(client, [exp.experiment_id]):
        p, t = r.data.params, r.data.tags
        if "batch_size" not in p or tracking.TAG_CONFIG_HASH not in t:
            continue
        row = {"run_id": r.info.run_id, "phase": phase, "status": r.info.status, "end_time": r.info.end_time or 0,
               "diverged": t.get(tracking.TAG_DIVERGED) == "true", "config_hash": t[tracking.TAG_CONFIG_HASH]}
        row.update({k: p.get(k) for k in PARAMS})
        row.update({k: r.data.metrics.get(k) for k in METRICS})
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for k in ("seed", "batch_size", "lr", "steps", "warmup_steps", "d_model", "n_layers", "n_heads", "n_params",
              *METRICS):
        df[k] = pd.to_numeric(df[k], errors="coerce")
    return df.sort_values("end_time", ascending=False).reset_index(drop=True)


def results(df: pd.DataFrame) -> pd.DataFrame:
    """One outcome per configuration: its newest FINISHED run, else its newest diverged one."""
    done = df[df["status"].eq("FINISHED") | df["diverged"]]
    return done.sort_values(["diverged"], kind="stable").drop_duplicates("config_hash").reset_index(drop=True)


def is_sibling(df: pd.DataFrame) -> bool:
    return not df.empty and (df["task"].notna().any() or df["model_size"].notna().any())


def varies(df: pd.DataFrame) -> bool:
    """Whether the runs differ in a variant axis (such a phase has no single LR_opt(B))."""
    return any(df[k].nunique(dropna=True) > 1 for k in AXES)


def collect(client, phases: list[str], metric: str = "final_val_loss", confidence: float = 0.95,
            history=None) -> dict[str, Any]:
    """The sibling sections of a comparison; ``only``: the phases left out of the LR_opt(B) analysis.
    ``history(run_id, key)``: metric history fetcher (default: the client's)."""
    history = history or (lambda run_id, key: client.get_metric_history(run_id, key))
    out: dict[str, Any] = {"grokking": [], "ladder": [], "only": []}
    for phase in phases:
        df = phase_runs(client, phase)
        if not is_sibling(df):
            continue
        if varies(df):
            out["only"].append(phase)
        if df["task"].notna().any():
            out["grokking"].append(grokking_section(phase, df, history))
        if df["model_size"].notna().any():
            out["ladder"].append(ladder_section(phase, df, metric, confidence))
    return out


# ---------------------------------------------------------------------------------------------
# Grokking


def _mean_se(values) -> tuple[float | None, float | None]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if not len(v):
        return None, None
    return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None)


def grokking_section(phase: str, df: pd.DataFrame, history) -> dict[str, Any]:
    res = results(df[df["task"].notna()])
    rows, curves = [], []
    for key, g in res.groupby(GROK_KEYS, sort=True, dropna=False):
        ok = g[~g["diverged"]]
        row = dict(zip(GROK_KEYS, key))
        row.update(batch_size=int(row["batch_size"]), n_seeds=int(len(ok)), n_diverged=int(g["diverged"].sum()),
                   steps=int(g["steps"].max()), n_reached_99=int((ok["max_val_acc"] >= ACC_THRESHOLD).sum()))
        for m in ("final_train_acc", "final_val_acc", "step_val_acc_99", "final_val_loss"):
            row[m], row[m + "_se"] = _mean_se(ok[m])
        row.update(in_force(g.iloc[0], history))
        rows.append(row)
        curves.append({**{k: row[k] for k in GROK_KEYS}, **accuracy_curve(list(ok["run_id"]), history)})
    return {"phase": phase, "rows": rows, "curves": curves, "n_runs": int(len(df)), "n_results": int(len(res))}


def in_force(run: pd.Series, history) -> dict[str, list]:
    """The batch size and LR a run trained with, first (after the warmup) and last, from its records."""
    out = {}
    for key in ("batch_size", "lr"):
        h = sorted((m.step, m.value) for m in history(run["run_id"], key))
        after = [v for s, v in h if s > (run["warmup_steps"] or 0)] or [v for _, v in h]
        out[f"{key}_in_force"] = [after[0], after[-1]] if after else None
    return out


def accuracy_curve(run_ids: list[str], history, key: str = "val_acc") -> dict[str, list]:
    """Mean and s.e. over runs of ``key`` at the steps every run recorded."""
    series = []
    for run_id in run_ids:
        h = {m.step: m.value for m in history(run_id, key)}
        if h:
            series.append(h)
    if not series:
        return {"steps": [], "mean": [], "se": [], "n": 0}
    steps = sorted(set.intersection(*(set(s) for s in series)))
    values = np.array([[s[k] for k in steps] for s in series], float)
    se = values.std(axis=0, ddof=1) / math.sqrt(len(series)) if len(series) > 1 else np.zeros(len(steps))
    return {"steps": steps, "mean": values.mean(axis=0).tolist(), "se": se.tolist(), "n": len(series)}


# ---------------------------------------------------------------------------------------------
# Ladder


def ladder_sizes(res: pd.DataFrame, metric: str) -> list[dict[str, Any]]:
    """Per model size: its best LR (lowest mean over seeds of ``metric``; a diverged run counts as inf),
    the loss there with its s.e., and whether that LR is the smallest or largest tried (censored)."""
    sizes = []
    for name, g in res.groupby("model_size", sort=False):
        y = g[metric].where(~g["diverged"], math.inf)
        per_lr = y.groupby(g["lr"]).mean().sort_index()
        finite = per_lr[np.isfinite(per_lr)]
        first = g.iloc[0]
        d, L = int(first["d_model"]), int(first["n_layers"])
        n = 12 * L * d * d
        entry = {"name": name, "d_model": d, "n_layers": L, "n_heads": int(first["n_heads"]), "n_nonembedding": n,
                 "n_params": _int(first["n_params"]), "lrs": [float(v) for v in per_lr.index],
                 "losses": [None if not np.isfinite(v) else float(v) for v in per_lr], "best_lr": None,
                 "loss": None, "loss_se": None, "n_seeds": 0, "censored": None, "tokens": None}
        if len(finite):
            best = float(finite.idxmin())
            at = g[(g["lr"] == best) & ~g["diverged"]]
            entry.update(best_lr=best, n_seeds=int(len(at)), tokens=_int(at["tokens_seen"].median()))
            entry["loss"], entry["loss_se"] = _mean_se(at[metric])
            if len(per_lr) > 1 and best in (per_lr.index[0], per_lr.index[-1]):
                entry["censored"] = "low" if best == per_lr.index[0] else "high"
        entry["tokens_per_param"] = entry["tokens"] / n if entry["tokens"] else None
        sizes.append(entry)
    return sorted(sizes, key=lambda s: s["n_nonembedding"])


def _int(v):
    return None if v is None or not np.isfinite(v) else int(v)


def ladder_section(phase: str, df: pd.DataFrame, metric: str, confidence: float) -> dict[str, Any]:
    metric = metric if metric in LOSS_METRICS else "final_val_loss"
    sizes = ladder_sizes(results(df[df["model_size"].notna()]), metric)
    pts = [s for s in sizes if s["loss"] is not None]
    n, loss = [s["n_nonembedding"] for s in pts], [s["loss"] for s in pts]
    fits = {"power": lawfit.fit(n, loss, "power", confidence)}
    fits["power_floor"] = (lawfit.fit(n, loss, "power_floor", confidence) if len(pts) >= 4 else
                           {"form": "power_floor", "status": "not enough points",
                            "reason": f"{len(pts)} sizes (the floor form needs 4 or more)"})
    out = {"phase": phase, "metric": metric, "sizes": sizes, "fits": fits, "kaplan": lawfit.kaplan_reference(),
           "n_equation": "N = 12 n_layers d_model^2 (non-embedding, Kaplan et al. 2020)"}
    out["kaplan"].update(kaplan_check(fits["power"]))
    out["warnings"] = ladder_warnings(out)
    return out


def kaplan_check(fit: dict[str, Any], n_from: float = 65e6, n_to: float = 175e6) -> dict[str, Any]:
    """Is Kaplan's α_N inside the fitted α's interval; the loss ratio the fit implies from 65M to 175M
    parameters (the plan's 8%) with its interval."""
    if fit.get("status") != "ok":
        return {"consistent": None}
    a = fit["params"]["alpha"]
    lo, hi = a["ci"]
    ratio = lambda al: (n_to / n_from) ** -al  # noqa: E731
    consistent = None if lo is None or hi is None else bool(lo <= 0.076 <= hi)
    return {"consistent": consistent, "fitted_ratio_65M_175M": ratio(a["value"]),
            "fitted_ratio_ci": [None if hi is None else ratio(hi), None if lo is None else ratio(lo)],
            "expected_ratio_65M_175M": ratio(0.076)}


def ladder_warnings(sec: dict[str, Any]) -> list[str]:
    warn = []
    cens = [s["name"] for s in sec["sizes"] if s["censored"]]
    if cens:
        warn.append(f"best LR on the edge of the LRs tried for size(s) {', '.join(cens)}: run "
                    f"`scaling search --phase {sec['phase']} --model-sizes NAME` until it is bracketed")
    missing = [s["name"] for s in sec["sizes"] if s["loss"] is None]
    if missing:
        warn.append(f"size(s) without a finished run: {', '.join(missing)}")
    tpp = [s["tokens_per_param"] for s in sec["sizes"] if s["tokens_per_param"]]
    if tpp and max(tpp) > 1.05 * min(tpp):
        warn.append(f"tokens per parameter differ between sizes ({min(tpp):.3g}..{max(tpp):.3g}): "
                    "not an equal-data ladder")
    for form, f in sec["fits"].items():
        if f.get("status") != "ok":
            continue
        if not f["converged"]:
            warn.append(f"{form}: the fit did not converge (optimizer status, or {f['n_agree']} of {f['n_starts']} "
                        f"starts agree)")
        if f["at_bound"]:
            warn.append(f"{form}: parameter(s) on a bound: {', '.join(f['at_bound'])}")
        opened = [k for k, v in f["params"].items() if any(v["ci_open"])]
        if opened:
            warn.append(f"{form}: the data do not bound {', '.join(opened)} (interval open to its bound)")
    return warn


# ---------------------------------------------------------------------------------------------
# Rendering


def _num(v, fmt="{:.3f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _pm(mean, se, fmt="{:.3f}") -> str:
    return _num(mean, fmt) + ("" if se is None else " ± " + _num(se, fmt))


def _ci(p: dict, fmt="{:.3g}") -> str:
    lo, hi = p["ci"]
    a = ("≤" if p["ci_open"][0] else "") + _num(lo, fmt)
    b = _num(hi, fmt) + ("+" if p["ci_open"][1] else "")
    return f"[{a}, {b}]"


def grokking_tables(sec: dict[str, Any], grid) -> list[str]:
    out = []
    headers = ["schedule", "lr rule", "B ref", "lr", "B in force", "lr in force", "seeds", "final train acc",
               "final val acc", "step val acc 99", "reached 99%"]
    span = lambda v, fmt: "-" if not v else fmt.format(v[0]) + ("" if v[0] == v[1] else "→" + fmt.format(v[1]))  # noqa: E731
    for task in dict.fromkeys(r["task"] for r in sec["rows"]):
        rows = [[r["batch_schedule_name"], r["lr_rule"], str(r["batch_size"]), f"{r['lr']:g}",
                 span(r["batch_size_in_force"], "{:.0f}"), span(r["lr_in_force"], "{:.3g}"),
                 f"{r['n_seeds']}" + (f" (+{r['n_diverged']} div.)" if r["n_diverged"] else ""),
                 _pm(r["final_train_acc"], r["final_train_acc_se"]), _pm(r["final_val_acc"], r["final_val_acc_se"]),
                 _pm(r["step_val_acc_99"], r["step_val_acc_99_se"], "{:.0f}"),
                 f"{r['n_reached_99']}/{r['n_seeds']}"] for r in sec["rows"] if r["task"] == task]
        out += [f"task {task} (mean ± s.e. over seeds; step val acc 99 = the budget when never reached; "
                "in force: first logged after the warmup → last)", "",
                grid(headers, rows), ""]
    return out


def ladder_lines(sec: dict[str, Any], grid) -> list[str]:
    headers = ["size", "d_model", "layers", "heads", "N (non-emb.)", "tokens/N", "best lr", "LRs tried",
               f"{sec['metric']}"]
    rows = [[s["name"], str(s["d_model"]), str(s["n_layers"]), str(s["n_heads"]), f"{s['n_nonembedding']:,}",
             _num(s["tokens_per_param"], "{:.1f}"), _num(s["best_lr"], "{:.3g}") + (" (edge)" if s["censored"] else ""),
             str(len(s["lrs"])), _pm(s["loss"], s["loss_se"], "{:.4f}")] for s in sec["sizes"]]
    out = [grid(headers, rows), "", f"{sec['n_equation']}; fits by least squares on ln L from several starts, "
           f"intervals: profile likelihood (F-calibrated), 95%", ""]
    for form, f in sec["fits"].items():
        if f.get("status") != "ok":
            out.append(f"- {form}: {f['status']} ({f.get('reason', '')})")
            continue
        params = "; ".join(f"{k} = {_num(v['value'], '{:.4g}')} {_ci(v)}" for k, v in f["params"].items())
        out.append(f"- {form}: {params}; RMSE(ln L) {f['rmse_log']:.4f}, AICc {_num(f['aicc'], '{:.1f}')}; "
                   f"{f['n_agree']}/{f['n_starts']} starts agree"
                   + (f"; at bound: {', '.join(f['at_bound'])}" if f["at_bound"] else ""))
    k = sec["kaplan"]
    if k.get("consistent") is not None or k.get("fitted_ratio_65M_175M") is not None:
        lo, hi = k["fitted_ratio_ci"]
        out.append(f"- Kaplan et al. 2020's alpha_N = 0.076 {'inside' if k['consistent'] else 'outside'} the "
                   f"power fit's interval; L(175M)/L(65M): expected {k['expected_ratio_65M_175M']:.3f}, "
                   f"this fit {k['fitted_ratio_65M_175M']:.3f} [{_num(lo)}, {_num(hi)}] (extrapolated far beyond "
                   f"the sizes fitted)")
    return out + [f"- ! {w}" for w in sec["warnings"]]


def render_lines(sib: dict[str, Any] | None, grid, md: bool = False) -> list[str]:
    """The sibling sections as lines of the table / markdown report (``grid``: report's table maker)."""
    if not sib or not (sib["grokking"] or sib["ladder"]):
        return []
    h = "## " if md else ""
    out = []
    for sec in sib["grokking"]:
        out += [f"{h}Grokking: phase {sec['phase']}", ""] + grokking_tables(sec, grid)
    for sec in sib["ladder"]:
        out += [f"{h}Model-size ladder: phase {sec['phase']}", ""] + ladder_lines(sec, grid) + [""]
    return out


def metric_rows(sib: dict[str, Any] | None) -> list[tuple[str, str, float]]:
    """Metrics of the comparison run, as (phase, name, value): each ladder fit's α."""
    rows = []
    for sec in (sib or {}).get("ladder", []):
        for form, f in sec["fits"].items():
            if f.get("status") == "ok":
                rows.append((sec["phase"], f"alpha_{form}", f["params"]["alpha"]["value"]))
    return rows

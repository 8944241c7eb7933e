"""``scaling compare``: runs from MLflow → :mod:`scaling.analysis` → table / JSON / CSV / markdown,
PNG plots, and a comparison run in the ``scaling-compare`` experiment.

Order matters for "bad input writes nothing": arguments are checked, the store is reached, every
phase's runs are read and analysed before a file or a run is created. Outputs are written into a
temporary directory first, logged to MLflow from there, and only then moved into ``--out``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from scaling import analysis, noise_report, runs_table, sibling_report, tracking
from scaling.config import ConfigError, builtin_phase_names, first_line

SCHEMA_VERSION = 2
FORMATS = ("table", "json", "csv", "markdown")
JSON_NAME = "compare.json"
TABLE_NAME = "compare.txt"
MARKDOWN_NAME = "compare.md"
PHASES_CSV = "compare_phases.csv"
OPTIMA_CSV = "compare_optima.csv"
_PHASE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def parse_phases(phases) -> list[str]:
    """``"2_5,3a"`` or a list → de-duplicated names, each checked (ConfigError)."""
    if isinstance(phases, str):
        phases = phases.split(",")
    names = [p.strip() for p in (phases or []) if p and p.strip()]
    if not names:
        raise ConfigError("give at least one phase, e.g. --phases 2_5,3a")
    for p in names:
        if not _PHASE_RE.match(p):
            raise ConfigError(f"unknown phase {p!r}: a phase name is a word like 2_5 or 3a")
    return list(dict.fromkeys(names))


RUN_COLUMNS = runs_table.Columns(
    params=("batch_size", "lr", "grad_clip", "seed", "budget_kind", "budget"),
    tags=(tracking.TAG_DIVERGED, tracking.TAG_LEARNED, tracking.TAG_SOURCE),
    metrics=(*analysis.METRIC_COLUMNS, *noise_report.NOISE_METRICS))


def load_runs(client, phases: list[str]) -> pd.DataFrame:
    """The runs table of :mod:`scaling.analysis` for ``phases``, from each phase's experiment: only the
    columns the analysis reads (:func:`scaling.runs_table.fetch_runs`: straight from a SQL store's tables,
    through ``search_runs`` from a server). ConfigError for a phase without an experiment (unknown) or
    without runs."""
    frames = []
    uri = client.tracking_uri
    for p in phases:
        exp = client.get_experiment_by_name(tracking.experiment_name(p))
        if exp is None or exp.lifecycle_stage == "deleted":
            if p in builtin_phase_names():
                raise ConfigError(f"phase {p!r} has no runs in {uri} (no experiment "
                                  f"{tracking.experiment_name(p)!r}); run `scaling sweep --phase {p}` "
                                  f"or `scaling import FILE --phase {p}` first")
            raise ConfigError(f"unknown phase {p!r}: no experiment {tracking.experiment_name(p)!r} in {uri} "
                              f"and no built-in phase of that name (built-in: {', '.join(builtin_phase_names())})")
        rows = [_run_row(r, p) for r in runs_table.fetch_runs(client, exp.experiment_id, RUN_COLUMNS)]
        rows = [r for r in rows if r is not None]
        if not rows:
            raise ConfigError(f"phase {p!r} has no runs in {uri} (experiment {tracking.experiment_name(p)!r} is empty)")
        frames.append(pd.DataFrame(rows))
    return pd.concat(frames, ignore_index=True)


def _run_row(run: runs_table.RunRecord, phase: str) -> dict[str, Any] | None:
    """Only the fields the analysis reads; None for runs that are not one configuration (parents)."""
    p, t, m = run.params, run.tags, run.metrics
    if "batch_size" not in p or "lr" not in p:
        return None
    row = {"run_id": run.run_id, "phase": phase, "batch_size": p["batch_size"], "lr": p["lr"],
           "grad_clip": p.get("grad_clip"), "seed": p.get("seed"), "status": run.status,
           "diverged": t.get(tracking.TAG_DIVERGED), "learned": t.get(tracking.TAG_LEARNED),
           "source": t.get(tracking.TAG_SOURCE), "budget_kind": p.get("budget_kind"), "budget": p.get("budget")}
    for k in RUN_COLUMNS.metrics:
        row[k] = m.get(k)
    return row


def check_batch_sizes(batch_sizes) -> list[int] | None:
    """``--batch-sizes`` as sorted distinct positive integers (None: every batch size)."""
    if batch_sizes is None:
        return None
    if not batch_sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {batch_sizes!r}")
    return sorted(set(batch_sizes))


def only_batch_sizes(runs: pd.DataFrame, batch_sizes: list[int] | None) -> pd.DataFrame:
    """The runs of these batch sizes; a ConfigError when none of them has a run."""
    if batch_sizes is None:
        return runs
    kept = runs[pd.to_numeric(runs["batch_size"], errors="coerce").isin(batch_sizes)]
    if kept.empty:
        have = sorted({int(b) for b in pd.to_numeric(runs["batch_size"], errors="coerce").dropna()})
        raise ConfigError(f"no run has batch size {', '.join(map(str, batch_sizes))} (the runs have "
                          f"{', '.join(map(str, have)) or 'none'})")
    return kept


def compare(phases, tracking_uri: str | None = None, metric: str = "final_val_loss", fmt: str = "table",
            out_dir: str | Path | None = None, exclude_unlearned: bool = False, pool_budgets: bool = False,
            bootstrap: int = 0, seed: int = 0, log_to_mlflow: bool = True, estimator: str = "vertex",
            plots: bool = True, budget: str | None = None, batch_sizes=None) -> dict[str, Any]:
    """Compare phases: returns the report dict (docs/compare-schema.md) with ``rendered`` (the text
    in ``fmt`` for the terminal), ``files`` (paths written under ``out_dir``) and
    ``comparison_run_id`` (None without MLflow logging). Raises ConfigError/TrackingError (one
    line) before anything is written. ``batch_sizes``: only the runs of these (None: all)."""
    names = parse_phases(phases)
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if metric not in analysis.OBJECTIVES:
        raise ConfigError(f"metric must be one of {', '.join(analysis.OBJECTIVES)}, got {metric!r}")
    if estimator not in analysis.ESTIMATORS:
        raise ConfigError(f"estimator must be one of {', '.join(analysis.ESTIMATORS)}, got {estimator!r}")
    if not isinstance(bootstrap, int) or bootstrap < 0:
        raise ConfigError(f"bootstrap must be an integer >= 0, got {bootstrap!r}")
    if budget is not None and pool_budgets:
        raise ConfigError("--budget selects one budget and --pool-budgets fits several together: give one of them")
    batch_sizes = check_batch_sizes(batch_sizes)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"--out must be a directory, got the file {str(out)!r}")
    client = tracking.connect(tracking_uri)
    settings = {"phases": names, "metric": metric, "estimator": estimator, "exclude_unlearned": exclude_unlearned,
                "pool_budgets": pool_budgets, "budget": budget, "bootstrap": bootstrap, "seed": seed,
                "confidence": 0.95, "quadratic_window": 1, "overfit_threshold": 0.05, "law_points": "uncensored",
                "noise_window": 1, "batch_sizes": batch_sizes}
    # Sibling phases (grokking, the model-size ladder) get their own sections; those whose runs vary over a
    # variant axis (task, schedule, size...) are no LR_opt(B) grid and stay out of the analysis below.
    siblings = sibling_report.collect(client, names, metric, settings["confidence"])
    main = [n for n in names if n not in siblings["only"]]
    result = {"phases": [], "comparison": [], "optima": []}
    if main:
        result = analysis.analyze(only_batch_sizes(load_runs(client, main), batch_sizes), metric=metric,
                                  estimator=estimator,
                                  exclude_unlearned=exclude_unlearned, pool_budgets=pool_budgets, budget=budget,
                                  bootstrap=bootstrap, seed=seed, phases=main, confidence=settings["confidence"],
                                  window=settings["quadratic_window"], overfit_threshold=settings["overfit_threshold"],
                                  law_points=settings["law_points"],
                                  sections={noise_report.SECTION: noise_report.NoiseSection(
                                      histories=noise_report.HistoryReader(client),
                                      window=settings["noise_window"])})
    report = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "tool": "scaling compare",
        "scaling_version": _version(),
        "tracking_uri": client.tracking_uri,
        "settings": {**settings, "max_epochs": analysis.MAX_EPOCHS, "law_margin": analysis.LAW_MARGIN},
        **result,
        "siblings": siblings,
    }
    report["comparison_run_id"] = None
    texts = {"table": render_table(report), "markdown": render_markdown(report),
             "csv": render_csv(report["comparison"]), "json": None}
    files = _write_outputs(report, texts, out, client if log_to_mlflow else None, plots)
    texts["json"] = to_json(report)
    report["files"] = files
    report["rendered"] = texts[fmt]
    return report


def _write_outputs(report, texts, out: Path | None, client, plots: bool) -> list[str]:
    """Every output into a temporary directory, logged to MLflow from there (``client``: None for
    no comparison run), then moved into ``out``; returns the paths written there."""
    files: list[str] = []
    if out is None and client is None:
        return files
    parent = out.parent if out is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".compare-", dir=parent))
    try:
        names_written = _write_all(report, texts, tmp, plots)
        if client is not None:
            report["comparison_run_id"] = _log_comparison(client, report, tmp)  # rewrites the JSON with its id
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            for rel in names_written:
                dest = out / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / rel, dest)
                files.append(str(dest))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def _version() -> str:
    try:
        from scaling import __version__
        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def to_json(report: dict[str, Any]) -> str:
    body = {k: v for k, v in report.items() if k not in ("rendered", "files")}
    return json.dumps(analysis.jsonable(body), indent=2, allow_nan=False) + "\n"


def _write_all(report, texts, d: Path, plots: bool) -> list[str]:
    written = []
    for name, text in ((TABLE_NAME, texts["table"]), (MARKDOWN_NAME, texts["markdown"]),
                       (PHASES_CSV, texts["csv"]), (OPTIMA_CSV, render_optima_csv(report["optima"])),
                       (JSON_NAME, to_json(report))):
        (d / name).write_text(text)
        written.append(name)
    if plots:
        from scaling import plots as plotting
        from scaling import sibling_plots

        for p in (plotting.make_plots(report, d / "plots") if report["phases"] else []) + \
                sibling_plots.make_plots(report.get("siblings"), d / "plots"):
            written.append(str(Path(p).relative_to(d)))
    return written


def _metric_key(*parts: str) -> str:
    return "/".join(re.sub(r"[^A-Za-z0-9_\-.]", "_", p) for p in parts)


def _log_comparison(client, report: dict[str, Any], d: Path) -> str:
    """A FINISHED run in ``scaling-compare`` with the settings, β per phase and every file as artifacts."""
    exp_id = tracking.get_or_create_experiment(client, tracking.COMPARE_EXPERIMENT)
    s = report["settings"]
    run = tracking.with_retry(client.create_run, exp_id, run_name=f"compare {','.join(s['phases'])}",
                              tags={tracking.TAG_SOURCE: "compare", "scaling.compare.phases": ",".join(s["phases"]),
                                    "scaling.compare.schema_version": str(SCHEMA_VERSION)})
    run_id = run.info.run_id
    try:
        tracking.log_params(client, run_id, {k: (",".join(v) if isinstance(v, list) else v) for k, v in s.items()})
        rows = []
        for ph in report["phases"]:
            for kind, f in ph["fits"].items():
                for key in ("beta", "r2", "beta_se"):
                    v = f.get(key)
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        rows.append((_metric_key(ph["phase"], f"{key}_{kind}"), v, 0))
            best = (ph.get("best") or {}).get("loss")
            if best is not None:
                rows.append((_metric_key(ph["phase"], "best_loss"), best, 0))
        rows += [(_metric_key(ph, k), v, 0) for ph, k, v in sibling_report.metric_rows(report.get("siblings"))]
        if rows:
            tracking.log_metrics(client, run_id, rows)
        report["comparison_run_id"] = run_id
        (d / JSON_NAME).write_text(to_json(report))
        tracking.with_retry(client.log_artifacts, run_id, str(d))
        tracking.with_retry(client.set_terminated, run_id, "FINISHED")
    except Exception as e:
        try:
            client.set_terminated(run_id, "FAILED")
        except Exception:
            pass
        raise tracking.TrackingError(f"could not record the comparison run in MLflow: {first_line(e)}") from None
    return run_id


# ---------------------------------------------------------------------------------------------
# Rendering

#: Extra per-phase sections: a phase's ``sections[name]`` (filled by an optional analysis, e.g. a
#: gradient-noise-scale prediction of the slope) is rendered by ``PHASE_SECTIONS[name](section,
#: phase)`` → lines, after the fits; a section without a renderer is listed as ``key: value`` lines.
PHASE_SECTIONS: dict[str, Callable[[dict[str, Any], dict[str, Any]], list[str]]] = {
    noise_report.SECTION: noise_report.render_lines}


def _f(v, fmt="{:.3f}", none="-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return fmt.format(v)


def _g(v) -> str:
    return _f(v, "{:.3g}")


def _ci(ci, fmt="{:.3f}") -> str:
    if not ci:
        return "-"
    lo, hi = ci
    return f"[{_f(lo, fmt, '-inf')}, {_f(hi, fmt, 'inf')}]"


def _beta_cell(f: dict, with_ci: bool = True) -> str:
    """β with its interval, or the fit's status in words (a fit that could not be made is never a number)."""
    if f["status"] != "ok":
        return f["status"]
    s = f"{f['beta']:.3f}"
    if with_ci:
        s += f" {_ci(f.get('beta_ci'))}"
        if not f.get("interval_calibrated", True):
            s += " (not calibrated)"
    return s


def _grid(headers: list[str], rows: list[list[str]], md: bool = False) -> str:
    rows = [[str(c) for c in r] for r in rows]
    if md:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _law_cell(laws: dict) -> str:
    if laws.get("selected"):
        return laws["selected"]
    return "cannot choose" if laws["status"] == "ok" else laws["status"]


def _phase_rows(report) -> tuple[list[str], list[list[str]]]:
    headers = ["phase", "budget", "B", "cens.", "beta all [95%]", "R2", "beta uncensored [95%]",
               "beta censored MLE [95%]", "noise sd", "regime", "best loss", "best config", "unigram/bigram",
               "learned y/n/?", ">epochs", "law"]
    rows = []
    for ph in report["phases"]:
        fa, fu, fc = ph["fits"]["all"], ph["fits"]["uncensored"], ph["fits"]["censored"]
        ok = [o for o in ph["optima"] if o["status"] == "ok"]
        bl, ln = ph["baselines"], ph["learned"]
        rows.append([
            ph["phase"], ", ".join(ph["budget"]["budgets"]), str(len(ok)),
            str(sum(1 for o in ok if o["censored"] in ("low", "high"))),
            _beta_cell(fa), _f(fa.get("r2")) if fa["status"] == "ok" else "-", _beta_cell(fu), _beta_cell(fc),
            _f((ph.get("loss_noise") or {}).get("sd"), "{:.4f}"), ph["regime"]["name"],
            _f((ph["best"] or {}).get("loss"), "{:.4f}"),
            (f"B={ph['best']['batch_size']} lr={ph['best']['lr']:g}" if ph["best"] else "-"),
            f"{_f(bl['unigram'])}/{_f(bl['bigram'])}", f"{ln['true']}/{ln['false']}/{ln['unknown']}",
            str(len(ph["epochs"]["repeated_data_batch_sizes"])), _law_cell(ph["laws"]),
        ])
    return headers, rows


def _optima_rows(report) -> tuple[list[str], list[list[str]]]:
    pooled = any(len(ph["budget"]["budgets"]) > 1 for ph in report["phases"])
    headers = ["phase", *(["budget"] if pooled else []), "B", "LRs", "argmin LR", "loss", "+-sd (n, div.)",
               "censored", "vertex LR", "SE(ln LR)", "vertex status", "clip freq", "regime", "learned",
               "val rise", "epochs"]
    rows = []
    for ph in report["phases"]:
        for o in ph["optima"]:
            cens = o["censored"] or "-"
            if o["censored"] in ("low", "high"):
                cens += f" ({'>' if o['censored'] == 'high' else '<'}{_g(o.get('bound_lr'))})"
            rows.append([
                ph["phase"], *([o.get("budget") or "-"] if pooled else []), str(o["batch_size"]),
                f"{o['n_lrs']} ({_g(o['lr_min'])}..{_g(o['lr_max'])})",
                _g(o["argmin_lr"]), _f(o["argmin_loss"], "{:.4f}", "inf"),
                (f"{_f(o.get('argmin_loss_std'), '{:.4f}')} "
                 f"({o.get('argmin_n') or '-'}, {o.get('argmin_n_diverged') or 0})"),
                cens, _g(o["vertex_lr"]), _f(o["vertex_log_se"]), o["vertex_status"],
                _f(o.get("clip_frequency")), o.get("regime") or "-",
                {True: "yes", False: "NO", None: "?"}[o.get("learned")],
                _f(o.get("val_loss_rise")) + (" (overfit)" if o.get("overfitting") else ""),
                _f(o.get("epochs"), "{:.3g}") + (" (repeated)" if o.get("repeated_data") else ""),
            ])
    return headers, rows


def _laws_rows(ph) -> tuple[list[str], list[list[str]]]:
    headers = ["law", "parameters (Wald 95%)", "AICc", "LOO rmse (ln LR)", "local beta (Bmin, Bmid, Bmax)",
               "bootstrap p"]
    rows = []
    p_values = ph["laws"].get("p_values") or {}
    for name, m in ph["laws"].get("models", {}).items():
        if m["status"] != "ok":
            rows.append([name, m["status"], "-", "-", "-", "-"])
            continue
        params = "; ".join(f"{k}={_g(v['value'])} {_ci(v['ci'], '{:.3g}')}" for k, v in m["params"].items())
        if m.get("at_bound"):
            params += f" (at bound: {', '.join(m['at_bound'])})"
        lb = ", ".join(_f(b, "{:.2f}") for b in m["local_beta"]["beta"])
        rows.append([name + (" *" if name == ph["laws"].get("selected") else ""), params, _f(m["aicc"], "{:.1f}"),
                     _f(m["loo_rmse"]), lb, _f(p_values.get(name), "{:.2f}")])
    return headers, rows


def _fit_lines(ph) -> list[str]:
    lines = []
    for kind in analysis.FIT_KINDS:
        f = ph["fits"][kind]
        if f["status"] != "ok":
            lines.append(f"{kind}: {f['status']} ({f.get('reason', '')})")
            continue
        pct = f"{round(f['confidence'] * 100)}%"
        if kind == "censored":
            s = (f"censored (Tobit MLE, {f['n_censored']} censored as bounds): beta = {f['beta']:.3f}, "
                 f"C = {f['C']:.3g}, sigma = {f['sigma']:.3g}{' (at its floor)' if f.get('sigma_at_floor') else ''}, "
                 f"{pct} profile interval {_ci(f['beta_ci'])} (cutoff {f['cutoff']:.2f}, t-calibrated on "
                 f"{f['cutoff_n']} uncensored points)")
        else:
            s = (f"{kind} ({f['method']}, {f['n_points']} batch sizes"
                 f"{', ' + str(f['n_censored']) + ' censored at their edge' if f['n_censored'] else ''}): "
                 f"beta = {f['beta']:.3f} (SE {f['beta_se']:.3f}), C = {f['C']:.3g}, R2 = {_f(f.get('r2'))}, "
                 f"tau = {math.sqrt(f['tau2']):.3g}, t({f['dof']}) {pct} interval {_ci(f['beta_ci_t'])}")
            if f.get("interval_note"):
                s += f" -- {f['interval_note']}"
            if f.get("beta_ci_bootstrap"):
                s += (f"; pairs bootstrap {_ci(f['beta_ci_bootstrap'])} ({f['bootstrap_resamples']} resamples, "
                      f"seed {f['bootstrap_seed']}: {f['bootstrap_note']})")
        excl = [t["name"] for t in f["theory"] if t["excluded"]]
        kept = [t["name"] for t in f["theory"] if t["excluded"] is False]
        s += (f"; excludes: {', '.join(excl) or 'none'}; consistent with: {', '.join(kept) or 'none'}"
              if any(t["excluded"] is not None for t in f["theory"]) else "; compared with no theory value")
        lines.append(s)
    return lines


def _section_lines(ph) -> list[str]:
    lines = []
    for name, section in (ph.get("sections") or {}).items():
        render = PHASE_SECTIONS.get(name)
        lines += render(section, ph) if render else [f"{name}: " + "; ".join(f"{k} = {v}" for k, v in section.items())]
    return lines


def _phase_block(ph, md: bool) -> list[str]:
    bullet = "- " if md else "  "
    bl, ln = ph["baselines"], ph["learned"]
    noise = ph.get("loss_noise")
    out = [f"{'## ' if md else ''}Phase {ph['phase']}" + ("" if md else ":"), "",
           f"runs: {ph['n_runs']} ({', '.join(f'{k} {v}' for k, v in ph['sources'].items())}), "
           f"budget {', '.join(ph['budget']['budgets'])}; baselines uniform/unigram/bigram "
           f"{_f(bl['uniform'])}/{_f(bl['unigram'])}/{_f(bl['bigram'])}; learned "
           f"{ln['true']} yes, {ln['false']} no, {ln['unknown']} unknown"
           + (f"; loss noise of one run {noise['sd']:.4f} nats ({noise['dof']} dof, from the seeds"
              + ("" if noise.get("pooled", True) else
                 f"; the batch sizes' noises differ, Bartlett p = {noise['homogeneity_p']:.2g}: each vertex's SE "
                 "from its own") + ")" if noise else ""),
           ""]
    out += [bullet + line for line in _fit_lines(ph) + _section_lines(ph)]
    out.append("")
    laws = ph["laws"]
    if laws["status"] == "ok":
        out += [(f"laws ({laws['uses']} of {laws['n_points']} batch sizes, "
                 f"{'weighted' if laws['weighted'] else 'unweighted'}): {laws['verdict']}"), "",
                _grid(*_laws_rows(ph), md=md)]
    else:
        out.append(f"laws: {laws['verdict']}")
    out.append("")
    if ph["warnings"]:
        out += [("- " if md else "  ! ") + w for w in ph["warnings"]] + [""]
    return out


def render_table(report: dict[str, Any], md: bool = False) -> str:
    s = report["settings"]
    h = "## " if md else ""
    how = ("grid argmin, the study method" if s["estimator"] == "argmin"
           else "quadratic vertex in ln LR with seed offsets, argmin where there is none")
    out = [f"{'# ' if md else ''}scaling compare: {', '.join(s['phases'])}",
           f"objective {s['metric']} (a configuration whose every replicate diverged = inf), optimum estimator: "
           f"{s['estimator']} ({how}), 95% intervals"
           + (f", pairs bootstrap {s['bootstrap']} resamples (seed {s['seed']})" if s["bootstrap"] else "")
           + (", unlearned runs excluded" if s["exclude_unlearned"] else "")
           + (f", budget {s['budget']}" if s.get("budget") else "")
           + (", budgets fitted together" if s["pool_budgets"] else ""), ""]
    if report["phases"]:  # none when every phase is a sibling phase of its own kind
        out += [f"{h}Phases", "", _grid(*_phase_rows(report), md=md), ""]
        out += [f"{h}Optimum per batch size", "", _grid(*_optima_rows(report), md=md), ""]
    for ph in report["phases"]:
        out += _phase_block(ph, md)
    out += sibling_report.render_lines(report.get("siblings"), lambda h, r: _grid(h, r, md=md), md)
    return "\n".join(out).rstrip() + "\n"


def render_markdown(report: dict[str, Any]) -> str:
    return render_table(report, md=True)


def _flat(v):
    if isinstance(v, list):
        return ";".join("" if x is None else str(x) for x in v)
    return "" if v is None else v


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    flat = []
    for r in rows:
        d = {}
        for k, v in r.items():
            if k.endswith(("_ci", "_ci_t", "_ci_bootstrap")):
                d[k + "_lo"], d[k + "_hi"] = v if isinstance(v, list) and len(v) == 2 else (None, None)
            else:
                d[k] = _flat(v)
        flat.append(d)
    keys = list(dict.fromkeys(k for d in flat for k in d))
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for d in flat:
        w.writerow({k: "" if d.get(k) is None else d.get(k) for k in keys})
    return buf.getvalue()


def render_csv(comparison: list[dict[str, Any]]) -> str:
    """One row per phase; an interval becomes two columns ``*_lo``/``*_hi``."""
    return _csv(comparison)


def render_optima_csv(optima: list[dict[str, Any]]) -> str:
    """One row per (phase, batch size) with both optimum estimates."""
    return _csv(optima)

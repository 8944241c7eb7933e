"""The numbers docs/performance.md and docs/results.md derive from returned MLflow stores of full sweeps.

    python benchmarks/sweep_stats.py sqlite:///a/mlflow.db sqlite:///b/mlflow.db ... [--phase 2_5] [--run B32-lr0.001]

Per store, from the store's own timestamps: the sweep's parent run's start and end (epoch seconds), the
span of the phase's runs, the time from the first run's creation to step 50 of the run named --run (a
prefix), the mean step time from step 50 to its last step, and the step time over steps 1,050–1,450 (no
evaluation or checkpoint inside for phase 2.5); the batched pass's own timings (``group_*`` metrics:
setup, first ticks with the compile, steady step).
Across stores: each configuration's final_val_loss in every store and its spread (max − min), and the
argmin LR per batch size in each store.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scaling import tracking  # noqa: E402


def finished_runs(client, phase: str):
    exp = client.get_experiment_by_name(tracking.experiment_name(phase))
    runs = tracking.search_runs(client, [exp.experiment_id])
    return [r for r in runs if r.info.status == "FINISHED" and r.info.run_name.startswith("B")
            and r.data.tags.get(tracking.TAG_SOURCE) == "sweep"]


def timeline(client, runs, prefix: str) -> dict:
    t0 = min(r.info.start_time for r in runs)
    run = next(r for r in runs if r.info.run_name.startswith(prefix))
    ts = {m.step: m.timestamp for m in client.get_metric_history(run.info.run_id, "train_loss")}
    last = max(ts)
    first = 50 if 50 in ts else min(ts)  # step 50 with the built-in phases' logging interval
    parent = client.get_run(run.data.tags["mlflow.parentRunId"]).info if "mlflow.parentRunId" in run.data.tags else None
    # the parent run's start and end (epoch seconds): against the sweep process's own start and end
    # (scripts/device_speed.sh prints them), the time before the sweep's first run and after its last
    return {"parent_start": parent.start_time / 1e3 if parent else None,
            "parent_end": parent.end_time / 1e3 if parent and parent.end_time else None,
            "span_s": (max(r.info.end_time for r in runs) - t0) / 1e3,
            "to_step50_s": (ts[first] - t0) / 1e3,
            "ms_per_step_50_to_last": (ts[last] - ts[first]) / max(last - first, 1),
            "ms_per_step_1050_1450": (ts[1450] - ts[1050]) / 400 if 1450 in ts and 1050 in ts else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stores", nargs="+", help="MLflow tracking URIs (sqlite:///path/mlflow.db)")
    ap.add_argument("--phase", default="2_5")
    ap.add_argument("--run", default="B32-lr0.001", help="run-name prefix of the run whose steps are timed")
    a = ap.parse_args(argv)
    losses: dict[str, list[float]] = {}
    for uri in a.stores:
        client = tracking.connect(uri)
        runs = finished_runs(client, a.phase)
        if not runs:  # e.g. a "prime" sweep stopped at its limit: its runs are KILLED
            print(f"{uri}: no finished sweep runs")
            continue
        tl = timeline(client, runs, a.run)
        print(f"{uri}: {len(runs)} finished sweep runs; " + ", ".join(
            f"{k} {v:.3f}" if k.startswith("parent") else f"{k} {v:.2f}" for k, v in tl.items() if v is not None))
        groups: dict[tuple, int] = {}  # each batched pass's own timings (the same on each of its runs), how many runs
        best: dict[int, tuple[float, float]] = {}
        for r in runs:
            g = tuple(sorted((k, v) for k, v in r.data.metrics.items() if k.startswith("group_")))
            if g:
                groups[g] = groups.get(g, 0) + 1
            v = r.data.metrics.get("final_val_loss")
            losses.setdefault(r.info.run_name, []).append(v)
            b, lr = int(r.data.params["batch_size"]), float(r.data.params["lr"])
            if v is not None and (b not in best or v < best[b][1]):
                best[b] = (lr, v)
        for g, n in groups.items():
            print(f"  group of {n} runs: " + ", ".join(f"{k} {v:.2f}" for k, v in g))
        print("  argmin LR per B: " + ", ".join(f"B={b}: {lr:g} ({v:.4f})" for b, (lr, v) in sorted(best.items())))
    full = {n: v for n, v in losses.items() if len(v) == len(a.stores) and None not in v}
    spreads = {n: max(v) - min(v) for n, v in full.items()}
    for n in sorted(full, key=lambda n: (int(n.split("-")[0][1:]), float(n.split("-")[1][2:]))):
        print(f"  {n}: {', '.join(f'{x:.4f}' for x in full[n])}  spread {spreads[n]:.4f}")
    if spreads:
        print(f"spread of final_val_loss over {len(a.stores)} stores: min {min(spreads.values()):.4f}, "
              f"median {statistics.median(spreads.values()):.4f}, max {max(spreads.values()):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

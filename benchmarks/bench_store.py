"""Benchmark: a store holding N finished runs of one phase (default 10,000), read and written the ways the
project does, against a local SQLite store and against a real `mlflow server` backed by PostgreSQL.

For each store:
  import      ``scaling import`` of a generated results table of N rows (``importing.import_table``);
  load        ``report.load_runs``, the runs table ``scaling compare`` analyses (straight from the tables
              of a SQL store; ``search_runs`` through a server);
  search      MLflow's ``search_runs`` of the whole experiment (the plain way, for reference);
  compare     ``report.compare`` in-process (load + analysis + rendering; no MLflow record, no plots);
  cli         the ``scaling compare --no-mlflow`` command as a process (its imports included);
  done-pass   a sweep's "what is done?" pass (``sweep.grid_status``) over the phase's grid.
Against the server also ``load`` and ``compare`` with the PostgreSQL database itself as tracking URI
(``--tracking-uri postgresql://...``: the direct-table path).

The table is phase 2.5's (4 batch sizes x 25 LRs x N/100 seeds), 12 CSV columns, so each run gets ~35
params, 10 tags and 9 metrics. The server needs PostgreSQL (``SCALING_TEST_POSTGRES``, e.g. from
``eval "$(scripts/ci_postgres.sh start)"``); without it only the local store is measured.

  python benchmarks/bench_store.py                       # 10,000 runs, both stores (minutes)
  python benchmarks/bench_store.py --runs 200 --no-server   # seconds
  python benchmarks/bench_store.py --no-server --local-store store/mlflow.db   # keep the store; later runs skip the import
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PHASE = "2_5"


def write_table(path: Path, n: int, seed: int = 0) -> None:
    """N rows of phase 2.5: a loss bowl around LR_opt = 3e-3 (B/32)^0.5 in log LR, plus noise."""
    rng = random.Random(seed)
    batch_sizes, lrs = [32, 64, 128, 256], [1e-4 * 10 ** (i / 8) for i in range(25)]
    cols = ["batch_size", "lr", "seed", "final_train_loss", "final_val_loss", "train_loss_std", "min_val_loss",
            "avg_grad_norm_before", "avg_grad_norm_after", "avg_clip_frequency", "converged", "num_steps"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i in range(n):
            b, lr, seed_ = batch_sizes[i % 4], lrs[(i // 4) % 25], i // 100
            v = 1.5 + 0.075 * (math.log(lr) - math.log(3e-3 * (b / 32) ** 0.5)) ** 2 + rng.gauss(0, 0.01)
            w.writerow([b, f"{lr:.6g}", seed_, f"{v - 0.02:.5f}", f"{v:.5f}", "0.004", f"{v - 0.01:.5f}",
                        "1.3", "0.9", "0.4", "True", 10000])


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def cpu_timed(fn, *args, **kwargs) -> tuple[float, float]:
    """(wall, this process's CPU) seconds of one call: on a machine others share, the CPU time is what the
    call itself costs (a local SQLite read runs in this process; a server's or PostgreSQL's work does not)."""
    t, c = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return time.perf_counter() - t, time.process_time() - c


def measure(uri: str, table: Path, label: str, db_uri: str | None = None) -> dict:
    """Every figure of one store (module docstring); ``db_uri``: the server's own database, read directly."""
    import scaling.data  # noqa: F401  (the import's baselines need it: its own start-up, not the import's)
    from scaling import report, sweep, tracking
    from scaling.config import load_phase
    from scaling.importing import import_table

    out: dict = {"store": label}
    client = tracking.connect(uri)  # the store exists (an empty SQLite one is made here) before the clock runs
    if client.get_experiment_by_name(tracking.experiment_name(PHASE)) is None:
        out["import_s"], summary = timed(import_table, table, PHASE, tracking_uri=uri)
        out["imported"] = summary.created
    exp = client.get_experiment_by_name(tracking.experiment_name(PHASE)).experiment_id
    out["load_s"], out["load_cpu_s"] = cpu_timed(report.load_runs, client, [PHASE])
    out["load_rows"] = len(report.load_runs(client, [PHASE]))
    out["search_runs_s"], out["search_runs_cpu_s"] = cpu_timed(tracking.search_runs, client, [exp])
    out["compare_s"], out["compare_cpu_s"] = cpu_timed(report.compare, PHASE, tracking_uri=uri, log_to_mlflow=False,
                                                       plots=False)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "scaling.cli", "compare", "--phases", PHASE, "--no-mlflow",
                        "--tracking-uri", uri], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    out["cli_compare_s"] = time.perf_counter() - t
    if r.returncode != 0:
        out["cli_compare_error"] = r.stderr.strip()[-300:]
    cfgs = sweep.plan(load_phase(PHASE))
    out["done_pass_s"], out["done_pass_cpu_s"] = cpu_timed(sweep.grid_status, client, exp, cfgs)
    out["done_pass_configs"] = len(cfgs)
    if db_uri:
        direct = tracking.connect(db_uri)
        out["load_direct_db_s"], _ = timed(report.load_runs, direct, [PHASE])
        out["compare_direct_db_s"], _ = timed(report.compare, PHASE, tracking_uri=db_uri, log_to_mlflow=False,
                                              plots=False)
    print(json.dumps(out), flush=True)
    return out


def server_store(tmp: Path):
    """A started `mlflow server` on a fresh PostgreSQL database, or None without PostgreSQL."""
    from live_stores import MlflowServer, free_port, postgres_cluster

    cluster = postgres_cluster()
    if cluster is None:
        print("no SCALING_TEST_POSTGRES: the server store is not measured", file=sys.stderr)
        return None, None
    db = cluster.mlflow_database("scaling_bench_store")
    server = MlflowServer(backend_uri=db, artifacts=tmp / "artifacts", port=free_port(), log=tmp / "server.log")
    server.start()
    return server, db


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--no-server", action="store_true", help="Only the local SQLite store.")
    ap.add_argument("--no-local", action="store_true", help="Only the server store.")
    ap.add_argument("--out", default=None, help="Write the results as JSON here.")
    ap.add_argument("--local-store", default=None,
                    help="SQLite file of the local store, kept (default: a temp one); one that holds the runs "
                         "already is measured without importing them again.")
    a = ap.parse_args()
    results = {"runs": a.runs, "machine": platform.node(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "stores": []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ["SCALING_CACHE_DIR"] = str(tmp / "cache")
        table = tmp / f"runs_{a.runs}.csv"
        write_table(table, a.runs)
        if not a.no_local:
            local = Path(a.local_store).resolve() if a.local_store else tmp / "local" / "mlflow.db"
            local.parent.mkdir(parents=True, exist_ok=True)
            results["stores"].append(measure(f"sqlite:///{local}", table, "local sqlite"))
        if not a.no_server:
            server, db = server_store(tmp)
            if server is not None:
                try:
                    results["stores"].append(measure(server.url, table, "mlflow server + postgresql", db))
                finally:
                    server.stop()
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""What the parts of a sweep's start cost, each timed in a fresh interpreter (docs/performance.md).

    python scripts/startup_probe.py [--repeat 3] [--cuda]

Each part is a `python -c` of its own, timed from outside (so interpreter start-up is in every figure:
the first part is the bare interpreter); the median of --repeat runs. "fresh store, MLflow migrating it"
opens a new SQLite store with MLflow alone (it runs its schema migrations); "fresh store (connect)" creates
one through scaling.tracking.connect (a copy of the migrated empty store in SCALING_CACHE_DIR, made there
the first time); "existing store" connects to that one again. With --cuda, also the CUDA context (the first
tensor on the GPU).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PARTS = [
    ("interpreter", "pass"),
    ("import torch", "import torch"),
    ("import torch._dynamo and inductor", "import torch, torch._dynamo, torch._inductor.compile_fx"),
    ("import scaling (cli, sweep, runner, batched)", "import scaling.cli, scaling.sweep, scaling.runner, scaling.batched"),
    ("import mlflow and its SQL store", "import mlflow; from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore"),
    ("fresh store, MLflow migrating it", "from mlflow.tracking import MlflowClient; "
     "MlflowClient(tracking_uri='sqlite:///{dir}/own.db').search_experiments(max_results=1)"),
    ("fresh store (connect)", "import scaling.tracking as t; t.connect('sqlite:///{dir}/mlflow.db')"),
    ("existing store (connect)", "import scaling.tracking as t; t.connect('sqlite:///{dir}/mlflow.db')"),
]
CUDA = ("CUDA context", "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()")


def timed(code: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cuda", action="store_true", help="also time the CUDA context")
    a = ap.parse_args(argv)
    parts = PARTS + ([CUDA] if a.cuda else [])
    times: dict[str, list[float]] = {name: [] for name, _ in parts}
    for _ in range(a.repeat):
        with tempfile.TemporaryDirectory() as d:  # a fresh store in every round
            for name, code in parts:
                times[name].append(timed(code.format(dir=d)))
    base = statistics.median(times["interpreter"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:48s} {med:6.2f} s  (beyond the interpreter {med - base:5.2f} s; runs "
              f"{', '.join(f'{t:.2f}' for t in ts)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

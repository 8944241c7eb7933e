"""Benchmark: what measuring the gradient noise costs a batched group (scaling.batched.train_group).

Trains one group of the phase's model (default phase 4: d_model 128, 4 layers, context 128) — ``--models``
models at each of ``--batch-sizes`` — for ``--steps`` steps with a measurement at every ``--every``-th step
(per-sequence micro-batches unless ``--microbatch``, tail index on), random tokens standing in for the text.
Prints the time of one training step (the group's wall time less setup, first ticks, evaluations and
measurements, per tick), of one measurement (``timings["noise"]``, synchronised), their ratio, and the
overhead a measurement every ``--interval`` steps adds to a sweep (measurement / (interval × step)).

  python benchmarks/bench_group_noise.py                     # CPU: 2 models at B 16 and 32, 8 steps
  python benchmarks/bench_group_noise.py --device cuda --compile --models 24 --batch-sizes 16,32,64 --steps 200
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from scaling.batched import WARM_TICKS, train_group  # noqa: E402
from scaling.config import DataConfig, load_phase  # noqa: E402
from scaling.data import random_corpus  # noqa: E402
from scaling.train import resolve_device  # noqa: E402


def bench_phase(phase, steps: int, every: int, microbatch: int, batch_sizes: list[int]):
    t = dataclasses.replace(phase.train, budget_kind="steps", budget=steps, eval_interval=steps, eval_batches=1,
                            log_interval=every, checkpoint_every=steps, noise_interval=every,
                            noise_microbatch=microbatch, tail_index=True)
    grid = dataclasses.replace(phase.grid, batch_sizes=tuple(batch_sizes))
    return dataclasses.replace(phase, train=t, grid=grid, data=DataConfig(dataset="random"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", default="4")
    ap.add_argument("--batch-sizes", default="16,32")
    ap.add_argument("--models", type=int, default=2, help="models per batch size")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=4, help="a measurement every this many steps")
    ap.add_argument("--interval", type=int, default=64, help="the sweep's noise_interval, for the overhead")
    ap.add_argument("--microbatch", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    device = resolve_device(a.device)
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    phase = bench_phase(load_phase(a.phase), a.steps, a.every, a.microbatch, sizes)
    cfgs = [phase.run_config(b, 1e-3, 1.0, s) for b in sizes for s in range(a.models)]
    corpus = random_corpus(phase.data, phase.model, 0).to(device)
    tm: dict = {}
    w0 = time.perf_counter()
    res = train_group(cfgs, corpus, device, compile=a.compile, timings=tm)
    wall = time.perf_counter() - w0
    assert all(r.status == "FINISHED" for r in res), [r.status for r in res]
    noise = tm["noise"]
    steady = tm["ticks"] - len(tm["warm"])
    step_s = (tm["wall_s"] - tm["setup_s"] - sum(tm["warm"]) - tm["eval_s"] - sum(noise[1:])) / max(steady, 1)
    meas_s = statistics.median(noise[1:] or noise)  # the first holds the measurement pass's compile
    print(f"device {device}  compile {a.compile}  models {len(cfgs)}  sequences/step {sum(c.batch_size for c in cfgs)}"
          f"  micro-batch {a.microbatch}  threads {torch.get_num_threads()}  wall {wall:.1f} s")
    print(f"step {1000 * step_s:.1f} ms  measurement {1000 * meas_s:.1f} ms (first {1000 * noise[0]:.1f} ms)  "
          f"ratio {meas_s / step_s:.2f} steps  overhead at interval {a.interval}: "
          f"{100 * meas_s / (a.interval * step_s):.1f}%  (warm ticks: {WARM_TICKS})")


if __name__ == "__main__":
    main()

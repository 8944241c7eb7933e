"""Benchmark: what measuring the gradient noise costs the single-config training loop.

Trains the phase's model (default phase 2.5: d_model 128, 4 layers, context 128) with ``scaling.train.train``
for ``--steps`` steps at one batch size, with the measurement off and on (``noise_interval``, per-sequence
micro-batches, tail index on or off), alternating the variants ``--repeats`` times so that a machine whose
load changes affects them alike. Random tokens stand in for the text (the cost does not depend on them).
Evaluation and checkpoints are left out of the timed loop (one evaluation at the end, one batch).

Prints the median time per step of each variant and the on/off ratio, and the time of one measurement
alone against one training step on the same batch (interleaved, ``--reps`` times). Times are wall clock
and process CPU time: on a machine shared with other work the wall clock follows their load, the CPU time
much less.

  python benchmarks/bench_noise.py                        # CPU: phase 2.5, B=32, every 50 steps, 100 steps
  python benchmarks/bench_noise.py --steps 200 --repeats 3 --device cuda
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

from scaling.config import DataConfig, load_phase  # noqa: E402
from scaling.data import BatchSampler, random_corpus  # noqa: E402
from scaling.model import build_model  # noqa: E402
from scaling.noise import microbatch_stats  # noqa: E402
from scaling.train import make_optimizer, resolve_device, train  # noqa: E402


def variant_phase(phase, steps: int, interval: int, microbatch: int, tail: bool):
    t = dataclasses.replace(phase.train, budget_kind="steps", budget=steps, eval_interval=steps, eval_batches=1,
                            log_interval=50, checkpoint_every=steps, noise_interval=interval,
                            noise_microbatch=microbatch, tail_index=tail and interval > 0)
    return dataclasses.replace(phase, train=t, data=DataConfig(dataset="random"))


def timed(fn, device) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - w0, time.process_time() - c0


def time_training(phase, batch_size: int, device) -> tuple[float, float]:
    """(wall, CPU) seconds per step of a whole training run."""
    cfg = phase.run_config(batch_size, 1e-3)
    corpus = random_corpus(phase.data, phase.model, 0).to(device)
    out = {}
    wall, cpu = timed(lambda: out.update(res=train(cfg, corpus, device)), device)
    assert out["res"].status == "FINISHED", out["res"].status
    return wall / cfg.steps, cpu / cfg.steps


def time_one_measurement(phase, batch_size: int, microbatch: int, tail: bool, device, reps: int):
    """Median (wall, CPU) seconds of one measurement and of one training step (forward, backward, AdamW)
    on the same batch, interleaved."""
    model = build_model(phase.model, 0).to(device)
    cfg = phase.run_config(batch_size, 1e-3)
    opt = make_optimizer(model, cfg, device)
    corpus = random_corpus(phase.data, phase.model, 0).to(device)
    x, y = BatchSampler(corpus.train, 0, batch_size, phase.model.context_length).batch(0)

    def step():
        opt.zero_grad(set_to_none=True)
        model.loss(x, y).backward()
        opt.step()

    step()  # AdamW's state exists from here on, as at every measured step
    meas, steps = [], []
    for _ in range(reps):
        steps.append(timed(step, device))
        meas.append(timed(lambda: microbatch_stats(model, x, y, microbatch, opt, tail), device))
    med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
    return (med(meas, 0), med(meas, 1)), (med(steps, 0), med(steps, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", default="2_5")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--interval", type=int, default=50)
    ap.add_argument("--microbatch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="interleaved measurement / step pairs timed")
    ap.add_argument("--skip-loop", action="store_true", help="only the one-measurement timing")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = resolve_device(args.device)
    base = load_phase(args.phase)
    variants = {"off": (0, False), "gns": (args.interval, False), "gns+tail": (args.interval, True)}
    print(f"phase {args.phase}, B={args.batch_size}, micro-batch {args.microbatch}, every {args.interval} "
          f"steps, {device}, {torch.get_num_threads()} threads", flush=True)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for r in range(0 if args.skip_loop else args.repeats):
        for name, (interval, tail) in variants.items():
            ph = variant_phase(base, args.steps, interval, args.microbatch, tail)
            times[name].append(time_training(ph, args.batch_size, device))
            w, c = times[name][-1]
            print(f"repeat {r + 1} {name}: {w * 1e3:.1f} ms/step wall, {c * 1e3:.1f} ms/step CPU", flush=True)
    if not args.skip_loop:
        print(f"\ntraining loop, {args.steps} steps, median of {args.repeats}:")
        off = [statistics.median(t[i] for t in times["off"]) for i in (0, 1)]
        for name in variants:
            med = [statistics.median(t[i] for t in times[name]) for i in (0, 1)]
            print(f"{name:9s} wall {med[0] * 1e3:8.1f} ms/step (x{med[0] / off[0]:.3f})   "
                  f"CPU {med[1] * 1e3:8.1f} ms/step (x{med[1] / off[1]:.3f})")
    ph = variant_phase(base, args.steps, args.interval, args.microbatch, True)
    for tail in (False, True):
        meas, step = time_one_measurement(ph, args.batch_size, args.microbatch, tail, device, args.reps)
        for i, kind in ((0, "wall"), (1, "CPU")):
            print(f"one measurement{' with tail index' if tail else ''} ({kind}, median of {args.reps}): "
                  f"{meas[i]:.3f} s = {meas[i] / step[i]:.2f} training steps ({step[i]:.3f} s); "
                  f"every {args.interval} steps: +{meas[i] / step[i] / args.interval:.1%}", flush=True)


if __name__ == "__main__":
    main()

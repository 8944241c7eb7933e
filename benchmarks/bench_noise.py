"""Benchmark: what measuring the gradient noise costs the single-config training loop.

Trains the phase's model (default phase 2.5: d_model 128, 4 layers, context 128) with ``scaling.train.train``
for ``--steps`` steps at one batch size, with the measurement off and on (``noise_interval``, per-sequence
micro-batches, tail index on or off), alternating the variants ``--repeats`` times so that a machine whose
load changes affects them alike. Random tokens stand in for the text (the cost does not depend on them).
Evaluation and checkpoints are left out of the timed loop (one evaluation at the end, one batch).

Prints the median seconds per step of each variant, the on/off ratio, and the time of one measurement
alone against one training step.

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


def time_training(phase, batch_size: int, device) -> float:
    cfg = phase.run_config(batch_size, 1e-3)
    corpus = random_corpus(phase.data, phase.model, 0).to(device)
    t0 = time.perf_counter()
    res = train(cfg, corpus, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert res.status == "FINISHED", res.status
    return (time.perf_counter() - t0) / cfg.steps


def time_one_measurement(phase, batch_size: int, microbatch: int, tail: bool, device, reps: int = 3):
    """Seconds of one measurement and of one training step (forward, backward, AdamW) on the same batch."""
    model = build_model(phase.model, 0).to(device)
    cfg = phase.run_config(batch_size, 1e-3)
    opt = make_optimizer(model, cfg, device)
    corpus = random_corpus(phase.data, phase.model, 0).to(device)
    x, y = BatchSampler(corpus.train, 0, batch_size, phase.model.context_length).batch(0)
    meas, step = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model.loss(x, y).backward()
        opt.step()
        step.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        microbatch_stats(model, x, y, microbatch, opt, tail)
        meas.append(time.perf_counter() - t0)
    return statistics.median(meas), statistics.median(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", default="2_5")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--interval", type=int, default=50)
    ap.add_argument("--microbatch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = resolve_device(args.device)
    base = load_phase(args.phase)
    variants = {"off": (0, False), "gns": (args.interval, False), "gns+tail": (args.interval, True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):
        for name, (interval, tail) in variants.items():
            ph = variant_phase(base, args.steps, interval, args.microbatch, tail)
            times[name].append(time_training(ph, args.batch_size, device))
            print(f"repeat {r + 1} {name}: {times[name][-1] * 1e3:.1f} ms/step", flush=True)
    off = statistics.median(times["off"])
    print(f"\nphase {args.phase}, B={args.batch_size}, micro-batch {args.microbatch}, every {args.interval} "
          f"steps, {args.steps} steps, {args.repeats} repeats, {device}, {torch.get_num_threads()} threads")
    for name in variants:
        med = statistics.median(times[name])
        print(f"{name:9s} {med * 1e3:8.1f} ms/step  ratio to off {med / off:.3f}")
    ph = variant_phase(base, args.steps, args.interval, args.microbatch, True)
    for tail in (False, True):
        meas, step = time_one_measurement(ph, args.batch_size, args.microbatch, tail, device)
        print(f"one measurement{' with tail index' if tail else ''}: {meas:.3f} s = {meas / step:.2f} "
              f"training steps ({step:.3f} s); every {args.interval} steps: +{meas / step / args.interval:.1%}")


if __name__ == "__main__":
    main()

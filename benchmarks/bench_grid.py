"""Benchmark: one phase grid trained (a) by a plain PyTorch loop, (b) by scaling.train.train, (c) by train_group.

All in one process on one device, on the phase's model (default phase 2.5: d_model 128, 4 layers, 4 heads,
vocab 128, context 128) at the grid's batch sizes:

  (a) plain loop: one config at a time, eager fp32, torch.optim.AdamW, clip_grad_norm_, ``.item()``
      every step (the study's baseline);
  (b) the project's single-config path ``scaling.train.train`` (bf16 autocast on CUDA, fused AdamW,
      device-side metrics fetched once per log interval);
  (c) the batched path ``scaling.batched.train_group``: every config of the grid in one pass, eager
      and/or compiled in the modes ``--compile-mode`` names (compile time reported apart from the steady
      state; on CUDA the peak GPU memory of the pass too).

Prints steps/s, tokens/s and achieved TFLOP/s (6·N·tokens + attention 12·L·T·d per token, N = all
parameters, causal mask not discounted), the ratios b/a and c/a, and the projected full-grid wall time of
each path (plus the actual one for the paths named in ``--full``). ``--check`` compares the losses of
the paths (bf16 against fp32). Results go to ``--out`` (JSON), rewritten after every section.

Imports only torch and scaling.{config,model,train,data,batched}: runs where mlflow/optuna are absent
(except ``--record``, which records into a temporary MLflow store as ``scaling sweep`` does).

  python benchmarks/bench_grid.py --smoke     # CPU, seconds (CI): a d_model=32 2-layer model, B 2 and 4
  python benchmarks/bench_grid.py --variants eager,default --check --out bench.json   # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from scaling.batched import WARM_TICKS, train_group  # noqa: E402
from scaling.config import COMPILE_MODES, DataConfig, ModelConfig, load_phase  # noqa: E402
from scaling.data import BatchSampler, load_corpus, random_corpus  # noqa: E402
from scaling.model import build_model, decay_mask  # noqa: E402
from scaling.train import Hooks, lr_at, resolve_device, train  # noqa: E402

T0 = time.perf_counter()
RECORD_PARTS = ("all", "metrics", "checkpoints", "none")


def flops_per_token(mc, n_params: int) -> float:
    return 6.0 * n_params + 12.0 * mc.n_layers * mc.context_length * mc.d_model


def parse_variant(variant: str) -> dict:
    """A variant → train_group keyword arguments: "eager" (not compiled) or a ``--compile-mode`` name
    (``config.COMPILE_MODES``: default, max-autotune-gemm, max-autotune), as a user's command trains."""
    if variant == "eager":
        return {"compile": False}
    if variant not in COMPILE_MODES:
        raise ValueError(f"variant {variant!r}: want eager or one of {', '.join(COMPILE_MODES)}")
    return {"compile": COMPILE_MODES[variant]}


def fresh_compile() -> None:
    """Forget every compiled graph (in memory; on disk too with --cold) before a variant."""
    torch._dynamo.reset()


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = resolve_device(args.device)
        self.cuda = self.device.type == "cuda"
        phase = load_phase(args.phase)
        if args.smoke:  # a tiny model of the same family: the real code paths, in seconds
            phase = dataclasses.replace(phase, model=ModelConfig(d_model=32, n_layers=2, n_heads=2,
                                                                 context_length=32, vocab_size=128))
        over = {}
        if args.batch_sizes:
            over["batch_sizes"] = args.batch_sizes
        if args.lrs:
            over["lrs"] = args.lrs
        if args.eval_batches:
            over["eval_batches"] = args.eval_batches
        if args.seeds:
            over["seeds"] = args.seeds
        self.phase = phase.with_overrides(**over) if over else phase
        self.full_steps = {b: self.phase.run_config(b, self.phase.grid.lrs[0] if self.phase.grid.lrs else 1e-3).steps
                           for b in self.phase.grid.batch_sizes}
        self.points = self.phase.grid_points()
        mc = self.phase.model
        if args.data_dir:
            self.corpus = load_corpus(self.phase, 0, args.data_dir, tuple(args.splits.split(":")))
        else:
            data = DataConfig(dataset="random", random_train_tokens=args.random_tokens,
                              random_val_tokens=max(args.random_tokens // 10, 20 * mc.context_length))
            self.corpus = random_corpus(data, mc, 0)
        self.corpus.to(self.device)
        self.n_params = build_model(mc, 0).n_params()
        self.fpt = flops_per_token(mc, self.n_params)
        self.out = {"meta": self.meta(), "a": {}, "b": {}, "c": {}, "check": {}, "full": {}, "projected_grid_s": {}}

    def meta(self) -> dict:
        a = self.args
        m = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
             "python": platform.python_version(), "torch": torch.__version__, "device": str(self.device),
             "phase": self.phase.name, "model": dataclasses.asdict(self.phase.model), "grid": self.points,
             "full_steps": self.full_steps, "data": a.data_dir or f"random tokens ({a.random_tokens})"}
        if self.cuda:
            m["gpu"] = torch.cuda.get_device_name()
        return m

    def save(self) -> None:
        if self.args.out:
            Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.out).write_text(json.dumps(self.out, indent=1, default=str))

    def past_deadline(self) -> bool:
        return bool(self.args.deadline_s) and time.perf_counter() - T0 > self.args.deadline_s

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def cfg(self, b: int, lr: float, steps: int, **over):
        p = self.phase.with_overrides(steps=steps, **over)
        return p.run_config(b, lr, "phase")

    # ---- (a) the plain loop ------------------------------------------------------------------------------
    def plain(self, b: int, lr: float, steps: int, record: bool = False) -> tuple[float, list[float]]:
        """Seconds for ``steps`` steps after warm-up (or the per-step losses when ``record``)."""
        cfg = self.cfg(b, lr, max(steps, 1))
        mc = self.phase.model
        model = build_model(mc, cfg.seed).to(self.device)
        mask = decay_mask(model)
        named = list(model.named_parameters())
        o = self.phase.optim
        opt = torch.optim.AdamW([{"params": [p for n, p in named if mask[n]], "weight_decay": o.weight_decay},
                                 {"params": [p for n, p in named if not mask[n]], "weight_decay": 0.0}],
                                lr=lr, betas=tuple(o.betas), eps=o.eps)
        sampler = BatchSampler(self.corpus.train, cfg.seed, b, mc.context_length)
        params = [p for _, p in named]
        clip = math.inf if cfg.clip is None else cfg.clip
        losses = []

        def step(s: int) -> None:
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, s)
            x, y = sampler.batch(s)
            loss = model.loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            losses.append(loss.item())

        if record:
            for s in range(steps):
                step(s)
            return 0.0, losses
        for s in range(self.args.warmup):
            step(s)
        self.sync()
        t = time.perf_counter()
        for s in range(self.args.warmup, self.args.warmup + steps):
            step(s)
        self.sync()
        return time.perf_counter() - t, losses

    def run_a(self) -> None:
        lr = self.phase.grid.lrs[0]
        for b in self.phase.grid.batch_sizes:
            dt, _ = self.plain(b, lr, self.args.steps)
            self.out["a"][b] = self.rates(b, self.args.steps, dt)
            self.report("a plain fp32 loop", b, self.out["a"][b])
            self.save()

    # ---- (b) scaling.train.train ---------------------------------------------------------------------------
    def run_b(self) -> None:
        lr = self.phase.grid.lrs[0]
        for b in self.phase.grid.batch_sizes:
            train(self.cfg(b, lr, self.args.warmup), self.corpus, self.device)  # warm-up (cuBLAS, allocator)
            self.sync()
            t = time.perf_counter()
            train(self.cfg(b, lr, self.args.steps), self.corpus, self.device)
            self.sync()
            dt = time.perf_counter() - t
            self.out["b"][b] = self.rates(b, self.args.steps, dt)
            self.report("b scaling.train", b, self.out["b"][b])
            self.save()

    # ---- (c) train_group -----------------------------------------------------------------------------------
    def grid_cfgs(self, steps: int | None, **over) -> list:
        if steps is None:
            p = self.phase.with_overrides(**over) if over else self.phase
            return [p.run_config(b, lr, clip, seed) for b, lr, clip, seed in self.points]
        p = self.phase.with_overrides(steps=steps, **over)
        return [p.run_config(b, lr, clip, seed) for b, lr, clip, seed in self.points]

    def recorders(self, cfgs, parts: str = "all") -> tuple[list, object, float]:
        """What `scaling sweep` attaches to a group: one MLflow run per config in a fresh SQLite store, one
        metric-sink thread and one checkpoint-writer thread. Returns (hooks, close, seconds to create).
        ``parts`` (RECORD_PARTS): "all" as the sweep; "metrics" without the checkpoints, "checkpoints"
        without the metrics, "none" neither (the threads exist and idle): what each part costs."""
        import tempfile

        from scaling import runner, tracking
        t = time.perf_counter()
        d = tempfile.mkdtemp(prefix="bench-mlflow-")
        client = tracking.connect(f"sqlite:///{d}/mlflow.db")
        sink, writer = runner.MetricSink(client), runner.CheckpointWriter(client)
        recs = [runner.RunRecorder(client, runner.start_run(client, c, self.corpus, self.device, "bench"), sink, writer)
                for c in cfgs]
        hooks = [r.hooks() for r in recs]
        if parts != "all":
            from scaling.train import Hooks

            def keep(h):
                return Hooks(on_log=h.on_log if parts == "metrics" else Hooks.on_log,
                             on_eval=h.on_eval if parts == "metrics" else Hooks.on_eval,
                             on_checkpoint=h.on_checkpoint if parts == "checkpoints" else Hooks.on_checkpoint,
                             on_step=h.on_step)
            hooks = [keep(h) for h in hooks]

        def close():
            sink.close()
            writer.close()
            shutil.rmtree(d, ignore_errors=True)  # a throwaway store

        return hooks, close, time.perf_counter() - t

    def run_c(self, variant: str, record: bool = False, switch_s: float | None = None, parts: str = "all") -> None:
        """Train the grid with one train_group variant, bare or (``record``) recording into MLflow as the
        sweep does, with Python's thread switch interval set to ``switch_s`` while it trains; ``parts``: which
        of the recording's hooks act (RECORD_PARTS)."""
        kw = parse_variant(variant)
        n = self.args.group_steps
        # with --record, both runs of a variant checkpoint 3 times (only the recorded one writes them)
        every = max(1, n // 3) if self.args.record else 10 * n
        eval_interval = max(1, n // 2)
        cfgs = self.grid_cfgs(n, eval_interval=eval_interval, checkpoint_every=every)
        tm: dict = {}
        hooks, close, create_s = self.recorders(cfgs, parts) if record else (None, None, 0.0)
        if record:
            variant = f"{variant}+record{'' if parts == 'all' else f'[{parts}]'}@{switch_s * 1e3:g}ms"
        else:
            fresh_compile()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        handoff = contextlib.nullcontext()
        if record:  # as the sweep trains (runner imports mlflow: only with --record)
            from scaling.runner import quick_gil_handoff
            handoff = quick_gil_handoff(switch_s)
        t = time.perf_counter()
        t1 = None
        try:
            with handoff:
                res = train_group(cfgs, self.corpus, self.device, hooks, timings=tm, **kw)
                self.sync()
            t1 = time.perf_counter()
        finally:
            if record:
                close()
        wall = t1 - t
        flush_s = time.perf_counter() - t1 if record else 0.0
        warm = sum(tm["warm"][:WARM_TICKS])
        steady_ticks = tm["ticks"] - WARM_TICKS
        steady_s = wall - warm - tm["eval_s"] - tm.get("setup_s", 0.0)
        tick_s = steady_s / max(steady_ticks, 1)
        # a compiled evaluation compiles in its first call: that one's excess over the others is compile time
        evals = tm["evals"] or [0.0]  # none if every model stopped before the first evaluation
        eval_each = statistics.mean(evals[1:]) if len(evals) > 1 else evals[0]
        eval_compile_s = max(0.0, evals[0] - eval_each) if kw["compile"] else 0.0
        compile_s = max(0.0, warm - WARM_TICKS * tick_s) + eval_compile_s
        seqs = sum(c.batch_size for c in cfgs)
        tokens_per_tick = seqs * self.phase.model.context_length
        full_ticks = max(self.full_steps.values())
        evals_full = math.ceil(full_ticks / self.phase.train.eval_interval)
        projected = tm.get("setup_s", 0.0) + compile_s + full_ticks * tick_s + evals_full * eval_each
        r = {"variant": variant, "configs": len(cfgs), "sequences_per_step": seqs, "ticks": tm["ticks"],
             "wall_s": wall, "warm_s": tm["warm"], "compile_s": compile_s, "setup_s": tm.get("setup_s"),
             "ms_per_step": 1e3 * tick_s, "steps_per_s": 1 / tick_s, "tokens_per_s": tokens_per_tick / tick_s,
             "tflops": tokens_per_tick / tick_s * self.fpt / 1e12, "eval_s_each": eval_each,
             "projected_grid_s": projected, "statuses": [x.status for x in res],
             "eval_compile_s": eval_compile_s,
             "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None,
             "note": "projected = setup + compile (of the step and of the evaluation) + steps x steady step + "
                     "evals (uniform step counts assumed)"}
        if record:
            r.update(runs_created_s=create_s, final_flush_s=flush_s,
                     note2="recorded as scaling sweep does; compile reuses the bare run's cache")
        self.out["c"][variant] = r
        print(f"[c train_group {variant}] {len(cfgs)} configs, {seqs} seqs/step: {r['ms_per_step']:.2f} ms/step "
              f"({r['steps_per_s']:.1f} group steps/s, {r['tokens_per_s'] / 1e6:.2f} M tok/s, "
              f"{r['tflops']:.1f} TFLOP/s); compile {compile_s:.1f} s, eval {eval_each * 1e3:.0f} ms; "
              f"projected grid {projected:.1f} s"
              + (f"; peak GPU memory {r['peak_mem_gb']:.2f} GiB" if self.cuda else "")
              + (f"; runs created in {create_s:.1f} s, final flush {flush_s:.1f} s" if record else ""), flush=True)
        self.save()

    # ---- helpers --------------------------------------------------------------------------------------------
    def rates(self, b: int, steps: int, dt: float) -> dict:
        tok = b * self.phase.model.context_length * steps / dt
        return {"steps": steps, "seconds": dt, "steps_per_s": steps / dt, "tokens_per_s": tok,
                "tflops": tok * self.fpt / 1e12}

    def report(self, name: str, b: int, r: dict) -> None:
        print(f"[{name}] B={b}: {r['steps_per_s']:.1f} steps/s, {r['tokens_per_s'] / 1e6:.3f} M tok/s, "
              f"{r['tflops']:.2f} TFLOP/s", flush=True)

    def project(self) -> None:
        """Projected full-grid seconds of (a) and (b) from their steps/s; ratios."""
        proj = self.out["projected_grid_s"]
        for path in ("a", "b"):
            rates = self.out[path]
            if rates and all(b in rates for b, *_ in self.points):
                proj[path] = sum(self.full_steps[b] / rates[b]["steps_per_s"] for b, *_ in self.points)
        for v, r in self.out["c"].items():
            proj[f"c:{v}"] = r["projected_grid_s"]
        ratios = {}
        if self.out["a"] and self.out["b"]:
            ratios["b/a_steps_per_s"] = {b: self.out["b"][b]["steps_per_s"] / self.out["a"][b]["steps_per_s"]
                                         for b in self.out["a"] if b in self.out["b"]}
        for k, v in proj.items():
            if k != "a" and "a" in proj:
                ratios[f"{k}/a_grid_speedup"] = proj["a"] / v
        self.out["ratios"] = ratios
        print("projected full-grid wall time (s):", {k: round(v, 1) for k, v in proj.items()})
        print("ratios:", json.dumps(ratios, default=lambda x: round(x, 2)))
        self.save()

    # ---- numerics: the paths against each other --------------------------------------------------------------
    def check(self) -> None:
        """Interval-mean losses and val losses of a few configs: batched vs alone (both bf16 on CUDA) vs the
        plain fp32 loop."""
        n = self.args.check_steps
        bs = sorted({self.phase.grid.batch_sizes[0], self.phase.grid.batch_sizes[-1]})
        lrs = sorted({self.phase.grid.lrs[len(self.phase.grid.lrs) // 2], self.phase.grid.lrs[-1]})
        li = max(1, n // 6)
        p = self.phase.with_overrides(steps=n, log_interval=li, eval_interval=max(1, n // 2), checkpoint_every=10 * n)
        cfgs = [p.run_config(b, lr, "phase") for b in bs for lr in lrs]

        def rec():
            logs, evals = [], []
            return logs, evals, Hooks(on_log=lambda s, m: logs.append(m["train_loss"]),
                                      on_eval=lambda s, v: evals.append(v))

        corpus = self.corpus
        if self.args.check_data_dir:
            corpus = load_corpus(self.phase, 0, self.args.check_data_dir, tuple(self.args.check_splits.split(":")))
            corpus.to(self.device)
        saved, self.corpus = self.corpus, corpus
        try:
            self._check(cfgs, n, li, rec)
        finally:
            self.corpus = saved

    def _check(self, cfgs, n, li, rec) -> None:
        kw = parse_variant(self.args.check_variant)

        rs = [rec() for _ in cfgs]
        fresh_compile()
        train_group(cfgs, self.corpus, self.device, [h for *_, h in rs], **kw)
        runs = {"group": [(lg, ev) for lg, ev, _ in rs]}
        single = []
        for c in cfgs:
            lg, ev, h = rec()
            train(c, self.corpus, self.device, h)
            single.append((lg, ev))
        runs["single_auto"] = single
        plain = []
        for c in cfgs:
            _, losses = self.plain(c.batch_size, c.lr, n, record=True)
            plain.append(([sum(losses[i:i + li]) / len(losses[i:i + li]) for i in range(0, n, li)], []))
        runs["plain_fp32"] = plain

        def maxrel(x, y):
            return max(abs(a - b) / abs(b) for a, b in zip(x, y)) if x and y else None

        pairs = [("group", "single_auto"), ("group", "plain_fp32"), ("single_auto", "plain_fp32")]
        out = {"configs": [(c.batch_size, c.lr) for c in cfgs], "steps": n, "log_interval": li, "pairs": {},
               "data": self.corpus.source}
        for x, y in pairs:
            tr = [maxrel(runs[x][i][0], runs[y][i][0]) for i in range(len(cfgs))]
            va = [maxrel(runs[x][i][1], runs[y][i][1]) for i in range(len(cfgs))]
            out["pairs"][f"{x} vs {y}"] = {"train_loss_max_rel": tr, "val_loss_max_rel": va}
            fmt = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
            print(f"[check] {x} vs {y}: max rel diff of interval train loss per config "
                  f"{[fmt(v) for v in tr]}, val loss {[fmt(v) for v in va]}", flush=True)
        out["final_train_loss"] = {k: [r[0][-1] for r in v] for k, v in runs.items()}
        self.out["check"] = out
        self.save()

    # ---- actual full grid ------------------------------------------------------------------------------------
    def full(self, paths: list[str]) -> None:
        limit = self.args.full_max_s
        if "c" in paths:
            variant = self.args.variants[-1]
            measured = {v: r["projected_grid_s"] for v, r in self.out["c"].items()}
            if self.args.full_variant == "best" and measured:
                variant = min(measured, key=measured.get)
            elif self.args.full_variant not in ("best", "last"):
                variant = self.args.full_variant
            kw = parse_variant(variant)
            cfgs = self.grid_cfgs(None)
            t0 = time.perf_counter()

            def on_step(step):
                if (limit and time.perf_counter() - t0 > limit) or self.past_deadline():
                    from scaling.train import Pruned
                    raise Pruned()

            tm: dict = {}
            fresh_compile()
            res = train_group(cfgs, self.corpus, self.device, [Hooks(on_step=on_step) for _ in cfgs], timings=tm,
                              **kw)
            self.sync()
            wall = time.perf_counter() - t0
            r = {"variant": variant, "wall_s": wall, "complete": all(x.status != "PRUNED" for x in res),
                 "statuses": [x.status for x in res], "steps_done": [x.steps_done for x in res],
                 "eval_s": tm["eval_s"], "warm_s": tm["warm"], "builds": tm["builds"],
                 "final_val_loss": [x.summary.get("final_val_loss") for x in res]}
            self.out["full"]["c"] = r
            print(f"[full c {variant}] {len(cfgs)} configs: wall {wall:.1f} s, complete={r['complete']}, "
                  f"statuses {r['statuses']}", flush=True)
            self.save()
        for path in [p for p in paths if p in ("a", "b")]:
            t0 = time.perf_counter()
            done = True
            for b, lr, clip, seed in self.points:
                if (limit and time.perf_counter() - t0 > limit) or self.past_deadline():
                    done = False
                    break
                if path == "a":
                    self.plain(b, lr, self.full_steps[b] - self.args.warmup)
                else:
                    train(self.phase.run_config(b, lr, clip, seed), self.corpus, self.device)
            self.out["full"][path] = {"wall_s": time.perf_counter() - t0, "complete": done}
            print(f"[full {path}] wall {self.out['full'][path]['wall_s']:.1f} s, complete={done}", flush=True)
            self.save()

    def profile(self) -> None:
        """Top kernels (CUDA time) of steady training steps of one variant: 3 steps to compile and warm up,
        then ``--profile`` steps recorded (no evaluation, no checkpoint in the recorded window)."""
        from torch.profiler import ProfilerActivity, profile, schedule
        variant = self.args.profile_variant or self.args.variants[-1]
        kw = parse_variant(variant)
        n = self.args.profile
        warm = WARM_TICKS  # the pass is compiled (and its CUDA graph recorded) by then
        cfgs = self.grid_cfgs(warm + n + 1, eval_interval=10 * n, checkpoint_every=10 * n)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        fresh_compile()
        with profile(activities=acts, schedule=schedule(wait=warm, warmup=0, active=n, repeat=1)) as prof:
            def on_step(step):  # one prof.step() per group step (the first member's hook)
                prof.step()

            hooks = [Hooks(on_step=on_step)] + [Hooks() for _ in cfgs[1:]]
            train_group(cfgs, self.corpus, self.device, hooks, **kw)
            self.sync()
        key = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90)
        print(table)
        self.out["profile"] = {"variant": variant, "steps": n, "table": table}
        self.save()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run for CI (seconds)")
    ap.add_argument("--phase", default="2_5")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--paths", default="a,b,c", help="which of a,b,c to measure")
    ap.add_argument("--variants", default="eager",
                    help=f"train_group variants, comma-separated: eager or a --compile-mode "
                         f"({', '.join(COMPILE_MODES)})")
    ap.add_argument("--batch-sizes", type=int, nargs="+", help="override the grid's batch sizes")
    ap.add_argument("--lrs", type=float, nargs="+", help="override the grid's learning rates")
    ap.add_argument("--seeds", type=int, nargs="+", help="override the phase's seeds")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per batch size for (a) and (b)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed warm-up steps for (a) and (b)")
    ap.add_argument("--group-steps", type=int, default=300, help="steps of the timed train_group run (c)")
    ap.add_argument("--record", action="store_true",
                    help="run each (c) variant again recording into a temp MLflow store as `scaling sweep` "
                         "does (needs mlflow): the difference is the cost of recording")
    ap.add_argument("--record-switch-s", default="",
                    help="with --record: Python thread switch intervals (s, comma-separated) to record under, one "
                         "recorded run each (default: the one `scaling sweep` sets, scaling.runner.GIL_SWITCH_S)")
    ap.add_argument("--record-parts", default="all",
                    help=f"with --record: which hooks act, comma-separated of {', '.join(RECORD_PARTS)} (one recorded "
                         "run each): all as the sweep, metrics only, checkpoints only, none (threads idle)")
    ap.add_argument("--check", action="store_true", help="compare losses: batched vs alone, bf16 vs fp32")
    ap.add_argument("--check-steps", type=int, default=300)
    ap.add_argument("--check-variant", default="eager", help="the train_group variant --check runs (batched paths)")
    ap.add_argument("--full", default="", help="paths to also run on the whole grid for real, e.g. c")
    ap.add_argument("--full-max-s", type=float, default=0.0, help="stop a --full run after this many seconds")
    ap.add_argument("--full-variant", default="last",
                    help="variant of the --full run of c: last (of --variants), best (lowest projection) or a name")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="stop --full runs this many seconds after the program started (they report complete=false)")
    ap.add_argument("--check-data-dir", help="WikiText-2 directory for --check (default: the benchmark's corpus)")
    ap.add_argument("--check-splits", default="valid:test")
    ap.add_argument("--profile", type=int, default=0, help="profile N steady steps of --profile-variant")
    ap.add_argument("--profile-variant", help="the variant to profile (default: the last of --variants)")
    ap.add_argument("--cold", action="store_true",
                    help="no on-disk compile caches: every variant compiles from scratch (honest compile times)")
    ap.add_argument("--eval-batches", type=int, help="override the phase's eval_batches (64 sequences each)")
    ap.add_argument("--data-dir", help="WikiText-2 directory (default: random tokens)")
    ap.add_argument("--splits", default="train:valid")
    ap.add_argument("--random-tokens", type=int, default=2_000_000)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device = "cpu" if args.device == "auto" else args.device
        args.batch_sizes = args.batch_sizes or [2, 4]
        args.lrs = args.lrs or [1e-3, 1e-2]
        args.steps, args.warmup, args.group_steps = 3, 1, 6
        args.check_steps = 6
        args.random_tokens = 20_000
        args.eval_batches = args.eval_batches or 1
        torch.set_num_threads(1)
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants + [args.check_variant]:
        try:
            parse_variant(v)
        except ValueError as e:
            ap.error(str(e))
    bad = [p for p in args.record_parts.split(",") if p not in RECORD_PARTS]
    if bad:
        ap.error(f"--record-parts: {', '.join(bad)} not in {', '.join(RECORD_PARTS)}")
    if args.cold:
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config
        inductor_config.fx_graph_cache = False
        if hasattr(functorch_config, "enable_autograd_cache"):
            functorch_config.enable_autograd_cache = False
    paths = [p for p in args.paths.split(",") if p]
    t0 = time.perf_counter()
    bench = Bench(args)
    print(f"device {bench.out['meta'].get('gpu', bench.device)}, torch {torch.__version__}, phase {bench.phase.name}, "
          f"{len(bench.points)} configs, N={bench.n_params}, {bench.fpt / 1e6:.2f} MFLOP/token", flush=True)
    if "a" in paths:
        bench.run_a()
    if "b" in paths:
        bench.run_b()
    if "c" in paths:
        for v in args.variants:
            try:
                bench.run_c(v)
                if args.record:
                    from scaling.runner import GIL_SWITCH_S
                    for parts in args.record_parts.split(","):
                        for sw in (args.record_switch_s.split(",") if args.record_switch_s else [GIL_SWITCH_S]):
                            bench.run_c(v, record=True, switch_s=float(sw), parts=parts)
            except Exception as e:  # one failing variant must not cost the others' numbers
                print(f"[c train_group {v}] FAILED: {type(e).__name__}: {e}", flush=True)
                bench.out["c_failed"] = {**bench.out.get("c_failed", {}), v: f"{type(e).__name__}: {e}"}
    bench.project()
    if args.check:
        bench.check()
    if args.profile:
        bench.profile()
    if args.full:
        bench.full([p for p in args.full.split(",") if p])
    bench.out["total_s"] = time.perf_counter() - t0
    bench.save()
    print(f"total {bench.out['total_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

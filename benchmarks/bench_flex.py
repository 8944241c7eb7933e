"""Benchmark: FlexAttention's causal attention, forward and backward, at the shape of one phase grid's pass.

The batched pass (``scaling.batched.train_group``, slots layout) runs causal attention on every sequence
of every config at once: for the phase 2.5 grid 2,400 sequences × 4 heads × 128 positions × head dim 32
per layer. This times that one call — q, k, v split from one (Z, T, 3C) projection as the model does, in
bf16, compiled, the gradient taken with respect to the projection (so the concatenation of dq, dk, dv is
in) — for each FlexAttention option set given (``scaling.batched.flex_spec``: ``BLOCK/FWD/BWD``, the
block mask's block size, the forward's tiles, the backward's tiles; "-" = inductor's default) and for
"fused:BLOCK.FWD_WARPS.BWD_WARPS.STAGES", this project's Triton kernels (``scaling.attention``,
``train_group(attention="fused")``) with those launch options, checks
each result against the first spec's (the default), and prints them fastest first. Every spec returns the
heads side by side, (Z, T, C), as the model's output projection reads them.

  python benchmarks/bench_flex.py --out flex.json                 # a CUDA GPU: the built-in candidates
  python benchmarks/bench_flex.py --specs "-/-/-,64/-/32.64.64.32.1.4,fused:64.4.4.1"

Imports only torch and scaling.{config,batched,attention}. The last line printed is the fastest spec that passed the
check (for a script to use).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from scaling.attention import parse_options  # noqa: E402
from scaling.batched import flex_causal, flex_spec, fused_causal  # noqa: E402
from scaling.config import error_line, load_phase  # noqa: E402

# BLOCK/FWD/BWD: inductor's defaults first (the reference), then the backward's tiles inductor's
# max-autotune would try at head dim 32 (M1 = N2 ∈ {32, 64}, N1 = M2 ∈ {32, 64, 128}) at a few stage
# counts, smaller block-mask blocks (the kernels skip the blocks above the diagonal), larger forward tiles;
# then the fused kernels at the launch options measured in the tenth round (docs/performance.md)
CANDIDATES = [
    "-/-/-",
    "-/-/32.64.64.32.3.4", "-/-/32.64.64.32.1.4", "-/-/32.64.64.32.4.4",
    "-/-/32.128.128.32.3.4", "-/-/32.128.128.32.3.8", "-/-/32.128.128.32.1.4",
    "-/-/64.128.128.64.3.4", "-/-/64.128.128.64.3.8", "-/-/64.128.128.64.1.8",
    "-/-/64.64.64.64.1.4", "-/-/64.64.64.64.4.4", "-/-/32.32.32.32.3.4",
    "-/-/16.64.64.16.3.4", "-/-/16.128.128.16.3.4",
    "-/128.64.3.4/-", "-/128.128.3.4/-", "-/128.128.2.8/-",
    "64/-/-", "64/-/32.64.64.32.3.4", "64/-/32.64.64.32.1.4", "64/-/32.32.32.32.3.4", "64/-/16.64.64.16.3.4",
    "32/32.32.3.4/32.32.32.32.3.4", "32/32.32.3.4/16.32.32.16.3.4", "32/32.32.1.4/16.32.32.16.1.4",
    "fused:64.4.4.2", "fused:64.4.4.1", "fused:64.4.4.3", "fused:64.2.4.2", "fused:64.8.4.2", "fused:64.4.8.2",
    "fused:32.4.4.2", "fused:128.8.8.1",
]


def timed(fn, iters: int) -> float:
    """Milliseconds per call of ``fn`` (CUDA events, after 3 untimed calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", default="2_5", help="the phase whose model and grid set the shape")
    ap.add_argument("--specs", help="comma-separated BLOCK/FWD/BWD specs (default: the built-in candidates); "
                                    "the first is the reference of the check")
    ap.add_argument("--iters", type=int, default=50, help="timed calls per spec")
    ap.add_argument("--rtol", type=float, default=2e-2, help="largest relative difference from the first spec")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    specs = args.specs.split(",") if args.specs else CANDIDATES
    try:
        options = [parse_options(s[6:]) if s.startswith("fused:") else flex_spec(s) for s in specs]
    except ValueError as e:
        print(f"bench_flex: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_flex: needs a CUDA device (FlexAttention has no CPU backward)", file=sys.stderr)
        return 2
    phase = load_phase(args.phase)
    mc = phase.model
    Z = sum(b for b, *_ in phase.grid_points())  # sequences in one pass of the whole grid
    T, C, H = mc.context_length, mc.d_model, mc.n_heads
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(Z, T, 3 * C, device=dev, generator=gen, dtype=torch.bfloat16).requires_grad_()
    grad_out = torch.randn(Z, T, C, device=dev, generator=gen, dtype=torch.bfloat16)
    flops = 4 * Z * H * T * T * (C // H) * 0.5 * 3.5  # causal fwd (2 matmuls) + bwd (5): half the square
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "shape": {"Z": Z, "H": H, "T": T, "head_dim": C // H}}
    print(f"{meta['gpu']}, torch {meta['torch']}: causal attention on (Z={Z}, H={H}, T={T}, D={C // H}) bf16, "
          f"forward + backward, {args.iters} calls per spec")
    rows, ref = [], None
    for spec, opts in zip(specs, options):
        torch._dynamo.reset()
        attend = fused_causal(None, opts) if spec.startswith("fused:") else flex_causal(T, dev, opts)

        def call(attend=attend):
            out = attend(qkv, T, H)
            (g,) = torch.autograd.grad(out, qkv, grad_out)
            return out, g

        fn = torch.compile(call, dynamic=False)
        row = {"spec": spec, "options": opts}
        t0 = time.perf_counter()
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out, g = fn()
                torch.cuda.synchronize()
                row["compile_s"] = round(time.perf_counter() - t0, 1)
                row["ms"] = round(timed(fn, args.iters), 4)
        except Exception as e:  # a tile set the kernel rejects (shared memory, static asserts): next one
            row["error"] = error_line(e)
            print(f"  {spec:32s} failed: {row['error']}")
            rows.append(row)
            continue
        if ref is None:
            ref = (out.detach().float(), g.detach().float())
        diff = max(((a.detach().float() - b).abs().max() / b.abs().max()).item() for a, b in zip((out, g), ref))
        row["max_rel_diff"] = diff
        row["ok"] = diff <= args.rtol
        row["tflops"] = round(flops / row["ms"] / 1e9, 1)
        rows.append(row)
        print(f"  {spec:32s} {row['ms']:7.3f} ms  {row['tflops']:6.1f} TFLOP/s  compile {row['compile_s']:5.1f} s  "
              f"diff {diff:.1e}{'' if row['ok'] else '  MISMATCH'}")
    good = sorted((r for r in rows if r.get("ok")), key=lambda r: r["ms"])
    first_ms = rows[0].get("ms")
    print("fastest first" + (f" (time / the first spec's {first_ms:.3f} ms):" if first_ms else ":"))
    for r in good:
        print(f"  {r['spec']:32s} {r['ms']:7.3f} ms" + (f"  {r['ms'] / first_ms:.3f}" if first_ms else ""))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if not good:
        print("bench_flex: no spec passed", file=sys.stderr)
        return 1
    print(good[0]["spec"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

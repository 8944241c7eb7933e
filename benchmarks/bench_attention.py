"""Benchmark: causal attention of one phase grid's training pass, forward and backward, fused kernels vs SDPA.

The batched pass (``scaling.batched.train_group``) runs causal attention on every sequence of every config
at once, as (M, S*T, 3C) projections: for the phase 2.5 grid 2,400 sequences × 4 heads × 128 positions ×
head dim 32 per layer. This times that one call in bf16, compiled as the pass compiles it, the gradient
taken with respect to the projection, for each attention given:

  sdpa[:BACKEND]   ``scaling.batched.sdpa_causal`` (torch's choice of SDPA backend, or flash, efficient,
                   cudnn, math: ``scaling.batched.sdpa_backends``);
  fused[:OPTIONS]  ``scaling.attention.causal_attention``, this project's Triton kernels, at their default
                   launch options or at BLOCK.FWD_WARPS.BWD_WARPS.STAGES (``scaling.attention.parse_options``).

The first is the reference every other is checked against; the results are printed fastest first.

  python benchmarks/bench_attention.py --out attention.json          # a CUDA GPU: sdpa, fused, sdpa:flash
  python benchmarks/bench_attention.py --specs "sdpa,fused,fused:64.4.4.1,sdpa:cudnn"
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from scaling import attention  # noqa: E402
from scaling.batched import sdpa_backends, sdpa_causal, slot_size  # noqa: E402
from scaling.config import error_line, load_phase  # noqa: E402

DEFAULT_SPECS = "sdpa,fused,sdpa:flash"


def attend_of(spec: str, device: torch.device):
    """(attention function, context it runs in) of a spec; ValueError for a malformed one."""
    kind, _, arg = spec.partition(":")
    if kind == "sdpa":
        if arg not in ("", "flash", "efficient", "cudnn", "math"):
            raise ValueError(f"spec {spec!r}: the SDPA backend is one of flash, efficient, cudnn, math")
        return sdpa_causal, (lambda: sdpa_backends((arg,) if arg else (), device))
    if kind == "fused":
        options = attention.parse_options(arg) if arg else attention.OPTIONS
        return (lambda qkv, T, H: attention.causal_attention(qkv, T, H, options)), nullcontext
    raise ValueError(f"spec {spec!r}: want sdpa[:BACKEND] or fused[:BLOCK.FWD_WARPS.BWD_WARPS.STAGES]")


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


def measure(spec: str, qkv: torch.Tensor, grad_out: torch.Tensor, T: int, H: int, iters: int) -> dict:
    """Compile time, ms per forward + backward, and the result (for the check) of one spec."""
    attend, context = attend_of(spec, qkv.device)
    torch._dynamo.reset()

    def call():
        out = attend(qkv, T, H)
        (g,) = torch.autograd.grad(out, qkv, grad_out)
        return out, g

    fn = torch.compile(call, dynamic=False)
    t0 = time.perf_counter()
    with context():
        out, g = fn()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        ms = timed(fn, iters)
    return {"spec": spec, "compile_s": round(compile_s, 1), "ms": round(ms, 4), "result": (out.float(), g.float())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", default="2_5", help="the phase whose model and grid set the shape")
    ap.add_argument("--specs", default=DEFAULT_SPECS, help="comma-separated attentions; the first is the reference")
    ap.add_argument("--iters", type=int, default=50, help="timed calls per spec")
    ap.add_argument("--rtol", type=float, default=2e-2, help="largest relative difference from the first spec")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    specs = [s for s in args.specs.split(",") if s]
    try:
        for spec in specs:
            attend_of(spec, torch.device("cuda"))
    except ValueError as e:
        print(f"bench_attention: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() or not attention.available():
        print("bench_attention: needs a CUDA device and Triton", file=sys.stderr)
        return 2
    attention.operator()  # the kernels are defined before the first trace
    phase = load_phase(args.phase)
    mc, cfgs = phase.model, [phase.run_config(b, lr, clip, seed) for b, lr, clip, seed in phase.grid_points()]
    S, Z = slot_size(cfgs), sum(c.batch_size for c in cfgs)  # the pass's slot size and sequences
    T, C, H = mc.context_length, mc.d_model, mc.n_heads
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(Z // S, S * T, 3 * C, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    grad_out = torch.randn(Z // S, S * T, C, device="cuda", generator=gen, dtype=torch.bfloat16)
    flops = 4 * Z * H * T * T * (C // H) * 0.5 * 3.5  # causal fwd (2 matmuls) + bwd (5): half the square
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "shape": {"slots": Z // S, "S": S, "H": H, "T": T, "head_dim": C // H}}
    print(f"{meta['gpu']}, torch {meta['torch']}: causal attention of {Z} sequences (H={H}, T={T}, D={C // H}) "
          f"bf16, forward + backward, {args.iters} calls per spec")
    rows, ref = [], None
    for spec in specs:
        try:
            row = measure(spec, qkv, grad_out, T, H, args.iters)
        except Exception as e:  # a backend this GPU or shape lacks, launch options the kernels reject: next one
            rows.append({"spec": spec, "error": error_line(e)})
            print(f"  {spec:24s} failed: {rows[-1]['error']}")
            continue
        out, g = row.pop("result")
        ref = ref or (out, g)
        row["max_rel_diff"] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip((out, g), ref))
        row["ok"] = row["max_rel_diff"] <= args.rtol
        row["tflops"] = round(flops / row["ms"] / 1e9, 1)
        rows.append(row)
        print(f"  {spec:24s} {row['ms']:7.3f} ms  {row['tflops']:6.1f} TFLOP/s  compile {row['compile_s']:5.1f} s  "
              f"diff {row['max_rel_diff']:.1e}{'' if row['ok'] else '  MISMATCH'}")
    good = sorted((r for r in rows if r.get("ok")), key=lambda r: r["ms"])
    print("fastest first:")
    for r in good:
        print(f"  {r['spec']:24s} {r['ms']:7.3f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())

"""The fused causal-attention kernels (``scaling.attention``) against PyTorch's SDPA.

On a CUDA GPU: forward and gradients in bf16 at several shapes and launch options, the operator compiled
once for any number of slots (the batched pass's dynamic dimension), and a batched training run (compiled,
replayed as a CUDA graph, rebuilt as models finish) against the eager pass's SDPA. Where Triton is
installed but there is no GPU, its interpreter runs the same kernels on the CPU (fp32 and fp16: the
interpreter's bf16 matmuls are wrong). CI has neither (the CPU wheel of torch brings no Triton): there only
the option parsing and the fallback run; the rest runs on the device machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling import attention as A
from scaling.batched import fused_causal, sdpa_causal, train_group
from scaling.config import _validated
from scaling.data import load_corpus
from scaling.train import Hooks

ROOT = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and A.available()),
                                reason="needs a CUDA device with Triton (run on the device machine)")


def test_parse_options():
    assert A.parse_options("64.4.8.1") == (64, 4, 8, 1)
    for bad in ("64.4.4", "48.4.4.1", "64.0.4.1", "a.b.c.d", ""):
        with pytest.raises(ValueError, match="BLOCK.FWD_WARPS"):
            A.parse_options(bad)


@settings(deadline=None)
@given(st.integers(1, 512), st.integers(1, 256), st.integers(1, 8),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_supports_only_what_the_kernels_handle(T, C, H, dtype):
    ok = A.supports(T, C, H, dtype)
    assert ok == (C % H == 0 and C // H in A.HEAD_DIMS and T % A.BLOCK == 0 and dtype != torch.float32)


def test_fused_falls_back_where_unsupported():
    """On CPU tensors (and for shapes or dtypes the kernels do not handle) the fused attention is the
    fallback's, exactly."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 3 * 16, 3 * 32)
    assert torch.equal(fused_causal(qkv, 16, 2), sdpa_causal(qkv, 16, 2))


INTERPRETED = """
import sys, torch
sys.path.insert(0, {root!r})
from scaling import attention as A
torch.manual_seed(0)
worst = 0.0
for dtype, T, H, D, opts in [(torch.float32, 64, 2, 16, (32, 4, 4, 1)), (torch.float16, 64, 2, 16, (16, 4, 4, 1)),
                             (torch.float32, 32, 1, 32, (32, 4, 4, 1))]:
    qkv = torch.randn(2, 2 * T, 3 * H * D).to(dtype)
    x = qkv.clone().requires_grad_()
    out = A.causal_attention(x, T, H, opts)
    rx = qkv.float().requires_grad_()
    ref = A.reference(rx, T, H)
    g = torch.randn_like(ref)
    out.backward(g.to(dtype))
    ref.backward(g)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for a, b in ((out, ref), (x.grad, rx.grad)):
        err = ((a.float() - b).abs().max() / b.abs().max()).item()
        assert err < tol, (dtype, T, H, D, opts, err)
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available() or not A.available(),
                    reason="needs Triton without a GPU (its interpreter)")
def test_kernels_interpreted_on_cpu():
    """The kernels' arithmetic, run by Triton's interpreter on CPU tensors (a fresh process: the interpreter
    is chosen when the kernels are defined), against SDPA in fp32."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", INTERPRETED.format(root=str(ROOT))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@needs_cuda
@pytest.mark.parametrize("T,H,D,options", [(128, 4, 32, A.OPTIONS), (128, 4, 32, (32, 4, 4, 1)),
                                           (128, 4, 32, (128, 8, 8, 1)), (256, 2, 64, (64, 4, 8, 2)),
                                           (64, 8, 16, (64, 4, 4, 1))])
def test_fused_equals_sdpa_on_cuda(T, H, D, options):
    """bf16 inputs, fp32 sums: within bf16's rounding of an fp32 reference (FlexAttention's and SDPA's own
    bf16 kernels differ from it by as much)."""
    torch.manual_seed(0)
    qkv = torch.randn(3, 5 * T, 3 * H * D, device="cuda").to(torch.bfloat16)
    x = qkv.clone().requires_grad_()
    out = A.causal_attention(x, T, H, options)
    rx = qkv.float().requires_grad_()
    ref = A.reference(rx, T, H)
    g = torch.randn_like(ref)
    out.backward(g.to(torch.bfloat16))
    ref.backward(g)
    for a, b in ((out, ref), (x.grad, rx.grad)):
        err = ((a.float() - b).abs().max() / b.abs().max()).item()
        assert err < 2e-2, err
    # the flash kernels of SDPA in bf16, for scale: the same order of error
    sx = qkv.clone().requires_grad_()
    A.reference(sx, T, H).backward(g.to(torch.bfloat16))
    sdpa_err = ((sx.grad.float() - rx.grad).abs().max() / rx.grad.abs().max()).item()
    fused_err = ((x.grad.float() - rx.grad).abs().max() / rx.grad.abs().max()).item()
    assert fused_err < 4 * sdpa_err + 1e-3, (fused_err, sdpa_err)


@needs_cuda
def test_fused_past_65535_sequence_heads_on_cuda():
    """16,640 sequences × 4 heads = 66,560 programs per block row, past the 65,535 a grid's y or z dimension
    takes: forward and backward run (sequence-heads on the grid's x), and the first and last sequences
    (heads past program 65,535) agree with SDPA in fp32 on their slice within bf16's rounding. ~1.6 GB qkv."""
    T, H, D, N = 128, 4, 32, 16_640
    assert N * H > 65_535
    torch.manual_seed(0)
    x = torch.randn(1, N * T, 3 * H * D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    out = A.causal_attention(x, T, H)
    g = torch.randn_like(out)
    out.backward(g)
    torch.cuda.synchronize()
    for first in (0, N - 8):  # 8 sequences each; the last ones' heads are programs 66,528..66,559
        rows = slice(first * T, (first + 8) * T)
        rx = x.detach()[:, rows].float().requires_grad_()
        ref = A.reference(rx, T, H)
        ref.backward(g[:, rows].float())
        for a, b in ((out[:, rows], ref), (x.grad[:, rows], rx.grad)):
            err = ((a.float() - b).abs().max() / b.abs().max()).item()
            assert err < 2e-2, (first, err)


@needs_cuda
def test_fused_compiles_once_for_any_slot_count():
    """Compiled with the slot dimension dynamic, as the batched pass compiles it, the operator serves 3, 5
    and 8 slots with one compile (the slot count only sets the kernels' grid), each within bf16's rounding
    of SDPA in fp32."""
    from test_batched import dynamo_compiles

    T, H, D, S = 128, 4, 32, 2
    fn = torch.compile(lambda qkv: A.causal_attention(qkv, T, H), dynamic=None)
    A.operator()
    torch.manual_seed(0)
    with dynamo_compiles() as ids:
        for M in (3, 5, 8):
            qkv = torch.randn(M, S * T, 3 * H * D, device="cuda").to(torch.bfloat16).requires_grad_()
            torch._dynamo.maybe_mark_dynamic(qkv, 0)
            out = fn(qkv)
            out.backward(torch.ones_like(out))
            rx = qkv.detach().float().requires_grad_()
            ref = A.reference(rx, T, H)
            ref.backward(torch.ones_like(ref))
            for a, b in ((out, ref), (qkv.grad, rx.grad)):
                assert ((a.float() - b).abs().max() / b.abs().max()).item() < 2e-2, M
    assert len(ids) == 1, ids


PHASE = """
name: tiny_fused
data: {dataset: random, random_train_tokens: 40000, random_val_tokens: 8000}
model: {d_model: 32, n_layers: 2, n_heads: 2, context_length: 64, vocab_size: 32}
optim: {betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1, warmup: 1536, schedule: cosine, min_lr_ratio: 0.1}
train: {budget_kind: tokens, budget: 15360, eval_interval: 10, eval_batches: 2, log_interval: 5, checkpoint_every: 10}
grid: {batch_sizes: [4, 8], lrs: [1.0e-3], clips: [1.0]}
"""


@needs_cuda
def test_train_group_fused_equals_eager():
    """A batched run with the fused kernels (compiled, CUDA graph, bf16) logs what the eager pass (SDPA,
    bf16) logs: the same hook calls, and losses within bf16's spread. Equal tokens: B=8 runs 30 steps, B=16
    15, so the pass (slots of 4 sequences) is rebuilt at step 15, and it compiles once (training pass,
    optimizer step, evaluation)."""
    from test_batched import dynamo_compiles

    phase = _validated(yaml.safe_load(PHASE))
    cuda = torch.device("cuda")
    corpus = load_corpus(phase, 0)
    corpus.to(cuda)
    cfgs = [phase.run_config(8, 3e-3, 1.0, 0), phase.run_config(16, 1e-3, None, 0)]
    assert [c.steps for c in cfgs] == [30, 15]

    def run(compile_):
        logs = [[] for _ in cfgs]
        evals = [[] for _ in cfgs]
        hooks = [Hooks(on_log=lambda s, m, i=i: logs[i].append((s, m)),
                       on_eval=lambda s, v, i=i: evals[i].append((s, v))) for i in range(len(cfgs))]
        tm: dict = {}
        res = train_group(cfgs, corpus, cuda, hooks, compile=compile_, timings=tm)
        return res, logs, evals, tm

    torch._dynamo.reset()
    with dynamo_compiles() as ids:
        res_f, logs_f, evals_f, tm = run(True)
    assert len(ids) == 3 and tm["builds"] == 2, (ids, tm["builds"])
    res_e, logs_e, evals_e, _ = run(False)
    for rf, re_, lf, le, ef, ee, c in zip(res_f, res_e, logs_f, logs_e, evals_f, evals_e, cfgs):
        assert (rf.status, rf.steps_done) == (re_.status, re_.steps_done) == ("FINISHED", c.steps)
        assert [s for s, _ in lf] == [s for s, _ in le] and [s for s, _ in ef] == [s for s, _ in ee]
        assert abs(lf[0][1]["train_loss"] - le[0][1]["train_loss"]) < 1e-2 * le[0][1]["train_loss"]
        assert all(abs(a - b) < 3e-2 * b for (_, a), (_, b) in zip(ef, ee)), (ef, ee)

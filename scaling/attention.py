"""Causal self-attention for short sequences as Triton kernels that read and write the batched pass's own
layouts (CUDA; Triton is imported only when the kernels are first defined, see :func:`available`).

The batched pass projects a block's input to q, k and v with one matmul: ``qkv`` is (M, S*T, 3C) — M slots
of S sequences of T tokens, q in columns [0, C), k in [C, 2C), v in [2C, 3C), head h in columns
[h*D, (h+1)*D) of each. ``causal_attention(qkv, T, H)`` returns the heads' outputs already side by side,
(M, S*T, C), as the output projection reads them; its gradient is one (M, S*T, 3C) tensor, as the qkv
projection's backward reads it. So no head transposes in the forward, and no concatenation of dq, dk and dv
in the backward.

The kernels are FlashAttention-2's (an online softmax in the forward; the backward recomputes the
probabilities from the saved log-sum-exp, and its dk/dv and dq loops run in one program per key/query
block), in blocks of ``BLOCK`` rows; inputs bf16 or fp16, every sum in fp32, as the SDPA kernels compute
them. ``torch.library.triton_op`` makes each a PyTorch operator that ``torch.compile`` traces into and a
CUDA graph records. The number of sequences only sets the kernels' grid (shapes, strides and scales are
compile-time constants of T, C and H), so one compiled pass serves any number of slots; sequences × heads
run along the grid's x, whose limit (2^31 − 1) a pass cannot reach, where y and z stop at 65,535.
"""

from __future__ import annotations

import math

import torch

BLOCK = 64  # rows (queries or keys) per block; T must be a multiple of it
# the kernels' launch options: (block, forward's warps, backward's warps, pipeline stages), among the fastest
# on an H100 at T=128, head dim 32 (benchmarks/bench_attention.py times others)
OPTIONS = (BLOCK, 4, 4, 2)
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.bfloat16, torch.float16)
LOG2E = 1.4426950408889634


def available() -> bool:
    """Whether Triton can be imported here (the kernels' only requirement besides a CUDA tensor)."""
    import importlib

    try:
        importlib.import_module("triton")
    except Exception:
        return False
    return True


def supports(T: int, C: int, H: int, dtype: torch.dtype, block: int = BLOCK) -> bool:
    """Whether ``causal_attention`` handles this shape and dtype (else the caller uses another attention)."""
    return C % H == 0 and C // H in HEAD_DIMS and T % block == 0 and T >= block and dtype in DTYPES


def parse_options(text: str) -> tuple[int, int, int, int]:
    """``BLOCK.FWD_WARPS.BWD_WARPS.STAGES`` (e.g. "64.4.4.1") → launch options for :func:`causal_attention`."""
    try:
        out = tuple(int(x) for x in text.split("."))
    except ValueError:
        out = ()
    if len(out) != 4 or out[0] not in (16, 32, 64, 128) or min(out) <= 0:
        raise ValueError(f"fused attention options {text!r}: want BLOCK.FWD_WARPS.BWD_WARPS.STAGES, "
                         "BLOCK one of 16, 32, 64, 128")
    return out


def _scales(D: int) -> tuple[float, float]:
    """The softmax scale 1/sqrt(D), and the same in base 2 (the kernels exponentiate with exp2)."""
    sm = 1.0 / math.sqrt(D)
    return sm, sm * LOG2E


def _forward_kernel():
    """The forward's Triton kernel: one program per (query block, sequence and head), an online softmax over
    the key blocks up to the diagonal; it writes the output and the log-sum-exp (base 2) of each row."""
    import triton
    import triton.language as tl

    @triton.jit
    def _fwd(QKV, O, LSE, QK_SCALE: tl.constexpr, T: tl.constexpr, C: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
             BLOCK_: tl.constexpr):
        nh = tl.program_id(0)  # sequence * H + head: the grid's x, the one dimension past 65,535 programs
        i = tl.program_id(1)  # query block
        n = nh // H
        h = nh % H
        rows = tl.arange(0, BLOCK_)
        cols = tl.arange(0, D)
        base = QKV + n.to(tl.int64) * (T * 3 * C) + h * D
        offs_m = i * BLOCK_ + rows
        q = tl.load(base + offs_m[:, None] * (3 * C) + cols[None, :])
        m_i = tl.full([BLOCK_], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_], tl.float32)
        acc = tl.zeros([BLOCK_, D], tl.float32)
        for j in range(0, i + 1):
            offs_n = j * BLOCK_ + rows
            k = tl.load(base + C + offs_n[:, None] * (3 * C) + cols[None, :])
            v = tl.load(base + 2 * C + offs_n[:, None] * (3 * C) + cols[None, :])
            s = tl.where(offs_m[:, None] >= offs_n[None, :], tl.dot(q, tl.trans(k)) * QK_SCALE, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        o_base = O + n.to(tl.int64) * (T * C) + h * D
        tl.store(o_base + offs_m[:, None] * C + cols[None, :], acc.to(O.dtype.element_ty))
        tl.store(LSE + nh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i))
    return _fwd


def _backward_kernel():
    """The backward's Triton kernel: one program per (block, sequence and head) computes dk, dv of that key
    block and dq of that query block, recomputing the probabilities from the saved log-sum-exp."""
    import triton
    import triton.language as tl

    @triton.jit
    def _bwd(QKV, O, DO, LSE, DQKV, SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr, T: tl.constexpr,
             C: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BLOCK_: tl.constexpr):
        nh = tl.program_id(0)  # sequence * H + head (the grid's x: see _fwd)
        b = tl.program_id(1)  # this program's key block (dk, dv) and query block (dq)
        n = nh // H
        h = nh % H
        NB: tl.constexpr = T // BLOCK_
        rows = tl.arange(0, BLOCK_)
        cols = tl.arange(0, D)
        base = QKV + n.to(tl.int64) * (T * 3 * C) + h * D
        dbase = DQKV + n.to(tl.int64) * (T * 3 * C) + h * D
        o_base = O + n.to(tl.int64) * (T * C) + h * D
        do_base = DO + n.to(tl.int64) * (T * C) + h * D
        lse_base = LSE + nh.to(tl.int64) * T

        # dk, dv of key block b: every query block at or after it
        offs_n = b * BLOCK_ + rows
        k = tl.load(base + C + offs_n[:, None] * (3 * C) + cols[None, :])
        v = tl.load(base + 2 * C + offs_n[:, None] * (3 * C) + cols[None, :])
        dk = tl.zeros([BLOCK_, D], tl.float32)
        dv = tl.zeros([BLOCK_, D], tl.float32)
        for i in range(b, NB):
            offs_m = i * BLOCK_ + rows
            q = tl.load(base + offs_m[:, None] * (3 * C) + cols[None, :])
            do = tl.load(do_base + offs_m[:, None] * C + cols[None, :])
            o = tl.load(o_base + offs_m[:, None] * C + cols[None, :])
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            lse = tl.load(lse_base + offs_m)
            p = tl.math.exp2(tl.dot(q, tl.trans(k)) * QK_SCALE - lse[:, None])
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)  # the causal mask (all true off the diagonal)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            dk += tl.dot(tl.trans(ds), q)
        tl.store(dbase + C + offs_n[:, None] * (3 * C) + cols[None, :], (dk * SM_SCALE).to(DQKV.dtype.element_ty))
        tl.store(dbase + 2 * C + offs_n[:, None] * (3 * C) + cols[None, :], dv.to(DQKV.dtype.element_ty))

        # dq of query block b: every key block up to it
        offs_m = b * BLOCK_ + rows
        q = tl.load(base + offs_m[:, None] * (3 * C) + cols[None, :])
        do = tl.load(do_base + offs_m[:, None] * C + cols[None, :])
        o = tl.load(o_base + offs_m[:, None] * C + cols[None, :])
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse = tl.load(lse_base + offs_m)
        dq = tl.zeros([BLOCK_, D], tl.float32)
        for j in range(0, b + 1):
            offs_n = j * BLOCK_ + rows
            k = tl.load(base + C + offs_n[:, None] * (3 * C) + cols[None, :])
            v = tl.load(base + 2 * C + offs_n[:, None] * (3 * C) + cols[None, :])
            p = tl.math.exp2(tl.dot(q, tl.trans(k)) * QK_SCALE - lse[:, None])
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = (p * (dp - delta[:, None])).to(k.dtype)
            dq += tl.dot(ds, k)
        tl.store(dbase + offs_m[:, None] * (3 * C) + cols[None, :], (dq * SM_SCALE).to(DQKV.dtype.element_ty))
    return _bwd


_OPERATOR = None


def operator():
    """The forward operator, ``scaling::causal_attention_fwd(qkv, T, H, options) -> (out, lse)``, with its
    backward: the Triton kernels and both operators are defined on first use (Triton is imported then)."""
    global _OPERATOR
    if _OPERATOR is not None:
        return _OPERATOR
    from torch.library import triton_op, wrap_triton

    _fwd, _bwd = _forward_kernel(), _backward_kernel()

    @triton_op("scaling::causal_attention_fwd", mutates_args=())
    def fwd(qkv: torch.Tensor, T: int, H: int, options: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        M, ST, C3 = qkv.shape
        C = C3 // 3
        N = M * (ST // T)
        block, warps, _, stages = options
        o = qkv.new_empty(M, ST, C)
        lse = torch.empty(N * H, T, device=qkv.device, dtype=torch.float32)
        wrap_triton(_fwd)[(N * H, T // block)](qkv, o, lse, QK_SCALE=_scales(C // H)[1], T=T, C=C, H=H, D=C // H,
                                               BLOCK_=block, num_warps=warps, num_stages=stages)
        return o, lse

    @triton_op("scaling::causal_attention_bwd", mutates_args=())
    def bwd(qkv: torch.Tensor, o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, T: int, H: int,
            options: list[int]) -> torch.Tensor:
        M, ST, C3 = qkv.shape
        C = C3 // 3
        N = M * (ST // T)
        block, _, warps, stages = options
        dqkv = torch.empty_like(qkv)
        sm, qk = _scales(C // H)
        wrap_triton(_bwd)[(N * H, T // block)](qkv, o, do, lse, dqkv, SM_SCALE=sm, QK_SCALE=qk, T=T, C=C, H=H, D=C // H,
                                               BLOCK_=block, num_warps=warps, num_stages=stages)
        return dqkv

    def setup_context(ctx, inputs, output):
        qkv, T, H, options = inputs
        o, lse = output
        ctx.save_for_backward(qkv, o, lse)
        ctx.T, ctx.H, ctx.options = T, H, options
        ctx.mark_non_differentiable(lse)

    def backward(ctx, do, _dlse):
        qkv, o, lse = ctx.saved_tensors
        return bwd(qkv, o, do.contiguous(), lse, ctx.T, ctx.H, ctx.options), None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    _OPERATOR = fwd
    return fwd


def causal_attention(qkv: torch.Tensor, T: int, H: int, options: tuple[int, int, int, int] = OPTIONS) -> torch.Tensor:
    """Causal multi-head attention of every length-T sequence in ``qkv`` (M, S*T, 3C) → (M, S*T, C), the
    heads side by side; differentiable. Needs ``supports(T, C, H, qkv.dtype, options[0])`` and a CUDA tensor
    (or Triton's interpreter, ``TRITON_INTERPRET=1``, on CPU tensors: fp16 and fp32 only).
    ``options``: (block, forward's warps, backward's warps, pipeline stages). Under ``torch.compile`` call
    :func:`operator` once before tracing (defining the kernels is not traceable: a graph break)."""
    return operator()(qkv.contiguous(), T, H, list(options))[0]


def reference(qkv: torch.Tensor, T: int, H: int) -> torch.Tensor:
    """The same attention through PyTorch's SDPA (the tests' reference; any device and dtype)."""
    M, ST, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (z.reshape(-1, T, H, C // H).transpose(1, 2) for z in qkv.split(C, dim=2))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(M, ST, C)

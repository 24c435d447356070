"""RMSNorm in Triton: fused forward and backward.

The math (Zhang & Sennrich 2019; Llama's pre-norm), for one row x of length N with weight w:

    rstd = 1 / sqrt(mean(x^2) + eps)
    y    = x * rstd * w

    backward, from dy (xhat = x * rstd):
    dx = rstd * (w*dy - xhat * mean(xhat * w*dy))
    dw = sum over rows of dy * xhat

Design choices:
- A whole row sits in one program's registers (BLOCK_N = next power of two >= N, masked), so x is read once
  and y written once, with fp32 math whatever the input dtype. rstd (4 bytes a row) is saved for the backward.
- Each program walks a contiguous band of rows (a few programs per SM), loading w once, and its row loop is
  software-pipelined (tl.range's num_stages): the next rows (two, fewer for very wide ones) are already being
  copied into shared memory while this one is summed. RMSNorm only moves bytes, and each row is a chain
  (load, sum across the program, scale, store) with nothing to overlap its load latency but other rows; one
  row per program kept an H100 SM at ~32 KB in flight (compiled for sm_90: loads then a wait each row, 2-4
  programs per SM), the pipelined loop keeps up to three times that.
- The backward writes dx row by row and accumulates its band's dw in fp32 registers, then stores one partial
  dw row. PyTorch sums the few partial rows (the second step): no atomics, deterministic.
- Output dtype = x's dtype; dweight has weight's dtype. Any hidden size up to 65536 (masked tails).

Dispatch rule of `rms_norm`, as in kernels/attention.py: CUDA tensors -> the Triton kernel, other tensors ->
PyTorch's own F.rms_norm (TRITON_INTERPRET=1 alone does not send CPU tensors through the slow interpreter; call
`rms_norm_triton` for that, as tests/test_kernels.py does). A CUDA fallback warns once. On a CPU F.rms_norm is
the reference's math, to the bit with torch 2.13 (values and gradients, fp32 / bf16 / fp16, under autocast too;
tested to assert_close's tolerances), in one call where the reference makes seven: decoding one token of the
2.2M cpu preset ran ~8% faster with it (0.75 against 0.82 ms, 2026-11-28), where every op's Python overhead
counts; a training step took the same time.

    python -m pytest -q tests/test_kernels.py    # CPU: the kernels under TRITON_INTERPRET=1
    python tests/bench_kernels.py                # GPU: GB/s vs eager PyTorch and torch.compile
"""
import os
import warnings

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # no triton wheel for this platform (macOS, Windows): keep the file importable
    from types import SimpleNamespace
    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=None)
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_N = 65536  # a row must fit in one program's registers; Llama 3 405B's hidden size is 16384


@triton.jit
def _rms_norm_fwd(X, W, Y,   # x, y (M, N) contiguous; w (N,)
                  RSTD,      # output (M,) fp32: 1 / rms of each row, for the backward
                  M, N, eps, ROWS_PER_PROGRAM, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)   # once for the program's band of rows
    row_lo = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM   # int64 row offsets: M * N can pass 2**31
    for row in tl.range(row_lo, tl.minimum(row_lo + ROWS_PER_PROGRAM, M), num_stages=STAGES):   # prefetching
        x = tl.load(X + row * N + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
        tl.store(Y + row * N + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=ok)
        tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(X, W, DY, RSTD,   # as in the forward; dy (M, N) contiguous
                  DX,               # output (M, N)
                  DW_PARTIAL,       # output (programs, N) fp32: each program's sum of dy * xhat over its rows
                  M, N, ROWS_PER_PROGRAM, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    row_lo = pid.to(tl.int64) * ROWS_PER_PROGRAM
    for row in tl.range(row_lo, tl.minimum(row_lo + ROWS_PER_PROGRAM, M), num_stages=STAGES):
        offs = row * N + cols
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        wdy = w * dy
        dx = rstd * (wdy - xhat * (tl.sum(xhat * wdy, 0) / N))
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=ok)


def _launch_shape(N):
    """BLOCK_N and warps for a row of N: ~8 elements per thread (the Triton layer-norm tutorial's rule) up to
    32 warps, the most one program may have, so wide rows get more threads rather than more registers each.
    Compiled for sm_90 and read with `ptxas -v` (no GPU here): no register spills up to hidden 8192, ~100 bytes
    in the backward at 16384 (it spilled 1.5 KB when capped at 16 warps)."""
    BLOCK_N = triton.next_power_of_2(N)
    return BLOCK_N, 1 if INTERPRET else min(max(BLOCK_N // 256, 1), 32)


def _stages(row_bytes):
    """num_stages of a row loop whose rows (all the arrays it loads) take row_bytes: 1 + the rows prefetched,
    2 while they fit in 96 KB of shared memory (an H100 SM has 227 KB; 2-4 programs share one), fewer for wide
    fp32 rows (at hidden 16384 the backward's x and dy take 128 KB a row: no prefetch, as before)."""
    return 1 + min(2, 96 * 1024 // row_bytes)


def _bands(M, device):
    """Split M rows into contiguous bands, one per program: enough programs to fill the GPU a few times over.
    -> (programs, rows per program); no programs for no rows."""
    n_sm = 4 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count
    rows_per_program = max(1, triton.cdiv(M, min(M, 4 * n_sm) or 1))
    return triton.cdiv(M, rows_per_program), rows_per_program


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape, N = x.shape, x.shape[-1]
        x2 = x.reshape(-1, N).contiguous()          # (M, N)
        M = x2.shape[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(M, device=x.device, dtype=torch.float32)
        BLOCK_N, num_warps = _launch_shape(N)
        programs, rows_per_program = _bands(M, x.device)
        if programs:
            _rms_norm_fwd[(programs,)](x2, weight, y, rstd, M, N, eps, rows_per_program, BLOCK_N=BLOCK_N,
                                       STAGES=_stages(BLOCK_N * x2.element_size()), num_warps=num_warps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative is an error, not a silent zero
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = dy.reshape(-1, N).contiguous()        # (M, N)
        dx = torch.empty_like(x2)
        programs, rows_per_program = _bands(M, x2.device)   # each band of rows sums one partial dw row
        dw_partial = torch.empty((programs, N), device=x2.device, dtype=torch.float32)
        BLOCK_N, num_warps = _launch_shape(N)
        stages = _stages(BLOCK_N * (x2.element_size() + dy2.element_size()))   # x and dy prefetched
        if programs:
            _rms_norm_bwd[(programs,)](x2, weight, dy2, rstd, dx, dw_partial, M, N, rows_per_program,
                                       BLOCK_N=BLOCK_N, STAGES=stages, num_warps=num_warps)
        dw = dw_partial.sum(0).to(weight.dtype)     # the second step: (programs, N) -> (N,) (zeros for no rows)
        return dx.view(dy.shape), dw, None


@torch.compiler.disable  # a graph break under torch.compile, as flash_attention (see there)
def rms_norm_triton(x, weight, eps):
    """The Triton kernel, always (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
    x (..., N), weight (N,) -> (..., N) in x's dtype, differentiable in x and weight."""
    if not HAS_TRITON:
        raise RuntimeError("rms_norm_triton needs triton (pip install triton, Linux); rms_norm() falls back")
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({N},) for x {tuple(x.shape)}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device}, x on {x.device}: both must be on one device")
    if N > MAX_N:
        raise ValueError(f"rms_norm_triton: hidden size {N} of x is over the kernel's limit of {MAX_N}")
    return _RMSNorm.apply(x, weight.contiguous(), eps)


def rms_norm_reference(x, weight, eps):
    """The spec, in plain PyTorch: fp32 math, result in x's dtype. x (..., N), weight (N,)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


_warned = False


def rms_norm(x, weight, eps):
    """RMSNorm: the Triton kernel on CUDA tensors, PyTorch's F.rms_norm elsewhere (see the module docstring)."""
    global _warned
    if x.is_cuda:
        if HAS_TRITON and x.shape[-1] <= MAX_N:
            return rms_norm_triton(x, weight, eps)
        if not _warned:
            _warned = True
            warnings.warn(f"rms_norm: Triton kernel unavailable (triton installed: {HAS_TRITON}, hidden size "
                          f"{x.shape[-1]}); using PyTorch's F.rms_norm on CUDA", stacklevel=2)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)

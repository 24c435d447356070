"""Tests for kernels/: each Triton kernel against its plain-PyTorch reference, values and gradients, and the
attention reference itself against F.scaled_dot_product_attention with an explicit boolean mask.

On CPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py) on small shapes, in fp32 and fp16;
on a CUDA machine the same tests run the compiled kernels on larger shapes, and in bf16 too.

    python -m pytest -q tests/test_kernels.py
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import attention as A
from kernels import rmsnorm as R

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TILE = 128 if CUDA else 16      # every block size the kernels may use divides it (GPU 16..128, interpreter 16)
S = 8 if CUDA else 1            # sequence lengths are scaled up on the GPU
D = 64 if CUDA else 16          # head_dim
# Tolerances on ||out - ref|| / ||ref||. fp32: exact fp32 in the interpreter; on the GPU tl.dot takes fp32 in
# tf32 (10-bit mantissa, ~5e-4 per product). fp16 (10 bits) and bf16 (7 bits) round q, k, v, p and ds before
# each product; the accumulation is fp32, so the error stays near one rounding: 2^-11 ~ 5e-4, 2^-8 ~ 4e-3.
TOL = {torch.float32: 5e-3 if CUDA else 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# The triton 3.9 interpreter's tl.dot returns garbage for bf16 (seen here: errors ~1e10), so bf16 is GPU-only.
HALF = torch.bfloat16 if CUDA else torch.float16


# On a GPU each new (T, head_dim, ...) would autotune: compile and time every block shape, minutes for this
# file. So each test runs one shape per kernel, and test_flash_every_config runs all of them once.
AUTOTUNED = [A._attn_fwd, A._attn_bwd_dkdv, A._attn_bwd_dq]
ALL_CONFIGS = {kernel: list(kernel.configs) for kernel in AUTOTUNED}
N_CONFIGS = max(len(c) for c in ALL_CONFIGS.values())   # 1 in the interpreter


@pytest.fixture(autouse=True)
def one_config_each(monkeypatch):
    for kernel in AUTOTUNED:
        monkeypatch.setattr(kernel, "configs", ALL_CONFIGS[kernel][:1])


def assert_close(out, ref, tol, what):
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    # a reference of ~zeros (dq when each row sees a single key: exact zeros in the math) comes out of cancelling
    # O(1) terms, so the kernel gives their round-off there (tf32 on a GPU: ~5e-4), not 0: measured against
    # those terms (rms 1) instead
    scale = ref.float().norm().item()
    scale = scale if scale > 0.05 * ref.numel() ** 0.5 else ref.numel() ** 0.5
    err = (out.float() - ref.float()).norm().item() / scale
    assert err < tol, f"{what}: relative error {err:.2e} over {tol:.0e}"


def docs_from_lengths(*rows):
    """Document ids (B, T) from per-row document lengths: docs_from_lengths([2, 3]) -> [[0, 0, 1, 1, 1]]."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]).to(DEV)


def check_attention(B, Hq, Hkv, T, Tk, doc_ids=None, dtype=torch.float32, d=D, strided=False):
    """Forward and all three gradients of flash_attention against attention_reference (fp32 math).
    strided: q, k, v as the model makes them, (B, T, H, D) transposed, and k, v slices of a KV cache twice as
    long (its tail NaN), so every stride differs from a contiguous tensor's."""
    def make(H, n, room=0):
        if not strided:
            return torch.randn(B, H, n, d, device=DEV, dtype=dtype, requires_grad=True)
        x = torch.randn(B, n + room, H, d, device=DEV, dtype=dtype)
        x[:, n:] = float("nan")     # the cache's unwritten tail (torch.empty: anything): no key past Tk may be read
        return x.transpose(1, 2)[:, :, :n].requires_grad_()
    q, k, v = make(Hq, T), make(Hkv, Tk, Tk), make(Hkv, Tk, Tk)
    assert strided == (not q.is_contiguous()) == (not k.is_contiguous())
    o = A.flash_attention(q, k, v, doc_ids)
    assert o.shape == q.shape and o.dtype == dtype
    # (strided: the gradient as the model sends it back through y.transpose(1, 2).reshape, not contiguous)
    do = torch.randn(B, T, Hq, d, device=DEV, dtype=dtype).transpose(1, 2) if strided else torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ref = A.attention_reference(q.float(), k.float(), v.float(), doc_ids)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.float())
    assert_close(o, ref, TOL[dtype], "o")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g, r, TOL[dtype], f"d{name}")


# ----------------------------------------------------------------------------- the reference is the spec
def explicit_mask(T, Tk, doc_ids):
    """(B, 1, T, Tk) boolean mask written out one entry at a time, independently of attention_reference."""
    B = 1 if doc_ids is None else doc_ids.shape[0]
    mask = torch.zeros(B, 1, T, Tk, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(Tk):
                same_doc = doc_ids is None or doc_ids[b, i] == doc_ids[b, j]
                mask[b, 0, i, j] = j <= i + (Tk - T) and same_doc
    return mask


@pytest.mark.parametrize("Hq,Hkv,T,Tk,docs", [(4, 4, 12, 12, False), (8, 2, 12, 12, True), (4, 1, 5, 13, False)])
def test_reference_matches_sdpa(Hq, Hkv, T, Tk, docs):
    B, d = 2, 8
    q, k, v = torch.randn(B, Hq, T, d), torch.randn(B, Hkv, Tk, d), torch.randn(B, Hkv, Tk, d)
    doc_ids = torch.tensor([[0] * 3 + [1] * 7 + [2] * 2, [4] * 6 + [9] * 6]) if docs else None
    out = A.attention_reference(q, k, v, doc_ids)
    k_rep, v_rep = (x.repeat_interleave(Hq // Hkv, dim=1) for x in (k, v))   # (B, Hq, Tk, d)
    want = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=explicit_mask(T, Tk, doc_ids))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- flash attention vs reference
@pytest.mark.parametrize("B,Hq,Hkv,T", [
    (2, 2, 2, 100 * S),    # GQA 1, T not a multiple of the block
    (1, 4, 2, 17 * S),     # GQA 2
    (1, 4, 1, 4 * TILE),   # GQA 4, T a multiple of every block
    (1, 8, 1, 33 * S),     # GQA 8
    (2, 2, 1, 1),          # a single position
])
def test_flash_causal(B, Hq, Hkv, T):
    check_attention(B, Hq, Hkv, T, T)


@pytest.mark.parametrize("case", ["random", "block_edges", "short", "scattered_ids", "repeated_runs"])
def test_flash_documents(case):
    T = 4 * TILE
    if case == "random":          # boundaries at random places, different per row
        g = torch.Generator().manual_seed(1)
        cuts = [sorted(torch.randperm(T - 1, generator=g)[:5].add(1).tolist()) for _ in range(2)]
        doc_ids = docs_from_lengths(*[torch.tensor([0] + c + [T]).diff().tolist() for c in cuts])
    elif case == "block_edges":   # boundaries exactly on tile edges, one tile-edge-minus-one, and a document whose
        doc_ids = docs_from_lengths([TILE + 1, 2 * TILE - 1, TILE], [TILE - 1, 1, TILE, 2 * TILE])  # last row
                                  # starts a tile (the dk/dv kernel's query range must reach it)
    elif case == "short":         # many short documents, some of length 1
        doc_ids = docs_from_lengths([1, 1, 3, 2, T - 13, 5, 1], [T // 8] * 8)
    elif case == "scattered_ids":  # the same id at separate places: still exact (only fewer tiles skipped)
        doc_ids = torch.randint(0, 3, (2, T), generator=torch.Generator().manual_seed(2)).to(DEV) * 1000
    else:                         # long runs of one id around another document: the unmasked (full) tiles
                                  # must start at the run, not at the id's first position
        doc_ids = docs_from_lengths([3 * TILE // 2, TILE, 3 * TILE // 2], [TILE + 5, 2 * TILE, TILE - 5])
        doc_ids[doc_ids == 2] = 0
    check_attention(2, 4, 2, T, T, doc_ids)


# (18 * S, 18 * S + TILE - 2): Tk - T is 2 short of a multiple of every tile size. There a rounding at the diagonal
# off by one row (the forward's first masked key tile, full_hi; dk/dv's first unmasked query tile, full_lo) moves a
# whole tile and leaves unmasked a key that a row must not see; the other offsets (on the CPU, 1 past a multiple of
# 16) hide it
@pytest.mark.parametrize("T,Tk", [(1, 50 * S), (7, 40 * S), (20 * S, 37 * S), (18 * S, 18 * S + TILE - 2)])
def test_flash_kv_cache_bottom_right(T, Tk):
    check_attention(1, 4, 1, T, Tk)


def test_flash_half_precision():
    doc_ids = docs_from_lengths([TILE + 3, 2 * TILE - 3, TILE])
    check_attention(1, 4, 2, 4 * TILE, 4 * TILE, doc_ids, dtype=HALF)


@pytest.mark.parametrize("d", [32, 128] if CUDA else [32, 64, 128])
def test_flash_head_dims(d):
    check_attention(1, 2, 1, 40 * S, 40 * S, d=d)


@pytest.mark.parametrize("i", range(N_CONFIGS))
def test_flash_every_config(i, monkeypatch):
    """Each block shape of the autotune space (the i-th of each kernel's list) on documents and on Tk > T."""
    for kernel in AUTOTUNED:
        configs = ALL_CONFIGS[kernel]
        monkeypatch.setattr(kernel, "configs", [configs[i % len(configs)]])
    check_attention(1, 4, 2, 3 * TILE + 5, 3 * TILE + 5, docs_from_lengths([TILE - 3, TILE + 7, TILE + 1]))
    check_attention(1, 4, 2, TILE + 3, 2 * TILE + 9)


def test_fit_shared_memory(monkeypatch):
    """The autotuner's pre-pass lowers num_stages until the tiles fit: fp32 at D=128 needs twice bf16's bytes.
    Its count for the forward, (BLOCK_M + 2 * BLOCK_N * stages) rows of D elements, is exact: for 128x64 at 3
    stages, fp32, D=128 it gives 262144 bytes, what triton 3.6 asked for on an H100 (it has 232448)."""
    monkeypatch.setattr(A, "_shared_memory_limit", lambda device: 232448)
    space = [A.triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
             for m, n, w, s in [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4)]]
    shapes = lambda configs: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
                              for c in configs]
    x = {dtype: {"Q": torch.empty(1, 1, 1, 128, dtype=dtype)} for dtype in (torch.bfloat16, torch.float32)}
    assert shapes(A.FWD_FIT(space, x[torch.bfloat16], HEAD_DIM=128)) == shapes(space)
    # fp32: 64x64 at 3 stages takes 229376 bytes and stays; both 128x64 become 2 stages, one config
    assert shapes(A.FWD_FIT(space, x[torch.float32], HEAD_DIM=128)) == [(64, 64, 4, 3), (128, 64, 8, 2)]
    # dk/dv keep k and v and a margin (2 * BLOCK_N + BLOCK_M rows) and stream q and dO (2 * BLOCK_M): 64x64 needs
    # 288 KB at 3 stages, 224 KB at 2; 32x128, the H100's pick at b818606, 240 KB at 3 (the margin's doing), 208 at 2
    assert shapes(A.DKDV_FIT(space[:1], x[torch.float32], HEAD_DIM=128)) == [(64, 64, 4, 2)]
    bwd = [A.triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3)]
    assert shapes(A.DKDV_FIT(bwd, x[torch.float32], HEAD_DIM=128)) == [(32, 128, 8, 2)]
    assert shapes(A.DKDV_FIT(bwd, x[torch.bfloat16], HEAD_DIM=128)) == [(32, 128, 8, 3)]
    # dq keeps q and dO (2 * BLOCK_M) and streams k and v (2 * BLOCK_N): 128x64 in fp32 is 320 KB at 3 stages,
    # 256 KB at 2, 192 KB at 1
    assert shapes(A.DQ_FIT(space[1:2], x[torch.float32], HEAD_DIM=128)) == [(128, 64, 8, 1)]
    # a config that does not fit even at 1 stage is dropped (fp32 dk/dv 32x256: 304 KB), unless none fits
    bwd = [A.triton.Config({"BLOCK_M": 32, "BLOCK_N": n}, num_warps=8, num_stages=2) for n in (128, 256)]
    assert shapes(A.DKDV_FIT(bwd, x[torch.bfloat16], HEAD_DIM=128)) == shapes(bwd)
    assert shapes(A.DKDV_FIT(bwd, x[torch.float32], HEAD_DIM=128)) == [(32, 128, 8, 2)]   # 208 KB
    assert shapes(A.DKDV_FIT(bwd[1:], x[torch.float32], HEAD_DIM=128)) == [(32, 256, 8, 2)]


def test_autotune_key_buckets_T(monkeypatch):
    """A new T tunes again only in a new power-of-two bucket: prompts of 5, 6, 7 and 8 tokens share one tuning,
    9 starts the next. Keyed on T itself, sample.py and align.py would time every config at each new length."""
    timed = []
    kernel = A._attn_fwd
    monkeypatch.setattr(kernel, "configs", [A.triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=w)
                                            for w in (1, 2)])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "_bench", lambda *args, config, **kw: timed.append(config) or [1.0, 1.0, 1.0])
    monkeypatch.setattr(A, "_shared_memory_limit", lambda device: 2 ** 20)
    for T in (5, 6, 7, 8, 9):
        q = torch.randn(1, 2, T, 16, device=DEV)
        with torch.no_grad():
            assert_close(A.flash_attention(q, q, q), A.attention_reference(q, q, q), TOL[torch.float32], f"T={T}")
    assert len(kernel.cache) == 2 and len(timed) == 4, (kernel.cache, timed)


@pytest.mark.skipif(CUDA, reason="replaces the autotuner's timings")
def test_autotuner_path_keeps_the_loop_choices(monkeypatch):
    """On a GPU every call goes through the autotuner's pre-pass (shared memory) and timings; the interpreter's
    one config skips both. Here two configs a kernel, the timings replaced so that the one with the loop or
    launch-order choice (the forward's PV_LAG, dk/dv's HEAD_LOOPS, dq's HEADS_INNER) wins: the pre-pass must keep
    the flag, and the result is right."""
    monkeypatch.setattr(A, "_shared_memory_limit", lambda device: 2 ** 20)
    for kernel, flag in ((A._attn_fwd, "PV_LAG"), (A._attn_bwd_dkdv, "HEAD_LOOPS"), (A._attn_bwd_dq, "HEADS_INNER")):
        monkeypatch.setattr(kernel, "configs", [A.triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, **extra}, num_warps=1)
                                                for extra in ({}, {flag: True})])
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "_bench", lambda *args, config, **kw: [1.0 if len(config.kwargs) == 2 else 0.5] * 3)
    check_attention(1, 4, 2, 3 * TILE + 5, 3 * TILE + 5, docs_from_lengths([TILE - 3, 2 * TILE + 8]))
    assert A._attn_fwd.best_config.kwargs.get("PV_LAG") and A._attn_bwd_dkdv.best_config.kwargs.get("HEAD_LOOPS")
    assert A._attn_bwd_dq.best_config.kwargs.get("HEADS_INNER")


@pytest.mark.skipif(not CUDA, reason="shared memory limits are the GPU's")
def test_flash_fp32_head_dim_128(monkeypatch):
    """fp32 at D=128 on the GPU: the whole autotune space, fitted to shared memory, compiles and is right."""
    for kernel in AUTOTUNED:
        monkeypatch.setattr(kernel, "configs", ALL_CONFIGS[kernel])
    check_attention(1, 2, 1, 2 * TILE + 3, 2 * TILE + 3, docs_from_lengths([TILE + 1, TILE + 2]), d=128)


@pytest.mark.skipif(CUDA, reason="on a GPU test_flash_every_config runs the real tiles, all of them unequal")
@pytest.mark.parametrize("fwd,dkdv,dq", [((32, 16), (16, 32), (32, 16)), ((16, 32), (32, 16), (16, 64)),
                                         ((16, 64), (16, 64), (64, 16))])
def test_flash_unequal_tiles(fwd, dkdv, dq, monkeypatch):
    """The interpreter's tiles are 16x16, but on a GPU BLOCK_M != BLOCK_N (128x64, 32x128, ...): the key and
    query ranges round to both. Run the interpreter on unequal tiles: documents (one id on both sides of
    another), and Tk > T (k, v slices of a KV cache whose tail is NaN: no tile may read past Tk)."""
    for kernel, (bm, bn) in zip(AUTOTUNED, (fwd, dkdv, dq)):
        monkeypatch.setattr(kernel, "configs", [A.triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=1)])
    doc_ids = docs_from_lengths([37, 50, 40, 13], [5, 60, 75])
    doc_ids[0, 127:] = 0
    check_attention(2, 4, 2, 140, 140, doc_ids)
    check_attention(1, 4, 2, 45, 110, strided=True)


@pytest.mark.skipif(CUDA, reason="on a GPU test_flash_every_config runs the autotuner's PV_LAG configs")
@pytest.mark.parametrize("bm", [16, 32])
def test_flash_pv_lag(bm, monkeypatch):
    """The forward's other loop (PV_LAG: each key tile's p v issued after the next tile's q k^T), which the
    interpreter's one config does not take: documents (ranges of one tile, several, none), causal rows, Tk > T
    (as a KV cache's slice, its tail NaN: the lagging v loads must stop at Tk too)."""
    monkeypatch.setattr(A._attn_fwd, "configs",
                        [A.triton.Config({"BLOCK_M": bm, "BLOCK_N": 16, "PV_LAG": True}, num_warps=1)])
    doc_ids = docs_from_lengths([37, 50, 40, 13], [5, 60, 75])
    doc_ids[0, 127:] = 0
    check_attention(2, 4, 2, 140, 140, doc_ids)
    check_attention(1, 4, 2, 3 * TILE + 5, 3 * TILE + 5)
    check_attention(1, 4, 2, 45, 110, strided=True)


@pytest.mark.skipif(CUDA, reason="on a GPU test_flash_every_config runs the autotuner's HEAD_LOOPS configs")
@pytest.mark.parametrize("bm,bn", [(16, 16), (16, 32)])
def test_flash_head_loops(bm, bn, monkeypatch):
    """dk/dv's other order (HEAD_LOOPS: the group's query heads one after another, each in loops of its own),
    which the interpreter's one config does not take: GQA 4 and 2, documents, causal rows, Tk > T."""
    monkeypatch.setattr(A._attn_bwd_dkdv, "configs",
                        [A.triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "HEAD_LOOPS": True}, num_warps=1)])
    doc_ids = docs_from_lengths([37, 50, 40, 13], [5, 60, 75])
    doc_ids[0, 127:] = 0
    check_attention(2, 8, 2, 140, 140, doc_ids)
    check_attention(1, 4, 2, 3 * TILE + 5, 3 * TILE + 5)
    check_attention(1, 4, 1, 45, 110)


@pytest.mark.skipif(CUDA, reason="on a GPU test_flash_every_config runs the autotuner's HEADS_INNER configs")
def test_flash_heads_inner_gives_the_same_bits(monkeypatch):
    """HEADS_INNER renumbers the programs (every head and batch row of a tile before the next tile), which the
    interpreter's one config does not take. Each program still computes the same tile the same way, so the
    output and the three gradients must equal the usual order's bit for bit: batch rows with documents of their
    own, GQA, unequal tiles, and Tk > T strided (a KV cache's slice). A wrong renumbering leaves a tile unwritten
    or writes one twice."""
    def run(heads_inner, B, Hq, Hkv, T, Tk, doc_ids=None, strided=False):
        for kernel, (bm, bn) in zip(AUTOTUNED, ((32, 16), (16, 32), (32, 16))):
            extra = {"HEADS_INNER": True} if heads_inner else {}
            monkeypatch.setattr(kernel, "configs", [A.triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **extra},
                                                                    num_warps=1)])
        torch.manual_seed(0)
        q = torch.randn(B, T, Hq, D, device=DEV).transpose(1, 2).requires_grad_()
        k, v = (torch.randn(B, 2 * Tk, Hkv, D, device=DEV).transpose(1, 2)[:, :, :Tk].requires_grad_()
                for _ in range(2))
        if not strided:
            q, k, v = (x.detach().contiguous().requires_grad_() for x in (q, k, v))
        o = A.flash_attention(q, k, v, doc_ids)
        return [o, *torch.autograd.grad(o, (q, k, v), torch.randn_like(o))]
    for args in [(3, 4, 2, 70, 70, docs_from_lengths([20, 30, 20], [50, 20], [7, 63])), (2, 4, 1, 37, 60, None, True)]:
        for usual, renumbered, name in zip(run(False, *args), run(True, *args), ("o", "dq", "dk", "dv")):
            assert torch.equal(usual, renumbered), f"{name} differs with HEADS_INNER for {args[:5]}"


tl = A.tl   # triton.language (kernels/attention.py's stand-in where triton is missing)


@A.triton.jit
def _launch_order(OUT, HEADS_INNER: tl.constexpr):
    """OUT[tile, head, batch row] = the launch position (CUDA's linear id) of the program that does it."""
    tile, h, b = A._tile_head_batch(HEADS_INNER)
    n = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    tl.store(OUT + (tile * tl.num_programs(1) + h) * tl.num_programs(2) + b, n)


@pytest.mark.skipif(CUDA, reason="the interpreter runs the same numbering (the GPU runs the kernels with it)")
def test_heads_inner_starts_every_head_of_a_tile_first():
    """The launch order HEADS_INNER promises: CUDA starts programs by linear id, axis 0 fastest, so in the usual
    numbering one head's tiles go in a row; renumbered, tile by tile, each with every batch row and head."""
    tiles, heads, rows = 5, 3, 2
    for heads_inner in (False, True):
        out = torch.full((tiles, heads, rows), -1, dtype=torch.int32, device=DEV)
        _launch_order[(tiles, heads, rows)](out, HEADS_INNER=heads_inner)
        t, h, b = torch.meshgrid(torch.arange(tiles), torch.arange(heads), torch.arange(rows), indexing="ij")
        want = (t * rows + b) * heads + h if heads_inner else t + tiles * (h + heads * b)
        assert torch.equal(out.cpu().long(), want), (heads_inner, out)


@pytest.mark.skipif(CUDA, reason="counts the interpreter's matrix products and masks")
def test_documents_cost_fewer_tiles(monkeypatch):
    """A row packed with short documents must cost less than one long document: count the tile iterations of
    each kernel (its tl.dot calls: 2 per tile in the forward, 4 in dk/dv, 3 in dq) with the tiles the H100
    picked at T=1K (forward 64x64, dk/dv 32x128, dq 64x32), for causal and for 8 documents of 128. Exact
    counts: causal query tile i of 64 sees i+1 key tiles (136 in all); a document is 2 of them and sees 1 + 2;
    dk/dv's key tile j of 128 sees 32 - 4j query tiles of 32 (144), its document 4; dq's query tile i sees 2i+2
    key tiles of 32 (272), a document's two 2 + 4.
    And a tile pays for a mask only where it needs one: count the masks applied to tiles (tl.where on a tile:
    the causal one and the document one). Causal rows mask the diagonal tiles alone: 1 per query tile in the
    forward, 4 per key tile in dk/dv, 2 per query tile in dq; the 8 documents the same tiles, with the document
    mask too. One document of 256 costs no more masks than causal rows would: the document mask only on the
    diagonal, its keys before are full tiles. A KV cache, T=128 queries against Tk=1151 keys, masks only at the
    bottom-right diagonal: a forward query tile sees 17 or 18 key tiles, its last masked; dk/dv's last key tile
    is seen by 4 query tiles, all masked, the 8 before by 4 unmasked; dq's query tile sees 34 or 36, 2 masked."""
    from triton.runtime import interpreter
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if not (hasattr(builder, "create_dot") and hasattr(builder, "create_select")):
        pytest.skip("this triton's interpreter has no InterpreterBuilder.create_dot/create_select to count")
    counts, running = {}, [None]

    def counting(what, create):
        def count(self, *args, **kwargs):
            if what == "dot" or args[0].data.ndim == 2:   # a tile's mask (tl.where), not a row's or a number's
                counts[running[0], what] = counts.get((running[0], what), 0) + 1
            return create(self, *args, **kwargs)
        return count
    for what, f in (("dot", "create_dot"), ("mask", "create_select")):
        monkeypatch.setattr(builder, f, counting(what, getattr(builder, f)))
    for kernel, (bm, bn) in zip(AUTOTUNED, ((64, 64), (32, 128), (64, 32))):
        monkeypatch.setattr(kernel, "configs", [A.triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=1)])

        def run(*args, _run=kernel.run, _name=kernel.fn.__name__, **kwargs):
            running[0] = _name
            return _run(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", run)
    # (T, Tk, doc_ids, tiles, causal masks, document masks), each of (forward, dk/dv, dq)
    for T, Tk, doc_ids, tiles, causal, doc in (
            (1024, 1024, None, (136, 144, 272), (16, 32, 32), (0, 0, 0)),
            (1024, 1024, docs_from_lengths([128] * 8), (8 * 3, 8 * 4, 8 * 6), (16, 32, 32), (16, 32, 32)),
            (256, 256, docs_from_lengths([256]), (10, 12, 20), (4, 8, 8), (4, 8, 8)),
            (128, 1151, None, (35, 36, 70), (2, 4, 4), (0, 0, 0))):
        counts.clear()
        q, k, v = (torch.randn(1, 1, n, 16, requires_grad=True) for n in (T, Tk, Tk))
        torch.autograd.grad(A.flash_attention(q, k, v, doc_ids), (q, k, v), torch.randn(1, 1, T, 16))
        names = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")
        got = {name: tuple(counts.get((name, what), 0) for what in ("dot", "mask")) for name in names}
        want = {name: (n * t, c + d) for name, n, t, c, d in zip(names, (2, 4, 3), tiles, causal, doc)}
        assert got == want, f"T={T} Tk={Tk} docs={doc_ids is not None}: (dots, masks)"


def test_flash_under_inference_mode():
    """Tensors made under torch.inference_mode() have no version counter, which the document spans' cache reads:
    they get their spans computed afresh."""
    q, k, v = (torch.randn(1, 2, 20 * S, D, device=DEV) for _ in range(3))
    with torch.inference_mode():
        doc_ids = docs_from_lengths([7 * S, 13 * S])
        o = A.flash_attention(q, k, v, doc_ids)
    assert_close(o, A.attention_reference(q, k, v, doc_ids), TOL[torch.float32], "o")
    # an ordinary doc_ids used under inference_mode (an evaluation), then for training: the spans cached in there
    # are inference tensors, which a backward cannot save; they are made again
    doc_ids = docs_from_lengths([7 * S, 13 * S])
    with torch.inference_mode():
        A.flash_attention(q, k, v, doc_ids)
    check_attention(1, 2, 2, 20 * S, 20 * S, doc_ids)


@pytest.mark.parametrize("docs", [False, True])
def test_flash_strided_inputs(docs):
    """q, k, v as the model makes them ((B, T, H, D) transposed), k, v as slices of a preallocated KV cache, and dO
    as the model's backward sends it: the forward and the backward read every input through its strides (training
    passes exactly these views). And a head dimension that is not contiguous (the kernels read whole rows of it):
    copied first."""
    if docs:
        check_attention(2, 4, 2, 37 * S, 37 * S, docs_from_lengths([10 * S, 27 * S], [37 * S]), strided=True)
    else:
        check_attention(2, 4, 1, 9 * S, 30 * S, strided=True)
    q, k, v = (torch.randn(1, 2, D, 9 * S, device=DEV).transpose(-1, -2).requires_grad_() for _ in range(3))
    assert q.stride(-1) != 1
    o, ref = A.flash_attention(q, k, v), A.attention_reference(q, k, v)
    assert_close(o, ref, TOL[torch.float32], "o")
    do = torch.randn_like(o)
    for name, g, r in zip("qkv", torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        assert_close(g, r, TOL[torch.float32], f"d{name}")


@pytest.mark.skipif(not CUDA, reason="the interpreter runs programs one at a time: any order repeats there")
@pytest.mark.parametrize("docs", [False, True])
def test_flash_backward_is_deterministic(docs, monkeypatch):
    """No atomic adds: each gradient row is summed by one program in a fixed order, so the same inputs give
    bit-identical gradients, run after run (FlashAttention's atomic dq differs at its last bits). Long rows, bf16,
    GQA 4: many key tiles see each query tile. Every backward tile of the autotune space."""
    T = 16 * TILE
    doc_ids = docs_from_lengths([3 * TILE + 5, 9 * TILE - 40, 4 * TILE + 35]) if docs else None
    q = torch.randn(1, 8, T, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 2, T, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    for kernel, config in [(kernel, c) for kernel in AUTOTUNED[1:] for c in ALL_CONFIGS[kernel]]:
        monkeypatch.setattr(kernel, "configs", [config])
        first = torch.autograd.grad(A.flash_attention(q, k, v, doc_ids), (q, k, v), do)
        for _ in range(3):
            again = torch.autograd.grad(A.flash_attention(q, k, v, doc_ids), (q, k, v), do)
            for name, a, b in zip("qkv", first, again):
                assert torch.equal(a, b), f"d{name} differs between two runs on the same inputs ({config})"
        monkeypatch.setattr(kernel, "configs", ALL_CONFIGS[kernel][:1])


def test_flash_skips_masked_tiles():
    """Tiles that are wholly masked must not be computed at all: poison them with NaN (0 * NaN = NaN, so a
    computed-then-masked tile would leak it) and check the outputs that must not depend on them stay exact."""
    T = 4 * TILE
    doc_ids = docs_from_lengths([2 * TILE, 2 * TILE])          # documents [0, 2 TILE) and [2 TILE, 4 TILE)
    q, k, v = (torch.randn(1, h, T, D, device=DEV, requires_grad=True) for h in (2, 1, 1))
    do = torch.randn(1, 2, T, D, device=DEV)
    rows = slice(2 * TILE, 3 * TILE)
    ref = A.attention_reference(q, k, v, doc_ids)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref, (q, k, v), do)

    # forward and dq: rows [2, 3) TILE see only keys [2, 3) TILE; keys of the other document (before) and of
    # the causal future (after) are poisoned
    v_bad = v.detach().clone()
    v_bad[:, :, :2 * TILE] = float("nan")
    v_bad[:, :, 3 * TILE:] = float("nan")
    o = A.flash_attention(q, k, v_bad, doc_ids)
    dq, = torch.autograd.grad(o, q, do)
    assert_close(o[:, :, rows], ref[:, :, rows], TOL[torch.float32], "o with poisoned v")
    assert_close(dq[:, :, rows], ref_dq[:, :, rows], TOL[torch.float32], "dq with poisoned v")

    # dk, dv: keys [1, 2) TILE are seen only by rows [1, 2) TILE; rows before (causal) and rows of the next
    # document get a poisoned output gradient
    keys = slice(TILE, 2 * TILE)
    do_bad = do.clone()
    do_bad[:, :, :TILE] = float("nan")
    do_bad[:, :, 2 * TILE:] = float("nan")
    o = A.flash_attention(q, k, v, doc_ids)
    _, dk, dv = torch.autograd.grad(o, (q, k, v), do_bad)
    assert_close(dk[:, :, keys], ref_dk[:, :, keys], TOL[torch.float32], "dk with poisoned dO")
    assert_close(dv[:, :, keys], ref_dv[:, :, keys], TOL[torch.float32], "dv with poisoned dO")


def test_doc_spans():
    """The per-position document summary the kernels use for skipping and for unmasked tiles, against a
    brute-force loop; ids that repeat at separate places make the document and its runs differ."""
    doc_ids = torch.tensor([[7, 7, 9, 9, 9, 2], [3, 1, 3, 3, 1, 5]])
    doc, first, last, run_first, run_last = A._doc_spans(doc_ids)
    for b in range(2):
        ids = doc_ids[b].tolist()
        for i, x in enumerate(ids):
            same = [j for j, y in enumerate(ids) if y == x]
            assert (first[b, i], last[b, i]) == (same[0], same[-1])
            run = [j for j in same if all(ids[m] == x for m in range(min(i, j), max(i, j) + 1))]
            assert (run_first[b, i], run_last[b, i]) == (run[0], run[-1])
            assert all((doc[b, i] == doc[b, j]) == (ids[i] == ids[j]) for j in range(len(ids)))


def test_spans_computed_once_per_doc_ids():
    """The layers share one doc_ids tensor, so its spans are computed once; an in-place edit of it recomputes."""
    doc_ids = docs_from_lengths([5, 20, 7])
    assert A._spans_once(doc_ids) is A._spans_once(doc_ids)
    assert A._spans_once(doc_ids.clone()) is not A._spans_once(doc_ids)
    check_attention(1, 2, 1, 32, 32, doc_ids)
    doc_ids[0, 10:] = 7                       # same tensor, new documents: a stale cache would mask wrongly
    check_attention(1, 2, 1, 32, 32, doc_ids)
    torch.testing.assert_close(A._spans_once(doc_ids), A._doc_spans(doc_ids))


def test_attention_errors():
    q, k = torch.randn(1, 3, 4, 16), torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="multiple of the 2 kv heads"):
        A.attention(q, k, k)
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 6, 16)
    with pytest.raises(ValueError, match="doc_ids"):
        A.attention(q, k, k, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of the 0 kv heads"):
        A.attention(q, k[:, :0], k[:, :0])
    q = torch.randn(1, 2, 4, 16, dtype=torch.float64)  # the kernel's sums are fp32: not a float64 kernel
    with pytest.raises(ValueError, match="dtype torch.float64 of q is not one of the kernel's"):
        A.flash_attention(q, q, q)
    # a batch row past int32 offsets (a meta tensor: the shape and strides, no memory): 1M tokens of a 16384-wide
    # model's q, in the model's layout; Llama 3 405B's 128K tokens are just inside
    q = torch.empty(1, 2 ** 20, 128, 128, device="meta").transpose(1, 2)
    with pytest.raises(ValueError, match=r"q \(1, 128, 1048576, 128\) .* past the kernels' int32 offsets"):
        A.flash_attention(q, q, q)
    q = torch.empty(1, 2 ** 17, 128, 128, device="meta").transpose(1, 2)
    assert sum((n - 1) * s for n, s in zip(q.shape[1:], q.stride()[1:])) == 2 ** 31 - 1   # (the last element)


def test_device_mismatch_is_an_error():
    """k, v or doc_ids on another device than q (doc_ids left on the CPU by a data loader, with CUDA q): a clear
    error naming the tensor, on every path. (On a GPU the kernel launch got a CPU pointer: by triton's launcher,
    "Pointer argument cannot be accessed from Triton (cpu tensor?)"; here the meta device stands in for the other
    one.) RMSNorm's weight likewise."""
    q = torch.randn(1, 2, 8, 16)
    docs = torch.zeros(1, 8, dtype=torch.long)
    for fn in (A.attention, A.attention_sdpa, A.attention_reference, A.flash_attention):
        with pytest.raises(ValueError, match="doc_ids is on meta, q on cpu"):
            fn(q, q, q, docs.to("meta"))
        with pytest.raises(ValueError, match="k is on meta, q on cpu"):
            fn(q, q.to("meta"), q.to("meta"))
        with pytest.raises(ValueError, match="v is on meta, q on cpu"):
            fn(q, q, q.to("meta"), docs)
    with pytest.raises(ValueError, match="weight is on meta, x on cpu"):   # RMSNorm's kernel likewise
        R.rms_norm_triton(q, torch.ones(16, device="meta"), 1e-5)


@pytest.mark.skipif(not CUDA, reason="CUDA caps grid axes 1 and 2 at 65535 programs; the interpreter has no cap")
def test_more_batch_heads_than_a_grid_axis_holds():
    """B * H over 65535 (a large prefill batch: B = 2048 at Llama 3 8B's 32 heads): the heads and the batch
    are grid axes of their own (one axis of B * H failed to launch); a batch over 65535 goes in parts."""
    check_attention(2, 40000, 40000, 3, 3)
    check_attention(70000, 1, 1, 3, 3)


def test_a_batch_over_the_grid_cap_goes_in_parts(monkeypatch):
    """The batch is a grid axis of its own, which CUDA caps at 65535 programs: a larger batch is cut into parts
    (here the cap is lowered to 2, so 5 rows of different documents go as 2 + 2 + 1); values and gradients as
    the reference's. More heads than the cap are refused by name."""
    monkeypatch.setattr(A, "GRID_CAP", 2)
    doc_ids = torch.randint(0, 3, (5, 11), device=DEV).sort(-1).values
    check_attention(5, 2, 1, 11, 11, doc_ids)
    check_attention(5, 2, 2, 7, 9)
    q = torch.randn(1, 4, 8, D, device=DEV)
    with pytest.raises(ValueError, match="q has 4 heads, over the 2 a CUDA grid axis holds"):
        A.flash_attention(q, q, q)


def test_second_derivatives_are_an_error_not_zero():
    """The backward kernels are not differentiable themselves: a loss made of gradients (a gradient penalty) must
    fail loudly in its backward (it trained on a silent zero: the gradients they return carried no graph)."""
    q, k, v = (torch.randn(1, 2, 8, D, device=DEV, requires_grad=True) for _ in range(3))
    gq, = torch.autograd.grad(A.flash_attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (gq.square().sum() + v.sum()).backward()
    x, w = torch.randn(4, 32, device=DEV, requires_grad=True), torch.ones(32, device=DEV, requires_grad=True)
    gx, = torch.autograd.grad(R.rms_norm_triton(x, w, 1e-5).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (gx.square().sum() + w.sum()).backward()


# ----------------------------------------------------------------------------- compiled for a GPU, without one
COMPILE_FOR_HOPPER = """
import re
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import attention as A, rmsnorm as R

def arg_type(p):  # the signature a launch with bf16 tensors would give each argument
    if p.is_constexpr:
        return "constexpr"
    if p.name in ("qk_scale", "sm_scale", "eps"):
        return "fp32"
    if p.name.startswith("stride") or p.name in ("Hq", "Hkv", "T", "Tk", "GROUP", "T_BUCKET", "M", "N",
                                                 "ROWS_PER_PROGRAM", "n_rows"):
        return "i32"
    if p.name.startswith(("DOC", "RUN")):
        return "*i32"
    return {"LSE": "*fp32", "DELTA": "*fp32", "RSTD": "*fp32", "DW_PARTIAL": "*fp32", "W": "*fp32"}.get(p.name, "*bf16")

for jit, consts, warps, stages in [
        (A._attn_fwd.fn, dict(HAS_DOCS=False, HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64), 8, 3),
        (A._attn_fwd.fn, dict(HAS_DOCS=True, HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64), 8, 3),
        (A._attn_fwd.fn, dict(HAS_DOCS=True, HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64, PV_LAG=True), 8, 3),
        (A._attn_bwd_dkdv.fn, dict(GROUP=4, HAS_DOCS=True, HEAD_DIM=128, BLOCK_M=32, BLOCK_N=128), 8, 3),
        (A._attn_bwd_dkdv.fn, dict(GROUP=4, HAS_DOCS=False, HEAD_DIM=128, BLOCK_M=32, BLOCK_N=64), 4, 3),
        (A._attn_bwd_dkdv.fn, dict(GROUP=4, HAS_DOCS=True, HEAD_DIM=128, BLOCK_M=64, BLOCK_N=128), 8, 2),
        (A._attn_bwd_dkdv.fn, dict(GROUP=4, HAS_DOCS=True, HEAD_DIM=128, BLOCK_M=64, BLOCK_N=128, HEADS_INNER=True),
         8, 2),
        (A._attn_bwd_dkdv.fn, dict(GROUP=4, HAS_DOCS=True, HEAD_DIM=128, BLOCK_M=32, BLOCK_N=128, HEAD_LOOPS=True),
         8, 3),
        (A._attn_bwd_dq.fn, dict(HAS_DOCS=True, HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64), 8, 2),
        (A._bwd_delta, dict(HEAD_DIM=128, BLOCK_M=64), 4, 3),
        (R._rms_norm_fwd, dict(BLOCK_N=4096, STAGES=R._stages(4096 * 2)), 16, 3),        # bf16 x
        (R._rms_norm_bwd, dict(BLOCK_N=4096, STAGES=R._stages(4096 * 2 * 2)), 16, 3)]:  # bf16 x and dy
    sig = {p.name: arg_type(p) for p in jit.params}
    # a launch marks every pointer and every integer that is a multiple of 16 (the strides at head_dim 128,
    # T = 4096, RMSNorm's N = 4096) "divisible by 16"; without that hint loads are not vectorised, so not
    # pipelined either
    aligned = {(i,): [["tt.divisibility", 16]] for i, (name, t) in enumerate(sig.items())
               if t.startswith("*") or name.startswith("stride") or name in ("T", "Tk", "M", "N")}
    kernel = triton.compile(ASTSource(jit, sig, consts, aligned), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps, num_stages=stages))
    if jit.__name__.startswith("_attn"):  # Hopper's tensor-core MMA, fed by asynchronous (pipelined) copies
        assert "wgmma.mma_async" in kernel.asm["ptx"], f"{jit.__name__}: no wgmma"
        assert "cp.async" in kernel.asm["ptx"], f"{jit.__name__}: loads not pipelined"
    if jit.__name__.startswith("_rms"):  # rows prefetched (the loop pipelined) in 16-byte copies of 8 bf16
        copies = re.findall(r"cp\\.async\\.cg\\.shared\\.global \\[[^]]*\\], \\[[^]]*\\], 0x10", kernel.asm["ptx"])
        assert copies, f"{jit.__name__}: row loads not pipelined in 16-byte copies"
    print(jit.__name__, "compiled")
print("ok")
"""


@pytest.mark.skipif(CUDA, reason="on a GPU the tests above compile and run every kernel for real")
def test_kernels_compile_for_hopper():
    """The interpreter runs code the compiler may reject (it is Python): compile each kernel for an H100
    (sm_90) in a subprocess without TRITON_INTERPRET, no GPU needed, and check attention uses Hopper's wgmma
    with its K/V (Q/dO) tiles prefetched by cp.async, as the autotune space's num_stages intends."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        del GPUTarget, ASTSource   # (only: are they there?)
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget compile API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


# ----------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("T,Tk,docs", [(8, 8, True), (8, 8, False), (3, 8, False)])
def test_dispatch_cpu_tensors_use_pytorch(monkeypatch, T, Tk, docs):
    """CPU tensors take PyTorch's SDPA and F.rms_norm (equal to the references) even under TRITON_INTERPRET=1, so
    CPU model tests stay fast; causal, document-masked and bottom-right (Tk > T) masks, values and gradients."""
    def boom(*args):
        raise AssertionError("the Triton path was taken for CPU tensors")
    monkeypatch.setattr(A, "flash_attention", boom)
    monkeypatch.setattr(R, "rms_norm_triton", boom)
    q = torch.randn(2, 4, T, 16, requires_grad=True)
    k, v = torch.randn(2, 2, Tk, 16, requires_grad=True), torch.randn(2, 2, Tk, 16, requires_grad=True)
    doc_ids = torch.tensor([[0] * 3 + [1] * 5] * 2) if docs else None
    out, ref = A.attention(q, k, v, doc_ids), A.attention_reference(q, k, v, doc_ids)
    torch.testing.assert_close(out, ref)
    dy = torch.randn_like(out)
    for g, g_ref in zip(torch.autograd.grad(out, (q, k, v), dy), torch.autograd.grad(ref, (q, k, v), dy)):
        torch.testing.assert_close(g, g_ref)
    # RMSNorm on CPU tensors is torch's F.rms_norm: the reference's values and gradients in every dtype (with
    # torch 2.13 to the bit; assert_close's tolerances leave room for another version's rounding)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, w = torch.randn(3, 5, 40).to(dtype).requires_grad_(), torch.randn(40).to(dtype).requires_grad_()
        out, ref = R.rms_norm(x, w, 1e-5), R.rms_norm_reference(x, w, 1e-5)
        dy = torch.randn_like(out)
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref)
        for g, g_ref in zip(torch.autograd.grad(out, (x, w), dy), torch.autograd.grad(ref, (x, w), dy)):
            torch.testing.assert_close(g, g_ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # (train.py's CPU setting: fp32 in, fp32 out)
        x = torch.randn(3, 40)
        out = R.rms_norm(x, torch.ones(40), 1e-5)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, R.rms_norm_reference(x, torch.ones(40), 1e-5))


def test_import_without_triton():
    """Platforms without a triton wheel (macOS, Windows) still import kernels/ and get the references."""
    code = ("import sys; sys.modules['triton'] = None\n"     # makes `import triton` raise ImportError
            "import torch\nfrom kernels.attention import attention\nfrom kernels.rmsnorm import rms_norm\n"
            "q = torch.randn(1, 2, 5, 16)\nattention(q, q, q)\nrms_norm(q, torch.ones(16), 1e-5)\nprint('ok')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@pytest.mark.skipif(not CUDA, reason="needs CUDA tensors (runs on the GPU machine)")
def test_dispatch_cuda_tensors_use_triton(monkeypatch):
    """Each dispatcher calls its Triton kernel exactly once, never a fallback (attention's is SDPA, RMSNorm's
    F.rms_norm): a counter on the kernels, and the fallbacks made to raise."""
    def boom(*args):
        raise AssertionError("a fallback was taken for CUDA tensors")
    calls = []

    def counted(name, fn):
        return lambda *a: calls.append(name) or fn(*a)
    monkeypatch.setattr(A, "flash_attention", counted("flash", A.flash_attention))
    monkeypatch.setattr(R, "rms_norm_triton", counted("rms", R.rms_norm_triton))
    for mod, fallback in [(A, "attention_sdpa"), (A, "attention_reference"), (R, "rms_norm_reference"),
                          (R.F, "rms_norm")]:
        monkeypatch.setattr(mod, fallback, boom)
    q = torch.randn(1, 2, 64, 64, device="cuda")
    A.attention(q, q, q)
    R.rms_norm(q, torch.ones(64, device="cuda"), 1e-5)
    assert calls == ["flash", "rms"]


# ----------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("shape,dtype,w_dtype", [
    ((3, 5, 100), torch.float32, torch.float32),    # leading dims, hidden size not a power of two
    ((300 * S, 33), torch.float32, torch.float32),  # many rows per program: the bands, the partial dw sums
    ((37, 48), torch.float16, torch.float16),
    ((4, 96), torch.bfloat16, torch.float32),        # bf16 activations with an fp32 weight (autocast)
    ((6, 16384), torch.float32, torch.float32),      # 405B's width in fp32: on a GPU the rows prefetched must fit
])                                                   # in shared memory (two ahead would ask 256 KB in backward)
def test_rms_norm(shape, dtype, w_dtype):
    x = torch.randn(shape, device=DEV, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEV)).to(w_dtype).requires_grad_()
    y = R.rms_norm_triton(x, w, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert dx.dtype == dtype and dw.dtype == w_dtype
    ref = R.rms_norm_reference(x.float(), w.float(), 1e-5)
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, w), dy.float())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]   # ~ one rounding of the output
    assert_close(y, ref, tol, "y")
    assert_close(dx, ref_dx, tol, "dx")
    assert_close(dw, ref_dw, tol, "dw")


def test_rms_norm_no_rows():
    """An empty batch (no rows) gives an empty output and a zero weight gradient, as the reference does."""
    x = torch.randn(0, 3, 64, device=DEV, requires_grad=True)
    w = torch.ones(64, device=DEV, requires_grad=True)
    y = R.rms_norm_triton(x, w, 1e-5)
    assert y.shape == x.shape
    dx, dw = torch.autograd.grad(y, (x, w), torch.randn_like(y))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))


def test_rms_norm_errors():
    with pytest.raises(ValueError, match=r"weight has shape \(8,\)"):
        R.rms_norm_triton(torch.randn(2, 6), torch.randn(8), 1e-5)


def test_rms_norm_eps_inside_the_root():
    """eps sits under the square root, 1 / sqrt(mean(x^2) + eps), as in Llama's RMSNorm: visible only on rows
    whose mean square is near eps (with randn rows, eps elsewhere moves y by ~1e-5, the tests' tolerance).
    Against the formula in float64, for the reference and for the kernel; an all-zero row gives 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g) * torch.tensor([1e-3, 3e-3, 1.0, 0.0])[:, None]
    w = 1 + 0.1 * torch.randn(64, generator=g)
    eps = 1e-5
    want = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + eps) * w.double()
    torch.testing.assert_close(R.rms_norm_reference(x, w, eps).double(), want, rtol=1e-5, atol=1e-6)
    if R.HAS_TRITON:
        y = R.rms_norm_triton(x.to(DEV), w.to(DEV), eps)
        torch.testing.assert_close(y.double().cpu(), want, rtol=1e-5, atol=1e-6)

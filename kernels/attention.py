"""Flash attention in Triton: causal, document-masked, grouped-query; forward and backward.

The math, for one query head (q_i, k_j, v_j are rows of length D; positions are row indices):

    visible(i, j) = j <= i + (Tk - T)          causal, bottom-right aligned: the T queries are the last T of the
                                               Tk positions, so decoding with a KV cache (Tk > T) works
                    and doc[i] == doc[j]       Llama 3 pretraining masks attention between the documents packed
                                               into one row (Llama 3 paper, Dubey et al. 2024, section 3.2)
    s_ij  = q_i . k_j / sqrt(D)                for visible (i, j) only
    lse_i = log sum_j exp(s_ij)                the row logsumexp: all the forward pass keeps besides o
    o_i   = sum_j exp(s_ij - lse_i) v_j

    backward, from dO and delta_i = dO_i . o_i (= sum_j p_ij dp_ij):
    p_ij = exp(s_ij - lse_i),  dp_ij = dO_i . v_j,  ds_ij = p_ij (dp_ij - delta_i)
    dv_j = sum_i p_ij dO_i,    dk_j = sum_i ds_ij q_i / sqrt(D),   dq_i = sum_j ds_ij k_j / sqrt(D)

Design choices:
- FlashAttention-2 (Dao, 2023): a program owns BLOCK_M query rows and walks the keys BLOCK_N at a time with an
  online softmax in fp32 (running max m, running sum l, rescaled accumulator), so the (T, Tk) score matrix never
  exists in memory. exp2 instead of exp: the scale log2(e) is folded into the score scale. Inputs in fp16, bf16 or
  fp32; fp32 products run as TF32 on the tensor cores (tl.dot's default, like torch with allow_tf32), even under
  train.py's --dtype float32, which keeps torch's own matmuls fp32: fp32 attention on a GPU matches the
  reference to ~1e-3, not to fp32's last bits.
- Skipping wholly-masked tiles, not computing them: a query tile walks only the keys [lo, hi) that can be visible.
  hi is the causal diagonal. lo is the first position of the earliest document among the tile's rows (from
  doc_ids). For packed rows (each document one contiguous run, what data.py makes) no tile in [lo, hi) is
  wholly masked, so a row of many short documents costs about sum(len_d^2), not T^2. Ids that repeat at
  separate places stay exact; fewer tiles are then skipped.
- Masking only where a tile needs it. [lo, hi) is walked in three ranges: [lo, full_lo) gets the document mask,
  [full_lo, full_hi) no mask at all, [full_hi, hi) (the few diagonal tiles) the causal and document masks.
  full_hi is where the causal diagonal begins. full_lo is where the keys start to lie in the same contiguous
  run of one document as every row of the tile ("full blocks" in FlexAttention's words); a tile whose rows span
  two documents has no such keys (full_lo = full_hi). Runs, not ids, keep this exact when an id repeats. Most
  tiles of a row packed with long documents are full: they pay for no load of document ids and no select.
  The backward kernels walk the same ranges (dk/dv: transposed, over the query tiles that see a key tile).
- GQA by index: query head h reads kv head h // (Hq // Hkv); repeated k/v are never materialised. The dk/dv
  program for one kv head sums over the query heads of its group, so dk/dv are sums without atomics, in one of
  two orders the autotuner times: (query tile, query head) pairs in one loop, one pipeline fill and drain per
  range at the price of head indexing in every tile (~6% more instructions), or HEAD_LOOPS, a loop per head:
  plainer tiles, but GROUP fills and drains, which the short ranges of short documents cannot hide. Which is
  faster depends on the ranges' length: on an H200 (2026-11-28) HEAD_LOOPS won every causal row, the one loop
  every row with documents (on 2026-11-27, before the 64-row tiles, HEAD_LOOPS won 16K with documents too).
- The forward loop comes in two orders for the autotuner to choose from: FlashAttention-2's, and PV_LAG, which
  issues each tile's p v after the next tile's q k^T so the tensor cores work during the softmax
  (FlashAttention-3's intra-warpgroup overlap; _fwd_tiles).
- The order the programs start in is an autotune choice of every kernel: one head's tiles in a row (CUDA's
  order for the grid (tiles, heads, batch)), or HEADS_INNER, all heads and batch rows of one tile before the
  next tile, so that the longest programs start first everywhere (_tile_head_batch).
- Backward is two kernels: dk/dv per key tile (walking query tiles), dq per query tile (walking key tiles),
  both recomputing p from the saved lse, after a small kernel for delta. dq's kernel recomputes q k^T and
  dO v^T (7 matrix products in all, FlashAttention-2/3 do 5 by adding dq up with atomics): the price of a
  deterministic backward, so training runs repeat exactly. A one-kernel backward with 5 products, dq's shares
  added in a fixed order (per-query-tile turn counters), was built and timed on an H100 (2026-11-27, at
  b4e136d): 0.80-0.92x the speed of these two kernels at T 1K-16K, level only at 1K with documents, so it
  was taken out (README).
- Inputs may be strided views (a transposed q, a slice of a KV cache) as long as head_dim is contiguous.
- Block sizes are autotuned on the GPU, keyed on head_dim and T rounded up to a power of two (see _configs and
  _bucket); the interpreter uses one small block so the CPU tests are quick and still cross many tile boundaries.

Dispatch rule of `attention`: CUDA tensors -> the Triton kernel; any other tensors -> PyTorch's own fused
attention (F.scaled_dot_product_attention with the same boolean mask, GQA by enable_gqa): the same math as the
reference, about 2x faster on CPU for a training step (fwd+bwd, the old 256-wide preset). TRITON_INTERPRET=1
(which tests/conftest.py sets on machines without CUDA) does not route CPU tensors to Triton: the interpreter
runs kernels in numpy (~200x slower than the reference at T=100, seen here), and the model and training tests
call `attention` on CPU tensors (tried on 2026-11-26: with CPU tensors sent to the interpreter, the test suite
had run 12 of its 175 tests after 20 minutes; as it is, all of them take 2). The kernel on CPU is reached by
calling `flash_attention` directly, which is what tests/test_kernels.py does. On CUDA, falling back (no triton,
or a head_dim or dtype the kernel does not take) warns once.

    python -m pytest -q tests/test_kernels.py    # CPU: the kernels under TRITON_INTERPRET=1, small shapes
    python tests/bench_kernels.py                # GPU: TFLOP/s vs SDPA and FlexAttention
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
    triton = SimpleNamespace(jit=lambda fn: fn, autotune=lambda **kw: (lambda fn: fn), Config=lambda *a, **kw: None)
    tl = SimpleNamespace(constexpr=None)
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
HEAD_DIMS = (16, 32, 64, 128)  # powers of two (tl.arange) that tl.dot takes; Llama 3 uses 64 and 128
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GRID_CAP = 65535  # programs CUDA allows on grid axes 1 and 2 (heads and batch here; axis 0, the tiles, 2**31 - 1)


# ----------------------------------------------------------------------------- block sizes
def _configs(shapes, **constexprs):
    """Autotune space: (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples, the winners of a wider space timed on an H100
    (tests/bench_kernels.py, bf16, D=128, T 1K-16K, causal and 8 documents; README). The running tiles live in registers
    (forward: the BLOCK_M x D accumulator and the BLOCK_M x BLOCK_N scores, fp32; dk/dv: two BLOCK_N x D accumulators
    plus k and v), and past 255 registers a thread spills to local memory; a Hopper warpgroup MMA is 64 rows tall, so
    64/128-row tiles keep 1-2 warpgroups (4/8 warps) busy; num_stages is how many K/V (or Q/dO) tiles are prefetched
    into shared memory. The forward takes 64x64 for short rows and for documents (more, cheaper programs for 132 SMs),
    128x64 for long causal rows; dk/dv 32x128 (on the H100 of that day 2 stages with documents, 3 without); dq 64x32 or
    128x64. Dropped after timing: forward 128x64 at 4 warps (spills at D=128) and 128x128 (never won: compiled for
    sm_90 by triton 3.9 at D=128 it spills 88-104 bytes at 8 warps and 72 at 16, and 64x128 8-24), dk/dv's 16-row
    tiles, dq 128x32 and 64x64. Compiled for sm_90 without a GPU (cuobjdump's resource usage): all pipeline their loads
    and use wgmma; at D=128 the dk/dv 32x128 tiles fill the 255 registers (two 128x128 fp32 accumulators) and spill 0-16
    bytes (32-272 while each query head of the group had a loop of its own). Added later, in the space since: dk/dv
    32x64 at 4 warps (one warpgroup per program at 243-255 registers, 64-81 KB of shared memory, so two programs share
    an SM), and the forward's PV_LAG loop (_fwd_tiles) at 128x64 and at 64x64 (2 stages; 212-255 registers against
    181-234, no spills in the loops). On an H100 and an H200 (2026-11-27) PV_LAG won only at T=1K with documents
    (64x64). dk/dv's HEAD_LOOPS order is offered at 32x128, the tiles of b818606 (it spills 16-296 bytes there, the one
    loop 0-16); on the H200 it won at 32x128 (8 warps) for causal rows, the one loop at 32x64 (4 warps) for documents up
    to 8K. Added 2026-11-27: dk/dv with 64 query rows a tile, 64x128 at 8 warps and 64x64 at 4, 2 stages, in
    the one loop (compiled for sm_90, bf16, D=128, with and without documents: 255 registers, no spills; HEAD_LOOPS
    spills 31-215 bytes there, so not offered). Two of dk/dv's four products sum over the query rows
    (dv += p^T dO, dk += ds^T q), and 32 rows make them 32-deep wgmma chains; 64 halves the loop's trips and the
    waits between its products, for twice the p and ds tiles in registers. On the H200 (2026-11-28) they won
    every document row from 2K on. Added untimed (2026-11-28): HEADS_INNER (_tile_head_batch) beside the tiles
    that won that day (forward 64x64 and 128x64, dk/dv 64x128, 64x64 and HEAD_LOOPS 32x128, dq both); compiled
    for sm_90 at D=128 it moves no register count by more than one."""
    if INTERPRET:  # one small tile: no benchmarking in the interpreter, and T=100 crosses ~7 tiles
        return [] if constexprs else [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **constexprs}, num_warps=w, num_stages=s)
            for bm, bn, w, s in shapes]


def _fit_shared_memory(tiles):
    """An autotuner pre-pass: lower num_stages until a config's tiles fit in this GPU's shared memory, and drop
    the configs that do not fit even with one stage (unless none does: then triton's own error says so).
    tiles(**config.kwargs) -> (rows kept for the whole loop, rows loaded per pipeline stage), each row D
    elements of the inputs' dtype. The configs above are sized for bf16; fp32 inputs at D=128 need twice the
    bytes (forward 128x64 at 3 stages: 256 KB, over an H100's 227 KB), and smaller GPUs have less."""
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        limit = _shared_memory_limit(q.device)
        row_bytes = kwargs["HEAD_DIM"] * q.element_size()
        fitted = {}
        for c in configs:
            kept, per_stage = tiles(**c.kwargs)
            stages = c.num_stages
            while stages > 1 and (kept + stages * per_stage) * row_bytes > limit:
                stages -= 1
            if (kept + stages * per_stage) * row_bytes <= limit:
                fitted[(tuple(c.kwargs.items()), c.num_warps, stages)] = None   # in order, no repeats
        return [triton.Config(dict(kw), num_warps=w, num_stages=s) for kw, w, s in fitted] or configs[:1]
    return prune


def _bucket(T):
    """The autotuner's key for T: T rounded up to a power of two. Timing a config takes over 0.125 s (triton's
    do_bench: 25 ms of warm-up, 100 ms of repeats), so keyed on T itself every new prompt length in sample.py and
    every new padded length in align.py would time every config again; this way a few buckets cover a run."""
    return triton.next_power_of_2(T)


def _shared_memory_limit(device):
    """Bytes of shared memory one program may use on this GPU (227 KB on an H100)."""
    return triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]


# forward and dq walk keys for a query tile (tall M), dk/dv walks queries for a key tile (tall N)
FWD_CONFIGS = (_configs([(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4)]) +
               _configs([(64, 64, 4, 2), (128, 64, 8, 3)], PV_LAG=True) +
               _configs([(64, 64, 4, 3), (128, 64, 8, 3)], HEADS_INNER=True))
DKDV_CONFIGS = (_configs([(32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 3), (64, 128, 8, 2), (64, 64, 4, 2)]) +
                _configs([(32, 128, 8, 2), (32, 128, 8, 3)], HEAD_LOOPS=True) +
                _configs([(64, 128, 8, 2), (64, 64, 4, 2)], HEADS_INNER=True) +
                _configs([(32, 128, 8, 3)], HEAD_LOOPS=True, HEADS_INNER=True))
DQ_CONFIGS = (_configs([(64, 32, 4, 3), (128, 64, 8, 2)]) +
              _configs([(64, 32, 4, 3), (128, 64, 8, 2)], HEADS_INNER=True))
# q kept, k and v streamed (with PV_LAG one more v tile in flight); dk/dv: k and v kept, q and dO streamed, and
# BLOCK_M rows more, a margin for p^T and ds^T on their way to the tensor cores (compiled for sm_90, bf16, D=128,
# 32x128 at 3 stages asks 115,200 bytes without documents and 115,456 with, up to 768 over the count without
# it; at fp32 that count would allow 3 stages in 224 KB of the H100's 227; test_flash_fp32_head_dim_128 on a GPU
# checks the fit); dq: q and dO kept, k and v streamed
FWD_FIT = _fit_shared_memory(lambda BLOCK_M, BLOCK_N, PV_LAG=False: (BLOCK_M + PV_LAG * BLOCK_N, 2 * BLOCK_N))
DKDV_FIT = _fit_shared_memory(lambda BLOCK_M, BLOCK_N, **_: (2 * BLOCK_N + BLOCK_M, 2 * BLOCK_M))
DQ_FIT = _fit_shared_memory(lambda BLOCK_M, BLOCK_N, **_: (2 * BLOCK_M, 2 * BLOCK_N))   # (**_: loop choices)


# ----------------------------------------------------------------------------- forward
@triton.jit
def _tile_head_batch(HEADS_INNER: tl.constexpr):
    """-> (tile, head, batch row) of this program in the grid (tiles, heads, batch). CUDA starts programs in order
    of their linear id, axis 0 fastest: one head's tiles in a row, then the next head's. HEADS_INNER, an autotune
    choice, renumbers them: every head and batch row of a tile, then the next tile. The kernels take causal tiles
    longest first, so the longest programs then start first across all heads. With documents each head's run
    repeats the documents' sawtooth of work, and in the usual order the last head's long tiles start late and
    finish alone (README: a model of the GPU as slots put dk/dv's end 20% past an even finish at T = 16K, 2%
    renumbered). The price: the programs running together read every kv head's keys, not one head's (L2 reuse)."""
    tile, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if HEADS_INNER:
        n_heads, n_rows = tl.num_programs(1), tl.num_programs(2)
        n = tile + tl.num_programs(0) * (h + n_heads * b.to(tl.int64))   # the program's linear id (int64:
        h = (n % n_heads).to(tl.int32)                                   # tiles x heads x batch can pass 2**31)
        b = (n // n_heads % n_rows).to(tl.int32)
        tile = (n // n_heads // n_rows).to(tl.int32)
    return tile, h, b


@triton.jit
def _key_ranges(start_m, offs_m, T, Tk,
                DOC, DOC_FIRST, RUN_FIRST,   # this row's document numbers, first positions of documents and runs
                HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where the key ranges of the query tile at start_m begin, lo <= full_lo <= full_hi (module docstring),
    and the document number of each of its rows. The forward and dq use the same ranges."""
    full_hi = (start_m + (Tk - T) + 1) // BLOCK_N * BLOCK_N     # keys before it are causally visible to all rows
    lo = 0
    full_lo = 0
    q_doc = offs_m                                              # unused without documents
    if HAS_DOCS:                                                # (doc_ids only come with Tk == T)
        row_ok = offs_m < T
        q_doc = tl.load(DOC + offs_m, mask=row_ok, other=-1)
        first = tl.load(DOC_FIRST + offs_m, mask=row_ok, other=T)
        lo = tl.min(first, 0) // BLOCK_N * BLOCK_N              # tiles before the earliest document are skipped
        full_hi = tl.maximum(full_hi, lo)
        run = tl.load(RUN_FIRST + start_m)                      # the tile lies in one run if its first and last
        one_run = run == tl.load(RUN_FIRST + tl.minimum(start_m + BLOCK_M, T) - 1)   # rows begin at the same place
        full_lo = tl.minimum(tl.where(one_run, (run + BLOCK_N - 1) // BLOCK_N * BLOCK_N, full_hi), full_hi)
    return lo, full_lo, full_hi, q_doc


@triton.jit
def _fwd_softmax(s, k_pos, q_pos, q_doc, m_i, l_i, DOC, Tk, qk_scale, MASKED: tl.constexpr, HAS_DOCS: tl.constexpr):
    """The online softmax step for one key tile: its unscaled scores s (BLOCK_M, BLOCK_N) against keys k_pos ->
    (p, the factor alpha that rescales what was summed so far, the new running max m and sum l).
    MASKED: the tile touches the causal diagonal or the end of the keys, so apply the causal mask."""
    if MASKED:
        s = tl.where(k_pos[None, :] <= q_pos[:, None], s, float("-inf"))
    if HAS_DOCS:
        k_doc = tl.load(DOC + k_pos, mask=k_pos < Tk, other=-1)
        s = tl.where(q_doc[:, None] == k_doc[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)                # log2 units; the scale is > 0
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)          # a row that has seen no visible key yet
    p = tl.math.exp2(s * qk_scale - m_safe[:, None])               # scale and shift in one FMA
    alpha = tl.math.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, q_pos, q_doc,
               K, V, DOC,            # this (batch, kv head)'s keys and values, and the row's document numbers
               stride_kt, stride_vt, lo, hi, Tk, qk_scale,
               MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, PV_LAG: tl.constexpr, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """Fold key tiles [lo, hi) into the running softmax (acc, l_i, m_i) of one query tile.
    PV_LAG, an autotune choice: each tile's p v product is issued one step late, after the next tile's q k^T,
    so the next tile's softmax runs while the tensor cores do it (FlashAttention-3's intra-warpgroup overlap,
    Shah et al. 2024, here in the order of the source). Compiled for sm_90, the plain loop waits for each q k^T
    and then does the whole softmax with its tensor cores idle; with the lag the exponentials issue while the
    p v wgmma is in flight. The price: registers, and one more v tile in shared memory. (Starting the next
    q k^T early instead, the other half of the trick, made ptxas serialize every wgmma: warning C7515.)"""
    offs_d = tl.arange(0, HEAD_DIM)
    if PV_LAG:
        if lo < hi:
            k_pos = lo + tl.arange(0, BLOCK_N)
            k = tl.load(K + k_pos[:, None] * stride_kt + offs_d[None, :], mask=k_pos[:, None] < Tk, other=0.0)
            p, alpha, m_i, l_i = _fwd_softmax(tl.dot(q, tl.trans(k)), k_pos, q_pos, q_doc, m_i, l_i, DOC, Tk,
                                              qk_scale, MASKED, HAS_DOCS)
            for start_n in range(lo + BLOCK_N, hi, BLOCK_N):
                next_pos = start_n + tl.arange(0, BLOCK_N)
                k = tl.load(K + next_pos[:, None] * stride_kt + offs_d[None, :], mask=next_pos[:, None] < Tk,
                            other=0.0)
                s = tl.dot(q, tl.trans(k))                                   # this tile's scores, then
                v = tl.load(V + k_pos[:, None] * stride_vt + offs_d[None, :], mask=k_pos[:, None] < Tk,
                            other=0.0)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])         # the previous tile's p v,
                p, alpha, m_i, l_i = _fwd_softmax(s, next_pos, q_pos, q_doc, m_i, l_i, DOC, Tk, qk_scale,
                                                  MASKED, HAS_DOCS)          # in flight during this softmax
                k_pos = next_pos
            v = tl.load(V + k_pos[:, None] * stride_vt + offs_d[None, :], mask=k_pos[:, None] < Tk, other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    else:
        for start_n in range(lo, hi, BLOCK_N):
            k_pos = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(K + k_pos[:, None] * stride_kt + offs_d[None, :], mask=k_pos[:, None] < Tk, other=0.0)
            p, alpha, m_i, l_i = _fwd_softmax(tl.dot(q, tl.trans(k)), k_pos, q_pos, q_doc, m_i, l_i, DOC, Tk,
                                              qk_scale, MASKED, HAS_DOCS)
            v = tl.load(V + k_pos[:, None] * stride_vt + offs_d[None, :], mask=k_pos[:, None] < Tk, other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_i


@triton.autotune(configs=FWD_CONFIGS, key=["T_BUCKET", "HEAD_DIM", "HAS_DOCS"],
                 prune_configs_by={"early_config_prune": FWD_FIT})
@triton.jit
def _attn_fwd(Q, K, V,               # q (B, Hq, T, D), k and v (B, Hkv, Tk, D); any strides, D contiguous
              O, LSE,                # outputs: o (B, Hq, T, D) contiguous, lse (B, Hq, T) fp32 in log2 units
              DOC, DOC_FIRST,        # (B, T) int32: document number of each position, first position of its document,
              RUN_FIRST,             # and first position of the contiguous run of its document it lies in
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
              Hq, T, Tk, GROUP, qk_scale,
              T_BUCKET,              # T rounded up to a power of two: read only by the autotuner (its key)
              HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              PV_LAG: tl.constexpr = False,      # autotune choices: see _fwd_tiles
              HEADS_INNER: tl.constexpr = False):   # and _tile_head_batch
    tile, h, b = _tile_head_batch(HEADS_INNER)   # (heads and batch: grid axes of their own, as one axis
    start_m = (tl.num_programs(0) - 1 - tile) * BLOCK_M   # holding B * Hq would be capped at 65535); the longest
                                                          # (last) query tiles start first
    bh = b * Hq + h
    hk = h // GROUP                                                      # GQA: the kv head this query head reads
    Q += b.to(tl.int64) * stride_qb + h * stride_qh    # int64: B*H*T*D can pass 2**31 (a row's: flash_attention)
    K += b.to(tl.int64) * stride_kb + hk * stride_kh
    V += b.to(tl.int64) * stride_vb + hk * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    q_pos = offs_m + (Tk - T)                      # each query's position among the keys (bottom-right)

    # the keys this tile can see: [lo, hi), in three ranges (module docstring): [lo, full_lo) document mask,
    # [full_lo, full_hi) no mask, [full_hi, hi) causal and document masks
    DOC += b * T
    lo, full_lo, full_hi, q_doc = _key_ranges(start_m, offs_m, T, Tk, DOC, DOC_FIRST + b * T, RUN_FIRST + b * T,
                                              HAS_DOCS, BLOCK_M, BLOCK_N)
    hi = tl.minimum(start_m + BLOCK_M + (Tk - T), Tk)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_pos, q_doc, K, V, DOC, stride_kt, stride_vt,
                               lo, full_lo, Tk, qk_scale, False, HAS_DOCS, PV_LAG, BLOCK_N, HEAD_DIM)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_pos, q_doc, K, V, DOC, stride_kt, stride_vt,
                               full_lo, full_hi, Tk, qk_scale, False, False, PV_LAG, BLOCK_N, HEAD_DIM)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_pos, q_doc, K, V, DOC, stride_kt, stride_vt,
                               full_hi, hi, Tk, qk_scale, True, HAS_DOCS, PV_LAG, BLOCK_N, HEAD_DIM)
    row_ok = offs_m < T
    tl.store(O + bh.to(tl.int64) * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             (acc / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _bwd_delta(O, DO,        # o, dO (B * Hq * T, D) contiguous
               DELTA,        # output (B * Hq * T,) fp32: delta_i = dO_i . o_i
               n_rows, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """(o.float() * do.float()).sum(-1), reading o and dO once (0.27 GB at 16K tokens x 32 heads x D=128 in
    bf16, where PyTorch's fp32 temporaries move ~1.9 GB: by estimate half the backward's time at T=1K)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = rows[:, None].to(tl.int64) * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    o = tl.load(O + offs, mask=rows[:, None] < n_rows, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=rows[:, None] < n_rows, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < n_rows)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, k_pos, k_doc,
                Q, DO, LSE, DELTA,   # q, dO, lse, delta of the first query head of this kv head's group
                DOC,                 # the row's document numbers
                stride_qh, stride_qt, lo, hi, T, Tk, qk_scale, GROUP: tl.constexpr,
                MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Add the contributions of query tiles [lo, hi) of the GROUP query heads from Q on to one key tile's dk, dv.
    One loop over (query tile, head) pairs, so those heads share one software pipeline; with GROUP=1 (HEAD_LOOPS)
    it is one head's loop. Works on s transposed (keys on rows) so both products come out in the key tile's
    layout."""
    offs_d = tl.arange(0, HEAD_DIM)
    for i in range(0, tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M) * GROUP):
        g = i % GROUP                                                   # the head, then the next query tile
        offs_m = lo + (i // GROUP) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        q = tl.load(Q + g * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0)
        lse = tl.load(LSE + g * T + offs_m, mask=row_ok, other=float("inf"))    # rows past T get p = 0
        pT = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])   # (BLOCK_N, BLOCK_M)
        if MASKED:
            pT = tl.where(k_pos[:, None] <= offs_m[None, :] + (Tk - T), pT, 0.0)
        if HAS_DOCS:
            q_doc = tl.load(DOC + offs_m, mask=row_ok, other=-1)
            pT = tl.where(k_doc[:, None] == q_doc[None, :], pT, 0.0)
        do = tl.load(DO + g * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None],
                     other=0.0)
        dv += tl.dot(pT.to(do.dtype), do)
        delta = tl.load(DELTA + g * T + offs_m, mask=row_ok, other=0.0)
        dsT = pT * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q)
    return dk, dv


@triton.jit
def _dkdv_ranges(dk, dv, k, v, k_pos, k_doc, Q, DO, LSE, DELTA, DOC, stride_qh, stride_qt, lo, full_lo, full_hi,
                 hi, T, Tk, qk_scale, GROUP: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    """_dkdv_tiles over the three ranges of query tiles: [lo, full_lo) with the causal and document masks,
    [full_lo, full_hi) with none, [full_hi, hi) with the document mask."""
    dk, dv = _dkdv_tiles(dk, dv, k, v, k_pos, k_doc, Q, DO, LSE, DELTA, DOC, stride_qh,
                         stride_qt, lo, full_lo, T, Tk, qk_scale, GROUP, True, HAS_DOCS, BLOCK_M, HEAD_DIM)
    dk, dv = _dkdv_tiles(dk, dv, k, v, k_pos, k_doc, Q, DO, LSE, DELTA, DOC, stride_qh,
                         stride_qt, full_lo, full_hi, T, Tk, qk_scale, GROUP, False, False, BLOCK_M, HEAD_DIM)
    if HAS_DOCS:  # (without documents this range is empty: leaving the loop out saves registers)
        dk, dv = _dkdv_tiles(dk, dv, k, v, k_pos, k_doc, Q, DO, LSE, DELTA, DOC, stride_qh,
                             stride_qt, full_hi, hi, T, Tk, qk_scale, GROUP, False, True, BLOCK_M, HEAD_DIM)
    return dk, dv


@triton.autotune(configs=DKDV_CONFIGS, key=["T_BUCKET", "HEAD_DIM", "HAS_DOCS"],
                 prune_configs_by={"early_config_prune": DKDV_FIT})
@triton.jit
def _attn_bwd_dkdv(Q, K, V,          # as in _attn_fwd
                   DO, LSE, DELTA,   # dO (B, Hq, T, D) contiguous; lse, delta (B, Hq, T) fp32
                   DK, DV,           # outputs (B, Hkv, Tk, D) contiguous
                   DOC, DOC_LAST,    # (B, T) int32: document number, last position of its document,
                   RUN_LAST,         # and last position of the contiguous run of its document it lies in
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                   Hq, Hkv, T, Tk, qk_scale, sm_scale, T_BUCKET,
                   GROUP: tl.constexpr,  # query heads per kv head; a constant, so i // GROUP needs no division
                   HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_LOOPS: tl.constexpr = False,    # autotune choices: see below
                   HEADS_INNER: tl.constexpr = False):  # and _tile_head_batch
    tile, hk, b = _tile_head_batch(HEADS_INNER)
    start_n = tile * BLOCK_N                       # causal: the first key tiles see the most queries, start first
    bhk = b * Hkv + hk
    offs_d = tl.arange(0, HEAD_DIM)
    k_pos = start_n + tl.arange(0, BLOCK_N)
    k_ok = k_pos[:, None] < Tk
    K += b.to(tl.int64) * stride_kb + hk * stride_kh
    V += b.to(tl.int64) * stride_vb + hk * stride_vh
    k = tl.load(K + k_pos[:, None] * stride_kt + offs_d[None, :], mask=k_ok, other=0.0)
    v = tl.load(V + k_pos[:, None] * stride_vt + offs_d[None, :], mask=k_ok, other=0.0)

    # the queries that can see this tile: [lo, hi), the forward's ranges transposed: [lo, full_lo) causal and
    # document masks, [full_lo, full_hi) no mask, [full_hi, hi) document mask
    lo = tl.maximum(start_n - (Tk - T), 0) // BLOCK_M * BLOCK_M
    full_lo = (tl.maximum(start_n + BLOCK_N - 1 - (Tk - T), 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    hi = T
    full_hi = T
    k_doc = k_pos                                                        # unused without documents
    if HAS_DOCS:                                                         # (then Tk == T)
        DOC += b * T
        k_doc = tl.load(DOC + k_pos, mask=k_pos < Tk, other=-1)
        last = tl.load(DOC_LAST + b * T + k_pos, mask=k_pos < Tk, other=-1)
        hi = tl.max(last, 0) + 1                   # query tiles after the last document end are skipped
        run = tl.load(RUN_LAST + b * T + start_n)  # the tile lies in one run if its first and last keys end theirs
        one_run = run == tl.load(RUN_LAST + b * T + tl.minimum(start_n + BLOCK_N, Tk) - 1)   # at the same place
        full_hi = tl.where(one_run, (run + 1) // BLOCK_M * BLOCK_M, full_lo)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    bh = b * Hq + hk * GROUP                       # the group's first query head; dk, dv sum over the group
    Qg = Q + b.to(tl.int64) * stride_qb + hk * GROUP * stride_qh
    DOg = DO + bh.to(tl.int64) * T * HEAD_DIM
    LSEg, DELTAg = LSE + bh * T, DELTA + bh * T
    if HEAD_LOOPS:  # the autotune choice: the group's heads one after another, each in loops of its own
        for g in range(GROUP):
            dk, dv = _dkdv_ranges(dk, dv, k, v, k_pos, k_doc, Qg + g * stride_qh, DOg + g * T * HEAD_DIM,
                                  LSEg + g * T, DELTAg + g * T, DOC, stride_qh, stride_qt, lo, full_lo, full_hi, hi,
                                  T, Tk, qk_scale, 1, HAS_DOCS, BLOCK_M, HEAD_DIM)
    else:           # the group's heads in one loop
        dk, dv = _dkdv_ranges(dk, dv, k, v, k_pos, k_doc, Qg, DOg, LSEg, DELTAg, DOC, stride_qh, stride_qt, lo,
                              full_lo, full_hi, hi, T, Tk, qk_scale, GROUP, HAS_DOCS, BLOCK_M, HEAD_DIM)
    out = bhk.to(tl.int64) * Tk * HEAD_DIM + k_pos[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=k_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, q_pos, q_doc,
              K, V, DOC,                  # this (batch, kv head)'s keys and values, the row's document numbers
              stride_kt, stride_vt, lo, hi, Tk, qk_scale,
              MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Add the contributions of key tiles [lo, hi) to one query tile's dq."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + k_pos[:, None] * stride_kt + offs_d[None, :], mask=k_pos[:, None] < Tk, other=0.0)
        v = tl.load(V + k_pos[:, None] * stride_vt + offs_d[None, :], mask=k_pos[:, None] < Tk, other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])    # (BLOCK_M, BLOCK_N)
        if MASKED:
            p = tl.where(k_pos[None, :] <= q_pos[:, None], p, 0.0)
        if HAS_DOCS:
            k_doc = tl.load(DOC + k_pos, mask=k_pos < Tk, other=-1)
            p = tl.where(q_doc[:, None] == k_doc[None, :], p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.autotune(configs=DQ_CONFIGS, key=["T_BUCKET", "HEAD_DIM", "HAS_DOCS"],
                 prune_configs_by={"early_config_prune": DQ_FIT})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA,   # as in _attn_bwd_dkdv
                 DQ,                        # output (B, Hq, T, D) contiguous
                 DOC, DOC_FIRST, RUN_FIRST,   # as in _attn_fwd
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                 Hq, T, Tk, GROUP, qk_scale, sm_scale, T_BUCKET,
                 HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEADS_INNER: tl.constexpr = False):   # an autotune choice: see _tile_head_batch
    tile, h, b = _tile_head_batch(HEADS_INNER)
    start_m = (tl.num_programs(0) - 1 - tile) * BLOCK_M
    bh = b * Hq + h
    hk = h // GROUP
    Q += b.to(tl.int64) * stride_qb + h * stride_qh
    K += b.to(tl.int64) * stride_kb + hk * stride_kh
    V += b.to(tl.int64) * stride_vb + hk * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    rows = bh.to(tl.int64) * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    do = tl.load(DO + rows, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
    q_pos = offs_m + (Tk - T)

    DOC += b * T                                          # the same key ranges as the forward
    lo, full_lo, full_hi, q_doc = _key_ranges(start_m, offs_m, T, Tk, DOC, DOC_FIRST + b * T, RUN_FIRST + b * T,
                                              HAS_DOCS, BLOCK_M, BLOCK_N)
    hi = tl.minimum(start_m + BLOCK_M + (Tk - T), Tk)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, q_pos, q_doc, K, V, DOC, stride_kt, stride_vt,
                   lo, full_lo, Tk, qk_scale, False, HAS_DOCS, BLOCK_N, HEAD_DIM)
    dq = _dq_tiles(dq, q, do, lse, delta, q_pos, q_doc, K, V, DOC, stride_kt, stride_vt,
                   full_lo, full_hi, Tk, qk_scale, False, False, BLOCK_N, HEAD_DIM)
    dq = _dq_tiles(dq, q, do, lse, delta, q_pos, q_doc, K, V, DOC, stride_kt, stride_vt,
                   full_hi, hi, Tk, qk_scale, True, HAS_DOCS, BLOCK_N, HEAD_DIM)
    tl.store(DQ + rows, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------- autograd wrapper
def _runs(x):
    """x (B, T) -> (first, last, begins): for each entry, the index of the first and last entry of its run of
    equal values along the row, and whether a run begins there. Scans, with no host sync."""
    B, T = x.shape
    pos = torch.arange(T, device=x.device).expand(B, T)
    begins = torch.ones_like(x, dtype=torch.bool)
    begins[:, 1:] = x[:, 1:] != x[:, :-1]
    ends = torch.ones_like(begins)
    ends[:, :-1] = begins[:, 1:]
    first = torch.where(begins, pos, 0).cummax(1).values
    last = torch.where(ends, pos, T - 1).flip(1).cummin(1).values.flip(1)
    return first, last, begins


def _doc_spans(doc_ids):
    """doc_ids (B, T), any integers -> (5, B, T) int32: doc, first, last, run_first, run_last. doc: the ids
    renumbered 1, 2, ... per row; first, last: the first and last position in the row of each position's
    document; run_first, run_last: the same for the contiguous run of it that the position lies in. They differ
    only when an id repeats at separate places; sorting the ids keeps first and last exact then.
    Example: doc_ids [[7, 7, 9, 9, 7]] -> doc [[1, 1, 2, 2, 1]], first [[0, 0, 2, 2, 0]], last [[4, 4, 3, 3, 4]],
    run_first [[0, 0, 2, 2, 4]], run_last [[1, 1, 3, 3, 4]]."""
    ids, perm = doc_ids.sort(dim=1, stable=True)           # equal ids adjacent, each group in position order
    group_first, group_last, group_begins = _runs(ids)     # indices in sorted order
    unsort = lambda x: torch.empty_like(x).scatter_(1, perm, x)  # noqa: E731  back to position order
    doc = unsort(group_begins.long().cumsum(1))
    first = unsort(perm.gather(1, group_first))            # stable sort: the group's first entry is its earliest
    last = unsort(perm.gather(1, group_last))
    run_first, run_last, _ = _runs(doc_ids)
    return torch.stack([doc, first, last, run_first, run_last]).int()


_last_spans = (None, -1, None)   # (doc_ids, its version counter, _doc_spans of it)


def _spans_once(doc_ids):
    """_doc_spans, computed once per doc_ids tensor: every layer of the model passes the same one (FlexAttention's
    block mask is likewise built once per batch). Its ~40 small ops take longer than the forward kernel itself
    (H100: 0.56 ms at T=1K, 1.3 ms at T=8K against 0.3 and 0.66 ms). Reused only while the tensor is unchanged:
    an in-place edit bumps its version counter (writes torch cannot see, through a numpy view or .data, are not
    detected). Tensors made under torch.inference_mode() have no version counter: computed every time."""
    global _last_spans
    if doc_ids.is_inference():
        return _doc_spans(doc_ids)
    ids, version, spans = _last_spans
    # (spans made under inference_mode cannot be saved for a backward: made again outside it)
    if ids is not doc_ids or version != doc_ids._version or (spans.is_inference() and
                                                              not torch.is_inference_mode_enabled()):
        spans = _doc_spans(doc_ids)
        _last_spans = (doc_ids, doc_ids._version, spans)
    return spans


def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        B, Hq, T, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        o = torch.empty((B, Hq, T, D), device=q.device, dtype=q.dtype)
        lse = torch.empty((B, Hq, T), device=q.device, dtype=torch.float32)
        # doc, first, last, run_first, run_last; without documents never read (HAS_DOCS=False): any int32 will do
        no_docs = torch.zeros(5, 1, 1, device=q.device, dtype=torch.int32)
        spans = _spans_once(doc_ids) if doc_ids is not None else no_docs
        doc, first, _, run_first, _ = spans
        sm_scale = D ** -0.5
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), Hq, B)  # noqa: E731
        _attn_fwd[grid](q, k, v, o, lse, doc, first, run_first,
                        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                        Hq, T, Tk, Hq // Hkv, sm_scale * LOG2E, _bucket(T),
                        HAS_DOCS=doc_ids is not None, HEAD_DIM=D)
        ctx.save_for_backward(q, k, v, o, lse, spans)
        ctx.has_docs = doc_ids is not None
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative is an error, not a silent zero
    def backward(ctx, do):
        q, k, v, o, lse, spans = ctx.saved_tensors
        doc, first, last, run_first, run_last = spans
        B, Hq, T, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        do = do.contiguous()
        delta = torch.empty((B, Hq, T), device=q.device, dtype=torch.float32)
        BLOCK = 16 if INTERPRET else 64
        _bwd_delta[(triton.cdiv(B * Hq * T, BLOCK),)](o, do, delta, B * Hq * T, HEAD_DIM=D, BLOCK_M=BLOCK)
        dq = torch.empty((B, Hq, T, D), device=q.device, dtype=q.dtype)
        dk = torch.empty((B, Hkv, Tk, D), device=k.device, dtype=k.dtype)
        dv = torch.empty((B, Hkv, Tk, D), device=v.device, dtype=v.dtype)
        sm_scale = D ** -0.5
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
        grid = lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), Hkv, B)  # noqa: E731
        _attn_bwd_dkdv[grid](q, k, v, do, lse, delta, dk, dv, doc, last, run_last, *strides,
                             Hq, Hkv, T, Tk, sm_scale * LOG2E, sm_scale, _bucket(T),
                             GROUP=Hq // Hkv, HAS_DOCS=ctx.has_docs, HEAD_DIM=D)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), Hq, B)  # noqa: E731
        _attn_bwd_dq[grid](q, k, v, do, lse, delta, dq, doc, first, run_first, *strides,
                           Hq, T, Tk, Hq // Hkv, sm_scale * LOG2E, sm_scale, _bucket(T),
                           HAS_DOCS=ctx.has_docs, HEAD_DIM=D)
        return dq, dk, dv, None


def _check(q, k, v, doc_ids):
    """Clear errors for shapes outside the contract, naming the tensor at fault."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be (B, H, T, D); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    for name, x in (("k", k), ("v", v), ("doc_ids", doc_ids)):
        if x is not None and x.device != q.device:
            raise ValueError(f"attention: {name} is on {x.device}, q on {q.device}: all must be on one device")
    B, Hq, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B={B}, Hkv, Tk, D={D})")
    Hkv, Tk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention: q has {Hq} heads, not a multiple of the {Hkv} kv heads of k and v")
    if Tk < T:
        raise ValueError(f"attention: k has Tk={Tk} positions, fewer than the T={T} queries of q")
    if doc_ids is not None and (tuple(doc_ids.shape) != (B, T) or Tk != T):
        raise ValueError(f"attention: doc_ids {tuple(doc_ids.shape)} must be (B, T) = ({B}, {T}), "
                         f"and needs Tk == T (k has Tk={Tk})")


# torch.compile sees this call as a graph break: it runs the kernels as they are. TODO: let Dynamo trace them
# (it can take user-defined Triton kernels) once that is checked on a GPU.
@torch.compiler.disable
def flash_attention(q, k, v, doc_ids=None):
    """The Triton kernel, always (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
    q (B, Hq, T, D), k and v (B, Hkv, Tk, D), doc_ids (B, T) or None -> (B, Hq, T, D), differentiable."""
    _check(q, k, v, doc_ids)
    if not HAS_TRITON:
        raise RuntimeError("flash_attention needs triton (pip install triton, Linux); attention() falls back")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in DTYPES:  # its sums are fp32: a float64 product would not compile (and gain nothing)
        raise ValueError(f"flash_attention: dtype {q.dtype} of q is not one of the kernel's {DTYPES}")
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        raise ValueError(f"flash_attention: head_dim {D} of q is not one of the kernel's {HEAD_DIMS}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        # Offsets within one batch row are int32 in the kernels' loops (int64 there costs registers the backward
        # has not got): Llama 3 405B's q at 128K tokens in the model's layout, 2**31 - 1 at its last element, fits.
        span = sum((n - 1) * s for n, s in zip(x.shape[1:], x.stride()[1:]))
        if span >= 2 ** 31:
            raise ValueError(f"flash_attention: {name} {tuple(x.shape)} with strides {x.stride()} puts its last "
                             f"element of a batch row at {span:,}, past the kernels' int32 offsets (2**31 - 1)")
    if q.shape[1] > GRID_CAP:
        raise ValueError(f"flash_attention: q has {q.shape[1]} heads, over the {GRID_CAP} a CUDA grid axis holds")
    if q.shape[0] <= GRID_CAP:
        return _FlashAttention.apply(q, k, v, doc_ids)
    # a larger batch goes in parts (each finds its own documents' spans: doc_ids' slices miss _spans_once's cache)
    parts = [slice(i, i + GRID_CAP) for i in range(0, q.shape[0], GRID_CAP)]
    return torch.cat([flash_attention(q[s], k[s], v[s], None if doc_ids is None else doc_ids[s]) for s in parts])


def attention_reference(q, k, v, doc_ids=None):
    """The spec, in plain PyTorch (fp32 math, the (T, Tk) mask and scores materialised).
    q (B, Hq, T, D), k and v (B, Hkv, Tk, D), doc_ids (B, T) or None -> (B, Hq, T, D) in q's dtype."""
    _check(q, k, v, doc_ids)
    B, Hq, T, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)       # (B, Hq, Tk, D): query head h uses kv head h // (Hq // Hkv)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    i = torch.arange(T, device=q.device)[:, None] + (Tk - T)    # query positions among the keys, bottom-right
    j = torch.arange(Tk, device=q.device)[None, :]
    visible = (j <= i)[None, None]                  # (1, 1, T, Tk)
    if doc_ids is not None:
        visible = visible & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])   # (B, 1, T, T)
    scores = (q.float() @ k.float().transpose(-2, -1)) * D ** -0.5                       # (B, Hq, T, Tk)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs @ v.float()).to(q.dtype)


_warned = set()


def _warn_once(msg):
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


def attention_sdpa(q, k, v, doc_ids=None):
    """The reference's mask given to PyTorch's fused attention (flash / memory-efficient CPU kernels):
    the path for tensors the Triton kernel does not take. Same shapes and semantics as attention_reference."""
    _check(q, k, v, doc_ids)
    T, Tk = q.shape[2], k.shape[2]
    if doc_ids is None and T == Tk:  # plain causal: SDPA's is_causal is top-left aligned, right only when T == Tk
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    i = torch.arange(T, device=q.device)[:, None] + (Tk - T)    # bottom-right aligned, as in the reference
    visible = (torch.arange(Tk, device=q.device)[None, :] <= i)[None, None]     # (1, 1, T, Tk)
    if doc_ids is not None:
        visible = visible & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])   # (B, 1, T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)


def attention(q, k, v, doc_ids=None):
    """Causal (document-masked, GQA) attention: the Triton kernel on CUDA tensors, PyTorch's SDPA elsewhere.
    See the module docstring for why TRITON_INTERPRET=1 does not send CPU tensors to the kernel."""
    if q.is_cuda:
        if HAS_TRITON and q.shape[-1] in HEAD_DIMS and q.dtype in DTYPES:
            return flash_attention(q, k, v, doc_ids)
        _warn_once(f"attention: Triton kernel unavailable (triton installed: {HAS_TRITON}, head_dim "
                   f"{q.shape[-1]}, dtype {q.dtype}); using PyTorch's SDPA on CUDA")
    return attention_sdpa(q, k, v, doc_ids)

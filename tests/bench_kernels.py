"""Benchmark of kernels/ on a GPU: our Triton attention and RMSNorm against PyTorch's. Prints ratio tables.

Attention, at Llama 3 8B's heads (32 query / 8 kv heads, head_dim 128), bf16, 16K tokens per batch (B = 16K / T):
forward and forward+backward TFLOP/s of kernels.attention.flash_attention against
- SDPA: F.scaled_dot_product_attention with the backend it picks: is_causal=True for causal rows, an
  explicit (B, 1, T, T) boolean mask for document rows; the forward table names its longest kernel, which
  says the backend (flash, cuDNN, memory-efficient). SDPA is given k and v with the kv heads already repeated
  (outside the timed region), so it does not pay for GQA;
- Flex: FlexAttention (torch.compile'd) with a block mask built from the same mask function, GQA native;
for causal rows and rows of 8 documents with random boundaries (seeded).
FLOPs count only the visible (query, key) pairs: 4*D per pair forward (QK^T, PV), 2.5x that backward
(5 products, FlashAttention-2's count), so document rows and causal rows report useful work alike.

RMSNorm at hidden 4096 and 8192 (16K rows, bf16 x, fp32 weight as under autocast): forward+backward GB/s of
rms_norm_triton against the eager reference and torch.compile of it. Bytes counted are the fewest a fused
kernel moves: x read twice (forward, backward), y written, dy read, dx written = 5 * rows * hidden * 2 bytes;
"of copy" is that rate over the card's device-to-device copy bandwidth, measured here. Each is timed as 8
norms chained like a model's layers with one backward through them, and ours also alone. Beside each wall time
the GPU's own kernel time (torch.profiler) is printed too: RMSNorm's "kernels only" GB/s, and for our attention
the split into forward, backward and the rest. A wall time well above it was spent waiting: RMSNorm's table
gives a chained norm's wall, kernel and host microseconds (the host's time to issue it, not waiting for the GPU):
a host time near the wall time, the host is the bound; both well under it, the gaps between kernels are. (The
host time is taken over chains issued back to back: timed each from a synchronised start, on the H200 it came out
above the wall time at hidden 4096, 378 against 264 us, 2026-11-28.)

    python tests/bench_kernels.py            # the full tables (a few minutes: autotuning, compiling)
    python tests/bench_kernels.py --quick    # T in {1K, 4K}
    mkdir -p out/base && for f in attention rmsnorm; do git show c75f879:kernels/$f.py > out/base/$f.py; done
    python tests/bench_kernels.py --against out/base   # + that version of the kernels, side by side
(c75f879: the kernels of 2026-11-27; on an H200 the next day ours ran fwd+bwd at 1.00-1.02x its speed causal,
1.02-1.06x with documents. b818606, of 2026-11-26: ours 1.00-1.14x. b4e136d: the backward in one kernel, on an
H100 0.80-0.92x the speed of the two.)
RMSNorm runs first (seconds): a time limit then cuts only the longest attention rows, which print as they are
measured, each with the block shapes autotuning picked. On a machine without CUDA it says so and exits 0 (the
kernels' CPU tests are tests/test_kernels.py).
"""
import argparse
import importlib.util
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, for `kernels`

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="T in {1K, 4K} only")
parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = tokens / T)")
parser.add_argument("--against", default=None, metavar="DIR",
                    help="another version of kernels/ (its attention.py and rmsnorm.py, e.g. one commit's from "
                         "git show), timed beside ours in every row: was a change to the kernels worth it?")
args = parser.parse_args()

if not torch.cuda.is_available():
    print("bench_kernels.py needs a CUDA GPU: it times the compiled Triton kernels against PyTorch's.\n"
          "On this machine run the kernels' tests instead: python -m pytest -q tests/test_kernels.py")
    sys.exit(0)

import triton  # noqa: E402  (after the CUDA check: a CPU-only machine may not have triton)

import kernels.attention as A  # noqa: E402
from kernels.attention import flash_attention  # noqa: E402
from kernels.rmsnorm import rms_norm_reference, rms_norm_triton  # noqa: E402

torch.manual_seed(0)
dev = torch.device("cuda")
print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")


def bench_ms(fn):
    """Median milliseconds of fn() over ~100 ms of repeats, after ~25 ms of warm-up (CUDA events)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def kernel_ms(fn, reps=5, torch_names=False):
    """Device time per call of each kernel fn() launches, {name: ms}, from torch.profiler (PyTorch's own kernels
    summed as "torch", or under their own names). Their sum against bench_ms(fn) says whether a wall time is
    the GPU's or the host's."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    ms = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name if torch_names or e.name.startswith("_") else "torch"   # ours: _attn_fwd, ...
            ms[name] = ms.get(name, 0.0) + e.time_range.elapsed_us() / 1e3 / reps
    return ms


def load_base(name):
    """--against: the other version's kernels/<name>.py as a module, run on the same inputs as ours."""
    spec = importlib.util.spec_from_file_location(f"base_{name}", os.path.join(args.against, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header, ["-" * w for w in widths]] + rows:
        print(" | ".join(str(x).rjust(w) for x, w in zip(r, widths)))


# ----------------------------------------------------------------------------- RMSNorm
src = torch.empty(2 ** 28, device=dev, dtype=torch.bfloat16)   # 512 MiB, far past the 50 MB L2
dst = torch.empty_like(src)
copy_gbs = 2 * src.numel() * 2 / bench_ms(lambda: dst.copy_(src)) / 1e6
src = dst = None   # (not del: the lambda above reads them)
compiled = torch.compile(rms_norm_reference, dynamic=False)   # (else its second shape compiles symbolic)
if args.against:
    print(f"base: the kernels in {args.against} (the 'base' columns)")
base_rms = load_base("rmsnorm") if args.against else None
rows = []
REPEAT = 8
for N in (4096, 8192):
    M = args.tokens
    x = torch.randn(M, N, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(N, device=dev)).requires_grad_()
    dy = torch.randn_like(x)
    err = (rms_norm_triton(x, w, 1e-5).float() - rms_norm_reference(x, w, 1e-5).float()).abs().max().item()
    gbs = {}
    impls = [("ours", rms_norm_triton), ("eager", rms_norm_reference), ("compile", compiled)]
    if base_rms is not None:
        impls.append(("base", base_rms.rms_norm_triton))
    def layers(fn):
        """REPEAT norms chained as a model's layers chain them, and one backward through them all. (Timed with an
        autograd.grad of its own per norm, the H100 machine gave 0.57-0.74 ms a call at hidden 4096 against 0.27
        ms of kernels, 0.64-1.10 at 8192 against 0.51: a cost per autograd.grad call, we guess, which a model
        pays once a step.)"""
        def run():
            y = x
            for _ in range(REPEAT):
                y = fn(y, w, 1e-5)
            return torch.autograd.grad(y, (x, w), dy)
        return run
    for name, fn in impls:
        gbs[name] = REPEAT * 5 * M * N * 2 / bench_ms(layers(fn)) / 1e6
    # a lone norm with its own backward: do_bench flushes the L2 first, and the host's start-up is not hidden
    lone = lambda: torch.autograd.grad(rms_norm_triton(x, w, 1e-5), (x, w), dy)  # noqa: E731
    one_call = 5 * M * N * 2 / bench_ms(lone) / 1e6
    # the GPU's time a norm in the chain, its kernels one after another (with autograd's sum of the 8 dweights):
    # well under the wall time, the GPU waited between kernels (launch gaps) or for the host
    kernels = max(1e-9, sum(kernel_ms(layers(rms_norm_triton)).values()) / REPEAT)
    # (1e-9: a profiler that saw no kernels must not cost the whole table)
    # the host's own time to issue the chain, GPU not waited for: near the wall time, the host is the bound.
    # 8 chains issued back to back after a warm-up one, so the host runs as in a training loop (on the H200 the
    # median of chains each issued from a synchronised start came out above the wall time itself, 2026-11-28)
    run = layers(rms_norm_triton)
    run()
    t0 = time.perf_counter()
    for _ in range(8):
        run()
    host_us = (time.perf_counter() - t0) / 8 / REPEAT * 1e6
    torch.cuda.synchronize()
    rows.append([N, M, f"{gbs['ours']:.0f}", f"{one_call:.0f}", f"{5 * M * N * 2 / kernels / 1e6:.0f}",
                 f"{5 * M * N * 2 / gbs['ours'] / 1e3:.0f}", f"{kernels * 1e3:.0f}", f"{host_us:.0f}",
                 f"{gbs['eager']:.0f}", f"{gbs['compile']:.0f}",
                 f"{gbs['ours'] / gbs['eager']:.2f}x", f"{gbs['ours'] / gbs['compile']:.2f}x",
                 f"{gbs['ours'] / copy_gbs:.0%}", f"{err:.1e}"] +
                ([f"{gbs['base']:.0f}", f"{gbs['ours'] / gbs['base']:.2f}x"] if base_rms is not None else []))
table(f"RMSNorm forward+backward (bf16 x, fp32 weight), GB/s; copy bandwidth measured {copy_gbs:.0f} GB/s",
      ["hidden", "rows", "ours", "ours, one call", "ours, kernels only", "wall us a norm", "kernel us a norm",
       "host us a norm", "eager", "compile", "vs eager", "vs compile", "of copy", "max err"] +
      (["base", "vs base"] if base_rms is not None else []), rows)


# ----------------------------------------------------------------------------- attention
base = load_base("attention") if args.against else None
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    # static shapes, as FlexAttention's docs ask: by default the second T compiles with T symbolic, and inductor,
    # unable to prove T % 128 == 0, takes the bounds-checked kernel (our table of 2026-11-27 had Flex that way
    # from T = 2K on)
    flex = torch.compile(flex_attention, dynamic=False)
    torch._dynamo.config.cache_size_limit = 64   # one compile per (T, mask) row: past the default 8 it runs eager
except ImportError:  # older torch
    flex = None
    print("FlexAttention not available in this torch: its columns are empty")

Hq, Hkv, D = 32, 8, 128


def tile(kernel):
    """The block shape autotuning picked at the kernel's last call: BLOCK_MxBLOCK_N, warps, stages (and the
    forward's PV_LAG loop, dk/dv's HEAD_LOOPS order, the HEADS_INNER launch order, when it won)."""
    c = getattr(kernel, "best_config", None)
    order = "".join(f" {flag}" for flag in ("PV_LAG", "HEAD_LOOPS", "HEADS_INNER") if c and c.kwargs.get(flag))
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}{order}" if c else "?"


fwd_rows, bwd_rows, skip_rows, split_rows = [], [], [], []
BWD = ("_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd")   # our two backward kernels; b4e136d's had one (--against)
Ts = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
t_start = time.time()
for T in Ts:
    B = max(1, args.tokens // T)
    q = torch.randn(B, Hq, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k_rep = k.detach().repeat_interleave(Hq // Hkv, 1).requires_grad_()   # (B, Hq, T, D) for SDPA
    v_rep = v.detach().repeat_interleave(Hq // Hkv, 1).requires_grad_()
    do = torch.randn_like(q)
    g = torch.Generator().manual_seed(T)
    cuts = torch.stack([torch.randperm(T - 1, generator=g)[:7].add(1).sort().values for _ in range(B)])  # (B, 7)
    doc_ids = (torch.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1).to(dev)   # (B, T): 8 documents a row
    spans_ms = bench_ms(lambda: A._doc_spans(doc_ids))   # once a batch (every layer shares doc_ids)
    times = {}
    for mask in ("causal", "8 docs"):
        docs = doc_ids if mask == "8 docs" else None
        if docs is None:
            pairs = B * T * (T + 1) / 2
        else:
            lengths = torch.stack([torch.bincount(r, minlength=8) for r in doc_ids.cpu()]).double()
            pairs = (lengths * (lengths + 1) / 2).sum().item()
        fwd_flop = 4 * D * Hq * pairs

        dense = (torch.arange(T, device=dev)[:, None] >= torch.arange(T, device=dev)[None, :])
        if docs is None:
            sdpa = lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)  # noqa: E731
        else:
            bool_mask = (dense & (docs[:, :, None] == docs[:, None, :]))[:, None]      # (B, 1, T, T)
            sdpa = lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=bool_mask)  # noqa: E731
        impls = {"ours": lambda: flash_attention(q, k, v, docs), "sdpa": sdpa}
        if base is not None:
            impls["base"] = lambda: base.flash_attention(q, k, v, docs)
        if flex is not None:
            if docs is None:
                mask_mod = lambda b, h, i, j: i >= j  # noqa: E731
            else:
                mask_mod = lambda b, h, i, j: (i >= j) & (docs[b, i] == docs[b, j])  # noqa: E731
            block_mask = create_block_mask(mask_mod, B, None, T, T, device=dev)
            impls["flex"] = lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)

        # correctness first: ours against SDPA on the same inputs (bf16: ~1e-2 relative is rounding)
        try:
            ref = impls["sdpa"]().float()
            err = ((impls["ours"]().float() - ref).norm() / ref.norm()).item()
            del ref
        except torch.OutOfMemoryError:
            err = float("nan")
            torch.cuda.empty_cache()
        tf = {}
        for name, fn in impls.items():
            leaves = (q, k_rep, v_rep) if name == "sdpa" else (q, k, v)
            try:
                torch.autograd.grad(fn(), leaves, do)   # compile / autotune outside the timing
                f_ms = bench_ms(fn)
                fb_ms = bench_ms(lambda: torch.autograd.grad(fn(), leaves, do))
            except torch.OutOfMemoryError:   # e.g. a masked SDPA that falls back to its math backend
                print(f"{name} at T={T}, {mask}: out of memory, left out")
                torch.cuda.empty_cache()
                continue
            tf[name] = (fwd_flop / f_ms / 1e9, 3.5 * fwd_flop / fb_ms / 1e9, f_ms, fb_ms)
        if "ours" not in tf:
            continue
        times[mask] = (tf["ours"][2], tf["ours"][3], pairs)
        sdpa_kernel = "-"
        if "sdpa" in tf:
            sdpa_kernels = kernel_ms(impls["sdpa"], torch_names=True)   # which backend SDPA picked: its kernel
            sdpa_kernel = max(sdpa_kernels, key=sdpa_kernels.get, default="-")[:48]
        splits = {}   # implementation -> its kernels' ms: forward, backward (dk/dv + dq if two), the rest
        for name in [n for n in ("ours", "base") if n in tf]:
            ms = kernel_ms(lambda: torch.autograd.grad(impls[name](), (q, k, v), do))
            total = sum(ms.values())
            splits[name] = [f"{ms.pop('_attn_fwd', 0.0):.2f}",
                            " + ".join(f"{ms.pop(kern):.2f}" for kern in BWD if kern in ms),
                            f"{sum(ms.values()):.2f}"]
            split_rows.append([T, mask, name, f"{tf[name][3]:.2f}", f"{total:.2f}"] + splits[name])
        ratio = lambda i, other: f"{tf['ours'][i] / tf[other][i]:.2f}x" if other in tf else "-"  # noqa: E731
        cell = lambda name, i: f"{tf[name][i]:.0f}" if name in tf else "-"  # noqa: E731
        vs_base = lambda i: [cell("base", i), ratio(i, "base")] if base is not None else []  # noqa: E731
        fwd_rows.append([T, B, mask, f"{tf['ours'][2]:.2f}", cell("ours", 0), cell("sdpa", 0), cell("flex", 0),
                         ratio(0, "sdpa"), ratio(0, "flex")] + vs_base(0) + [f"{err:.1e}", sdpa_kernel])
        bwd_rows.append([T, B, mask, f"{tf['ours'][3]:.2f}", cell("ours", 1), cell("sdpa", 1), cell("flex", 1),
                         ratio(1, "sdpa"), ratio(1, "flex")] + vs_base(1))
        tiles = ", ".join(f"{kern.fn.__name__} {tile(kern)}"
                          for kern in (A._attn_fwd, A._attn_bwd_dkdv, A._attn_bwd_dq))
        print(f"T={T} {mask}: fwd TF/s ours/SDPA/Flex {cell('ours', 0)}/{cell('sdpa', 0)}/{cell('flex', 0)}, "
              f"fwd+bwd {cell('ours', 1)}/{cell('sdpa', 1)}/{cell('flex', 1)}, err {err:.1e}; tiles: {tiles}; "
              f"kernel ms fwd/bwd/other {'/'.join(splits['ours'])} of {tf['ours'][3]:.2f} wall "
              f"({time.time() - t_start:.0f} s)" +
              (f"; base fwd/fwd+bwd TF/s {cell('base', 0)}/{cell('base', 1)}, kernel ms "
               f"{'/'.join(splits['base'])}" if "base" in splits else ""),
              flush=True)
    if len(times) == 2:  # (unless ours ran out of memory)
        (cf, cb, cp), (df, db, dp) = times["causal"], times["8 docs"]
        skip_rows.append([T, f"{dp / cp:.3f}", f"{df / cf:.3f}", f"{db / cb:.3f}", f"{spans_ms:.2f}"])
    q = k = v = k_rep = v_rep = do = None   # freed (the timed lambdas read these names: not del)
    torch.cuda.empty_cache()

head = ["T", "B", "mask", "ours ms", "ours TF/s", "SDPA TF/s", "Flex TF/s", "vs SDPA", "vs Flex"]
head += ["base TF/s", "vs base"] if base is not None else []
table(f"attention forward (bf16, {Hq}q/{Hkv}kv heads, D={D}, {args.tokens} tokens/batch)",
      head + ["err vs SDPA", "SDPA's longest kernel (its backend)"], fwd_rows)
table("attention forward+backward", head, bwd_rows)
table("where the forward+backward time goes: wall ms (as above) against the GPU's kernel ms (torch.profiler)",
      ["T", "mask", "kernels of", "wall", "kernels", "fwd", "bwd (dk/dv + dq; b4e136d: one kernel)",
       "other (delta, zeroing, casts)"],
      split_rows)
table("document masking: our time with 8 docs over our causal time (ideal = the ratio of visible pairs)",
      ["T", "pairs docs/causal", "fwd time docs/causal", "fwd+bwd time docs/causal", "doc spans ms, once a batch"],
      skip_rows)

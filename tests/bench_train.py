"""Benchmark of a training step (forward + backward + AdamW step), tokens/s: our Llama 3 model vs baselines.

CPU (always): the default "cpu" model and a nanoGPT-sized model (nanoGPT's shakespeare_char config: 6 layers,
6 heads, width 384, context 256), each against a plain-PyTorch GPT written below in the style of nanoGPT's
model.py (learned positions, LayerNorm, GELU MLP, causal F.scaled_dot_product_attention, tied embedding) at the
same width, depth and context. Ours trains on packed rows with the document mask, as train.py does; the
baseline, like nanoGPT, attends across documents. The two are timed in alternation so that the shared CPU's
load falls on both alike; the figure is the median step. Both in fp32, and both under bf16 autocast where the
CPU has bf16 matrix instructions (model.bf16_matmuls; train.py's default there).

GPU (when CUDA is present): a Llama 3.2 1B-shaped model, bf16 autocast, T = 4096 packed rows (documents of
random lengths, mean ~1000 tokens), 8 micro-steps per optimizer step (gradient accumulation, as train.py runs
it; the clipping + AdamW time is printed), tokens/s and MFU (6N + attention FLOPs per token, PaLM appendix B,
over the card's dense bf16 peak) with our Triton kernels (flash attention with the document mask, fused
RMSNorm) vs the same model on torch's F.scaled_dot_product_attention with the document mask as a boolean mask
+ torch's F.rms_norm (fused on CUDA in recent torch; until 2026-11-28 these rows had the reference's eager ops),
and vs SDPA causal-only (flash backend, no document mask: an upper bound that computes a different thing).
MFU counts attention as PaLM does, every query against all T keys (as nanoGPT and torchtitan do): under the
document mask the kernels compute fewer pairs, so MFU by the work done is lower (the README gives both).

    python tests/bench_train.py                 # CPU part; the GPU part too when CUDA is available
    python tests/bench_train.py --compile       # both models' blocks torch.compile'd (as nanoGPT trains by default)
    python tests/bench_train.py --steps 20 --compile --skip_cpu   # GPU only: more steps, compiled blocks
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as llama  # noqa: E402

# -----------------------------------------------------------------------------
# the baseline: a plain GPT in the style of nanoGPT's model.py


class Block(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, dim, n_layers, n_heads, seq_len):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, dim), nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in nanoGPT

    def forward(self, idx, targets, doc_ids=None):  # doc_ids ignored: nanoGPT attends across documents
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x)).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


# -----------------------------------------------------------------------------
# the two paths of our model for the GPU comparison: swap the functions model.py calls

def sdpa_attention(q, k, v, doc_ids=None):
    """torch's SDPA with the same semantics as kernels.attention: causal + document mask, GQA."""
    T = q.shape[2]
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]  # (1, 1, T, T)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])  # (B, 1, T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def sdpa_causal(q, k, v, doc_ids=None):
    """Causal only, no document mask (lets SDPA pick its flash backend): not the same function, a bound."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def torch_rms_norm(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def use_paths(attention, rms_norm):
    llama.attention, llama.rms_norm = attention, rms_norm


KERNELS = (llama.attention, llama.rms_norm)  # what model.py imported: kernels.attention / kernels.rmsnorm


# -----------------------------------------------------------------------------
# timing

def packed_batch(B, T, vocab, device, mean_doc=1000, seed=0):
    """Random tokens with documents of random (exponential) lengths, as data.PackedLoader yields them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(vocab, (B, T + 1), generator=g)
    starts = torch.rand(B, T, generator=g) < 1 / mean_doc  # a new document starts here
    starts[:, 0] = False
    doc_ids = starts.cumsum(1)  # (B, T)
    return x[:, :-1].to(device), x[:, 1:].to(device), doc_ids.to(device)


def make_step(model, batch, device, autocast, micro_steps=1):
    """A training step as train.py takes it: micro_steps forward/backward passes over batch (gradient
    accumulation), then clipping and AdamW. step.optimizer_s: the last step's clipping + AdamW seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)  # as train.py, CPU too
    cuda = device.type == "cuda"
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None

    def step():
        for _ in range(micro_steps):
            with autocast:
                loss = model(*batch) / micro_steps
            loss.backward()
        t0 = time.perf_counter()
        if cuda:
            events[0].record()   # CUDA events time the GPU's work without a sync inside the step
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            events[1].record()
            torch.cuda.synchronize()
        step.optimizer_s = events[0].elapsed_time(events[1]) / 1e3 if cuda else time.perf_counter() - t0
    return step


def time_alternating(steps, n_warmup, n_steps):
    """{name: median seconds per step}, the candidates interleaved step by step."""
    times = {name: [] for name in steps}
    for i in range(n_warmup + n_steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= n_warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_part(args):
    device, rows = torch.device("cpu"), []
    llama.keep_freed_memory()  # as train.py on CPU; it serves both models, as they share this process
    configs = [  # name, our ModelArgs, batch size; train.py's default vocabulary (8192) for both
        ("train.py default (PRESETS['cpu'])", dataclasses.replace(llama.PRESETS["cpu"], vocab_size=8192), 8),
        ("nanoGPT shakespeare_char size", llama.ModelArgs(dim=384, n_layers=6, n_heads=6, n_kv_heads=6,
                                                          vocab_size=8192, multiple_of=32, max_seq_len=256,
                                                          tie_embeddings=True), 8),
    ]
    # fp32, and bf16 autocast (train.py's default on a CPU with bf16 matrix instructions) where the CPU has them
    dtypes = [torch.float32] + [torch.bfloat16] * llama.bf16_matmuls(device)
    for name, margs, B in configs:
        T = margs.max_seq_len
        torch.manual_seed(0)
        ours = llama.Transformer(margs)
        base = GPT(margs.vocab_size, margs.dim, margs.n_layers, margs.n_heads, T)
        batch = packed_batch(B, T, margs.vocab_size, device, mean_doc=args.mean_doc_cpu)
        if args.compile:  # per block, as train.py --compile does; the first steps (warm-up) compile
            for block in [*ours.layers, *base.blocks]:
                block.compile()
        tok = B * T
        params = (f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M / "
                  f"{sum(p.numel() for p in base.parameters()) / 1e6:.1f}M")
        for dtype in dtypes:
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
            med = time_alternating({"ours": make_step(ours, batch, device, autocast),
                                    "base": make_step(base, batch, device, autocast)}, args.warmup, args.steps)
            rows.append((name, f"{margs.n_layers}x{margs.dim}, T={T}, B={B}", str(dtype).split(".")[1], params,
                         f"{tok / med['ours']:,.0f}", f"{tok / med['base']:,.0f}", f"{med['base'] / med['ours']:.2f}x"))
    print(f"\nCPU ({torch.get_num_threads()} threads), training step tokens/s, median of {args.steps} steps, "
          f"compile={args.compile}")
    header = ("config", "shape", "matmuls", "params ours / base", "ours tok/s", "plain GPT tok/s", "ours / base")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def gpu_part(args, device=torch.device("cuda")):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    peak = llama.peak_flops(device)
    margs = dataclasses.replace(llama.PRESETS[args.model], max_seq_len=args.seq_len)
    B, T = args.batch_size, args.seq_len
    torch.manual_seed(0)
    model = llama.Transformer(margs).to(device)
    if args.compile:
        for block in model.layers:
            block.compile()
    batch = packed_batch(B, T, margs.vocab_size, device)
    step = make_step(model, batch, device, torch.autocast(device.type, dtype=torch.bfloat16), args.micro_steps)
    tokens = args.micro_steps * B * T                  # per optimizer step
    flops = model.flops_per_token(T) * tokens
    rows = []
    for label, paths in [("ours: Triton flash attention (doc mask) + fused RMSNorm", KERNELS),
                         ("SDPA with doc mask (boolean) + F.rms_norm", (sdpa_attention, torch_rms_norm)),
                         ("SDPA causal only, no doc mask (bound) + F.rms_norm", (sdpa_causal, torch_rms_norm))]:
        use_paths(*paths)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            sec = time_alternating({label: step}, args.warmup, args.steps)[label]
        except torch.OutOfMemoryError:
            rows.append((label, None, "OOM"))
            continue
        finally:
            use_paths(*KERNELS)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0
        rows.append((label, tokens / sec, f"MFU {flops / sec / peak:6.1%}" if peak else "MFU n/a", f"{mem:.1f} GiB",
                     f"clip + AdamW {step.optimizer_s * 1e3:.1f} ms of {sec * 1e3:.0f}"))
    print(f"\n{name} (peak {peak / 1e12 if peak else '?'} TFLOP/s bf16 dense), {args.model} shape, B={B}, T={T} "
          f"packed, {args.micro_steps} micro-steps per optimizer step, bf16 autocast, compile={args.compile}, "
          f"median of {args.steps} steps")
    base = rows[1][1]
    for label, tps, *rest in rows:
        ratio = f"{tps / base:.2f}x vs SDPA+mask" if tps and base else ""
        print(f"{label:56s} | {f'{tps:,.0f} tok/s' if tps else '':>14s} | {' | '.join(rest)} | {ratio}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mean_doc_cpu", type=int, default=400, help="mean document length of the CPU batches")
    p.add_argument("--model", default="llama3.2-1b", help="GPU: shape preset of model.py")
    p.add_argument("--batch_size", type=int, default=1, help="GPU")
    p.add_argument("--seq_len", type=int, default=4096, help="GPU")
    p.add_argument("--micro_steps", type=int, default=8,
                   help="GPU: forward/backward passes per optimizer step, as train.py's --tokens_per_step makes them "
                        "(its 1-GPU example: 32); with 1, the optimizer step over 1.2B fp32 weights weighs on each")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (both models)")
    p.add_argument("--skip_cpu", action="store_true")
    args = p.parse_args()
    if not args.skip_cpu:
        cpu_part(args)
    if torch.cuda.is_available():
        gpu_part(args)
    else:
        print("\nGPU part skipped: no CUDA device (run this file on a GPU machine for the 1B / T=4096 / MFU table)")

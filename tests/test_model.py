"""model.py against a plain reference written here: forward, GQA, RoPE scaling, KV cache, checkpoints.

    python -m pytest -q tests/test_model.py
"""
import contextlib
import errno
import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
import torch.nn.functional as F

import model as M
from model import CheckpointError, ModelArgs, Transformer


def tiny_args(**kw):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, rope_theta=10000.0,
                max_seq_len=64)
    return ModelArgs(**{**base, **kw})


def tiny_model(**kw):
    """A small model with weights large enough that every part of the forward moves the logits."""
    m = Transformer(tiny_args(**kw))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return m.eval()


# ---------------------------------------------------------------------------------------------- reference

def meta_apply_scaling(freqs, factor, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192):
    """Llama 3.1's rule, one frequency at a time with explicit branches (the spec in Meta's words)."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_freq_wavelen:
            out.append(f)
        elif wavelen > low_freq_wavelen:
            out.append(f / factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def reference_forward(sd, args, tokens, doc_ids=None):
    """Llama 3 forward from the state dict, in float64: RoPE as 2x2 rotations, repeated KV heads, explicit mask."""
    sd = {k: v.double() for k, v in sd.items()}
    B, T = tokens.shape
    Hq, Hkv, hd = args.n_heads, args.n_kv_heads, args.dim // args.n_heads

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps) * w

    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if args.use_scaled_rope:
        freqs = meta_apply_scaling(freqs, args.rope_scaling_factor)
    angle = torch.outer(torch.arange(T).double(), freqs)[None, :, None]  # (1, T, 1, hd/2)

    def rope(x):  # (B, T, H, hd): rotate each pair (x[2i], x[2i+1]) by angle t * f_i, a 2x2 rotation matrix
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x0 * angle.cos() - x1 * angle.sin()
        out[..., 1::2] = x0 * angle.sin() + x1 * angle.cos()
        return out

    mask = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(B, T, T)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
    h = sd["tok_embeddings.weight"][tokens]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        x = norm(h, sd[p + "attention_norm.weight"])
        q = rope((x @ sd[p + "attention.wq.weight"].T).view(B, T, Hq, hd))
        k = rope((x @ sd[p + "attention.wk.weight"].T).view(B, T, Hkv, hd)).repeat_interleave(Hq // Hkv, dim=2)
        v = (x @ sd[p + "attention.wv.weight"].T).view(B, T, Hkv, hd).repeat_interleave(Hq // Hkv, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        att = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        h = h + torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, -1) @ sd[p + "attention.wo.weight"].T
        x = norm(h, sd[p + "ffn_norm.weight"])
        ff = F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    return norm(h, sd["norm.weight"]) @ sd["output.weight"].T


# ---------------------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=4), dict(n_kv_heads=1, tie_embeddings=True),
                                dict(use_scaled_rope=True, rope_theta=500000.0, rope_scaling_factor=32.0)])
def test_forward_matches_reference(kw):
    m = tiny_model(**kw)
    tokens = torch.randint(0, 97, (2, 24))
    ref = reference_forward(m.state_dict(), m.args, tokens)
    torch.testing.assert_close(m(tokens).double(), ref, atol=2e-4, rtol=1e-4)


def test_doc_ids_mask_matches_reference_and_separate_documents():
    m = tiny_model()
    tokens = torch.randint(0, 97, (2, 20))
    doc_ids = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4, [5] * 20])
    out = m(tokens, doc_ids=doc_ids)
    torch.testing.assert_close(out.double(), reference_forward(m.state_dict(), m.args, tokens, doc_ids),
                               atol=2e-4, rtol=1e-4)
    # a packed document sees only itself: same logits as when it is run alone (RoPE is relative)
    torch.testing.assert_close(out[0, 7:16], m(tokens[:1, 7:16])[0], atol=1e-4, rtol=1e-4)


def test_loss_is_mean_cross_entropy_over_kept_targets():
    m = tiny_model()
    tokens, targets = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    targets[0, :5] = -100
    loss = m(tokens, targets)
    logp = torch.log_softmax(m(tokens), -1)
    keep = targets != -100
    manual = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, manual)
    loss.backward()  # the training forward is differentiable end to end
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_cross_entropy_gives_the_plain_loss_and_gradients(bf16, device):
    """M.cross_entropy (the training loss, a chunk of rows at a time, gradients made in the forward pass) against
    F.cross_entropy on the full logits: 300 rows in chunks of 64 (the last one short), every 7th target and one
    whole chunk ignored, the loss scaled after (backward must scale the kept gradients). In bf16 (autocast) the loss
    is the plain one's (the same bf16 logits, softmax in fp32), but the gradients round differently, so each is held
    to a float64 reference: the chunked one no further from it than the plain one (x1.5), and under 1e-2 (bf16
    operands: both land near 4.5e-3 here)."""
    h = torch.randn(300, 32, device=device, requires_grad=True)
    w = (0.5 * torch.randn(1000, 32, device=device)).requires_grad_()
    targets = torch.randint(0, 1000, (300,), device=device)
    targets[::7], targets[64:128] = -100, -100
    exact = F.cross_entropy(F.linear(h.double(), w.double()), targets, ignore_index=-100)
    exact_grads = torch.autograd.grad(3 * exact, (h, w))

    def loss_and_grads(fn):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = fn()
        return [loss.double(), *torch.autograd.grad(3 * loss, (h, w))]
    plain = loss_and_grads(lambda: F.cross_entropy(F.linear(h, w).float(), targets, ignore_index=-100))
    chunked = loss_and_grads(lambda: M.cross_entropy(h, w, targets, chunk=64))
    assert chunked[1].dtype == h.dtype and chunked[2].dtype == w.dtype
    assert chunked[1][::7].abs().max() == 0 and chunked[1][64:128].abs().max() == 0  # ignored rows: no gradient
    if not bf16:
        for a, b in zip(chunked, plain):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    elif device == "cpu":  # the same bf16 logits, log-softmax in fp32: the plain loss to fp32 rounding (~1e-7 here,
        # where fp32 matmuls or a bf16 log-softmax land 1e-5 to 4e-5 off it, as far as the plain loss is from the exact
        # one). Not held on CUDA: cuBLAS may sum a 64-row chunk in another order than all 300 rows (other bf16 logits)
        assert abs(chunked[0] - plain[0]) < 2e-6 * plain[0], (chunked[0], plain[0])
    for a, b, ref in zip(chunked, plain, [exact, *exact_grads]):
        err, plain_err = ((x.double() - ref).norm() / ref.norm() for x in (a, b))
        assert err <= 1.5 * plain_err + 1e-6 and err < (1e-2 if bf16 else 1e-6), (err, plain_err)
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        torch.testing.assert_close(M.cross_entropy(h, w, targets), F.cross_entropy(h @ w.t(), targets))
    assert M.cross_entropy(h, w, torch.full_like(targets, -100)).isnan()  # nothing to average, as F.cross_entropy
    with pytest.raises(ValueError, match=r"hidden states \(300, 32\) and targets \(299,\)"):
        M.cross_entropy(h, w, targets[1:])


def test_chunked_cross_entropy_with_every_target_ignored_gives_zero_gradients():
    """Every target -100 (an SFT micro-batch, or one DDP rank's share, with no assistant tokens): the loss is nan, as
    F.cross_entropy's, but the gradients are F.cross_entropy's zeros, not nan (nan * 0 is nan: a rank weighed by a
    share of 0 would otherwise put nan into every rank's all-reduced gradients)."""
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    targets = torch.full((10,), -100)
    for scale in (1.0, 0.0):
        plain = torch.autograd.grad(scale * F.cross_entropy(h @ w.t(), targets, ignore_index=-100), (h, w))
        loss = M.cross_entropy(h, w, targets, chunk=3)
        assert loss.isnan()
        for a, b in zip(torch.autograd.grad(scale * loss, (h, w)), plain):
            assert torch.equal(a, b) and b.abs().max() == 0


def test_chunked_cross_entropy_never_holds_all_the_logits(peak_growth):
    """The point of the chunked loss, measured: forward + backward at 4096 rows and Llama 3's 128,256-token
    vocabulary, in a fresh process, grows its peak memory by less than one fp32 copy of the logits (2.1 GB;
    the plain loss holds about three: logits, log-softmax, gradient)."""
    grew = peak_growth("import torch, model\n"
                       "h = torch.randn(4096, 32, requires_grad=True)\n"
                       "w = (0.02 * torch.randn(128256, 32)).requires_grad_()\n"
                       "targets = torch.randint(0, 128256, (4096,))",
                       "model.cross_entropy(h, w, targets).backward()")
    assert grew < 4096 * 128256 * 4, f"peak grew by {grew / 1e9:.2f} GB"


def test_hidden_states_feed_the_output_head():
    m = tiny_model()
    tokens = torch.randint(0, 97, (1, 10))
    h = m.hidden_states(tokens)
    assert h.shape == (1, 10, 64)
    torch.testing.assert_close(m.output(h).float(), m(tokens))


def test_gqa_equals_multi_head_with_repeated_kv_heads():
    """n_kv_heads < n_heads is plain multi-head attention whose k/v heads are copied to each group."""
    gqa = tiny_model(n_kv_heads=2)
    mha = Transformer(tiny_args(n_kv_heads=4)).eval()
    sd = gqa.state_dict()
    for i in range(2):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            sd[key] = sd[key].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)  # (Hkv, hd, dim) -> Hq
    mha.load_state_dict(sd)
    tokens = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(gqa(tokens), mha(tokens), atol=1e-4, rtol=1e-4)


def test_mha_attention_equals_sdpa():
    """With n_kv_heads = n_heads, one Attention module is textbook causal multi-head attention."""
    m = tiny_model(n_kv_heads=4)
    attn = m.layers[0].attention
    x = torch.randn(2, 10, 64)
    rot = m.rope(torch.arange(10)[None])
    q = M.apply_rotary_emb(attn.wq(x).view(2, 10, 4, 16), rot).transpose(1, 2)
    k = M.apply_rotary_emb(attn.wk(x).view(2, 10, 4, 16), rot).transpose(1, 2)
    v = attn.wv(x).view(2, 10, 4, 16).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 10, 64)
    torch.testing.assert_close(attn(x, rot), attn.wo(y), atol=1e-5, rtol=1e-5)


def test_rope_scaling_against_hand_computed_frequencies():
    args = ModelArgs(dim=4096, n_heads=32, use_scaled_rope=True, rope_scaling_factor=8.0)
    freqs = M.rope_frequencies(args).double()
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    torch.testing.assert_close(freqs, meta_apply_scaling(plain, 8.0), rtol=1e-6, atol=0)
    # by hand: f_0 = 1 (wavelength 2 pi < 2048) is kept; the slowest, wavelength ~2.5e6 > 8192, is divided by 8
    assert freqs[0].item() == 1.0
    assert freqs[-1].item() == pytest.approx(500000.0 ** (-126 / 128) / 8, rel=1e-6)
    # a frequency in the blend band: wavelength 4096 -> smooth = (8192/4096 - 1) / 3 = 1/3
    f = torch.tensor([2 * math.pi / 4096])
    assert M.scale_rope_frequencies(f, 8.0).item() == pytest.approx((2 / 3) * f.item() / 8 + (1 / 3) * f.item())
    torch.testing.assert_close(M.rope_frequencies(ModelArgs(dim=4096, n_heads=32)).double(), plain, rtol=1e-6, atol=0)
    # anchored at a model's own shorter context (train.py --init): the same wavelength 4096 is now > 2048 / 1
    short = ModelArgs(dim=4096, n_heads=32, use_scaled_rope=True, rope_scaling_factor=8.0, rope_original_context=2048)
    assert M.rope_frequencies(short)[-1].item() == pytest.approx(freqs[-1].item(), rel=1e-6)
    # every frequency, against Meta's rule anchored at 2048 (the slowest alone is divided by 8 either way)
    torch.testing.assert_close(M.rope_frequencies(short).double(), meta_apply_scaling(plain, 8.0, old_context_len=2048),
                               rtol=1e-6, atol=0)
    assert M.scale_rope_frequencies(f, 8.0, original_context=2048).item() == pytest.approx(f.item() / 8)


# ---------------------------------------------------------------------------------------------- KV cache

def test_kv_cache_decoding_matches_full_forward_ragged_batch():
    m = tiny_model()
    lengths = [3, 7, 5]
    steps = 6
    seqs = [torch.randint(0, 97, (n + steps,)) for n in lengths]
    m.setup_cache(3, max(lengths) + steps)
    prompts = torch.zeros(3, max(lengths), dtype=torch.long)
    for b, n in enumerate(lengths):
        prompts[b, :n] = seqs[b][:n]
    with torch.no_grad():
        got = [[row] for row in m.output(m.forward_cached(prompts, 0)).float()]  # prefill, right-padded
        pos = torch.tensor(lengths)
        for s in range(steps):
            nxt = torch.stack([seqs[b][lengths[b] + s] for b in range(3)])[:, None]
            out = m.output(m.forward_cached(nxt, pos)).float()
            for b in range(3):
                got[b].append(out[b])
            pos = pos + 1
        for b, n in enumerate(lengths):
            cached = torch.cat([got[b][0][:n]] + got[b][1:])  # (n + steps, V) logits at every position
            torch.testing.assert_close(cached, m(seqs[b][None])[0], atol=1e-4, rtol=1e-4)
    m.clear_cache()
    assert m.layers[0].attention.cache_k is None


def test_kv_cache_chunks_at_shared_position_match_full_forward():
    """Chat: the conversation grows chunk by chunk in the cache (int start_pos, bottom-right causal)."""
    m = tiny_model(tie_embeddings=True)
    tokens = torch.randint(0, 97, (2, 30))
    m.setup_cache(2, 40)
    with torch.no_grad():
        parts = [m.forward_cached(tokens[:, a:b], a) for a, b in [(0, 11), (11, 12), (12, 25), (25, 30)]]
        torch.testing.assert_close(m.output(torch.cat(parts, 1)).float(), m(tokens), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="KV cache holds 2 rows x 40 positions"):
        m.forward_cached(tokens[:, :11], 30)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the model on the Triton kernels")
def test_model_on_gpu_kernels_matches_cpu():
    """The model on CUDA (attention() and rms_norm() take the Triton kernels) against the same weights on CPU
    (PyTorch's SDPA, the reference RMSNorm), fp32: the loss and every gradient on packed rows with GQA; then
    a KV-cache prefill, a chunk (Tk > T) and one decoded token against the full forward."""
    device = "cuda"
    cpu = tiny_model(dim=128, n_heads=4, n_kv_heads=2, max_seq_len=160)   # head_dim 32, GQA 2
    dev = Transformer(cpu.args).to(device)
    dev.load_state_dict(cpu.state_dict())
    tokens, targets = torch.randint(0, 97, (2, 150)), torch.randint(0, 97, (2, 150))
    doc_ids = torch.tensor([[0] * 70 + [1] * 80, [0] * 5 + [1] * 100 + [2] * 45])
    loss = cpu(tokens, targets, doc_ids)
    loss.backward()
    loss_dev = dev(tokens.to(device), targets.to(device), doc_ids.to(device))
    loss_dev.backward()
    # the kernels' tl.dot rounds fp32 operands to tf32 (10-bit mantissa): ~1e-3 relative, not fp32's 1e-6
    assert abs(loss_dev.item() - loss.item()) < 1e-3 * loss.item()
    for (name, p), p_dev in zip(cpu.named_parameters(), dev.parameters()):
        err = ((p_dev.grad.cpu() - p.grad).norm() / p.grad.norm()).item()
        assert err < 1e-2, f"{name}: gradient differs by {err:.1e} (relative)"
    with torch.no_grad():
        full = dev(tokens.to(device))[:, :121]
        dev.setup_cache(2, 121)
        parts = [dev.forward_cached(tokens[:, a:b].to(device), a) for a, b in [(0, 100), (100, 120), (120, 121)]]
        dev.clear_cache()
        cached = dev.output(torch.cat(parts, 1)).float()
    assert ((cached - full).norm() / full.norm()).item() < 1e-3


def test_compiled_blocks_with_kernels_match_eager(monkeypatch):
    """train.py --compile on a GPU: each block torch.compile'd with the Triton kernels inside it, where
    torch.compile stops and runs them as they are (they are torch.compiler.disable'd). On CPU the kernels run
    in the interpreter, sent there by hand (attention() gives CPU tensors to SDPA). The compiled blocks must
    give the eager model's loss and gradients on packed rows with GQA."""
    from kernels import attention as A, rmsnorm as R
    if not A.HAS_TRITON:
        pytest.skip("needs triton")
    monkeypatch.setattr(M, "attention", A.flash_attention)
    monkeypatch.setattr(M, "rms_norm", R.rms_norm_triton)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = tiny_model().to(device)                    # head_dim 16, GQA 2
    tokens, targets = torch.randint(0, 97, (2, 40), device=device), torch.randint(0, 97, (2, 40), device=device)
    doc_ids = torch.tensor([[0] * 13 + [1] * 27, [0] * 40], device=device)

    def loss_and_grads():
        m.zero_grad()
        loss = m(tokens, targets, doc_ids)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    loss, grads = loss_and_grads()
    for block in m.layers:
        block.compile(backend="aot_eager")   # Dynamo and AOTAutograd as under Inductor, without its compile time
    try:
        loss_c, grads_c = loss_and_grads()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss_c, loss)
    for (name, _), g, g_c in zip(m.named_parameters(), grads, grads_c):
        torch.testing.assert_close(g_c, g, msg=lambda msg: f"{name}: {msg}")


def test_cache_needs_setup_and_respects_max_seq_len():
    m = tiny_model()
    with pytest.raises(RuntimeError, match="setup_cache"):
        m.forward_cached(torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="max_seq_len 64"):
        m.setup_cache(1, 65)


# ---------------------------------------------------------------------------------------------- shapes, counts

def test_model_args_validation():
    with pytest.raises(ValueError, match="dim=100 is not a multiple of n_heads=3"):
        ModelArgs(dim=100, n_heads=3)
    with pytest.raises(ValueError, match="n_heads=6 is not a multiple of n_kv_heads=4"):
        ModelArgs(dim=96, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="head_dim=3 must be even"):
        ModelArgs(dim=12, n_heads=4)
    assert ModelArgs(dim=64, n_heads=4).n_kv_heads == 4
    with pytest.raises(ValueError, match=r"unknown fields \['bogus'\]"):
        ModelArgs.from_params({"dim": 64, "bogus": 1})
    args = tiny_args(tie_embeddings=True)
    assert ModelArgs.from_params(json.loads(json.dumps(args.to_params()))) == args
    assert "ffn_hidden_dim" not in args.to_params()  # Meta's loader does not know our extra fields


@pytest.mark.parametrize("name, total, hidden", [
    ("llama3.2-1b", 1_235_814_400, 8192), ("llama3.2-3b", 3_212_749_824, 8192),
    ("llama3-8b", 8_030_261_248, 14336), ("llama3-70b", 70_553_706_496, 28672),
    ("llama3.1-405b", 405_853_388_800, 53248)])
def test_presets_have_meta_shapes(name, total, hidden):
    """Parameter counts of Meta's releases (8B: 8.03B, 70B: 70.6B, 405B: 405.9B; HF model cards)."""
    with torch.device("meta"):
        m = Transformer(M.PRESETS[name])
    assert m.num_params(exclude_embedding=False) == total
    assert m.layers[0].feed_forward.w1.weight.shape[0] == hidden


def test_cpu_preset_is_small_and_counts_flops():
    m = Transformer(M.PRESETS["cpu"])
    n = m.num_params()
    assert 2e6 < n < 20e6
    a = m.args
    assert m.flops_per_token(256) == 6 * n + 12 * a.n_layers * a.n_heads * a.head_dim * 256
    untied = tiny_model()
    assert untied.num_params() == untied.num_params(exclude_embedding=False) - 97 * 64


def test_configure_optimizer_decays_matrices_only():
    m = tiny_model()
    opt = m.configure_optimizer(lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_keep_freed_memory_stops_page_faults():
    """A 64 MB tensor made ten times: without the setting each is a fresh mmap whose 16,384 pages all fault
    (train.py's logits on CPU); with it, freed memory is reused. The first few may still land on new pages,
    depending on what else sits on the heap, so the typical (median) allocation is compared. Each in a fresh
    process."""
    code = ("import resource, statistics, sys, torch, model\n"
            "if sys.argv[1] == '1' and not model.keep_freed_memory(): sys.exit(3)\n"
            "faults = []\n"
            "for _ in range(10):\n"
            "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    torch.ones(16 << 20)\n"
            "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
            "print(statistics.median(faults))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = [subprocess.run([sys.executable, "-c", code, flag], cwd=root, capture_output=True, text=True)
            for flag in ("0", "1")]
    if runs[1].returncode == 3:
        pytest.skip("not glibc: keep_freed_memory does nothing here")
    without, kept = (float(r.stdout) for r in runs)
    assert kept * 10 < without, (kept, without)


def test_meta_device_build_then_init():
    """Build on the meta device (no memory), materialise, init: the same weights as a CPU build, still tied."""
    with torch.device("meta"):
        m = Transformer(tiny_args(tie_embeddings=True))
    m.to_empty(device="cpu")
    torch.manual_seed(1)
    m.init_weights()
    ref = Transformer(tiny_args(tie_embeddings=True))
    torch.manual_seed(1)
    ref.init_weights()
    assert m.output.weight is m.tok_embeddings.weight
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ref.parameters()))


def test_init_is_deterministic_and_scaled():
    torch.manual_seed(3)
    a = Transformer(tiny_args(n_layers=8))
    torch.manual_seed(3)
    b = Transformer(tiny_args(n_layers=8))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    # the residual-stream writes (wo, w2) at 0.02 / sqrt(2 * 8) = 0.005, the rest at 0.02; each matrix has >= 4096
    # entries, so its sample std is within ~1.1% (1 / sqrt(2n)) of the true one: rel=0.1 is wide and still 4x apart
    layer = a.layers[0]
    for w, std in [(layer.attention.wq, 0.02), (layer.attention.wo, 0.005), (layer.feed_forward.w1, 0.02),
                   (layer.feed_forward.w2, 0.005)]:
        assert w.weight.std().item() == pytest.approx(std, rel=0.1), w


# ---------------------------------------------------------------------------------------------- checkpoints

def test_save_load_round_trip(tmp_path):
    m = tiny_model(tie_embeddings=True)
    (tmp_path / "tok.model").write_bytes(b"dGVzdA== 0\n")
    M.save_model(m, tmp_path / "ckpt", tokenizer_path=tmp_path / "tok.model")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["consolidated.00.pth", "params.json",
                                                                      "tokenizer.model"]
    assert json.loads((tmp_path / "ckpt" / "params.json").read_text())["n_kv_heads"] == 2
    # tied: under both names, as Meta's 3.2 1B/3B, one tensor (separate copies off a GPU were two)
    sd = torch.load(tmp_path / "ckpt" / "consolidated.00.pth")
    assert sd["output.weight"].data_ptr() == sd["tok_embeddings.weight"].data_ptr()
    loaded = M.load_model(tmp_path / "ckpt")
    assert loaded.args == m.args and loaded.output.weight is loaded.tok_embeddings.weight
    tokens = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(loaded(tokens), m(tokens), atol=0, rtol=0)
    assert M.load_model(tmp_path / "ckpt", dtype=torch.bfloat16).output.weight.dtype == torch.bfloat16


def test_average_models_and_their_reward_heads(tmp_path):
    """model.py --average: each tensor's mean (tied embeddings too), the tokenizer kept, a reward model's head
    averaged with it; another shape or another tokenizer refused by name, in one line from the CLI."""
    (tmp_path / "tok.model").write_bytes(b"dGVzdA== 0\n")
    models = [tiny_model(tie_embeddings=True) for _ in range(3)]
    for i, m in enumerate(models):
        torch.nn.init.normal_(m.layers[0].attention.wq.weight)  # (tiny_model's seed: three different models)
        M.save_model(m, tmp_path / f"m{i}", tokenizer_path=tmp_path / "tok.model")
        M.atomic_save({"weight": torch.full((1, 8), float(i))}, tmp_path / f"m{i}" / "reward_head.pth")
    paths = [str(tmp_path / f"m{i}") for i in range(3)]
    r = subprocess.run([sys.executable, "model.py", "--average", *paths, "--out", str(tmp_path / "avg")],
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True)
    assert r.returncode == 0 and "the mean of" in r.stdout, r.stderr
    avg = M.load_model(tmp_path / "avg")
    for k, t in avg.state_dict().items():
        torch.testing.assert_close(t, sum(m.state_dict()[k] for m in models) / 3, rtol=0, atol=1e-6, msg=k)
    assert avg.output.weight is avg.tok_embeddings.weight and not torch.equal(*(m.layers[0].attention.wq.weight
                                                                                 for m in models[:2]))
    assert (tmp_path / "avg" / "tokenizer.model").read_bytes() == (tmp_path / "tok.model").read_bytes()
    assert torch.equal(torch.load(tmp_path / "avg" / "reward_head.pth")["weight"], torch.full((1, 8), 1.0))
    M.save_model(tiny_model(dim=32, tie_embeddings=True), tmp_path / "wide", tokenizer_path=tmp_path / "tok.model")
    M.atomic_save({"weight": torch.zeros(1, 8)}, tmp_path / "wide" / "reward_head.pth")
    with pytest.raises(CheckpointError, match=r"wide: not the architecture of .*m0: dim 32 \(in .*m0: 64\)$"):
        M.average_models([paths[0], str(tmp_path / "wide")], tmp_path / "x")
    with pytest.raises(CheckpointError, match="avg: already there: give a new folder"):  # (no stale files mixed in)
        M.average_models(paths, tmp_path / "avg")
    M.save_model(models[0], tmp_path / "plain", tokenizer_path=tmp_path / "tok.model")  # no reward head
    with pytest.raises(CheckpointError, match=r"plain: has no other .pth files, .*m0 \['reward_head.pth'\]"):
        M.average_models([paths[0], str(tmp_path / "plain")], tmp_path / "x")
    with pytest.raises(ValueError, match="each once"):
        M.average_models([paths[0], paths[0] + "/"], tmp_path / "x")
    (tmp_path / "m2" / "tokenizer.model").write_bytes(b"dGVzdQ== 0\n")
    r = subprocess.run([sys.executable, "model.py", "--average", *paths, "--out", str(tmp_path / "y")],
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True)
    assert r.returncode == 1 and "not all with the same tokenizer.model" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    r = subprocess.run([sys.executable, "model.py", "--out", str(tmp_path / "y")],   # (it printed the presets)
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True)
    assert r.returncode == 2 and "--out is where --average writes" in r.stderr, r.stderr


def test_atomic_save_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / "state.pt"
    M.atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        M.atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind


@pytest.mark.parametrize("name", ["consolidated.00.pth", "tokenizer.model", "params.json"])
def test_save_model_over_a_checkpoint_keeps_a_file_whose_write_fails(tmp_path, monkeypatch, name):
    """save_model writes each file atomically: one whose write fails part way (a full disk) over an existing
    checkpoint is left as it was, and nothing is left beside it."""
    (tmp_path / "old.model").write_bytes(b"dGVzdA== 0\n")
    (tmp_path / "new.model").write_bytes(b"dGVzdQ== 0\n")
    M.save_model(tiny_model(), tmp_path / "ckpt", tokenizer_path=tmp_path / "old.model")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    real_open = open

    def fill_the_disk(file, mode="wb"):  # a few bytes land, then the disk is full
        with real_open(file, mode) if isinstance(file, (str, os.PathLike)) else contextlib.nullcontext(file) as f:
            f.write(b"PK" if "b" in mode else "PK")
        raise OSError(errno.ENOSPC, "No space left on device")

    def failing_open(file, mode="r", *args, **kwargs):
        if "w" in mode and name in os.fspath(file):
            fill_the_disk(file, mode)
        return real_open(file, mode, *args, **kwargs)
    if name == "consolidated.00.pth":
        monkeypatch.setattr(torch, "save", lambda obj, f, *args, **kwargs: fill_the_disk(f))
    else:  # (pathlib opens through io.open)
        monkeypatch.setattr("builtins.open", failing_open)
        monkeypatch.setattr(io, "open", failing_open)
    with pytest.raises(OSError, match="No space left on device"):
        M.save_model(tiny_model(ffn_hidden_dim=48), tmp_path / "ckpt", tokenizer_path=tmp_path / "new.model")
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    assert after.keys() == before.keys() and after[name] == before[name]


class MetaModelArgs:
    """Meta's reference code (meta-llama/llama-models, models/llama3/args.py): defaults as class attributes, and an
    __init__ that keeps only the keys it has (hasattr). Its loader (generation.py, Llama.build) calls it as
    ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)."""
    dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of, ffn_dim_multiplier = 4096, 32, 32, None, -1, 256, None
    norm_eps, rope_theta, use_scaled_rope, max_batch_size, max_seq_len = 1e-5, 500000, False, 32, 2048

    def __init__(self, **kwargs):
        for k, v in kwargs.items():
            if hasattr(self, k):
                setattr(self, k, v)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads


def meta_shapes(p):
    """The tensor shapes Meta's llama3 model.py builds from its ModelArgs p (FeedForward: its hidden-size rule)."""
    hidden = int(2 * (4 * p.dim) / 3)
    if p.ffn_dim_multiplier is not None:
        hidden = int(p.ffn_dim_multiplier * hidden)
    hidden = p.multiple_of * ((hidden + p.multiple_of - 1) // p.multiple_of)
    q, kv = p.dim // p.n_heads * p.n_heads, p.dim // p.n_heads * p.n_kv_heads
    shapes = {"tok_embeddings.weight": (p.vocab_size, p.dim), "norm.weight": (p.dim,),
              "output.weight": (p.vocab_size, p.dim)}
    for i in range(p.n_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in {
            "attention.wq.weight": (q, p.dim), "attention.wk.weight": (kv, p.dim), "attention.wv.weight": (kv, p.dim),
            "attention.wo.weight": (p.dim, q), "feed_forward.w1.weight": (hidden, p.dim),
            "feed_forward.w2.weight": (p.dim, hidden), "feed_forward.w3.weight": (hidden, p.dim),
            "attention_norm.weight": (p.dim,), "ffn_norm.weight": (p.dim,)}.items()})
    return shapes


@pytest.mark.parametrize("kw", [
    dict(), dict(use_scaled_rope=True, tie_embeddings=True), dict(ffn_hidden_dim=200), dict(ffn_hidden_dim=1),
    dict(ffn_hidden_dim=100_003, dim=96, n_heads=6),
    # Hugging Face's Llama 3 8B, 70B, 3.2 1B, 3B (intermediate_size given, multiple_of left at its default)
    dict(dim=4096, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336, vocab_size=128256, n_layers=1),
    dict(dim=8192, n_heads=64, n_kv_heads=8, ffn_hidden_dim=28672, vocab_size=128256, n_layers=1),
    dict(dim=2048, n_heads=32, n_kv_heads=8, ffn_hidden_dim=8192, vocab_size=128256, n_layers=1),
    dict(dim=3072, n_heads=24, n_kv_heads=8, ffn_hidden_dim=8192, vocab_size=128256, n_layers=1)])
def test_params_json_loads_in_metas_reference_code(kw):
    """Meta's loader passes max_seq_len itself (a second one in params.json was a TypeError) and sizes the SwiGLU
    from multiple_of / ffn_dim_multiplier, never reading our ffn_hidden_dim: it must build our shapes."""
    args = tiny_args(**{"multiple_of": 256, **kw} if "ffn_hidden_dim" in kw else kw)
    params = json.loads(json.dumps(args.to_params()))
    meta = MetaModelArgs(max_seq_len=512, max_batch_size=4, **params)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    assert meta_shapes(meta) == ours
    assert params["context_len"] == args.max_seq_len and ModelArgs.from_params(params).max_seq_len == args.max_seq_len
    assert ("use_scaled_rope" in params) == args.use_scaled_rope  # Meta's Llama 3 8B/70B files have no such key
    assert None not in params.values()  # (Meta's files leave out what is None: HF's converter multiplies by it)


def test_params_json_round_trip_keeps_context_rope_and_ffn(tmp_path):
    m = tiny_model(ffn_hidden_dim=200, use_scaled_rope=True, rope_scaling_factor=4.0, max_seq_len=96)
    M.save_model(m, tmp_path / "meta_anchor")   # anchored at 8192, as Meta's code has it: no warning
    m.args.rope_original_context = 48   # what train.py --rope_factor writes: Meta's code would run other frequencies
    with pytest.warns(UserWarning, match="anchored at 48 tokens; Meta's llama-models anchors it at 8192"):
        M.save_model(m, tmp_path / "ckpt")
    params = json.loads((tmp_path / "ckpt" / "params.json").read_text())
    loaded = M.load_model(tmp_path / "ckpt")
    a = loaded.args
    assert (a.max_seq_len, a.rope_scaling_factor, M.swiglu_hidden_dim(a)) == (96, 4.0, 200)
    assert a.to_params() == params  # saving again writes the same file
    tokens = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(loaded(tokens), m(tokens), atol=0, rtol=0)
    # Llama 3.2 1B's shape with 3.1's factor 8: written, so not mistaken for Meta's files that leave out their 32
    args = ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, use_scaled_rope=True)
    (tmp_path / "1b").mkdir()
    (tmp_path / "1b" / "params.json").write_text(json.dumps(args.to_params()))
    torch.save({}, tmp_path / "1b" / "consolidated.00.pth")  # the shapes are all this reads
    assert M.read_meta_checkpoint(tmp_path / "1b")[0] == args
    # params.json written before context_len still loads; one that gives both is refused
    assert ModelArgs.from_params({"dim": 64, "n_heads": 4, "max_seq_len": 96}).max_seq_len == 96
    with pytest.raises(ValueError, match="both context_len and max_seq_len"):
        ModelArgs.from_params({"dim": 64, "n_heads": 4, "max_seq_len": 96, "context_len": 96})


# Meta's fairscale split of each weight across model-parallel ranks (meta-llama/llama3 model.py):
# ColumnParallelLinear (wq, wk, wv, w1, w3, output) and VocabParallelEmbedding on dim 0,
# RowParallelLinear (wo, w2) on dim 1, norms copied to every rank.
def meta_shards(sd, n):
    shards = [{} for _ in range(n)]
    for key, t in sd.items():
        leaf = key.split(".")[-2]
        dim = 0 if leaf in ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings") else \
            1 if leaf in ("wo", "w2") else None
        for i in range(n):
            shards[i][key] = t.clone() if dim is None else t.chunk(n, dim=dim)[i].clone()
    return shards


def write_meta_dir(path, m, n_shards):
    path.mkdir()
    params = {k: v for k, v in m.args.to_params().items() if k != "context_len"}  # Meta omits it
    (path / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(meta_shards(m.state_dict(), n_shards)):
        shard["rope.freqs"] = torch.zeros(8)  # a buffer older Meta checkpoints carry; the loader drops it
        torch.save(shard, path / f"consolidated.{i:02d}.pth")


def test_meta_sharded_checkpoint_loads(tmp_path):
    m = tiny_model(vocab_size=96)
    write_meta_dir(tmp_path / "meta", m, n_shards=2)
    loaded = M.load_model(tmp_path / "meta")
    tokens = torch.randint(0, 96, (2, 11))
    torch.testing.assert_close(loaded(tokens), m(tokens), atol=0, rtol=0)
    assert loaded.args.max_seq_len == 8192  # Llama 3's context when params.json does not say


def test_meta_checkpoint_missing_a_shard_names_it(tmp_path):
    """(review, helper) Of 8 model-parallel shards, consolidated.03.pth missing was refused as a tensor whose shape
    did not match the config: params.json does not give the number of shards, their numbered names do, and (the
    last one missing) the share of wq's rows in each."""
    write_meta_dir(tmp_path / "meta", tiny_model(vocab_size=96), n_shards=8)
    (tmp_path / "meta" / "consolidated.03.pth").unlink()
    with pytest.raises(CheckpointError, match=r"meta: consolidated.03.pth missing \(the shards are numbered up to "
                                              r"consolidated.07.pth\)"):
        M.load_model(tmp_path / "meta")
    (tmp_path / "meta" / "consolidated.00.pth").unlink()
    with pytest.raises(CheckpointError, match="meta: consolidated.00.pth, consolidated.03.pth missing"):
        M.load_model(tmp_path / "meta")
    write_meta_dir(tmp_path / "tail", tiny_model(vocab_size=96), n_shards=8)  # the last one: no gap in the names
    (tmp_path / "tail" / "consolidated.07.pth").unlink()
    with pytest.raises(CheckpointError, match=r"tail: consolidated.07.pth missing \(each shard holds 1/8 of wq's"):
        M.load_model(tmp_path / "tail")


def write_safetensors(path, tensors):
    """The format, written by hand: u64 header size, JSON header, raw little-endian bytes."""
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def hf_permute(w, n_heads):
    """What HF's convert_llama_weights_to_hf.py does to wq/wk: interleaved pairs -> two halves per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def write_hf_dir(path, m):
    a = m.args
    path.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "hidden_size": a.dim, "intermediate_size": M.swiglu_hidden_dim(a), "num_hidden_layers": a.n_layers,
              "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "vocab_size": a.vocab_size,
              "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta, "max_position_embeddings": a.max_seq_len,
              "tie_word_embeddings": a.tie_embeddings, "attention_bias": False, "mlp_bias": False,
              "torch_dtype": "float32"}
    if a.use_scaled_rope:
        config["rope_scaling"] = {"rope_type": "llama3", "factor": a.rope_scaling_factor, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (path / "config.json").write_text(json.dumps(config))
    hf_names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}
    files = [{}, {}]
    for key, t in m.state_dict().items():
        if key == "tok_embeddings.weight":
            files[0]["model.embed_tokens.weight"] = t
        elif key == "output.weight":
            if not a.tie_embeddings:
                files[1]["lm_head.weight"] = t
        elif key == "norm.weight":
            files[1]["model.norm.weight"] = t
        else:
            _, i, rest = key.split(".", 2)
            module = rest.rsplit(".", 1)[0]
            if module == "attention.wq":
                t = hf_permute(t, a.n_heads)
            elif module == "attention.wk":
                t = hf_permute(t, a.n_kv_heads)
            files[int(i) % 2][f"model.layers.{i}.{hf_names[module]}.weight"] = t
    weight_map = {}
    for i, tensors in enumerate(files):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        write_safetensors(path / name, tensors)
        weight_map.update({k: name for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=True, use_scaled_rope=True, rope_scaling_factor=32.0)])
def test_hf_directory_loads(tmp_path, kw):
    m = tiny_model(**kw)
    write_hf_dir(tmp_path / "hf", m)
    loaded = M.load_model(tmp_path / "hf")
    assert loaded.args.use_scaled_rope == m.args.use_scaled_rope
    tokens = torch.randint(0, 97, (2, 13))
    torch.testing.assert_close(loaded(tokens), m(tokens), atol=1e-5, rtol=1e-5)


def test_hf_directory_matches_transformers(tmp_path):
    """The same directory in Hugging Face's own LlamaForCausalLM (only where transformers is installed)."""
    transformers = pytest.importorskip("transformers")
    m = tiny_model(use_scaled_rope=True, rope_scaling_factor=8.0)
    write_hf_dir(tmp_path / "hf", m)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, m(tokens), atol=1e-4, rtol=1e-4)


def test_directory_saved_by_transformers_loads(tmp_path):
    """A directory written by transformers' own save_pretrained (its config style, its safetensors writer)."""
    transformers = pytest.importorskip("transformers")
    m = tiny_model(tie_embeddings=True, use_scaled_rope=True, rope_scaling_factor=32.0)
    write_hf_dir(tmp_path / "hf", m)
    transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "resaved")
    loaded = M.load_model(tmp_path / "resaved")
    assert loaded.args.use_scaled_rope and loaded.args.rope_scaling_factor == 32.0
    tokens = torch.randint(0, 97, (2, 13))
    torch.testing.assert_close(loaded(tokens), m(tokens), atol=1e-5, rtol=1e-5)


def test_safetensors_plain_reader(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4).bfloat16(), "c": torch.arange(6).view(2, 3),
               "empty": torch.zeros(0, 3)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    got = M.read_safetensors_plain(tmp_path / "x.safetensors")
    assert got.keys() == tensors.keys()
    for k in tensors:
        assert got[k].dtype == tensors[k].dtype and torch.equal(got[k], tensors[k])
    try:  # the package's own files read the same (only where safetensors is installed)
        from safetensors.torch import save_file
    except ImportError:
        return
    save_file(tensors, tmp_path / "y.safetensors")
    got = M.read_safetensors_plain(tmp_path / "y.safetensors")
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_hf_directory_without_safetensors_package(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_safetensors(name, *args, **kw):
        if name.startswith("safetensors"):
            raise ImportError("no safetensors here")
        return real_import(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    m = tiny_model()
    write_hf_dir(tmp_path / "hf", m)
    tokens = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(M.load_model(tmp_path / "hf")(tokens), m(tokens), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_checkpoints_name_file_and_tensor(tmp_path):
    m = tiny_model()
    M.save_model(m, tmp_path / "ok")
    sd = m.state_dict()
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "layers.1.feed_forward.w3.weight"},
                    "missing tensor layers.1.feed_forward.w3.weight"),
        "extra": ({**sd, "layers.0.attention.bias": torch.zeros(3)}, "unexpected tensor layers.0.attention.bias"),
        "shape": ({**sd, "layers.0.attention.wk.weight": torch.zeros(16, 64)},
                  r"tensor layers.0.attention.wk.weight has shape \(16, 64\), expected \(32, 64\)"),
    }
    for name, (bad_sd, message) in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "params.json").write_text((tmp_path / "ok" / "params.json").read_text())
        torch.save(bad_sd, d / "consolidated.00.pth")
        where = name if name == "missing" else f"{name}/consolidated.00.pth"  # the file that holds it
        with pytest.raises(CheckpointError, match=f"{where}: {message}"):
            M.load_model(d)
    # a flipped bit in a tensor's bytes is refused (the zip's CRC-32), naming the file; without CRCs it loads
    data = (tmp_path / "ok" / "consolidated.00.pth").read_bytes()
    at = data.index(sd["layers.1.feed_forward.w2.weight"].numpy().tobytes())
    (tmp_path / "ok" / "consolidated.00.pth").write_bytes(data[:at + 5] + bytes([data[at + 5] ^ 4]) + data[at + 6:])
    with pytest.raises(CheckpointError, match=r"ok/consolidated.00.pth: the bytes of its record .*data/\d+ do not "
                                              "match their CRC-32"):
        M.load_model(tmp_path / "ok")
    torch.serialization.set_crc32_options(False)
    try:
        M.save_model(m, tmp_path / "no_crc")
    finally:
        torch.serialization.set_crc32_options(True)
    torch.testing.assert_close(M.load_model(tmp_path / "no_crc").state_dict(), sd)
    # a truncated file is refused, naming it
    (tmp_path / "ok" / "consolidated.00.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="consolidated.00.pth: cannot read"):
        M.load_model(tmp_path / "ok")
    (tmp_path / "ok" / "params.json").write_text('{"dim": 64, "n_heads": 5}')
    with pytest.raises(CheckpointError, match="params.json: ModelArgs: dim=64 is not a multiple of n_heads=5"):
        M.load_model(tmp_path / "ok")
    (tmp_path / "ok" / "params.json").write_text('{"dim": 64.0, "n_heads": 4}')
    with pytest.raises(CheckpointError, match="params.json: ModelArgs: dim=64.0: sizes must be integers"):
        M.load_model(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="missing_dir: no such folder"):
        M.load_model(tmp_path / "missing_dir")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="empty_dir: neither params.json"):
        M.load_model(tmp_path / "empty_dir")


def test_bad_safetensors_and_shards_are_refused(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", {"a": torch.randn(8)})
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match="x.safetensors: tensor a has data_offsets"):
        M.read_safetensors_plain(tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CheckpointError, match="y.safetensors: header of 1000 bytes"):
        M.read_safetensors_plain(tmp_path / "y.safetensors")
    for header, said in (({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},   # two views of one place
                           "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "tensors a and b overlap"),
                         ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [False, False]}}, "tensor a has")):
        head = json.dumps(header).encode()
        (tmp_path / "z.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + bytes(8))
        with pytest.raises(CheckpointError, match=f"z.safetensors: {said}"):
            M.read_safetensors_plain(tmp_path / "z.safetensors")
    # Meta shards that disagree on their tensors
    m = tiny_model(vocab_size=96)
    write_meta_dir(tmp_path / "meta", m, n_shards=2)
    shard = torch.load(tmp_path / "meta" / "consolidated.01.pth")
    del shard["norm.weight"]
    torch.save(shard, tmp_path / "meta" / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="consolidated.01.pth: tensor norm.weight"):
        M.load_model(tmp_path / "meta")
    shutil.rmtree(tmp_path / "meta")
    write_meta_dir(tmp_path / "meta", m, n_shards=2)   # a norm (whole in every shard) that differs between them,
    shards = [torch.load(tmp_path / "meta" / f"consolidated.0{i}.pth") for i in (0, 1)]   # or a stray tensor
    torch.save({**shards[1], "norm.weight": shards[1]["norm.weight"] * 2}, tmp_path / "meta" / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="consolidated.01.pth: tensor norm.weight, which every shard holds whole"):
        M.load_model(tmp_path / "meta")
    for i in (0, 1):
        torch.save({**shards[i], "step": torch.tensor(3.0)}, tmp_path / "meta" / f"consolidated.0{i}.pth")
    with pytest.raises(CheckpointError, match="unexpected tensor step"):
        M.load_model(tmp_path / "meta")
    shutil.rmtree(tmp_path / "meta")
    write_meta_dir(tmp_path / "meta", m, n_shards=2)
    # an HF config of another architecture
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CheckpointError, match="config.json: model_type gpt2"):
        M.load_model(tmp_path / "hf")
    write_hf_dir(tmp_path / "yarn", tiny_model())
    config = json.loads((tmp_path / "yarn" / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "yarn" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: RoPE .* is neither plain nor Llama 3.1's"):
        M.load_model(tmp_path / "yarn")
    config["rope_scaling"] = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}  # no factor
    (tmp_path / "yarn" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: RoPE .* is neither plain nor Llama 3.1's"):
        M.load_model(tmp_path / "yarn")
    # Meta shards whose pieces do not join
    shard = torch.load(tmp_path / "meta" / "consolidated.00.pth")
    torch.save({**shard, "norm.weight": torch.ones(60)}, tmp_path / "meta" / "consolidated.01.pth")
    shard["layers.0.attention.wq.weight"] = shard["layers.0.attention.wq.weight"][:, :60]
    torch.save(shard, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.\*\.pth: tensor layers.0.attention.wq.weight has "
                                              r"shard shapes \[\(32, 60\), \(32, 64\)\]"):
        M.load_model(tmp_path / "meta")


def test_damaged_zip_records_name_the_file(tmp_path):
    """Bits flipped in a .pth's zip records (not its tensors' bytes) made zipfile raise what it likes."""
    M.save_model(tiny_model(), tmp_path / "ok")
    data = (tmp_path / "ok" / "consolidated.00.pth").read_bytes()
    central = data.index(b"PK\x01\x02")  # the first central directory record; the first local header is at 0
    with zipfile.ZipFile(tmp_path / "ok" / "consolidated.00.pth") as z:
        last = z.infolist()[-1].header_offset  # the last local header
    # zipfile raised NotImplementedError, RuntimeError, UnicodeDecodeError and EOFError, naming no file
    flips = {"compression method": (central + 10, 1), "encrypted flag": (central + 8, 1),
             "name length": (26, 0x20), "extra length": (last + 29, 0x20)}
    for what, (at, bit) in flips.items():
        d = tmp_path / what.replace(" ", "_")
        d.mkdir()
        (d / "params.json").write_text((tmp_path / "ok" / "params.json").read_text())
        (d / "consolidated.00.pth").write_bytes(data[:at] + bytes([data[at] ^ bit]) + data[at + 1:])
        with pytest.raises(CheckpointError, match=f"{d.name}/consolidated.00.pth: "):
            M.load_model(d)


def test_malformed_safetensors_headers_name_file_and_tensor(tmp_path):
    headers = {"noshape": ({"a": {"dtype": "F32", "data_offsets": [0, 4]}}, "tensor a has header entry"),
               "list": ([1], "header is a JSON list"), "entry_str": ({"a": "F32"}, "tensor a has header entry"),
               "offsets1": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4]}}, "tensor a has header entry"),
               "dtype_list": ({"a": {"dtype": [], "shape": [1], "data_offsets": [0, 4]}}, "tensor a has unsupported")}
    for name, (header, message) in headers.items():
        head = json.dumps(header).encode()
        (tmp_path / f"{name}.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + bytes(4))
        with pytest.raises(CheckpointError, match=f"{name}.safetensors: {message}"):
            M.read_safetensors_plain(tmp_path / f"{name}.safetensors")


def test_hf_shapes_and_names_are_checked_before_unpermuting(tmp_path):
    write_hf_dir(tmp_path / "hf", tiny_model())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_size": 96, "num_attention_heads": 6}))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002.safetensors: tensor model.layers.0.self_attn."
                                              r"q_proj.weight has shape \(64, 64\), expected \(96, 96\)"):
        M.load_model(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    write_safetensors(tmp_path / "hf" / "extra.safetensors", {"model.layers.0.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="extra.safetensors: unexpected tensor model.layers.0.weight"):
        M.load_model(tmp_path / "hf")


def test_hf_index_naming_a_missing_shard_names_it(tmp_path):
    """A sharded download cut short (model.safetensors.index.json names a shard that is not there) was reported as
    "missing tensor layers.1.attention.wq.weight", in Meta's name, naming neither the shard nor the index."""
    write_hf_dir(tmp_path / "hf", tiny_model())
    (tmp_path / "hf" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"hf/model.safetensors.index.json: names model-00002-of-00002."
                                              r"safetensors \(tensor model\..*\), which is not in "):
        M.load_model(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a safetensors index"):
        M.load_model(tmp_path / "hf")


def test_malformed_configs_and_state_dicts_name_the_file(tmp_path):
    write_hf_dir(tmp_path / "hf", tiny_model())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for bad, message in [([config], "a JSON list, not an object"), ({**config, "rope_theta": None}, "rope_theta=None"),
                         ({**config, "rms_norm_eps": None}, "norm_eps=None"),
                         ({**config, "intermediate_size": 176.0}, "ffn_hidden_dim=176.0: sizes must be integers")]:
        (tmp_path / "hf" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=f"hf/config.json: .*{message}"):
            M.load_model(tmp_path / "hf")
    with pytest.raises(ValueError, match="ffn_hidden_dim=-1 must be positive"):
        tiny_args(ffn_hidden_dim=-1)
    m = tiny_model()
    M.save_model(m, tmp_path / "meta")
    sd = m.state_dict()
    for held, message in [(torch.zeros(3), "holds a Tensor, not a state dict"),
                          ([1, 2], "holds a list, not a state dict"),
                          ({**sd, "norm.weight": [1.0] * 64}, "tensor norm.weight is not a tensor but list"),
                          ({**sd, "norm.weight": torch.ones(64, dtype=torch.int64)},
                           "tensor norm.weight has dtype torch.int64, not a floating point one")]:
        torch.save(held, tmp_path / "meta" / "consolidated.00.pth")
        with pytest.raises(CheckpointError, match=f"meta/consolidated.00.pth: {message}"):
            M.load_model(tmp_path / "meta")


def test_output_layer_is_tied_only_where_the_checkpoint_says(tmp_path):
    """Meta's layout: both names are saved (Meta's loader is strict: its Transformer always has `output`), the
    tied matrix stored once; an output.weight equal to the embedding is tied (Meta's 3.2 1B/3B say it no other
    way), a missing one too, said aloud. Hugging Face's: the config's tie_word_embeddings decides, and a tensor
    that contradicts it is refused, naming its file."""
    tied = tiny_model(tie_embeddings=True)
    M.save_model(tied, tmp_path / "ours")
    sd = torch.load(tmp_path / "ours" / "consolidated.00.pth")
    meta = MetaModelArgs(max_seq_len=512, max_batch_size=4,
                         **json.loads((tmp_path / "ours" / "params.json").read_text()))
    assert set(sd) == set(meta_shapes(meta))
    assert sd["output.weight"].data_ptr() == sd["tok_embeddings.weight"].data_ptr()   # one copy in the file
    params = json.loads((tmp_path / "ours" / "params.json").read_text())
    del params["tie_embeddings"]                                  # Meta's 3.2 1B: the same matrix twice, no flag
    (tmp_path / "ours" / "params.json").write_text(json.dumps(params))
    torch.save({k: v.clone() for k, v in sd.items()}, tmp_path / "ours" / "consolidated.00.pth")
    loaded = M.load_model(tmp_path / "ours")
    assert loaded.args.tie_embeddings and loaded.output.weight is loaded.tok_embeddings.weight
    m = tiny_model()
    M.save_model(m, tmp_path / "meta")
    assert not M.load_model(tmp_path / "meta").args.tie_embeddings   # two different matrices stay two
    sd = torch.load(tmp_path / "meta" / "consolidated.00.pth")
    torch.save({k: v for k, v in sd.items() if k != "output.weight"}, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.warns(UserWarning, match="no output.weight, so the output layer is tied"):
        loaded = M.load_model(tmp_path / "meta")
    assert loaded.output.weight is loaded.tok_embeddings.weight
    write_hf_dir(tmp_path / "untied", m)
    second = tmp_path / "untied" / "model-00002-of-00002.safetensors"
    tensors = {k: v.clone() for k, v in M.read_safetensors_plain(second).items() if k != "lm_head.weight"}
    write_safetensors(second, tensors)
    with pytest.raises(CheckpointError, match="untied: missing tensor output.weight"):
        M.load_model(tmp_path / "untied")
    tied = tiny_model(tie_embeddings=True)
    write_hf_dir(tmp_path / "tied", tied)
    write_safetensors(tmp_path / "tied" / "extra.safetensors", {"lm_head.weight": torch.randn(97, 64)})
    with pytest.raises(CheckpointError, match="extra.safetensors: output.weight differs from tok_embeddings"):
        M.load_model(tmp_path / "tied")
    write_safetensors(tmp_path / "tied" / "extra.safetensors", {"model.norm.weight": torch.ones(64)})
    with pytest.raises(CheckpointError,
                       match="model-00002-of-00002.safetensors: tensor model.norm.weight is also in extra"):
        M.load_model(tmp_path / "tied")
    write_safetensors(tmp_path / "tied" / "extra.safetensors",
                      {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    with pytest.raises(CheckpointError, match="extra.safetensors: unexpected tensor model.layers.0.self_attn"):
        M.load_model(tmp_path / "tied")


def test_meta_params_get_their_rope_factor_and_context(tmp_path):
    """Meta's params.json of Llama 3.1 and 3.2 say use_scaled_rope but neither the factor (32 for 3.2 1B/3B, and
    Llama Guard 3 1B, pruned to 12 layers; 8 for 3.1) nor the context, 128K (8K for 3.0, without scaling)."""
    for dims, factor, context in [(dict(dim=2048, n_layers=16), 32.0, 131072), (dict(dim=2048, n_layers=12), 32.0,
                                   131072), (dict(dim=4096, n_layers=32), 8.0, 131072),
                                  (dict(dim=4096, n_layers=32, use_scaled_rope=False), 8.0, 8192)]:
        d = tmp_path / f"{dims['dim']}-{dims['n_layers']}-{context}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps({"n_heads": 32, "n_kv_heads": 8, "use_scaled_rope": True, **dims}))
        torch.save({}, d / "consolidated.00.pth")  # the shapes are all this reads
        args = M.read_meta_checkpoint(d)[0]
        assert (args.rope_scaling_factor, args.max_seq_len) == (factor, context)


def test_float8_weights_are_refused(tmp_path):
    """Meta's FP8 405B keeps its scales in fp8_scales_N.pt beside the weights: its float8 tensors would load
    unscaled, silently (float8 counts as floating point). Refused, naming the tensor."""
    m = tiny_model()
    M.save_model(m, tmp_path / "fp8")
    sd = torch.load(tmp_path / "fp8" / "consolidated.00.pth")
    sd["layers.0.feed_forward.w1.weight"] = sd["layers.0.feed_forward.w1.weight"].to(torch.float8_e4m3fn)
    torch.save(sd, tmp_path / "fp8" / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="tensor layers.0.feed_forward.w1.weight has dtype torch.float8_e4m3fn"):
        M.load_model(tmp_path / "fp8")


def test_tied_model_counts_its_shared_matrix_as_the_output_matmul():
    """Tied, the embedding is also the output matmul: num_params() keeps it (MFU counts its FLOPs), once."""
    tied, untied = tiny_model(tie_embeddings=True), tiny_model()
    assert tied.num_params() == tied.num_params(exclude_embedding=False) == \
        untied.num_params(exclude_embedding=False) - 97 * 64


def test_hf_config_llama3_rope_keeps_its_original_context():
    """rope_scaling's original_max_position_embeddings anchors the scaling (not always Llama 3.1's 8192)."""
    config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 97, "intermediate_size": 176, "max_position_embeddings": 64, "rope_theta": 10000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 2048}}
    args = M.args_from_hf_config(config)
    assert args.use_scaled_rope and args.rope_scaling_factor == 8.0 and args.rope_original_context == 2048
    del config["rope_scaling"]["original_max_position_embeddings"]
    assert M.args_from_hf_config(config).rope_original_context == 8192  # the default when the config is silent


def test_hf_config_head_dim_null_is_derived():
    """(review, helper) "head_dim": null is what transformers' LlamaConfig reads as hidden_size / num_attention_heads
    (configs written by other tools carry it: Granite's, Mistral's); it was refused as "head_dim None != ..."."""
    config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 97, "intermediate_size": 176, "head_dim": None}
    assert M.args_from_hf_config(config).head_dim == 16
    with pytest.raises(CheckpointError, match="head_dim 32 != hidden_size / num_attention_heads"):
        M.args_from_hf_config({**config, "head_dim": 32})


def test_meta_shards_that_disagree_say_which_lacks_the_tensor(tmp_path):
    """(review, helper) A shard without a tensor the first holds was reported as "consolidated.01.pth: tensor
    norm.weight is in one shard and not in consolidated.00.pth", the other way round."""
    m = tiny_model(vocab_size=96)
    write_meta_dir(tmp_path / "meta", m, n_shards=2)
    shard = torch.load(tmp_path / "meta" / "consolidated.01.pth")
    torch.save({k: v for k, v in shard.items() if k != "norm.weight"}, tmp_path / "meta" / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.01.pth: tensor norm.weight is missing here but in "
                                              r"consolidated.00.pth$"):
        M.load_model(tmp_path / "meta")
    torch.save({**shard, "extra.weight": torch.zeros(3)}, tmp_path / "meta" / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.01.pth: tensor extra.weight is here but not in "
                                              r"consolidated.00.pth$"):
        M.load_model(tmp_path / "meta")

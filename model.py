"""The Llama 3 transformer, its KV cache, and its checkpoints (ours, Meta's, Hugging Face's).

One file, read top to bottom: ModelArgs and the named shapes -> RMSNorm -> RoPE (with Llama 3.1's
frequency scaling) -> grouped-query attention -> SwiGLU feed-forward -> the chunked loss -> Transformer
(training forward, cached forward for generation, parameter/FLOP counts, optimizer) -> the training device
(peak FLOP/s, bf16, CPU memory) -> checkpoint IO.

Design choices
- Module names are Meta's (tok_embeddings, layers.N.attention.wq, feed_forward.w1, attention_norm, ...),
  so `model.state_dict()` IS Meta's checkpoint layout: consolidated.00.pth loads with no renaming.
- RoPE rotates interleaved pairs (x[2i], x[2i+1]) as Meta does: each pair is a complex number multiplied by
  e^{i * position * freq} (one complex multiply). The rotations are recomputed in each forward (a few ops on
  head_dim/2 numbers), so the model has no buffers: it builds on the meta device, survives `.to(bfloat16)`,
  and FSDP's input casting leaves the complex64 rotations alone (it casts only real floating tensors).
- Attention and RMSNorm go through kernels/ (Triton on GPU, plain PyTorch on CPU). Training passes
  doc_ids so a packed sequence never attends across documents (Llama 3 paper, section 3.2).
- Generation: a KV cache preallocated per layer, written by index. A chunk of tokens at one shared position
  (prefill, a chat turn) goes through kernels.attention on the cache, bottom-right causal. Decoding one token
  per row uses PyTorch's SDPA: a single query row would leave a flash kernel's query tile almost empty, and
  rows at different positions (ragged batches) need a per-row length mask, which the kernel contract has not.
- The training loss (cross_entropy) goes through the rows a chunk at a time and makes its gradients in the forward
  pass, so the logits (at Llama 3's 128K vocabulary the largest activation by far) are never all held.
- Init: N(0, 0.02) for every matrix, the two residual-branch outputs (wo, w2) scaled by 1/sqrt(2 n_layers)
  (GPT-2 paper, section 2.3): each block's update starts small, so the residual stream's variance does not
  grow with depth and the first steps are stable at lr 1e-3 without warm-up tricks.

Run:  python model.py            # prints every preset's parameter count and FLOPs per token
      python model.py --average out/a out/b --out out/ab   # the mean of models of one architecture and tokenizer
Tests: python -m pytest -q tests/test_model.py
"""
import ctypes
import dataclasses
import json
import math
import mmap
import os
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.attention import attention
from kernels.rmsnorm import rms_norm
from tokenizer import atomic_write


# ----------------------------------------------------------------------------------------------------------
# Configuration: Meta's field names (params.json), plus a few of ours

@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None       # grouped-query attention; None means n_heads (plain multi-head)
    vocab_size: int = 128256               # Llama 3: 128000 BPE tokens + 256 special tokens
    multiple_of: int = 256                 # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0           # Llama 3 raised RoPE's base from 10000 (paper, section 3.2)
    use_scaled_rope: bool = False          # Llama 3.1's long-context frequency scaling
    max_seq_len: int = 8192                # Llama 3's pretraining context; caps the KV cache (params.json: context_len)
    # ours (Meta's loaders skip them), written to params.json where they differ from these defaults
    rope_scaling_factor: float = 8.0       # Llama 3.1 uses 8, Llama 3.2 (1B, 3B) uses 32
    rope_original_context: int = 8192      # the context the model was pretrained at, where the scaling is anchored
    tie_embeddings: bool = False           # output shares tok_embeddings (Llama 3.2 1B/3B)
    ffn_hidden_dim: Optional[int] = None   # explicit SwiGLU hidden size (HF configs give intermediate_size)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        sizes = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len",
                 "rope_original_context") + (("ffn_hidden_dim",) if self.ffn_hidden_dim is not None else ())
        bad = [f"{f}={getattr(self, f)!r}" for f in sizes if not isinstance(getattr(self, f), int)]
        if bad:
            raise ValueError(f"ModelArgs: {', '.join(bad)}: sizes must be integers")
        bad = [f"{f}={getattr(self, f)!r}" for f in sizes if getattr(self, f) <= 0]
        if bad:
            raise ValueError(f"ModelArgs: {', '.join(bad)} must be positive")
        reals = ("norm_eps", "rope_theta", "rope_scaling_factor") + \
            (("ffn_dim_multiplier",) if self.ffn_dim_multiplier is not None else ())
        bad = [f"{f}={getattr(self, f)!r}" for f in reals
               if not isinstance(getattr(self, f), (int, float)) or not getattr(self, f) > 0]  # (not NaN either)
        if bad:
            raise ValueError(f"ModelArgs: {', '.join(bad)}: must be a positive number")
        checks = [
            (self.dim % self.n_heads == 0, f"dim={self.dim} is not a multiple of n_heads={self.n_heads}"),
            (self.n_heads % self.n_kv_heads == 0,
             f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"),
            ((self.dim // self.n_heads) % 2 == 0, f"head_dim={self.dim // self.n_heads} must be even for RoPE"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ModelArgs: {message}")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def to_params(self) -> dict:
        """The params.json dict, which Meta's reference code (meta-llama/llama-models) loads as
        `ModelArgs(max_seq_len=..., max_batch_size=..., **params)`, skipping the keys it does not know: Meta's fields,
        ours where they are not the default, and the RoPE factor whenever scaling is on."""
        defaults = ModelArgs()
        ours = {"use_scaled_rope", "rope_scaling_factor", "rope_original_context", "tie_embeddings", "ffn_hidden_dim"}
        params = {k: v for k, v in dataclasses.asdict(self).items()  # (None, Meta's default, is left out, as
                  if (k not in ours or v != getattr(defaults, k)) and v is not None}   # Meta's own files do)
        if self.use_scaled_rope:  # else read_meta_checkpoint would guess the factor at the Llama 3.2 1B/3B shapes
            params.update(rope_scaling_factor=self.rope_scaling_factor,
                          rope_original_context=self.rope_original_context)
        # Meta's loaders pass max_seq_len themselves (the cache they set up), so ours would be a second value
        # for it (TypeError): our context goes under a name they skip
        params["context_len"] = params.pop("max_seq_len")
        hidden = self.ffn_hidden_dim
        if hidden is not None and swiglu_hidden_dim(dataclasses.replace(self, ffn_hidden_dim=None)) != hidden:
            # Meta's loaders skip ffn_hidden_dim too and size the SwiGLU from multiple_of and ffn_dim_multiplier
            # (swiglu_hidden_dim): a multiplier taking int(8/3 dim) to hidden + 0.5, which int() makes hidden (half
            # a unit from float rounding either way), is rounded up to a multiple of hidden: hidden itself
            params.update(multiple_of=hidden, ffn_dim_multiplier=(hidden + 0.5) / int(2 * 4 * self.dim / 3))
        return params

    @classmethod
    def from_params(cls, params: dict) -> "ModelArgs":
        """The inverse of to_params; also reads Meta's params.json and ours from before context_len (max_seq_len)."""
        if not isinstance(params, dict):
            raise ValueError(f"params: a JSON {type(params).__name__}, not an object of fields")
        params = dict(params)
        if "context_len" in params:
            if "max_seq_len" in params:
                raise ValueError("params: both context_len and max_seq_len (the same field, the context)")
            params["max_seq_len"] = params.pop("context_len")
        unknown = sorted(set(params) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"params: unknown fields {unknown}")
        return cls(**params)


PRESETS = {
    # 2.2M parameters with the tokenizer's 8K vocab (half of them the embedding), sized for `python train.py`'s
    # 6 minutes on 2 CPU cores by its val loss there (widths 96 / 128 / 192 / 256: 1.27 / 1.24 / 1.44 / 1.52 bits
    # per byte, 96 and 128 within the noise; until 2026-11-28 it was 256 wide, 6.5M) and by scaling.py's power
    # law (README, Pretraining).
    "cpu": ModelArgs(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=8192, multiple_of=32,
                     rope_theta=10000.0, max_seq_len=256, tie_embeddings=True),
    # Meta's published shapes (params.json of each download; Llama 3 paper, table 3).
    "llama3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5,
                             multiple_of=256, use_scaled_rope=True, rope_scaling_factor=32.0,
                             max_seq_len=131072, tie_embeddings=True),
    "llama3.2-3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0,
                             multiple_of=256, use_scaled_rope=True, rope_scaling_factor=32.0,
                             max_seq_len=131072, tie_embeddings=True),
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
                           multiple_of=1024),
    "llama3-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                            multiple_of=4096),
    "llama3.1-405b": ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2,
                               multiple_of=4096, use_scaled_rope=True, max_seq_len=131072),
}


# ----------------------------------------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019); the fused kernel is in kernels/rmsnorm.py."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def scale_rope_frequencies(freqs, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context=8192):
    """Llama 3.1's RoPE scaling (llama-models, apply_scaling): a frequency whose wavelength is shorter than
    original_context / high_freq_factor is kept, one longer than original_context / low_freq_factor is divided
    by `factor`, and in between the two are blended linearly in original_context / wavelength."""
    wavelen = 2 * math.pi / freqs
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smooth = smooth.clamp(0.0, 1.0)  # 1: short wavelength, keep; 0: long wavelength, divide by factor
    return (1 - smooth) * freqs / factor + smooth * freqs


def rope_frequencies(args, device=None):
    """theta^(-2i/head_dim) for i < head_dim/2 (Su et al. 2021, RoFormer eq. 15), fp32, shape (head_dim/2,)."""
    d = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    if args.use_scaled_rope:
        freqs = scale_rope_frequencies(freqs, args.rope_scaling_factor,
                                       original_context=args.rope_original_context)
    return freqs


def apply_rotary_emb(x, rot):
    """Rotate each pair (x[2i], x[2i+1]) of x (B, T, H, D) by angle position * freq_i.
    rot (B|1, T, 1, D/2) complex64 = e^{i * position * freq} (Transformer.rope)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, D/2): Meta's interleaved pairs
    return torch.view_as_real(pairs * rot).flatten(-2).type_as(x)  # (B, T, H, D)


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): n_heads query heads share n_kv_heads key/value heads,
    which shrinks the KV cache n_heads/n_kv_heads times at almost no quality cost."""

    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache_k = self.cache_v = None  # (B, n_kv_heads, max_seq_len, head_dim) once setup_cache is called

    def forward(self, x, rot, doc_ids=None, start_pos=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, rot), apply_rotary_emb(k, rot)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, head_dim)
        if start_pos is None:
            y = attention(q, k, v, doc_ids)
        else:
            y = self.cached_attention(q, k, v, start_pos)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, C)
        return self.wo(y)

    def cached_attention(self, q, k, v, start_pos):
        """Write this chunk's k, v into the cache at its positions, then attend over everything cached so far.
        start_pos: an int (every row at the same position) or a (B,) tensor (row b's chunk starts at start_pos[b])."""
        B, _, T, _ = q.shape
        if isinstance(start_pos, int):
            end = start_pos + T
            self.cache_k[:B, :, start_pos:end] = k
            self.cache_v[:B, :, start_pos:end] = v
            k, v = self.cache_k[:B, :, :end], self.cache_v[:B, :, :end]
            if T > 1:
                return attention(q, k, v)  # causal, bottom-right: the chunk's queries are the last T positions
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # one new token sees every key
        pos = start_pos[:, None] + torch.arange(T, device=q.device)  # (B, T) absolute position of each query
        rows = torch.arange(B, device=q.device)[:, None]
        self.cache_k[rows, :, pos] = k.transpose(1, 2)  # index update, (B, T, Hkv, head_dim) slots
        self.cache_v[rows, :, pos] = v.transpose(1, 2)
        # Plain PyTorch path: the kernel contract has no per-row lengths. Attend over the whole cache, so every
        # step has the same shapes; slots past a row's position hold junk and are masked.
        keys = torch.arange(self.cache_k.shape[2], device=q.device)
        mask = keys[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, T, S): causal within each row
        return F.scaled_dot_product_attention(q, self.cache_k[:B], self.cache_v[:B], attn_mask=mask,
                                              enable_gqa=True)


def swiglu_hidden_dim(args):
    """Meta's rule: 2/3 of 4*dim (SwiGLU has three matrices, so this keeps the parameters of a 4*dim MLP,
    Shazeer 2020), times ffn_dim_multiplier, rounded up to a multiple of multiple_of. 8B: 4096 -> 14336."""
    if args.ffn_hidden_dim is not None:
        return args.ffn_hidden_dim
    hidden = int(2 * 4 * args.dim / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, args):
        super().__init__()
        hidden = swiglu_hidden_dim(args)
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attention(norm(x)); out = h + feed_forward(norm(h))."""

    def __init__(self, args):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rot, doc_ids=None, start_pos=None):
        h = x + self.attention(self.attention_norm(x), rot, doc_ids, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


# ----------------------------------------------------------------------------------------------------------
# The loss: cross-entropy over a 128K vocabulary without holding the logits

class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softmax(h @ weight.T) against targets (-100: ignored), rows a chunk at a time. The
    loss ends the graph, so d loss / d logits = (softmax - onehot) / n is known in the forward pass: each chunk's
    gradients of h and weight are made there and kept (never its logits); backward only scales them. Matmuls in
    `dtype` (the autocast dtype), softmax and sums in fp32, as autocast does for the plain loss (README, Model)."""

    @staticmethod
    def forward(ctx, h, weight, targets, dtype, chunk, grad_enabled):
        n = (targets != -100).sum()  # the mean is over these (0: nan, like F.cross_entropy)
        grad_h = torch.empty_like(h) if grad_enabled and ctx.needs_input_grad[0] else None  # (no_grad: eval)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if grad_enabled and ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        w = weight.to(dtype)
        for start in range(0, len(h), chunk):
            hc, y = h[start:start + chunk].to(dtype), targets[start:start + chunk]
            logp = torch.log_softmax(hc @ w.t(), dim=-1, dtype=torch.float32)  # (chunk, vocab), fp32
            ignored = y == -100
            y = y.masked_fill(ignored, 0)[:, None]
            total -= logp.gather(1, y)[:, 0].masked_fill(ignored, 0).sum()
            if grad_h is None and grad_w is None:
                continue
            g = logp.exp_()                                            # softmax, in place of the log-probs
            g = g.scatter_add_(1, y, torch.full_like(y, -1, dtype=g.dtype)).to(dtype)  # - onehot(target)
            keep = (~ignored)[:, None].to(dtype)  # ignored rows give no gradient: zero them where it is cheap
            if grad_h is not None:
                grad_h[start:start + chunk] = (g @ w) * keep
            if grad_w is not None:
                grad_w += g.t() @ (hc * keep)  # (vocab, dim), added into fp32 without an fp32 copy
        ctx.save_for_backward(grad_h, grad_w, n)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, n = ctx.saved_tensors
        scale = grad_loss / n.clamp(min=1)  # n = 0: every row ignored, every gradient 0 (F.cross_entropy's), not nan
        return (grad_h * scale.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None, None, None, None, None)


def chunk_rows(weight):
    """Rows per chunk of the logits (weight: (vocab, dim)), here and in align.py's token_logprobs: about 64M logits
    (256 MB in fp32), but at least `dim` rows, so that adding each chunk's (vocab, dim) product into the weight's
    gradient moves at most half the bytes of the chunk's own logits (the 1B model at 128K: 2048-row chunks)."""
    return max(weight.shape[1], (1 << 26) // weight.shape[0])


def cross_entropy(h, weight, targets, chunk=None):
    """Mean cross-entropy of the logits h @ weight.T (h: (..., dim), targets: (...), -100 ignored), in chunks of
    `chunk` rows (default: chunk_rows). Equal to F.cross_entropy(F.linear(h, weight).float(), targets,
    ignore_index=-100), under autocast too."""
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"cross_entropy: hidden states {tuple(h.shape)} and targets {tuple(targets.shape)} do not "
                         "pair up (want h (..., dim) and targets (...))")
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)  # (N, dim), (N,)
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
    chunk = chunk or chunk_rows(weight)
    with torch.autocast(h.device.type, enabled=False):
        return ChunkedCrossEntropy.apply(h, weight, targets, dtype, chunk, torch.is_grad_enabled())


# ----------------------------------------------------------------------------------------------------------
# The model

class Transformer(nn.Module):

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """N(0, 0.02); wo and w2 (the writes into the residual stream) scaled by 1/sqrt(2 n_layers), GPT-2 style.
        Also usable after `to_empty()` on a model built on the meta device."""
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # to_empty() gives each module its own copy
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.args.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def rope(self, positions):
        """positions (B|1, T) -> rotations e^{i * position * freq} (B|1, T, 1, head_dim/2), complex64."""
        angles = positions[..., None].float() * rope_frequencies(self.args, positions.device)  # (B|1, T, D/2)
        return torch.polar(torch.ones_like(angles), angles)[:, :, None]  # broadcast over heads

    def hidden_states(self, tokens, doc_ids=None, start_pos=None):
        """tokens (B, T) -> final-normed hidden states (B, T, dim); doc_ids (B, T) masks attention across docs.
        start_pos (forward_cached): the position of tokens[:, 0], an int or a (B,) tensor; None: 0, no cache."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]  # (1, T)
        if start_pos is not None:
            positions = positions + (start_pos if isinstance(start_pos, int) else start_pos[:, None])  # (B|1, T)
        rot = self.rope(positions)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, rot, doc_ids, start_pos)
        return self.norm(h)

    def forward(self, tokens, targets=None, doc_ids=None):
        """No targets: logits (B, T, vocab) in fp32. With targets (B, T): mean cross-entropy over targets != -100
        (chunked: the logits are never all held, see cross_entropy)."""
        h = self.hidden_states(tokens, doc_ids)
        if targets is None:
            return self.output(h).float()
        return cross_entropy(h, self.output.weight, targets)

    # --- generation: KV cache ------------------------------------------------------------------------------

    def setup_cache(self, batch_size, max_seq_len):
        """Preallocate every layer's K and V: (batch_size, n_kv_heads, max_seq_len, head_dim) each."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"KV cache of {max_seq_len} positions exceeds the model's max_seq_len "
                             f"{self.args.max_seq_len}")
        w = self.tok_embeddings.weight
        for layer in self.layers:
            a = layer.attention
            a.cache_k, a.cache_v = (w.new_zeros(batch_size, a.n_kv_heads, max_seq_len, a.head_dim) for _ in "kv")

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    def forward_cached(self, tokens, start_pos):
        """Run a chunk through the model using and filling the KV cache; returns final-normed hidden states
        (B, T, dim) (apply `model.output` to the positions whose logits you need).
        tokens (B, T); start_pos: int (all rows) or LongTensor (B,) (per row) position of tokens[:, 0]."""
        B, T = tokens.shape
        cache = self.layers[0].attention.cache_k
        if cache is None:
            raise RuntimeError("forward_cached needs model.setup_cache(batch_size, max_seq_len) first")
        # (checked unless a CUDA graph is being captured, which forbids reading a value back from the GPU)
        if not (tokens.is_cuda and torch.cuda.is_current_stream_capturing()):
            last = start_pos + T if isinstance(start_pos, int) else int(start_pos.max()) + T
            if B > cache.shape[0] or last > cache.shape[2]:
                raise ValueError(f"KV cache holds {cache.shape[0]} rows x {cache.shape[2]} positions; "
                                 f"this chunk needs {B} rows x {last}")
        return self.hidden_states(tokens, start_pos=start_pos)

    # --- accounting and optimizer ----------------------------------------------------------------------------

    def num_params(self, exclude_embedding=True):
        """Parameter count (a tied matrix once). The embedding lookup costs no FLOPs, so for MFU it is left out
        unless tied (then it is also the output matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and not self.args.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token, PaLM (Chowdhery et al. 2022) appendix B: 6N (2 forward + 4 backward per
        matmul weight) plus 12 * n_layers * n_heads * head_dim * seq_len for the attention scores and values."""
        a = self.args
        return 6 * self.num_params() + 12 * a.n_layers * a.n_heads * a.head_dim * seq_len

    def configure_optimizer(self, lr, weight_decay, betas=(0.9, 0.95), device_type="cpu"):
        """AdamW; weight decay on matrices (linears, embedding) only, not on norm gains (betas 0.9/0.95: Llama 2 §2.2;
        Llama 3 gives none; eps PyTorch's 1e-8, as torchtitan's, where Llama 2 says 1e-5).
        Fused (one kernel over all tensors) on CUDA and on CPU, where it took 8 ms a step against 21 ms for the
        default per-tensor loop (nanoGPT-sized model, 2 cores)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cuda", "cpu"))


# ----------------------------------------------------------------------------------------------------------
# The device a model trains on: its peak FLOP/s (for MFU), whether it has bf16 matmuls, CPU memory reuse

# Dense bf16 tensor-core peak per card, the "without sparsity" figures of NVIDIA's datasheets: H100 SXM 989.4
# TFLOP/s, H100 NVL 835, H100 PCIe 756 (H100 datasheet), H200 989.4 (H200 datasheet), A100 312 (A100 datasheet).
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12)]


def peak_flops(device):
    """Peak FLOP/s of one card for MFU (= flops_per_token * tokens/s / peak), or None on CPU or a card not listed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def device_problem(name):
    """What is wrong with a --device name (torch does not know it; cuda on a machine without CUDA), or None."""
    try:
        if torch.device(name).type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device here (give --device cpu)"
    except RuntimeError as e:
        return str(e)
    return None


def bf16_matmuls(device):
    """Whether matmuls run natively in bf16: CUDA, or a CPU with AVX512-BF16 (AMD Zen 4, Intel Cooper Lake) or AMX
    (Sapphire Rapids); other CPUs emulate bf16, slower than fp32 (README, Pretraining, has the speed-ups)."""
    return device.type == "cuda" or device.type == "cpu" and any(
        getattr(torch.cpu, f"_is_{isa}_supported", bool)() for isa in ("avx512_bf16", "amx_tile"))  # private: guarded


def keep_freed_memory():
    """CPU training: make glibc's malloc keep freed memory for the next tensor (as preloading jemalloc or tcmalloc
    does). Otherwise each large tensor is a fresh mmap whose pages are zeroed by page faults when first written:
    ~75,000 a step of the old 256-wide preset; kept, none, ~10% faster (README, Pretraining). Both settings are
    needed: the mmap one stops fresh maps, the trim one stops freed memory at the top of the heap going back. The
    cost: the process keeps its peak memory. Returns whether it took effect (False off glibc, e.g. macOS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: ours = Meta's layout (params.json + consolidated.NN.pth + tokenizer.model); Hugging Face's.

class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and the tensor."""


def atomic_save(obj, path):
    """torch.save(obj, path), atomically (a killed process leaves the previous file intact)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_model(model, out_dir, tokenizer_path=None, state_dict=None):
    """Write out_dir/{params.json, consolidated.00.pth[, tokenizer.model]}: Meta's layout, each file atomic.
    state_dict: pass a gathered full state dict when the model is sharded (FSDP); default model.state_dict()."""
    out_dir = Path(out_dir)
    sd = model.state_dict() if state_dict is None else state_dict
    tied = model.args.tie_embeddings
    sd = {k: v.detach().cpu() for k, v in sd.items() if not (k == "output.weight" and tied)}
    if tied:  # Meta's loaders want both names (strict): one tensor, so torch.save stores its bytes once
        sd["output.weight"] = sd["tok_embeddings.weight"]   # (two .cpu() copies of a GPU's would be two)
    atomic_save(sd, out_dir / "consolidated.00.pth")
    if tokenizer_path is not None:
        data = Path(tokenizer_path).read_bytes()
        atomic_write(out_dir / "tokenizer.model", lambda f: f.write(data))
    params = json.dumps(model.args.to_params(), indent=2) + "\n"
    atomic_write(out_dir / "params.json", lambda f: f.write(params.encode()))
    if model.args.use_scaled_rope and model.args.rope_original_context != 8192:   # (train.py --rope_factor)
        warnings.warn(f"{out_dir}: RoPE scaling anchored at {model.args.rope_original_context} tokens; Meta's "
                      "llama-models anchors it at 8192, whatever params.json says, so its code would run this model "
                      "with other RoPE frequencies (ours read rope_original_context)", stacklevel=2)


def load_pth(file):
    """torch.load (CPU, weights only, mmapped) after checking each zip record's CRC-32, which torch.save writes
    (Meta's files too) and torch.load never checks: a flipped bit would load silently. ~3 GB/s on one core. Files
    without CRCs (set_crc32_options(False)) or no zip at all (torch.load decides) are not checked."""
    try:
        with zipfile.ZipFile(file) as z:
            bad = z.testzip() if any(r.CRC for r in z.infolist()) else None
    except (zipfile.BadZipFile, OSError):  # not a zip, or unreadable: torch.load below says what it is
        bad = None
    except Exception as e:  # damaged zip records: zipfile raises EOFError, NotImplementedError, UnicodeDecodeError...
        raise CheckpointError(f"{file}: its zip records are damaged ({e!r}): the file is corrupt "
                              "(copy or download it again)") from e
    if bad is not None:
        raise CheckpointError(f"{file}: the bytes of its record {bad} do not match their CRC-32: the file is "
                              "corrupt (copy or download it again)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, pickle with code in it, not a torch file...
        raise CheckpointError(f"{file}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from e


# Meta trained with fairscale model parallelism; consolidated.NN.pth holds shard NN of each weight.
# The split dimension per layer type (meta-llama/llama3 model.py):
SHARD_DIM = {
    "tok_embeddings": 0,  # VocabParallelEmbedding: vocabulary rows split
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,  # ColumnParallelLinear: output features split
    "wo": 1, "w2": 1,  # RowParallelLinear: input features split
}  # norms (attention_norm, ffn_norm, norm) are replicated in every shard


def read_meta_checkpoint(path):
    """params.json + consolidated.*.pth (one or many model-parallel shards) -> (ModelArgs, state_dict, the file
    each tensor came from)."""
    path = Path(path)
    try:
        params = json.loads((path / "params.json").read_text())
        args = ModelArgs.from_params(params)
    except (ValueError, TypeError, OSError) as e:  # (OSError: a folder named params.json, unreadable)
        raise CheckpointError(f"{path / 'params.json'}: {e}") from e
    if args.use_scaled_rope and "rope_scaling_factor" not in params and args.dim in (2048, 3072):
        # Llama 3.2 1B/3B (and models pruned from them): Meta's params.json omit their factor, 32 not 3.1's 8
        args.rope_scaling_factor = 32.0  # (their config.json; meta-llama/llama-models issues 166 and 241)
    if args.use_scaled_rope and not {"context_len", "max_seq_len"} & params.keys():
        args.max_seq_len = 131072  # nor do they give the context: Llama 3.1's and 3.2's is 128K (config.json)
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{path}: params.json but no consolidated.*.pth")
    # params.json does not say how many shards there are, but their names are numbered 00 .. N-1, and each holds
    # 1/N of wq's n_heads * head_dim rows (a missing last one leaves no gap in the names)
    numbers = {int(m[1]) for f in files if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", f.name))}
    missing = [f"consolidated.{i:02d}.pth" for i in range(max(numbers, default=-1) + 1) if i not in numbers]
    if missing:
        raise CheckpointError(f"{path}: {', '.join(missing)} missing (the shards are numbered up to "
                              f"consolidated.{max(numbers):02d}.pth): a download cut short? (fetch the missing shards)")
    shards = [load_pth(f) for f in files]
    for f, shard in zip(files, shards):
        if not isinstance(shard, dict):
            raise CheckpointError(f"{f}: holds a {type(shard).__name__}, not a state dict (name -> tensor)")
        for key, t in shard.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{f}: tensor {key} is not a tensor but {type(t).__name__}")
    wq, rows = shards[0].get("layers.0.attention.wq.weight"), args.n_heads * args.head_dim
    n = rows // wq.shape[0] if wq is not None and wq.ndim == 2 and wq.shape[0] and rows % wq.shape[0] == 0 else 0
    if n > len(files):
        raise CheckpointError(f"{path}: {', '.join(f'consolidated.{i:02d}.pth' for i in range(len(files), n))} "
                              f"missing (each shard holds 1/{n} of wq's rows, by params.json's n_heads): a download "
                              "cut short?")
    for f, shard in zip(files[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            diff = sorted(shard.keys() ^ shards[0].keys())
            where_else = "missing here but in" if diff[0] in shards[0] else "here but not in"
            raise CheckpointError(f"{f}: tensor {diff[0]} is {where_else} {files[0].name}")
    for shard in shards:
        shard.pop("rope.freqs", None)  # a buffer of RoPE's frequencies some Meta checkpoints carry; we compute it
    where = files[0] if len(files) == 1 else path / "consolidated.*.pth"
    if len(shards) == 1:
        return args, shards[0], dict.fromkeys(shards[0], where)
    sd = {}
    for key in shards[0]:
        parts = [s[key] for s in shards]
        dim = SHARD_DIM.get(key.split(".")[-2]) if "." in key else None  # (a stray name: refused by load_model)
        if dim is None and not all(torch.equal(p, parts[0]) for p in parts[1:]):  # (norms: copies, not parts)
            odd = next(f for f, p in zip(files[1:], parts[1:]) if not torch.equal(p, parts[0]))
            raise CheckpointError(f"{odd}: tensor {key}, which every shard holds whole, differs from {files[0].name}'s")
        try:
            sd[key] = parts[0] if dim is None else torch.cat(parts, dim=dim)
        except RuntimeError:
            raise CheckpointError(f"{where}: tensor {key} has shard shapes {[tuple(p.shape) for p in parts]}, "
                                  f"which do not join along dim {dim}") from None
    return args, sd, dict.fromkeys(sd, where)


# --- Hugging Face: config.json + *.safetensors -------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_plain(file):
    """The safetensors format without the package: 8-byte little-endian header size N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}} (offsets relative to the data after the header), raw
    little-endian data. The tensors are views of one memory map of the file."""
    file = Path(file)
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{file}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CheckpointError(f"{file}: header of {n} bytes does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{file}: header is not JSON ({e})") from e
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: header is a JSON {type(header).__name__}, not an object")
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        info = info if isinstance(info, dict) else {}
        shape, offsets = info.get("shape"), info.get("data_offsets")
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731  (JSON's true is no size)
        if not (isinstance(shape, list) and all(whole(d) and d >= 0 for d in shape) and
                isinstance(offsets, list) and len(offsets) == 2 and all(whole(o) for o in offsets)):
            raise CheckpointError(f"{file}: tensor {name} has header entry {header[name]!r}: expected shape [sizes] "
                                  "and data_offsets [begin, end], integers")
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {info.get('dtype')}")
        begin, end = offsets
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0 or 8 + n + end > size:
            raise CheckpointError(f"{file}: tensor {name} has data_offsets {[begin, end]} that do not hold "
                                  f"shape {shape} {info['dtype']} inside the file")
        spans.append((begin, end, name))
        if nbytes == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=8 + n + begin).view(shape)
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:   # (the safetensors package refuses overlapping tensors too)
            raise CheckpointError(f"{file}: tensors {first} and {second} overlap in the file")
    return out


def read_safetensors(file):
    try:
        from safetensors.torch import load_file
    except ImportError:
        return read_safetensors_plain(file)
    try:
        return load_file(file)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read as safetensors ({type(e).__name__}: {e})") from e


def args_from_hf_config(config, file="config.json"):
    """Hugging Face LlamaConfig fields -> ModelArgs."""
    def get(key, default=None):
        if key not in config and default is None:
            raise CheckpointError(f"{file}: missing field {key}")
        return config.get(key, default)
    if config.get("model_type", "llama") != "llama" or config.get("hidden_act", "silu") != "silu" or \
            config.get("attention_bias") or config.get("mlp_bias"):
        raise CheckpointError(f"{file}: model_type {config.get('model_type')}, hidden_act {config.get('hidden_act')}"
                              f", biases {config.get('attention_bias')}/{config.get('mlp_bias')} is not a Llama "
                              f"(llama, silu, no biases)")
    # RoPE: transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; older configs write
    # rope_theta and rope_scaling {rope_type (or type), factor, ...} (null when unscaled)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{file}: RoPE {rope!r} is not an object")
    args = dict(dim=get("hidden_size"), n_layers=get("num_hidden_layers"), n_heads=get("num_attention_heads"),
                n_kv_heads=config.get("num_key_value_heads"), vocab_size=get("vocab_size"),
                ffn_hidden_dim=get("intermediate_size"), norm_eps=get("rms_norm_eps", 1e-6),
                rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
                max_seq_len=get("max_position_embeddings", 2048),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    expected = dict(low_freq_factor=1.0, high_freq_factor=4.0)
    if kind == "llama3" and "factor" in rope and all(rope.get(k) == v for k, v in expected.items()):
        args.update(use_scaled_rope=True, rope_scaling_factor=rope["factor"],
                    rope_original_context=rope.get("original_max_position_embeddings", 8192))
    elif kind != "default":
        raise CheckpointError(f"{file}: RoPE {rope} is neither plain nor Llama 3.1's (rope_type llama3, {expected})")
    try:
        model_args = ModelArgs(**args)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from e
    if config.get("head_dim") not in (None, model_args.head_dim):  # (null: derived, as in transformers)
        raise CheckpointError(f"{file}: head_dim {config['head_dim']} != hidden_size / num_attention_heads")
    return model_args


def unpermute_hf(w, n_heads):
    """Undo HF's q/k row permutation. HF's rotary code rotates (x[i], x[i + D/2]) where Meta rotates
    (x[2i], x[2i+1]); HF's convert_llama_weights_to_hf.py reorders each head's rows to match. Per head:
    HF row order [0, 2, 4, ..., 1, 3, 5, ...] of Meta's rows -> back to Meta's order."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


HF_NAMES = {  # HF module name -> Meta's
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}


def read_hf_checkpoint(path):
    """config.json + *.safetensors (one file or sharded) -> (ModelArgs, state_dict in Meta's names and layout,
    the file each tensor came from)."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: not JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / 'config.json'}: a JSON {type(config).__name__}, not an object of fields")
    args = args_from_hf_config(config, path / "config.json")
    index = path / "model.safetensors.index.json"
    if index.exists():  # sharded: a download cut short lacks some of the shards its index names
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r}): expected "
                                  '{"weight_map": {tensor: file}}') from e
        if missing:
            name = next(k for k, f in weight_map.items() if f == missing[0])
            raise CheckpointError(f"{index}: names {missing[0]} (tensor {name}, ...), which is not in {path}: "
                                  "a download cut short? (fetch the missing shards)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: config.json but no *.safetensors (only safetensors weights are read)")
    sd, source = {}, {}
    for file in files:
        for name, t in read_safetensors(file).items():
            if name.endswith("rotary_emb.inv_freq"):  # a buffer old HF versions saved; recomputed here
                continue
            key = name.removeprefix("model.")
            if key == "embed_tokens.weight":
                key = "tok_embeddings.weight"
            elif key == "lm_head.weight":
                key = "output.weight"
            elif key.startswith("layers."):
                match = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", key)  # layers.3.self_attn.q_proj.weight
                if match is None or match[2] not in HF_NAMES:  # (a Llama has no biases)
                    raise CheckpointError(f"{file}: unexpected tensor {name}")
                i, module = match.groups()
                key = f"layers.{i}.{HF_NAMES[module]}.weight"
                heads = {"self_attn.q_proj": args.n_heads, "self_attn.k_proj": args.n_kv_heads}.get(module)
                if heads is not None:  # load_model checks the other shapes; unpermuting needs these right first
                    if t.shape != (heads * args.head_dim, args.dim):
                        raise CheckpointError(f"{file}: tensor {name} has shape {tuple(t.shape)}, expected "
                                              f"{(heads * args.head_dim, args.dim)} from config.json")
                    t = unpermute_hf(t, heads)
            if key in sd:
                raise CheckpointError(f"{file}: tensor {name} is also in {source[key].name}")
            sd[key], source[key] = t, file
    return args, sd, source


# --- one entry point ------------------------------------------------------------------------------------------

def model_dir(path):
    """path as a Path, when it is a folder that may hold a model; else a CheckpointError saying what it is."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: {'a file, not a folder' if path.exists() else 'no such folder'}")
    if (path / "manifest.json").exists() and (path / "state.pt").exists():
        run = path.resolve().parent.parent  # (out_dir/ckpt/step_N)
        where = (f"the run's model is {run}" if (run / "params.json").exists() else f"its run {run} exports one when "
                 "it ends (one stopped early: resume it with --max_steps at this checkpoint's step)")
        raise CheckpointError(f"{path}: a training checkpoint (what train.py --resume reads), not an exported model; "
                              f"{where}")
    return path


def tokenizer_path(ckpt_dir):
    """tokenizer.model in the checkpoint directory (ours, Meta's), or original/tokenizer.model (HF downloads)."""
    for path in (model_dir(ckpt_dir) / "tokenizer.model", Path(ckpt_dir) / "original" / "tokenizer.model"):
        if path.exists():
            return path
    raise FileNotFoundError(f"{ckpt_dir}: no tokenizer.model (nor original/tokenizer.model: a Hugging Face download "
                            "has Meta's tokenizer there only when its original/ folder was downloaded too)")


def load_model(path, device="cpu", dtype=None):
    """Load our checkpoint directory, Meta's original download (params.json + consolidated.NN.pth shards), or a
    Hugging Face Llama directory (config.json + safetensors). dtype None keeps the checkpoint's dtype."""
    path = model_dir(path)
    if (path / "params.json").exists():
        args, sd, files = read_meta_checkpoint(path)
        out, emb = sd.get("output.weight"), sd.get("tok_embeddings.weight")
        if not args.tie_embeddings:  # Meta's Llama 3.2 1B/3B: params.json does not say, the same matrix twice does
            if out is None:
                warnings.warn(f"{path}: no output.weight, so the output layer is tied to tok_embeddings", stacklevel=2)
            args.tie_embeddings = out is None or (emb is not None and torch.equal(out, emb))
    elif (path / "config.json").exists():
        args, sd, files = read_hf_checkpoint(path)  # tied or not: config.json's tie_word_embeddings says
    else:
        raise CheckpointError(f"{path}: neither params.json (Meta layout) nor config.json (Hugging Face) found")
    with torch.device("meta"):
        model = Transformer(args)  # shapes only, no memory, no init
    expected = model.state_dict()
    if args.tie_embeddings and "tok_embeddings.weight" in sd:
        out, emb = sd.setdefault("output.weight", sd["tok_embeddings.weight"]), sd["tok_embeddings.weight"]
        if out.data_ptr() != emb.data_ptr() and not torch.equal(out, emb):  # (one storage: ours, saved tied)
            raise CheckpointError(f"{files['output.weight']}: output.weight differs from tok_embeddings.weight, "
                                  "but the config ties them")
    for key in expected:
        if key not in sd:
            raise CheckpointError(f"{path}: missing tensor {key}")
    for key, t in sd.items():
        if key not in expected:
            raise CheckpointError(f"{files.get(key, path)}: unexpected tensor {key}")
        if t.shape != expected[key].shape:
            raise CheckpointError(f"{files.get(key, path)}: tensor {key} has shape {tuple(t.shape)}, expected "
                                  f"{tuple(expected[key].shape)} from the config")
        if not t.is_floating_point() or t.element_size() == 1:  # (float8: a quantized download, scales elsewhere)
            raise CheckpointError(f"{files.get(key, path)}: tensor {key} has dtype {t.dtype}, not a floating point one "
                                  "of 16 bits or more (for Meta's FP8 405B, take the bf16 download)")
    model.load_state_dict(sd, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # assign=True replaced the shared Parameter
    return model.to(device=device, dtype=dtype)


def mean_tensors(dicts, files):
    """{name: tensor} dicts of the same names and shapes -> each tensor's mean, in fp32, back in the first's dtype."""
    for d, file in zip(dicts, files):
        if not isinstance(d, dict) or not all(torch.is_tensor(t) for t in d.values()):
            raise CheckpointError(f"{file}: not a flat {{name: tensor}} dict, which is all that can be averaged")
        other = sorted(k for k in d.keys() | dicts[0].keys() if k not in d or k not in dicts[0]
                       or d[k].shape != dicts[0][k].shape)
        if other:
            raise CheckpointError(f"{file}: tensor {other[0]} is not as in {files[0]} (missing or another shape)")
    return {k: (sum(d[k].float() for d in dicts) / len(dicts)).to(t.dtype) for k, t in dicts[0].items()}


SAME_MODEL = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta", "use_scaled_rope",
              "rope_scaling_factor", "rope_original_context", "tie_embeddings")  # (tensor shapes are checked too)


def average_models(paths, out_dir):
    """Model averaging (Llama 3 section 4.1.5: the RM, SFT and DPO models of runs with other data or hyperparameters
    are averaged): each tensor's mean over models of one architecture and tokenizer, written to a new folder in our
    layout and the first model's dtype, with the other .pth files every folder has (reward_head.pth) averaged too.
    The files are mmapped, so memory holds one fp32 tensor and the mean. All is checked before anything is written."""
    if len({os.path.realpath(p) for p in paths}) < max(len(paths), 2):
        raise ValueError(f"average_models: {', '.join(map(str, paths))}: give two models or more, each once")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise CheckpointError(f"{out_dir}: already there: give a new folder for the mean (its model files would mix "
                              "with the ones there)")
    extras = [{f for f in os.listdir(model_dir(p)) if f.endswith(".pth") and not f.startswith("consolidated.")}
              for p in paths]
    for p, names in zip(paths, extras):
        if names != extras[0]:
            raise CheckpointError(f"{p}: has {sorted(names) or 'no other .pth files'}, {paths[0]} "
                                  f"{sorted(extras[0]) or 'none'}: average models of one kind (a reward model's "
                                  "reward_head.pth beside it)")
    models = [load_model(p) for p in paths]
    for p, m in zip(paths[1:], models[1:]):
        other = [f"{f} {getattr(m.args, f)} (in {paths[0]}: {getattr(models[0].args, f)})" for f in SAME_MODEL
                 if getattr(m.args, f) != getattr(models[0].args, f)]
        if other:
            raise CheckpointError(f"{p}: not the architecture of {paths[0]}: {', '.join(other)}")
    tokenizers = []
    for p in paths:
        try:
            tokenizers.append(tokenizer_path(p))
        except FileNotFoundError:
            tokenizers.append(None)
    if len({t.read_bytes() if t else None for t in tokenizers}) > 1:
        raise CheckpointError(f"{', '.join(map(str, paths))}: not all with the same tokenizer.model: their ids mean "
                              "different text, and the mean of their embeddings would mean nothing")
    tied = models[0].args.tie_embeddings  # (the output matrix is the embedding: averaged once)
    mean = mean_tensors([{k: t for k, t in m.state_dict().items() if not (tied and k == "output.weight")}
                         for m in models], paths)
    means = {name: mean_tensors([load_pth(os.path.join(p, name)) for p in paths],
                                [os.path.join(p, name) for p in paths]) for name in sorted(extras[0])}
    save_model(models[0], out_dir, tokenizer_path=tokenizers[0], state_dict=mean)
    for name, sd in means.items():
        atomic_save(sd, Path(out_dir, name))


if __name__ == "__main__":
    import argparse
    import sys
    parser = argparse.ArgumentParser(description="Print each preset's size, or average models (--average).")
    parser.add_argument("--average", nargs="+", metavar="DIR", help="models of one architecture and tokenizer to "
                        "average (Llama 3 section 4.1.5), written to --out")
    parser.add_argument("--out", help="a new folder, where --average writes the mean model")
    a = parser.parse_args()
    if a.out and not a.average:
        parser.error("--out is where --average writes: give the models to average")
    if a.average:
        if not a.out or len(a.average) < 2:
            parser.error("--average takes two models or more, and --out")
        try:
            average_models(a.average, a.out)
        except (ValueError, OSError) as e:  # (a CheckpointError is a ValueError)
            sys.exit(str(e))
        print(f"{a.out}: the mean of {', '.join(a.average)}")
        sys.exit(0)
    for name, args in PRESETS.items():
        with torch.device("meta"):
            m = Transformer(args)
        print(f"{name:14s} params {m.num_params(exclude_embedding=False) / 1e6:10.1f}M  "
              f"in matmuls (the N of 6N) {m.num_params() / 1e6:10.1f}M  "
              f"FLOPs/token @ {args.max_seq_len} ctx {m.flops_per_token(args.max_seq_len) / 1e9:10.2f}G")

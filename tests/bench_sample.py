"""Benchmark: generation speed of sample.generate against Hugging Face transformers, same weights.

For the "cpu" preset (2.2M), its shape at width 256 (6.5M) and a ~100M Llama, at batch 1 and 8: prefill
tokens/s (the prompt's forward) and decode tokens/s (new tokens, one forward each), ours vs
LlamaForCausalLM.generate (greedy, KV cache, its default SDPA attention). The weights are copied into the HF
model with HF's q/k permutation, and the first step's logits are checked equal before timing. Best of 3 runs
(the machine may be shared).
transformers is imported here only; without it the script prints our figures alone.

    python tests/bench_sample.py                 # CPU (whatever threads torch uses; --threads 1 on a busy machine)
    python tests/bench_sample.py --device cuda   # GPU, fp32 weights on both sides
"""
import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import sample  # noqa: E402

CONFIGS = {   # (6.5M: the cpu preset's shape until 2026-11-28, kept for comparison with older figures)
    "2.2M": M.PRESETS["cpu"],
    "6.5M": dataclasses.replace(M.PRESETS["cpu"], dim=256, n_heads=8, n_kv_heads=4),
    "~100M": M.ModelArgs(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32768, multiple_of=256,
                         rope_theta=500000.0, max_seq_len=1024, tie_embeddings=True),
}


def to_hf(m):
    """The same weights in transformers' LlamaForCausalLM (Meta -> HF: rows of wq/wk permuted per head)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    a = m.args
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=M.swiglu_hidden_dim(a),
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                      tie_word_embeddings=a.tie_embeddings, torch_dtype=torch.float32)
    hf = LlamaForCausalLM(cfg)

    def permute(w, n_heads):
        rows, cols = w.shape
        return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    sd = {"model.embed_tokens.weight": m.tok_embeddings.weight, "model.norm.weight": m.norm.weight,
          "lm_head.weight": m.output.weight}
    for i, layer in enumerate(m.layers):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": permute(layer.attention.wq.weight, a.n_heads),
                   p + "self_attn.k_proj.weight": permute(layer.attention.wk.weight, a.n_kv_heads),
                   p + "self_attn.v_proj.weight": layer.attention.wv.weight,
                   p + "self_attn.o_proj.weight": layer.attention.wo.weight,
                   p + "mlp.gate_proj.weight": layer.feed_forward.w1.weight,
                   p + "mlp.up_proj.weight": layer.feed_forward.w3.weight,
                   p + "mlp.down_proj.weight": layer.feed_forward.w2.weight,
                   p + "input_layernorm.weight": layer.attention_norm.weight,
                   p + "post_attention_layernorm.weight": layer.ffn_norm.weight})
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()})
    hf.generation_config.eos_token_id = None  # never stop early: both sides make exactly n tokens
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def best_times(fns, reps=3):
    """Best wall time of each function, run interleaved (a, b, a, b, ...) so that load from other jobs on a
    shared machine hits both sides alike."""
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


@torch.inference_mode()
def bench(name, args, device, prompt_len, new_tokens, reps):
    torch.manual_seed(0)
    m = M.Transformer(args).to(device).eval()
    hf = None
    try:
        hf = to_hf(m).to(device)
    except ImportError:
        print("(transformers not installed: our figures only)")
    for batch in (1, 8):
        prompt = torch.randint(0, args.vocab_size, (batch, prompt_len), device=device)
        mask = torch.ones_like(prompt)
        if hf is not None:  # same weights, same logits (on CUDA our attention kernel's tl.dot rounds fp32 to tf32:
            diff = (hf(prompt).logits - m(prompt)).abs().max().item()   # 2.5e-3 seen on an H100)
            assert diff < (1e-2 if device == "cuda" else 1e-3), f"HF and ours disagree by {diff}"

        def ours_prefill():
            m.setup_cache(batch, prompt_len + 1)
            m.output(m.forward_cached(prompt, 0)[:, -1])
            m.clear_cache()
        fns = [ours_prefill, lambda: sample.generate(m, prompt.tolist(), new_tokens, temperature=0)]
        if hf is not None:
            fns += [lambda: hf(prompt, attention_mask=mask, use_cache=True, logits_to_keep=1),
                    lambda: hf.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, do_sample=False)]
        t = best_times(fns, reps)
        # prefill: prompt tokens / prefill time; decode: new tokens / (generate time - prefill time)
        rates = [(batch * prompt_len / t[i], batch * new_tokens / (t[i + 1] - t[i])) for i in range(0, len(t), 2)]
        for phase, label in ((0, f"prefill {prompt_len}"), (1, f"decode {new_tokens}")):
            ours = rates[0][phase]
            theirs = f"{rates[1][phase]:12.1f} {ours / rates[1][phase]:7.2f}x" if hf is not None else \
                f"{'-':>12s} {'-':>8s}"
            print(f"{name:12s} {batch:5d}  {label:12s} {ours:12.1f} {theirs}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3, help="runs of each; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"device {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 weights")
    print(f"{'model':12s} {'batch':>5s}  {'phase':12s} {'ours tok/s':>12s} {'HF tok/s':>12s} {'ratio':>8s}")
    for name, args in CONFIGS.items():
        bench(name, args, a.device, a.prompt_len, a.new_tokens, a.reps)


if __name__ == "__main__":
    main()

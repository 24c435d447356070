"""Talk to a model: streamed sampling from a prompt, a chat REPL, and batch generation for align.py.

Design choices
- The KV cache (model.setup_cache / model.forward_cached) turns each new token into one forward over one
  position: the prompt is run once (prefill), then each sampled token is fed back alone (decode).
- A `Session` owns the cache for one conversation: `tokens` is the text so far and `cached` how many of them
  the cache holds. A turn feeds only tokens[cached:], so the conversation stays in the cache between turns,
  and a reply cut by ctrl-C leaves a consistent state (the next feed catches up).
- `generate` is the batched version align.py uses: prompts of different lengths are right-padded and run
  in one prefill (causal attention never looks right, so padding is invisible to the real tokens); each row
  then decodes at its own position, stops at its own stop token, and the log-prob of every sampled token under
  the plain softmax (temperature 1, no top-k/top-p) is returned for PPO. On a GPU, for 16 new tokens or more,
  its decode step is a CUDA graph (cuda_graphed), replayed for every token.
- Sampling: temperature, then top-k, then top-p (nucleus, Holtzman et al. 2019; Meta's llama3 generate uses
  temperature and top-p); temperature 0 is greedy.
- Streaming prints bytes, not per-token strings: a UTF-8 character split across two tokens is decoded once
  complete (an incremental decoder), so no U+FFFD appears mid-stream.

Run:
    python sample.py --ckpt out/default --prompt "def fibonacci(n):" --max_new_tokens 200
    python sample.py --ckpt out/default-sft --chat --system "You are a concise assistant."
    python sample.py --ckpt path/to/Meta-Llama-3-8B-Instruct --chat      # Meta's download, or HF's with its
                                                                         # original/tokenizer.model
Tests: python -m pytest -q tests/test_sample.py      Benchmark: python tests/bench_sample.py
"""
import argparse
import codecs
import math
import numbers
import sys
import warnings

import torch
import torch.nn.functional as F

from model import CheckpointError, device_problem, load_model, tokenizer_path
from tokenizer import Tokenizer


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) fp32 -> next token ids (B,). Checks its arguments: generate and Session.stream come here."""
    if not 0 <= temperature < math.inf:  # (NaN too) below 0 would favour the least likely tokens, inf draws uniformly
        raise ValueError(f"temperature={temperature}: must be >= 0 and finite (0 is greedy)")
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or top_k < 1):  # (numpy ints too)
        raise ValueError(f"top_k={top_k}: must be an integer >= 1 (or None: no top-k)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be within (0, 1] (or None: no top-p)")
    if temperature == 0:
        return logits.argmax(-1)
    # the largest logit becomes 0 before dividing, so a tiny temperature gives -inf (probability 0), never inf - inf
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the top one always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # multinomial renormalises


def cuda_graphed(fn, *args):
    """fn(*args) captured once as a CUDA graph -> a function of new args (same shapes) that copies them into the
    captured inputs, replays the graph and returns its output (overwritten by the next call). One replay launches
    the whole step, where eager PyTorch launches kernel by kernel from Python: what decoding a small model waits on
    (~100M parameters on an H100: 12.5 ms of launches a token, 0.15 ms of weights). One eager call first, on a side
    stream, so that Triton's autotuning and cuBLAS's set-up happen outside the capture."""
    static = [a.clone() for a in args]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)

    def replay(*new):
        for buffer, value in zip(static, new):
            buffer.copy_(value)
        graph.replay()
        return out
    return replay


GRAPH_DEVICES = ("cuda",)  # where generate decodes through cuda_graphed (the tests put an imitation on "cpu")
GRAPH_MIN_TOKENS = 16      # capturing costs about two eager steps: not worth it for fewer new tokens


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(),
             generator=None):
    """Sample a continuation of each prompt (lists of token ids, any lengths) in one batch.
    Returns (tokens, logprobs): per row the new tokens, up to and including the first stop token, and each
    one's log-probability under the model's plain softmax at temperature 1."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate needs at least one prompt and no empty prompt (start with <|begin_of_text|>)")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens {max_new_tokens} < 0")
    for b, p in enumerate(prompts):  # (an id past the embedding: an IndexError, or a device assert on CUDA)
        bad = [t for t in p if not 0 <= t < model.args.vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {b} holds token id {bad[0]}, outside the model's vocabulary of "
                             f"{model.args.vocab_size} (another tokenizer's ids?)")
    was_training = model.training
    model.eval()
    device = model.tok_embeddings.weight.device
    B, lengths = len(prompts), [len(p) for p in prompts]
    T = max(lengths)
    if T + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"a prompt of {T} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"max_seq_len {model.args.max_seq_len}")
    stop_ids = set(stop_ids)
    out_tokens, out_logprobs = [[] for _ in range(B)], [[] for _ in range(B)]
    try:
        model.setup_cache(B, T + max_new_tokens)
        tokens = torch.zeros(B, T, dtype=torch.long, device=device)  # right-padded prompts
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        last = torch.tensor(lengths, device=device) - 1
        h = model.forward_cached(tokens, 0)  # (B, T, dim)
        logits = model.output(h[torch.arange(B, device=device), last]).float()  # (B, V) at each prompt's end
        # equal lengths: one shared position (an int); ragged: a (B,) tensor of per-row positions
        pos = lengths[0] if min(lengths) == T else last + 1
        decode = lambda nxt, pos: model.output(model.forward_cached(nxt[:, None], pos)[:, -1]).float()  # (B, V)
        if device.type in GRAPH_DEVICES and max_new_tokens >= GRAPH_MIN_TOKENS:
            pos = last + 1  # per-row positions for every batch: the step's shapes never change, as a graph needs
            try:
                decode = cuda_graphed(decode, torch.zeros_like(last), pos)
            except RuntimeError as e:  # decoding still works, one kernel launch at a time
                warnings.warn(f"generate: CUDA graph capture failed ({e}); decoding without it")
        done = [False] * B
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            logp = F.log_softmax(logits, dim=-1).gather(-1, nxt[:, None]).squeeze(-1)
            for b, (t, lp) in enumerate(zip(nxt.tolist(), logp.tolist())):
                if not done[b]:
                    out_tokens[b].append(t)
                    out_logprobs[b].append(lp)
                    done[b] = t in stop_ids
            if all(done) or step == max_new_tokens - 1:
                break
            logits = decode(nxt, pos)
            pos = pos + 1  # finished rows keep decoding junk; their output is no longer recorded
    finally:
        model.clear_cache()
        model.train(was_training)
    return out_tokens, out_logprobs


class Session:
    """One conversation's KV cache: tokens (everything said so far) and how many of them are cached."""

    def __init__(self, model, max_len):
        self.model, self.max_len = model, max_len
        model.setup_cache(1, max_len)
        self.tokens, self.cached = [], 0

    @torch.inference_mode()
    def feed(self):
        """Run the tokens not yet in the cache; logits (1, V) for the next token."""
        device = self.model.tok_embeddings.weight.device
        chunk = torch.tensor([self.tokens[self.cached:]], dtype=torch.long, device=device)
        h = self.model.forward_cached(chunk, self.cached)
        self.cached = len(self.tokens)
        return self.model.output(h[:, -1]).float()

    def stream(self, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(), generator=None):
        """Yield sampled tokens one at a time (appended to self.tokens), up to a stop token or the cache end."""
        for _ in range(min(max_new_tokens, self.max_len - len(self.tokens))):
            tok = sample_next(self.feed(), temperature, top_k, top_p, generator).item()
            self.tokens.append(tok)
            yield tok
            if tok in stop_ids:
                return


def load_tokenizer(ckpt_dir):
    """The checkpoint's tokenizer (ours: ckpt/tokenizer.model; Hugging Face's: ckpt/original/tokenizer.model)."""
    try:
        return Tokenizer.load(tokenizer_path(ckpt_dir))
    except ValueError as e:  # a malformed tokenizer.model (the message names file:line) is a bad checkpoint file
        raise CheckpointError(str(e)) from None


def load_checkpoint(ckpt_dir, device="cpu", dtype=None):
    """The checkpoint's model and tokenizer. The tokenizer is read first, so that a missing or malformed one is found
    before the weights are (minutes, at 8B), then checked to fill the vocabulary exactly: more ids than embedding
    rows cannot run, and fewer is a tokenizer.model cut short at a line's end (Meta's format holds no count: such
    a file loads, every special id shifted) or another model's."""
    tok = load_tokenizer(ckpt_dir)
    model = load_model(ckpt_dir, device=device, dtype=dtype)
    if tok.n_words != model.args.vocab_size:
        raise CheckpointError(f"{tokenizer_path(ckpt_dir)}: {tok.n_words} ids, but the model's vocabulary has "
                              f"{model.args.vocab_size}: a file cut short, or another model's")
    return model, tok


def print_stream(tok, tokens):
    """Print tokens as they come; multi-byte characters are printed once their last byte has arrived."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for t in tokens:
        if t not in tok.stop_ids:
            print(decoder.decode(tok.decode_bytes([t])), end="", flush=True)
    print(decoder.decode(b"", final=True))


def chat(model, tok, args, generator):
    """REPL in Llama 3's chat format. ctrl-C stops a reply, ctrl-D exits, /reset starts over."""
    session = Session(model, min(model.args.max_seq_len, args.max_context))
    system = [{"role": "system", "content": args.system}] if args.system else []
    print(f"chat with {args.ckpt} ({session.max_len}-token context). ctrl-C stops a reply, ctrl-D exits, "
          "/reset starts a new conversation.")
    while True:
        try:
            text = input("\n> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if text.strip() == "/reset":
            session.tokens, session.cached = [], 0
            print("(new conversation)")
            continue
        message = [{"role": "user", "content": text}]
        fresh = tok.encode_dialog_prompt(system + message)  # this message as the start of a new conversation
        if len(fresh) >= session.max_len:
            print(f"(that message is {len(fresh)} tokens with the system prompt; the context holds "
                  f"{session.max_len}: shorten it, or raise --max_context if the model allows)")
            continue
        if session.tokens and session.tokens[-1] in tok.stop_ids:  # (sampled, not yet in the cache)
            session.tokens[-1] = tok.eot_id    # (ended by <|end_of_text|>: Meta's format closes a turn with this)
        elif session.tokens:
            session.tokens.append(tok.eot_id)  # close a reply cut short by ctrl-C or the token limit
        # later turns continue the dialog: the same rendering without its <|begin_of_text|> and system prompt
        turn = tok.encode_dialog_prompt(message)[1:] if session.tokens else fresh
        # keep room for a reply (a quarter of the context at most: stream() stops at the cache's end anyway)
        reserve = min(args.max_new_tokens, session.max_len // 4)
        if session.tokens and len(session.tokens) + len(turn) + reserve > session.max_len:
            print(f"(the conversation outgrew the {session.max_len}-token context: starting over with only "
                  f"{'the system prompt and ' if system else ''}this message; /reset does this by hand)")
            session.tokens, session.cached, turn = [], 0, fresh
        session.tokens += turn
        try:
            print_stream(tok, session.stream(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                             tok.stop_ids, generator))
        except KeyboardInterrupt:
            print("\n(stopped)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory: ours, Meta's or Hugging Face's")
    parser.add_argument("--prompt", default=None, help="text to continue")
    parser.add_argument("--chat", action="store_true", help="chat REPL in the Llama 3 chat format")
    parser.add_argument("--system", default=None, help="system prompt for --chat")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--max_context", type=int, default=8192, help="KV cache length for --chat")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if (args.prompt is None) != args.chat or (args.system is not None and not args.chat):  # (one would be ignored)
        parser.error("give --prompt TEXT or --chat (--system goes with --chat), not both")
    if args.max_context != parser.get_default("max_context") and not args.chat:  # (--prompt's cache: prompt + new)
        parser.error("--max_context goes with --chat: --prompt's context is the prompt and --max_new_tokens")
    if not 0 <= args.temperature < math.inf or (args.top_k is not None and args.top_k < 1) or \
            not 0 < args.top_p <= 1 or args.max_new_tokens < 0 or args.max_context < 1:
        parser.error("--temperature must be >= 0 and finite, --top_k >= 1, --top_p within (0, 1], "
                     "--max_new_tokens >= 0, --max_context >= 1")
    if problem := device_problem(args.device):  # (else torch's traceback at its first use)
        parser.error(f"--device {args.device}: {problem}")

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    try:
        model, tok = load_checkpoint(args.ckpt, args.device, dtype)
    except (FileNotFoundError, CheckpointError) as e:
        sys.exit(str(e))
    model.eval()
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    if args.chat:
        return chat(model, tok, args, generator)
    ids = tok.encode(args.prompt, bos=True)
    if len(ids) >= model.args.max_seq_len:
        sys.exit(f"the prompt is {len(ids)} tokens; the model's context is {model.args.max_seq_len}")
    session = Session(model, min(model.args.max_seq_len, len(ids) + args.max_new_tokens))
    session.tokens = list(ids)  # (stream() appends to it; ids stays the prompt)
    print(args.prompt, end="", flush=True)
    try:
        print_stream(tok, session.stream(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                         tok.stop_ids, generator))
    except KeyboardInterrupt:
        print()
        return
    new = len(session.tokens) - len(ids)
    if new < args.max_new_tokens and session.tokens[-1] not in tok.stop_ids:
        print(f"(stopped after {new} new tokens: the model's context of {model.args.max_seq_len} is full)",
              file=sys.stderr)


if __name__ == "__main__":
    main()
